"""What a long run must survive: damaged or missing checkpoints, and writes that fail mid-run.

TensorFlow's own behaviour here is either silent or cryptic, and both are unacceptable for a run
that took hours:
  * `tf.train.latest_checkpoint` returns None when model_dir/checkpoint is unreadable or names
    files that are gone, and the run then silently starts over from its initial weights;
  * a truncated or corrupted checkpoint fails deep inside the restore, with a traceback.
`recover_checkpoint_state` runs before a resumed run restores anything: it proves the latest
checkpoint reads back intact (every tensor, CRC-checked) and otherwise falls back, loudly, to the
newest intact one - or refuses with what to do when none is left.

`explain_write_failure` turns a disk-full, quota or permission failure of a checkpoint, summary or
export write into one clear message (the checkpoints written before it are intact).
"""

import contextlib
import errno
import logging
import os
import re
from typing import List, Optional, Tuple

import tensorflow as tf

from estimator_ft import messages
from estimator_ft import storage

logger = logging.getLogger("estimator_ft")

CHECKPOINT_STATE_FILE = "checkpoint"
# A killed or failed save leaves its shards in `<prefix>_temp/`; the next save of that step would
# overwrite them, but until then they can hold hundreds of megabytes.
_TEMP_SUFFIX = "_temp"
# errno values that mean "this place cannot take the write", whoever raised them: Python raises
# OSError(errno), TensorFlow an OpError whose message ends with os.strerror(errno).
WRITE_FAILURE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                        errno.EPERM)


# ---------------------------------------------------------------- checkpoint integrity

