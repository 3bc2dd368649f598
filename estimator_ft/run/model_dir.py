"""The model_dir contract both training paths keep: what is in it, who may write it, and when.

  .estimator_ft.lock   the run lock (flock: released by the kernel when the process dies)
  config.json          the resolved Config and class names, written before training starts;
                       a later run with other checkpoint-defining settings is refused
  initial_weights/     the starting weights, written once (both paths start from them)
  results.json         what the finished run measured (written last)
  train_history.json   the Estimator path's per-epoch training averages
  keras_history.json   the Keras path's per-epoch history
In a TF_CONFIG cluster only the chief writes these; the other tasks wait for its files.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from typing import Optional, Tuple

import tensorflow as tf

from estimator_ft import config as config_lib
from estimator_ft import files
from estimator_ft import model as model_lib
from estimator_ft import recipes
from estimator_ft.config import Config

logger = logging.getLogger("estimator_ft")

CONFIG_FILE = model_lib.RUN_CONFIG_FILE
RESULTS_FILE = "results.json"
LOCK_FILE = ".estimator_ft.lock"
INITIAL_WEIGHTS_PREFIX = os.path.join("initial_weights", "weights")
TRAIN_HISTORY_FILE = "train_history.json"  # the Estimator path's
KERAS_HISTORY_FILE = "keras_history.json"
# Checkpoint names (`<name>-<global step>`): tf.estimator's own, and the Keras path's manager's.
ESTIMATOR_CHECKPOINT_NAME = "model.ckpt"
KERAS_CHECKPOINT_NAME = "ckpt"
# How long a worker or evaluator waits for the chief to write config.json and the initial weights:
# the chief builds the model eagerly first, which takes minutes with ImageNet weights at 224 px.
CHIEF_WAIT_TIMEOUT_S = 600
CHIEF_WAIT_POLL_S = 1.0


class RunLockedError(ValueError):
  """Another live process is training in the same model_dir."""


# ---------------------------------------------------------------- config.json

def write_run_config(config: Config, class_names: Tuple[str, ...], model_dir: Optional[str] = None):
  """Writes `config.json` (the resolved config plus class names) atomically into model_dir."""
  model_dir = model_dir or config.model_dir
  record = {"config": config.to_dict(), "class_names": list(class_names)}
  files.write_json_atomic(os.path.join(model_dir, CONFIG_FILE), record)


def read_run_config(model_dir: str) -> Optional[dict]:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({e}). It records the configuration of the run in "
                     "this model_dir; restore it, or use a new --model_dir.") from e


def check_resumable(config: Config, class_names: Tuple[str, ...], model_dir: str) -> bool:
  """True if model_dir holds an earlier run of the same configuration, False if it is new.

  Raises ValueError when model_dir holds a different run: mixing the two would silently corrupt
  both (other classes, other image size, other training path...).
  """
  previous = read_run_config(model_dir)
  if previous is None:
    return False
  differences = []
  if list(previous.get("class_names", [])) != list(class_names):
    differences.append(f"class_names: {previous.get('class_names')} -> {list(class_names)}")
  old = previous.get("config", {})
  for name in config_lib.CHECKPOINT_DEFINING_FIELDS:
    if name in old and old[name] != getattr(config, name):
      differences.append(f"{name}: {old[name]!r} -> {getattr(config, name)!r}")
  refused, accepted = recipes.resume_changes(old, config.to_dict())
  differences += refused
  if differences:
    raise ValueError(
        f"--model_dir={model_dir} holds a run with a different configuration "
        f"({'; '.join(differences)}). Resuming would mix the two. Use a new --model_dir, or "
        "repeat the original settings to resume it.")
  for change in accepted:
    logger.info("Resuming with %s.", change)
  return True


# ---------------------------------------------------------------- preparing and locking

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
  resuming = check_resumable(config, tuple(class_names), config.model_dir)
  if not resuming and _has_checkpoint(config.model_dir):
    raise ValueError(f"--model_dir={config.model_dir} holds checkpoints but no {CONFIG_FILE}: "
                     "it was not written by estimator_ft (or that file was deleted). Use a new "
                     "--model_dir rather than mixing runs.")
  write_run_config(config, class_names)
  return resuming


def _has_checkpoint(model_dir: str) -> bool:
  return os.path.exists(os.path.join(model_dir, "checkpoint"))


def initial_weights_prefix(config: Config, class_names) -> str:
  """The run's starting weights, written once per model_dir (so a resume never rebuilds them):
  --weights, or the run --warm_start_from names."""
  prefix = os.path.join(config.model_dir, INITIAL_WEIGHTS_PREFIX)
  if not model_lib.initial_weights_exist(prefix):
    model_lib.save_initial_weights(config, len(class_names), prefix, class_names)
  return prefix


def checkpoint_name(config: Config) -> str:
  """The name of the path's checkpoints in model_dir (`<name>-<global step>`)."""
  return ESTIMATOR_CHECKPOINT_NAME if config.path == "estimator" else KERAS_CHECKPOINT_NAME


def latest_checkpoint_step(model_dir: str) -> int:
  """The global step of model_dir's latest checkpoint; 0 for a new run."""
  latest = tf.train.latest_checkpoint(model_dir)
  if latest is None:
    return 0
  return int(tf.train.load_checkpoint(latest).get_tensor(tf.compat.v1.GraphKeys.GLOBAL_STEP))


# ---------------------------------------------------------------- results and histories

def write_results(config: Config, results: dict) -> str:
  path = os.path.join(config.model_dir, RESULTS_FILE)
  files.write_json_atomic(path, results)
  return path


def read_history(model_dir: str, file_name: str) -> list:
  """One of the per-epoch history files (TRAIN_HISTORY_FILE, KERAS_HISTORY_FILE); [] if none yet."""
  return files.read_json(os.path.join(model_dir, file_name), [])


def write_history(model_dir: str, file_name: str, history: list) -> None:
  files.write_json_atomic(os.path.join(model_dir, file_name), history)


# ---------------------------------------------------------------- a cluster's chief

def wait_for_chief(model_dir: str, prefix: str, role: str, timeout_s: float = CHIEF_WAIT_TIMEOUT_S,
                   poll_s: float = CHIEF_WAIT_POLL_S) -> None:
  """Blocks until the chief's config.json and complete initial-weights checkpoint exist."""
  config_path = os.path.join(model_dir, CONFIG_FILE)
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
