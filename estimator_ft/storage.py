"""A run's files on this machine or on any TensorFlow file system (gs://, hdfs://, s3://, ram://).

The one place that decides how a path is read and written. A local path keeps the standard
library's calls and what they guarantee: the file flushed to disk before it is renamed over its
target, the folder entry flushed after, a folder renamed in one step (files.py). A URL goes
through tf.io.gfile, the only way to reach it: Python's open() would silently create a local
folder named after the scheme. What a URL gives instead:
  * atomic_write: written beside the target and renamed over it, so a reader never sees half a
    file (TF 2.15's ram:// appends to, rather than truncates, a file opened for writing, so the
    temporary name is fresh every time);
  * replace_tree: file systems that cannot rename a folder in one step (object stores, ram://)
    get its files renamed one by one, the `last` file last (what a reader waits for);
  * no fsync: the file system's own close is what makes a write durable there;
  * listdir keeps only names that exist (ram:// also lists the tails of a folder's siblings);
  * checkpoint_reader: checkpoints read without TensorFlow's guess whether a prefix is a folder
    (ram:// takes every prefix for one).
The run lock is run/model_dir's (flock locally, a lease on a URL).
"""

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import tempfile
import uuid
from typing import List, Optional

import tensorflow as tf

from estimator_ft import files
from estimator_ft.files import is_local


def exists(path: str) -> bool:
  return os.path.exists(path) if is_local(path) else tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
  return os.path.isdir(path) if is_local(path) else tf.io.gfile.isdir(path)


def isfile(path: str) -> bool:
  if is_local(path):
    return os.path.isfile(path)
  return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def listdir(path: str) -> List[str]:
  """The names in folder `path` ([] when it does not exist), without gfile's trailing '/'.

  On a URL each name is checked to exist: TF 2.15's ram:// lists the names of a folder's
  siblings that start with its name too (saved_model/assets also "holds" .extra, the tail of
  saved_model/assets.extra).
  """
  if is_local(path):
    return os.listdir(path) if os.path.isdir(path) else []
  if not tf.io.gfile.isdir(path):
    return []
  names = [name.rstrip("/") for name in tf.io.gfile.listdir(path)]
  return [name for name in names if tf.io.gfile.exists(os.path.join(path, name))]


def glob_in(directory: str, pattern: str) -> List[str]:
  """The paths in `directory` whose names match the shell pattern (sorted). Names only, so the
  directory needs no escaping and every file system matches the same way (fnmatch)."""
  return sorted(os.path.join(directory, name) for name in listdir(directory)
                if fnmatch.fnmatchcase(name, pattern))


def makedirs(path: str) -> None:
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    tf.io.gfile.makedirs(path)


def remove(path: str) -> None:
  if is_local(path):
    os.remove(path)
  else:
    tf.io.gfile.remove(path)


