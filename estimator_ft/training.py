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

from estimator_ft import config as config_lib
from estimator_ft.config import Config

logger = logging.getLogger("estimator_ft")

RESULTS_FILE = "results.json"
LOCK_FILE = ".estimator_ft.lock"
INITIAL_WEIGHTS_PREFIX = os.path.join("initial_weights", "weights")


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
    reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
    raise ValueError(f"{flag}={path} is not writable ({reason}). Choose a folder you can write to, "
                     "or fix its permissions / free disk space; nothing was trained.") from e


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


def run(config: Config, initial_weights: str = "") -> dict:
  """The train job for either path; returns the results dict also written to results.json."""
  from estimator_ft import data as data_lib
  started = time.time()
  splits = data_lib.load_splits(config)
  class_names = tuple(splits.class_names)
  ensure_writable_dir(config.model_dir)
  with run_lock(config.model_dir):
    resuming = prepare_model_dir(config, class_names)
    logger.info("%s run in %s (%s)", config.path, config.model_dir,
                "resuming from its latest checkpoint" if resuming else "new run")
    prefix = initial_weights or initial_weights_prefix(config, len(class_names))
    if config.path == "estimator":
      from estimator_ft import estimator as path_lib
    else:
      from estimator_ft import keras_path as path_lib
    outcome = path_lib.train(config, splits, prefix)
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
