"""Atomic file writes and JSON reads (standard library only).

Every file a reader (TF Serving, TensorBoard, a resumed run, a person) may open while a run is
writing it goes through `atomic_write`: written beside its target, flushed to disk, renamed over
it, and the folder's entry flushed too, so neither a reader nor a crash ever sees half a file.
"""

import contextlib
import json
import os


def is_local(path: str) -> bool:
  """A path of this machine's file system (flock works), not a TensorFlow URL (gs://, ram://...)."""
  return "://" not in path


MOUNTS_FILE = "/proc/self/mounts"


def mount_fs_type(path: str, mounts_file: str = MOUNTS_FILE) -> str:
  """The type of the file system mounted where `path` lives ("ext4", "fuse.gcsfuse"...), "" if
  unknown (no mounts file: not Linux)."""
  try:
    with open(mounts_file) as f:
      lines = f.read().splitlines()
  except OSError:
    return ""
  real = os.path.realpath(path)
  deepest, fs_type = "", ""
  for line in lines:
    fields = line.split()
    if len(fields) < 3:
      continue
    mount_point = fields[1].replace("\\040", " ")  # the mounts file escapes spaces
    inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
    if inside and len(mount_point) >= len(deepest):  # the last of equal mounts is the visible one
      deepest, fs_type = mount_point, fields[2]
  return fs_type


def fsync_directory(directory: str) -> None:
  """Makes a rename or new entry in `directory` durable (without it a power cut can undo it)."""
  try:
    descriptor = os.open(directory or ".", os.O_RDONLY)
  except OSError:
    return  # a file system without directory handles: nothing more can be done
  try:
    os.fsync(descriptor)
  except OSError:
    pass  # some file systems refuse fsync on a directory; the rename itself was atomic
  finally:
    os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_args):
  """`with atomic_write(path) as f: ...` - `path` appears complete when the block ends, or not at
  all (an exception leaves any earlier version of it untouched)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, mode, **open_args) as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  fsync_directory(os.path.dirname(path))


def json_text(value) -> str:
  """How this package writes a JSON file: indented, keys sorted (stable diffs), a final newline."""
  return json.dumps(value, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str, value) -> None:
  """Writes JSON so that a reader (or a crash) never sees a half-written file."""
  with atomic_write(path) as f:
    f.write(json_text(value))


def read_json(path: str, default):
  """The JSON value in `path`, or `default` when the file does not exist (yet)."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)