def rmtree(path: str) -> None:
  """Deletes a folder and everything in it; nothing if it is already gone."""
  if is_local(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    # NotFound: gone already, or (ram://) a sibling's name that its listing shows (see listdir):
    # everything else is deleted before that is reported.
    with contextlib.suppress(tf.errors.NotFoundError):
      tf.io.gfile.rmtree(path)


def replace(source: str, target: str) -> None:
  """Renames a file over `target`."""
  if is_local(source):
    os.replace(source, target)
  else:
    tf.io.gfile.rename(source, target, overwrite=True)


def replace_tree(source: str, target: str, last: Optional[str] = None) -> None:
  """Moves folder `source` to `target` (which must not exist).

  Locally one rename: `target` appears complete or not at all. On a URL the files are renamed
  one by one (no TensorFlow file system renames a folder atomically; ram:// moves only the
  folder's own entry), the file named `last` (relative to the folder) after all others, so a
  reader that waits for it never loads a version with files missing.
  """
  if is_local(source):
    os.replace(source, target)
    return
  if tf.io.gfile.exists(target):
    # What os.replace raises for a non-empty folder: renaming file by file would mix the two.
    raise FileExistsError(errno.ENOTEMPTY, "the target folder exists", target)
  deferred = []

  def move(relative):
    makedirs(os.path.join(target, relative))
    for name in listdir(os.path.join(source, relative)):
      inner = os.path.join(relative, name) if relative else name
      if tf.io.gfile.isdir(os.path.join(source, inner)):
        move(inner)
      elif inner == last:
        deferred.append(inner)
      else:
        tf.io.gfile.rename(os.path.join(source, inner), os.path.join(target, inner), overwrite=True)

  move("")
  for inner in deferred:
    tf.io.gfile.rename(os.path.join(source, inner), os.path.join(target, inner), overwrite=True)
  rmtree(source)


def make_unique_dir(parent: str, prefix: str) -> str:
  """A new, empty folder in `parent` named `prefix` + something unique (tempfile.mkdtemp)."""
  if is_local(parent):
    return tempfile.mkdtemp(prefix=prefix, dir=parent)
  path = os.path.join(parent, f"{prefix}{uuid.uuid4().hex[:8]}")
  tf.io.gfile.makedirs(path)
  return path


def fsync_directory(directory: str) -> None:
  """Makes a rename in `directory` durable locally; a URL's file system has no such step."""
  if is_local(directory):
    files.fsync_directory(directory)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
  """`with atomic_write(path) as f: ...` - `path` appears complete when the block ends, or not at
  all (see files.atomic_write; on a URL: a fresh temporary name, then a rename)."""
  if is_local(path):
    with files.atomic_write(path, mode) as handle:
      yield handle
    return
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with tf.io.gfile.GFile(tmp, mode) as handle:
      yield handle
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    with contextlib.suppress(tf.errors.OpError):
      tf.io.gfile.remove(tmp)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes a file that its writer alone reads until published (a staging folder's files)."""
  if is_local(path):
    with open(path, "wb") as f:
      f.write(data)
  else:
    with atomic_write(path, "wb") as f:  # a plain GFile "w" would append to an existing file
      f.write(data)


# GFile.read() with no size asks the file system for the size by name, after opening the file:
# when the file is renamed over in between (a renewed lease, a rewritten config.json), it reads
# the old content cut to the new length. Reading fixed chunks to the end uses the open file only.
_READ_CHUNK_BYTES = 1 << 20


def read_bytes(path: str) -> bytes:
  """The whole content of one version of `path`, even while a writer renames a new one over it."""
  if is_local(path):
    with open(path, "rb") as f:
      return f.read()
  chunks = []
  with tf.io.gfile.GFile(path, "rb") as f:
    while True:
      chunk = f.read(_READ_CHUNK_BYTES)
      if not chunk:
        return b"".join(chunks)
      chunks.append(chunk)


def write_json_atomic(path: str, value) -> None:
  """JSON that a reader (or a crash) never sees half-written, on any file system."""
  with atomic_write(path) as f:
    f.write(files.json_text(value))


def read_json(path: str, default):
  """The JSON value in `path`, or `default` when the file does not exist (yet)."""
  if not exists(path):
    return default
  return json.loads(read_bytes(path).decode("utf-8"))


# ---------------------------------------------------------------- checkpoints

def checkpoint_reader(prefix: str):
  """The reader of the checkpoint at `prefix` (tf.train.load_checkpoint, minus its guess).

  load_checkpoint first asks the file system whether `prefix` is a folder; TF 2.15's ram://
  says yes for any prefix of a file name (its Stat matches by prefix), so there it would look
  for a checkpoint state file inside "model.ckpt-3/" and fail.
  """
  return tf.compat.v1.train.NewCheckpointReader(prefix)


def checkpoint_state_name(prefix: str, folder: str) -> str:
  """How to name the checkpoint `prefix` in `folder` to update_checkpoint_state so that the state
  file holds its name relative to the folder (which then stays movable). TensorFlow keeps a name
  as given under an absolute folder, but passes it through os.path.relpath under any other (a
  relative local path, or a URL), so there it must be given whole."""
  return os.path.relpath(prefix, folder) if os.path.isabs(folder) else prefix