def checkpoint_problem(prefix: str) -> Optional[str]:
  """Why the checkpoint at `prefix` cannot be restored, or None if every tensor reads back intact.

  Reads every tensor: the index alone says nothing of the data file, and TensorFlow checks each
  tensor's CRC32C only when it is read. (About a second for ResNet50 with its optimizer slots.)
  """
  if not storage.exists(prefix + ".index"):
    return "its files are missing"
  try:
    reader = storage.checkpoint_reader(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  # The reader raises IndexError for a data file shorter than the index says.
  except (tf.errors.OpError, IndexError, ValueError) as e:
    return f"it cannot be read back ({messages.short_tf_error(e)})"
  return None


def _checkpoints_on_disk(model_dir: str, checkpoint_name: str) -> List[Tuple[int, str]]:
  """[(step, prefix)] of `<checkpoint_name>-<step>` checkpoints with an index file, newest first."""
  pattern = re.compile(re.escape(checkpoint_name) + r"-(\d+)\.index$")
  found = []
  for path in storage.glob_in(model_dir, f"{checkpoint_name}-*.index"):
    match = pattern.search(os.path.basename(path))
    if match:
      found.append((int(match.group(1)), path[:-len(".index")]))
  return sorted(found, reverse=True)


def _step_of(prefix: str) -> Optional[int]:
  suffix = prefix.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else None


def _named_checkpoints(model_dir: str) -> Tuple[Optional[str], List[str], Optional[str]]:
  """(latest, all listed, problem) from model_dir/checkpoint; problem says why it is unusable."""
  state_path = os.path.join(model_dir, CHECKPOINT_STATE_FILE)
  if not storage.exists(state_path):
    return None, [], f"{state_path} is missing"
  # None when the file does not parse (TensorFlow only logs a warning then). TensorFlow has
  # already joined each relative name in it to model_dir (itself maybe relative: runs/demo).
  state = tf.train.get_checkpoint_state(model_dir)
  if state is None or not state.model_checkpoint_path:
    return None, [], f"{state_path} is damaged (it does not name a checkpoint)"
  return state.model_checkpoint_path, list(state.all_model_checkpoint_paths), None


def remove_stale_temporaries(model_dir: str, checkpoint_name: str) -> List[str]:
  """Deletes the `<name>-<step>_temp` folders of saves that were killed or failed; returns them.

  Only call this while holding model_dir's run lock: a live run's save in progress looks the same.
  """
  removed = []
  for path in storage.glob_in(model_dir, f"{checkpoint_name}-*{_TEMP_SUFFIX}"):
    if storage.isdir(path) and _step_of(path[:-len(_TEMP_SUFFIX)]) is not None:
      storage.rmtree(path)
      removed.append(path)
  if removed:
    logger.info("Removed %d unfinished checkpoint save(s) of an earlier run: %s", len(removed),
                ", ".join(os.path.basename(p) for p in removed))
  return removed


def list_unlisted_checkpoints(model_dir: str, checkpoint_name: str) -> List[str]:
  """Makes model_dir/checkpoint list every intact checkpoint on disk; returns those it added.

  A save writes the checkpoint's files, then model_dir/checkpoint: a run stopped in between
  (Ctrl-C, SIGTERM or kill -9 during a save) leaves a complete `<name>-<step>` that nothing
  lists, which a resume would ignore and no retention would ever delete. The newest intact one
  becomes the latest (nothing trained is lost); older ones are listed behind the listed ones, so
  the savers' --keep_checkpoint_max retention deletes them in turn. Data files of a save that
  never got its index (unreadable) are removed. Call it while holding model_dir's run lock.
  """
  latest, listed, state_problem = _named_checkpoints(model_dir)
  if state_problem:
    return []  # a missing or damaged state file: recover_checkpoint_state's fallback handles it
  on_disk = _checkpoints_on_disk(model_dir, checkpoint_name)
  listed = [p for p in listed if storage.exists(p + ".index")]
  if latest and storage.exists(latest + ".index") and latest not in listed:
    listed.append(latest)
  latest_step = max((_step_of(p) or 0 for p in listed), default=-1)
  _remove_data_without_index(model_dir, checkpoint_name, latest_step)
  unlisted = [prefix for _, prefix in sorted(on_disk) if prefix not in listed]
  added = [prefix for prefix in unlisted if checkpoint_problem(prefix) is None]
  if not added:
    return []
  ordered = sorted(set(listed) | set(added), key=lambda p: _step_of(p) or 0)
  tf.compat.v1.train.update_checkpoint_state(
      model_dir, storage.checkpoint_state_name(ordered[-1], model_dir),
      all_model_checkpoint_paths=[storage.checkpoint_state_name(p, model_dir) for p in ordered])
  logger.info("Listed %d complete checkpoint(s) that model_dir/checkpoint did not name (a save "
              "was interrupted before it could record them): %s", len(added),
              ", ".join(os.path.basename(p) for p in added))
  return added


def _remove_data_without_index(model_dir: str, checkpoint_name: str, latest_step: int) -> None:
  pattern = re.compile(re.escape(checkpoint_name) + r"-(\d+)\.data-\d+-of-\d+$")
  for path in storage.glob_in(model_dir, f"{checkpoint_name}-*.data-*"):
    match = pattern.search(os.path.basename(path))
    if (match and int(match.group(1)) > latest_step
        and not storage.exists(path[:path.rindex(".data-")] + ".index")):
      storage.remove(path)
      logger.info("Removed %s: the data of a save that was interrupted before its index.",
                  os.path.basename(path))


def recover_checkpoint_state(model_dir: str, checkpoint_name: str) -> Optional[str]:
  """The checkpoint a run in model_dir will resume from, proven intact; None for a fresh start.

  When the latest checkpoint is damaged or gone (or model_dir/checkpoint is), the newest intact
  `<checkpoint_name>-<step>` checkpoint becomes the latest - model_dir/checkpoint is rewritten
  to name it - and a warning says what was wrong. Falling back is safe: a checkpoint holds the
  whole training state (weights, optimizer, step), and the history files are keyed by epoch, so
  the epochs after it are simply trained again. Raises ValueError when no intact one is left.
  Call it while holding model_dir's run lock.
  """
  remove_stale_temporaries(model_dir, checkpoint_name)
  list_unlisted_checkpoints(model_dir, checkpoint_name)
  on_disk = _checkpoints_on_disk(model_dir, checkpoint_name)
  latest, listed, state_problem = _named_checkpoints(model_dir)
  if state_problem and not on_disk:
    return None  # nothing was ever checkpointed here: a fresh start is right
  if latest is not None:
    problem = checkpoint_problem(latest)
    if problem is None:
      return latest
    problem = f"the latest checkpoint {latest} is unusable: {problem}"
  else:
    problem = state_problem

  damaged = {latest} if latest else set()
  for _, prefix in on_disk:
    if prefix in damaged:
      continue
    reason = checkpoint_problem(prefix)
    if reason is None:
      _make_latest(model_dir, prefix, listed)
      logger.warning(
          "%s. Resuming from %s instead: the newest intact checkpoint (step %s); the steps after it "
          "are trained again.%s", problem[0].upper() + problem[1:], prefix, _step_of(prefix),
          f" Delete the damaged files {latest}.* to free their space." if latest and
          storage.exists(latest + ".index") else "")
      return prefix
    damaged.add(prefix)
  also_damaged = sorted((p for p in damaged if p and p != latest), key=_step_of)
  also_note = (f" (also damaged: {', '.join(os.path.basename(p) for p in also_damaged)})"
               if also_damaged else "")
  raise ValueError(
      f"--model_dir={model_dir} cannot be resumed: {problem}, and no intact earlier checkpoint "
      f"is left{also_note}. To train this run over from its start, move the {checkpoint_name}-* "
      f"files and {CHECKPOINT_STATE_FILE} out of model_dir; or use a new --model_dir.")


def _make_latest(model_dir: str, prefix: str, listed: List[str]) -> None:
  """Rewrites model_dir/checkpoint to name `prefix`, keeping the older listed ones tracked."""
  step = _step_of(prefix)
  older = [p for p in listed if p != prefix and (_step_of(p) or 0) < step and
           storage.exists(p + ".index")]
  tf.compat.v1.train.update_checkpoint_state(
      model_dir, storage.checkpoint_state_name(prefix, model_dir),
      all_model_checkpoint_paths=[storage.checkpoint_state_name(p, model_dir) for p in older + [prefix]])



# ---------------------------------------------------------------- failed writes

def write_failure_errno(error: BaseException) -> Optional[int]:
  """The errno of a failed write (disk full, quota, file too large, read-only...), or None."""
  if isinstance(error, OSError):
    return error.errno if error.errno in WRITE_FAILURE_ERRNOS else None
  if isinstance(error, tf.errors.OpError):
    message = getattr(error, "message", "") or str(error)
    for number in WRITE_FAILURE_ERRNOS:
      if os.strerror(number) in message:
        return number
  return None


def explain_write_failure(error: BaseException, model_dir: str,
                          job: str = "train") -> Optional[ValueError]:
  """A what-to-do ValueError for a write that failed mid-run, or None if `error` is not one.

  `job` is "train" (model_dir is --model_dir) or "export" (model_dir is the export base).
  """
  number = write_failure_errno(error)
  if number is None:
    return None
  written = _failed_file(error, number)
  if written and not _is_inside(written, model_dir):
    return None  # some other file's problem: the original error says more
  if number in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    remedy = "free disk space (or raise the quota / file size limit)"
  else:
    remedy = "make it writable again"
  failure = f"({os.strerror(number)}{f', writing {written}' if written else ''})"
  if job == "export":
    return ValueError(
        f"Export failed: a write under {model_dir} failed {failure}. No partial version was "
        f"published (versions are written to a staging folder first): {remedy}, then re-run "
        "`estimator-ft export`.")
  return ValueError(
      f"Training stopped: a write under --model_dir={model_dir} failed {failure}. The checkpoints "
      f"written before it are intact: {remedy}, then re-run the same command to resume from the "
      "latest one.")


def _failed_file(error: BaseException, number: int) -> Optional[str]:
  """The file a failed write was writing, when the error names it."""
  if isinstance(error, OSError):
    return error.filename
  # TensorFlow: "<path>; <strerror>", on some line of a possibly multi-line graph error.
  for line in (getattr(error, "message", "") or str(error)).splitlines():
    line = messages.short_tf_error(Exception(line))
    if line.endswith(f"; {os.strerror(number)}"):
      return line[:-len(f"; {os.strerror(number)}")].strip() or None
  return None


def _is_inside(path: str, folder: str) -> bool:
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return os.path.commonpath([path, folder]) == folder


@contextlib.contextmanager
def explained_write_failures(model_dir: str, job: str = "train"):
  """Re-raises a failed write inside the block as explain_write_failure's ValueError."""
  try:
    yield
  except (OSError, tf.errors.OpError) as e:
    explained = explain_write_failure(e, model_dir, job)
    if explained is None:
      raise
    raise explained from e
