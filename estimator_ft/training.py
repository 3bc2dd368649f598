"""What every training path shares: the model_dir contract, the run lock, results.json.

`run(config)` is the `estimator-ft train` job: resolve data, prepare model_dir (refusing a foreign
or concurrent run), write the initial weights once, hand over to the chosen path, write results.
"""

import contextlib
import errno
import fcntl
import logging
import os
import time

from estimator_ft import cluster as cluster_lib
from estimator_ft import config as config_lib
from estimator_ft.config import Config

logger = logging.getLogger("estimator_ft")

RESULTS_FILE = "results.json"
LOCK_FILE = ".estimator_ft.lock"
INITIAL_WEIGHTS_PREFIX = os.path.join("initial_weights", "weights")
ESTIMATOR_CHECKPOINT_NAME = "model.ckpt"  # tf.estimator's own name
# How long a worker or evaluator waits for the chief to write config.json and the initial weights:
# the chief builds the model eagerly first, which takes minutes with ImageNet weights at 224 px.
CHIEF_WAIT_TIMEOUT_S = 600
CHIEF_WAIT_POLL_S = 1.0


class RunLockedError(ValueError):
  """Another live process is training in the same model_dir."""


def ensure_writable_dir(path: str, flag: str = "--model_dir") -> None:
  """Creates `path` and proves it is writable, with a what-to-do message if not."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    if e.errno == errno.ENOSPC:
      reason = "the disk is full"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
      reason = "a part of that path is a file, not a folder"
    else:
      reason = e.strerror or str(e)
    raise ValueError(f"{flag}={path} is not writable ({reason}). Choose a folder you can write to, "
                     "or fix its permissions / free disk space; nothing was written.") from e


@contextlib.contextmanager
def run_lock(model_dir: str):
  """An exclusive lock on model_dir for the life of this process.

  flock is released by the kernel when the process dies (even by kill -9), so a crashed run never
  leaves a stale lock behind; the file only records who held it last.
  """
  path = os.path.join(model_dir, LOCK_FILE)
  handle = open(path, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise RunLockedError(f"--model_dir={model_dir} is in use by {holder}. Wait for that run to "
                         "finish (or stop it), or use another --model_dir.") from None
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
  handle.flush()
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def prepare_model_dir(config: Config, class_names) -> bool:
  """Checks model_dir is writable and holds nothing foreign; writes config.json.

  Returns True if an earlier run of the same configuration is resumed.
  """
  ensure_writable_dir(config.model_dir)
  resuming = config_lib.check_resumable(config, tuple(class_names), config.model_dir)
  if not resuming and _has_checkpoint(config.model_dir):
    raise ValueError(f"--model_dir={config.model_dir} holds checkpoints but no {config_lib.CONFIG_FILE}: "
                     "it was not written by estimator_ft (or that file was deleted). Use a new "
                     "--model_dir rather than mixing runs.")
  config_lib.write_run_config(config, class_names)
  return resuming


def _has_checkpoint(model_dir: str) -> bool:
  return os.path.exists(os.path.join(model_dir, "checkpoint"))


def initial_weights_prefix(config: Config, num_classes: int) -> str:
  """The run's starting weights, written once per model_dir (so a resume never rebuilds them)."""
  from estimator_ft import model as model_lib  # TensorFlow only once training really starts
  prefix = os.path.join(config.model_dir, INITIAL_WEIGHTS_PREFIX)
  if not model_lib.initial_weights_exist(prefix):
    model_lib.save_initial_weights(config, num_classes, prefix)
  return prefix


def write_results(config: Config, results: dict) -> str:
  path = os.path.join(config.model_dir, RESULTS_FILE)
  config_lib.write_json_atomic(path, results)
  return path


def checkpoint_name(config: Config) -> str:
  """The name of the path's checkpoints in model_dir (`<name>-<global step>`)."""
  if config.path == "estimator":
    return ESTIMATOR_CHECKPOINT_NAME
  from estimator_ft import keras_path  # pylint: disable=g-import-not-at-top
  return keras_path.CHECKPOINT_NAME


@contextlib.contextmanager
def op_determinism(enabled: bool):
  """--deterministic: TensorFlow ops give bit-identical results run after run, for this run only.

  The switch is process-wide, so it is turned off again afterwards: a later run in the same process
  (tests, compare) must not inherit it (it makes unseeded random ops raise).
  """
  if not enabled:
    yield
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # TF 2.15 exports only the enabling call; the query and the reset live next to it.
  from tensorflow.python.framework import config as tf_framework_config  # pylint: disable=g-direct-tensorflow-import
  was_enabled = tf_framework_config.is_op_determinism_enabled()
  tf.config.experimental.enable_op_determinism()
  try:
    yield
  finally:
    if not was_enabled:
      tf_framework_config.disable_op_determinism()


def _warn_about_inexact_resume(config: Config) -> None:
  if config.exact_resume and config.dropout > 0:
    logger.warning("--exact_resume replays the input stream exactly, but dropout masks come from a "
                   "random stream that restarts with each process: a resumed run matches an "
                   "uninterrupted one exactly only with --dropout=0.")


