"""The model_dir contract both training paths keep: what is in it, who may write it, and when.

  .estimator_ft.lock   the run lock (flock: released by the kernel when the process dies; a
                       renewed lease on a non-local file system, see lease_lock)
  config.json          the resolved Config and class names, written before training starts;
                       a later run with other checkpoint-defining settings is refused
  initial_weights/     the starting weights, written once (both paths start from them)
  results.json         what the finished run measured (written last)
  untrained-<time>/    the files of a run that stopped before its first checkpoint, set aside
                       when a run of other settings (the corrected command) took model_dir over
  train_history.json   the Estimator path's per-epoch training averages
  keras_history.json   the Keras path's per-epoch history
In a TF_CONFIG cluster only the chief writes these; the other tasks wait for its files.
model_dir may be on any TensorFlow file system (gs://, hdfs://, ram://): every file operation on it
goes through storage.py, which keeps the local calls (fsync, one-step renames) for local folders.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import re
import time
from typing import Optional, Tuple

import tensorflow as tf

from estimator_ft import config as config_lib
from estimator_ft import files
from estimator_ft import messages
from estimator_ft import model as model_lib
from estimator_ft import recipes
from estimator_ft import storage
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
# Where a run that never trained is kept when a run of other settings takes its model_dir over.
UNTRAINED_RUN_PREFIX = "untrained-"
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
  storage.write_json_atomic(os.path.join(model_dir, CONFIG_FILE), record)


def read_run_config(model_dir: str) -> Optional[dict]:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_bytes(path).decode("utf-8"))
  except (OSError, ValueError, tf.errors.OpError) as e:
    raise ValueError(f"{path} is unreadable ({e}). It records the configuration of the run in "
                     "this model_dir; restore it, or use a new --model_dir.") from e


def _differences(previous: dict, config: Config, class_names: Tuple[str, ...]) -> list:
  differences = []
  if list(previous.get("class_names", [])) != list(class_names):
    differences.append(f"class_names: {previous.get('class_names')} -> {list(class_names)}")
  old = previous.get("config", {})
  for name in config_lib.CHECKPOINT_DEFINING_FIELDS:
    if name in old and old[name] != getattr(config, name):
      differences.append(f"{name}: {old[name]!r} -> {getattr(config, name)!r}")
  return differences


def _different_run_error(model_dir: str, differences: list) -> ValueError:
  return ValueError(
      f"--model_dir={model_dir} holds a run with a different configuration "
      f"({'; '.join(differences)}). Resuming would mix the two. Use a new --model_dir, or "
      "repeat the original settings to resume it.")


def check_resumable(config: Config, class_names: Tuple[str, ...], model_dir: str) -> bool:
  """True if model_dir holds an earlier run of the same configuration, False if it is new.

  Raises ValueError when model_dir holds a different run: mixing the two would silently corrupt
  both (other classes, other image size, other training path...).
  """
  previous = read_run_config(model_dir)
  if previous is None:
    return False
  differences, accepted = _resume_differences(previous, config, class_names)
  if differences:
    raise _different_run_error(model_dir, differences)
  _say_accepted(accepted)
  return True


def _say_accepted(accepted: list) -> None:
  for change in accepted:
    logger.info("Resuming with %s.", change)


def _resume_differences(previous: dict, config: Config, class_names: Tuple[str, ...]):
  """(what forbids resuming the recorded run with `config`, the changes a resume accepts)."""
  refused, accepted = recipes.resume_changes(previous.get("config", {}), config.to_dict())
  return _differences(previous, config, class_names) + refused, accepted


def checkpoint_steps(model_dir: str) -> list:
  """The steps of the training checkpoints in model_dir (either path's names), sorted."""
  pattern = re.compile(rf"^(?:{re.escape(ESTIMATOR_CHECKPOINT_NAME)}|"
                       rf"{re.escape(KERAS_CHECKPOINT_NAME)})-(\d+)\.index$")
  return sorted(int(m.group(1)) for m in map(pattern.match, storage.listdir(model_dir)) if m)


def never_trained(model_dir: str) -> bool:
  """True if model_dir's run wrote no checkpoint past step 0 (the starting point) and no results.

  Such a run stopped before its first training checkpoint - a setting that failed after
  config.json was written, an interrupt or a crash in its first steps - so it has nothing a
  resume could continue.
  """
  return (not storage.exists(os.path.join(model_dir, RESULTS_FILE))
          and all(step == 0 for step in checkpoint_steps(model_dir)))


def plan_run(config: Config, class_names: Tuple[str, ...]) -> Tuple[str, list]:
  """What a run of `config` will do with model_dir, read-only: ("new" | "resume" | "replace",
  the differences from the run recorded there).

  "replace": model_dir holds the config.json of a run of another configuration that never
  trained (see never_trained); the new run takes model_dir over and keeps the old run's files
  aside (prepare_model_dir). Raises ValueError for a different run that did train, and for
  checkpoints without a config.json.
  """
  plan, differences, _ = _plan(config, class_names)
  return plan, differences


def _plan(config: Config, class_names: Tuple[str, ...]) -> Tuple[str, list, list]:
  """plan_run's (plan, differences), and the changes a resume accepts ([] unless "resume")."""
  model_dir = config.model_dir
  previous = read_run_config(model_dir)
  if previous is None:
    if _has_checkpoint(model_dir):
      raise ValueError(f"--model_dir={model_dir} holds checkpoints but no {CONFIG_FILE}: "
                       "it was not written by estimator_ft (or that file was deleted). Use a new "
                       "--model_dir rather than mixing runs.")
    return "new", [], []
  # The schedule's rules too (recipes.resume_changes): a single machine used to skip them, so a
  # cosine run resumed with more epochs jumped back up its schedule without a word.
  differences, accepted = _resume_differences(previous, config, class_names)
  if not differences:
    return "resume", [], accepted
  if never_trained(model_dir):
    return "replace", differences, []
  raise _different_run_error(model_dir, differences)


def _set_aside_untrained_run(model_dir: str, differences: list) -> str:
  """Moves the files of a run that never trained into model_dir/untrained-<time>/; returns it.

  Its config.json, initial weights, step-0 checkpoint (the initial weights again, with the old
  run's optimizer settings) and history: nothing is deleted, and nothing of it is resumed.
  """
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  aside = os.path.join(model_dir, f"{UNTRAINED_RUN_PREFIX}{stamp}")
  suffix = 0
  while storage.exists(aside):
    suffix += 1
    aside = os.path.join(model_dir, f"{UNTRAINED_RUN_PREFIX}{stamp}-{suffix}")
  storage.makedirs(aside)
  step_zero = re.compile(rf"^(?:{re.escape(ESTIMATOR_CHECKPOINT_NAME)}|"
                         rf"{re.escape(KERAS_CHECKPOINT_NAME)})-0\.")
  # config.json last: a set-aside interrupted half way still finds a run to replace when the same
  # command starts again, rather than checkpoints without their config.json.
  names = ([os.path.dirname(INITIAL_WEIGHTS_PREFIX), "checkpoint", TRAIN_HISTORY_FILE,
            KERAS_HISTORY_FILE] + [n for n in storage.listdir(model_dir) if step_zero.match(n)]
           + [CONFIG_FILE])
  for name in names:
    source = os.path.join(model_dir, name)
    if storage.isdir(source):
      storage.replace_tree(source, os.path.join(aside, name))
    elif storage.exists(source):
      storage.replace(source, os.path.join(aside, name))
  storage.fsync_directory(model_dir)
  logger.warning("--model_dir=%s held the config.json of a run that never trained, with other "
                 "settings (%s): this run replaces it; that run's files are kept in %s.",
                 model_dir, "; ".join(differences), aside)
  return aside


# ---------------------------------------------------------------- preparing and locking

def ensure_writable_dir(path: str, flag: str = "--model_dir", local_only: str = "") -> None:
  """Creates `path` and proves it is writable, with a what-to-do message if not.

  local_only: why `path` must be a local folder (a job whose reports are written with local
  calls); empty when any TensorFlow file system will do.
  """
  if not storage.is_local(path):
    if local_only:
      raise ValueError(f"{flag}={path}: this must be a local folder ({local_only}). Write it "
                       "locally and copy it, e.g. with gsutil -m cp -r.")
    try:
      storage.makedirs(path)
      probe = os.path.join(path, f".write_probe_{os.getpid()}")
      storage.write_bytes(probe, b"ok")
      storage.remove(probe)
    except tf.errors.OpError as e:
      raise ValueError(f"{flag}={path} is not writable through TensorFlow's file system "
                       f"({messages.short_tf_error(e)}). Check "
                       "the URL, your credentials and that TensorFlow supports its scheme "
                       "(gs:// and ram:// are built in; s3:// and hdfs:// need tensorflow-io); "
                       "nothing was written.") from e
    return
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


def _is_fuse(fs_type: str) -> bool:
  # A FUSE mount (gcsfuse as Vertex AI's /gcs/, s3fs, sshfs...) keeps flock in this machine's
  # kernel: a run on another machine would take the same model_dir unopposed.
  return fs_type == "fuse" or fs_type.startswith("fuse.")


@contextlib.contextmanager
def run_lock(model_dir: str, mounts_file: str = files.MOUNTS_FILE):
  """An exclusive lock on model_dir for the life of this process.

  flock is released by the kernel when the process dies (even by kill -9), so a crashed run never
  leaves a stale lock behind; the file only records who held it last. A model_dir on another
  TensorFlow file system (gs://, hdfs://, ram://) cannot be flocked, and on a FUSE mount flock
  holds on one machine only: there a lease guards it (lease_lock).
  """
  local = storage.is_local(model_dir)
  fs_type = files.mount_fs_type(model_dir, mounts_file) if local else ""
  if not local or _is_fuse(fs_type):
    if local:
      logger.info("--model_dir=%s is on a %s mount, where flock holds on one machine only: the "
                  "run lock is a renewed lease.", model_dir, fs_type)
    with lease_lock(model_dir):
      yield
    return
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


# A lease older than this is a dead run's (its holder renews it every LEASE_RENEW_S).
LEASE_TIMEOUT_S = 120.0
LEASE_RENEW_S = 30.0
# After writing its lease, a run waits this long and reads it back: of two runs that started
# together, only the last writer finds its own lease there.
LEASE_SETTLE_S = 2.0


def _read_lease(path: str) -> Optional[dict]:
  try:
    return json.loads(storage.read_bytes(path).decode("utf-8"))
  except (tf.errors.NotFoundError, FileNotFoundError, ValueError):  # none, or half-written
    return None


@contextlib.contextmanager
def lease_lock(model_dir: str, timeout_s: Optional[float] = None, renew_s: Optional[float] = None,
               settle_s: Optional[float] = None):
  """The run lock of a non-local model_dir: a lease file (holder, time) the holder renews.

  A run refuses a model_dir whose lease is younger than timeout_s; a lease older than that is a
  dead run's and is taken over. Weaker than flock: it relies on roughly synchronised clocks, and
  a run frozen (not dead) for longer than timeout_s loses its lease. Released (deleted) on exit.
  """
  timeout_s = LEASE_TIMEOUT_S if timeout_s is None else timeout_s
  renew_s = LEASE_RENEW_S if renew_s is None else renew_s
  settle_s = LEASE_SETTLE_S if settle_s is None else settle_s
  path = f"{model_dir.rstrip('/')}/{LOCK_FILE}"
  holder = f"pid {os.getpid()} on {os.uname().nodename} ({time.time_ns()})"

  def refuse(lease):
    age_s = time.time() - lease["time"]
    raise RunLockedError(f"--model_dir={model_dir} is in use by {lease['holder']} (its lease was "
                         f"renewed {age_s:.0f} s ago). Wait for that run to finish (or stop it), "
                         "or use another --model_dir. If that run is gone (killed, preempted), "
                         f"its lease expires in {max(timeout_s - age_s, 0):.0f} s: then the same "
                         "command takes model_dir over and resumes.")

  def write():
    storage.write_json_atomic(path, {"holder": holder, "time": time.time()})

  lease = _read_lease(path)
  if lease and time.time() - lease["time"] < timeout_s:
    refuse(lease)
  write()
  time.sleep(settle_s)
  lease = _read_lease(path)
  if not lease:
    raise RunLockedError(f"--model_dir={model_dir}: the run lease {path} vanished right after it "
                         "was written; another run may be starting there. Try again, or use "
                         "another --model_dir.")
  if lease["holder"] != holder:
    refuse(lease)
  stop = threading.Event()

  def renew():
    # A renewal that fails (an object store's transient error) must not end the renewals: the
    # lease would then expire under a live run. A lease another run holds is left to it: it took
    # over after this one went unrenewed for timeout_s, and said so.
    failing_since = None
    while not stop.wait(renew_s):
      try:
        lease = _read_lease(path)
        if lease and lease["holder"] != holder:
          logger.error("--model_dir=%s was taken over by %s: this run's lease went unrenewed for "
                       "over %.0f s. Both runs now write there: stop one of them.", model_dir,
                       lease["holder"], timeout_s)
          return
        write()
        if failing_since is not None:
          logger.info("The run lease %s is renewed again.", path)
        failing_since = None
      except (tf.errors.OpError, OSError) as e:
        failing_since = failing_since or time.monotonic()
        logger.warning("Could not renew the run lease %s (%s); retrying in %g s. Unrenewed for "
                       "%.0f s of the %.0f s after which another run may take --model_dir over.",
                       path, e, renew_s, time.monotonic() - failing_since + renew_s, timeout_s)

  renewer = threading.Thread(target=renew, name="estimator_ft-lease", daemon=True)
  renewer.start()
  try:
    yield
  finally:
    stop.set()
    renewer.join()
    # An error here must not replace what ended the run (its results, or how to resume it).
    try:
      lease = _read_lease(path)
      if lease and lease["holder"] == holder:
        tf.io.gfile.remove(path)
    except (tf.errors.OpError, OSError) as e:
      logger.warning("Could not release the run lease %s (%s). It expires %.0f s after its last "
                     "renewal; until then a new run in --model_dir=%s is refused.", path, e,
                     timeout_s, model_dir)


def prepare_model_dir(config: Config, class_names) -> bool:
  """Checks model_dir is writable and holds nothing foreign; writes config.json.

  Call it while holding the run lock, once every setting has been validated: config.json is the
  first file a run writes. A run of another configuration that never trained is set aside (see
  plan_run). Returns True if an earlier run of the same configuration is resumed.
  """
  ensure_writable_dir(config.model_dir)
  plan, differences, accepted = _plan(config, tuple(class_names))
  if plan == "replace":
    _set_aside_untrained_run(config.model_dir, differences)
  _say_accepted(accepted)
  write_run_config(config, class_names)
  return plan == "resume"


def _has_checkpoint(model_dir: str) -> bool:
  return storage.exists(os.path.join(model_dir, "checkpoint"))



def initial_weights_prefix(config: Config, class_names, values=None) -> str:
  """The run's starting weights, written once per model_dir (so a resume never rebuilds them):
  --weights, or the run --warm_start_from names.

  values: model.initial_weight_values' (weights, source), when the caller built them already
  (to validate the model settings before anything was written).
  """
  prefix = os.path.join(config.model_dir, INITIAL_WEIGHTS_PREFIX)
  if not model_lib.initial_weights_exist(prefix):
    if values is None:
      values = model_lib.initial_weight_values(config, len(class_names), class_names)
    model_lib.write_initial_weights(*values, prefix)
  return prefix


def checkpoint_name(config: Config) -> str:
  """The name of the path's checkpoints in model_dir (`<name>-<global step>`)."""
  return ESTIMATOR_CHECKPOINT_NAME if config.path == "estimator" else KERAS_CHECKPOINT_NAME


def latest_checkpoint_step(model_dir: str) -> int:
  """The global step of model_dir's latest checkpoint; 0 for a new run."""
  latest = tf.train.latest_checkpoint(model_dir)
  if latest is None:
    return 0
  return int(storage.checkpoint_reader(latest).get_tensor(tf.compat.v1.GraphKeys.GLOBAL_STEP))


# ---------------------------------------------------------------- results and histories

def write_results(config: Config, results: dict) -> str:
  path = os.path.join(config.model_dir, RESULTS_FILE)
  storage.write_json_atomic(path, results)
  return path


def read_history(model_dir: str, file_name: str) -> list:
  """One of the per-epoch history files (TRAIN_HISTORY_FILE, KERAS_HISTORY_FILE); [] if none yet."""
  return storage.read_json(os.path.join(model_dir, file_name), [])


def write_history(model_dir: str, file_name: str, history: list) -> None:
  storage.write_json_atomic(os.path.join(model_dir, file_name), history)


# ---------------------------------------------------------------- a cluster's chief

def wait_for_chief(config: Config, class_names: Tuple[str, ...], prefix: str, role: str,
                   timeout_s: float = CHIEF_WAIT_TIMEOUT_S,
                   poll_s: float = CHIEF_WAIT_POLL_S) -> None:
  """Blocks until the chief has prepared model_dir for this run: its config.json and complete
  initial-weights checkpoint.

  A config.json of other settings from a run that never trained is waited out as well: the chief
  sets such a run aside (plan_run's "replace"), but only after its own minutes of setup. Raises
  ValueError at once for a different run that trained, and after timeout_s with what was missing.
  """
  deadline = time.monotonic() + timeout_s
  reported = ""
  while True:
    missing = _missing_for(config, class_names, prefix)
    if not missing:
      return
    if time.monotonic() > deadline:
      raise ValueError(
          f"{role} waited {timeout_s:g} s for the chief to prepare {config.model_dir} ({missing}), "
          "in vain. Check that the chief is running with the same --model_dir and the same flags "
          "as this task, and that model_dir is a folder every task of the cluster can read (a "
          "shared file system).")
    if missing != reported:
      logger.info("%s waits for the chief to prepare %s: %s", role, config.model_dir, missing)
      reported = missing
    time.sleep(poll_s)


def _missing_for(config: Config, class_names: Tuple[str, ...], prefix: str) -> str:
  """What this run's member still waits for in model_dir, "" when nothing."""
  model_dir = config.model_dir
  try:
    previous = read_run_config(model_dir)
  except ValueError as e:  # read while the chief moved it aside
    return str(e)
  if previous is None:
    return f"no {CONFIG_FILE} yet"
  differences, _ = _resume_differences(previous, config, class_names)
  if differences:
    if not never_trained(model_dir):
      raise _different_run_error(model_dir, differences)
    return (f"its {CONFIG_FILE} is a run that never trained, with other settings "
            f"({'; '.join(differences)}), which the chief replaces")
  if not _checkpoint_complete(prefix):
    return f"the initial weights {prefix} are not complete yet"
  return ""


def _checkpoint_complete(prefix: str) -> bool:
  # The index and data files are renamed into place one after the other: wait for both.
  directory = os.path.dirname(prefix) or "."
  data_prefix = os.path.basename(prefix) + ".data-"
  has_data = any(n.startswith(data_prefix) for n in storage.listdir(directory))
  return storage.exists(prefix + ".index") and has_data