def _path_module(config: Config):
  if config.path == "estimator":
    from estimator_ft import estimator as path_lib
  else:
    from estimator_ft import keras_path as path_lib
  return path_lib


def run(config: Config, initial_weights: str = "") -> dict:
  """The train job for either path; returns the results dict also written to results.json.

  In a TF_CONFIG cluster only the chief does this; the other roles run `run_cluster_member`.
  """
  with op_determinism(config.deterministic):
    return _run(config, initial_weights)


def _run(config: Config, initial_weights: str) -> dict:
  from estimator_ft import data as data_lib
  from estimator_ft import faults
  task = cluster_lib.current_task()
  if task is not None:
    cluster_lib.check_cluster_settings(config.path, config.distribution, task)
    if config.distribution == "multi_worker_mirrored":
      # First, in every task: TensorFlow sets up collective ops only before a process runs its
      # first op, and the chief and workers wait here until all of them have joined.
      from estimator_ft import estimator as estimator_lib
      estimator_lib.distribution_strategy(config)
    if not task.is_chief:
      return run_cluster_member(config, task, initial_weights)
  started = time.time()
  splits = data_lib.load_splits(config)
  class_names = tuple(splits.class_names)
  ensure_writable_dir(config.model_dir)
  with run_lock(config.model_dir), faults.explained_write_failures(config.model_dir):
    resuming = prepare_model_dir(config, class_names)
    resume_from = (faults.recover_checkpoint_state(config.model_dir, checkpoint_name(config))
                   if resuming else None)
    logger.info("%s run in %s (%s)", config.path, config.model_dir,
                f"resuming from {resume_from}" if resume_from else "starting from the initial weights")
    _warn_about_inexact_resume(config)
    prefix = initial_weights or initial_weights_prefix(config, len(class_names))
    outcome = _path_module(config).train(config, splits, prefix)
    results = {
        "path": config.path,
        "class_names": list(class_names),
        "image_size": config.image_size,
        "train_examples": splits.train.num_examples,
        "validation_examples": splits.validation.num_examples,
        "skipped_images": [{"path": p, "reason": r} for p, r in
                           list(splits.train.skipped) + list(splits.validation.skipped)],
        "update_ops": config.update_ops,
        "wall_time_s": round(time.time() - started, 2),
        "model_dir": config.model_dir,
        **outcome,
    }
    write_results(config, results)
  return results


def run_cluster_member(config: Config, task: "cluster_lib.Task", initial_weights: str = "") -> dict:
  """A worker, parameter server or evaluator of a TF_CONFIG cluster; returns what it did.

  The chief alone owns model_dir (run lock, config.json, initial weights, results.json): the other
  roles would be refused by its lock or race on those files. They wait for the chief's files
  instead and refuse to start with settings that differ from the chief's. A parameter server only
  holds variables, so it starts at once (the chief's session waits for it).
  """
  from estimator_ft import data as data_lib
  splits = data_lib.load_splits(config)
  prefix = initial_weights or os.path.join(config.model_dir, INITIAL_WEIGHTS_PREFIX)
  if task.type != cluster_lib.PS:
    wait_for_chief(config.model_dir, prefix, task.name)
    config_lib.check_resumable(config, tuple(splits.class_names), config.model_dir)
  logger.info("%s of a TF_CONFIG cluster, %s path, model_dir %s", task.name, config.path,
              config.model_dir)
  outcome = _path_module(config).train(config, splits, prefix)
  return {"path": config.path, "role": task.name, "model_dir": config.model_dir, **outcome}


def wait_for_chief(model_dir: str, prefix: str, role: str, timeout_s: float = CHIEF_WAIT_TIMEOUT_S,
                   poll_s: float = CHIEF_WAIT_POLL_S) -> None:
  """Blocks until the chief's config.json and complete initial-weights checkpoint exist."""
  config_path = os.path.join(model_dir, config_lib.CONFIG_FILE)
  deadline = time.monotonic() + timeout_s
  logged = False
  while not (os.path.exists(config_path) and _checkpoint_complete(prefix)):
    if time.monotonic() > deadline:
      raise ValueError(
          f"{role} waited {timeout_s:g} s for the chief to write {config_path} and the initial "
          f"weights {prefix}, in vain. Check that the chief is running with the same --model_dir, "
          "and that model_dir is a folder every task of the cluster can read (a shared file system).")
    if not logged:
      logger.info("%s waits for the chief to prepare %s", role, model_dir)
      logged = True
    time.sleep(poll_s)


def _checkpoint_complete(prefix: str) -> bool:
  # The index and data files are renamed into place one after the other: wait for both.
  directory = os.path.dirname(prefix) or "."
  data_prefix = os.path.basename(prefix) + ".data-"
  has_data = os.path.isdir(directory) and any(n.startswith(data_prefix) for n in os.listdir(directory))
  return os.path.exists(prefix + ".index") and has_data
