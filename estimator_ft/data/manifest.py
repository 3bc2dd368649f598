"""The scan manifest: each image file's verdict and facts, kept so a later start re-checks only
new or changed files.

Test-decoding every image is what makes bad data fail in seconds, but at 1.3 M JPEGs it takes
close to an hour, and a resumed run, every task of a cluster and `compare` would repeat it. The
manifest remembers, per file (keyed by its path below the folder, its size and its mtime), what
the check found: why it cannot be used (or that it can), and the facts `inspect` reports (format,
size, colour mode, EXIF orientation, a hash of its bytes).

It lives in a cache folder, not in the data folder (which may be read-only or shared): by default
$XDG_CACHE_HOME/estimator_ft/manifests (~/.cache/... without it), one file per data folder named
by a hash of the folder's real path. A manifest that cannot be read, or was written by another
format version or with other check settings, is ignored with a warning - never trusted.
Standard library only.
"""

import dataclasses
import hashlib
import json
import logging
import os
from typing import Dict, Mapping, Optional

from estimator_ft import files

logger = logging.getLogger("estimator_ft")

FORMAT = "estimator_ft.scan_manifest"
# Raise when what a verdict means changes (new checks, new facts): older manifests are ignored.
VERSION = 2
CACHE_SUBDIR = os.path.join("estimator_ft", "manifests")


@dataclasses.dataclass(frozen=True)
class FileFacts:
  """What the check of one file found. `reason` is None for a usable image."""
  reason: Optional[str] = None
  format: str = ""          # JPEG, PNG, GIF, BMP (from the file's header)
  width: int = 0
  height: int = 0
  mode: str = ""            # PIL's mode: L (gray), RGB, RGBA, CMYK, P (palette), ...
  orientation: int = 1      # EXIF orientation (1 = upright); the pipeline decodes unrotated
  sha1: str = ""            # of the file's bytes: duplicates and train/validation leakage

  def to_list(self) -> list:
    return [self.reason, self.format, self.width, self.height, self.mode, self.orientation,
            self.sha1]

  @classmethod
  def from_list(cls, values) -> "FileFacts":
    return cls(*values)


# What a manifest stores per file, as one JSON list per column: 20,000 entries decode about 3x
# faster as columns than as 20,000 small nested lists (this load is most of a second start).
_KEY_COLUMNS = ("path", "size", "mtime_ns")
_FACT_COLUMNS = tuple(field.name for field in dataclasses.fields(FileFacts))


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, CACHE_SUBDIR)


def manifest_path(root: str, cache_dir: str = "") -> str:
  """Where the manifest of data folder `root` lives (one per folder, whatever its name)."""
  digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:20]
  return os.path.join(cache_dir or default_cache_dir(), f"{digest}.json")


def file_key(stat_result) -> list:
  """What identifies an unchanged file: its size and its modification time (ns)."""
  return [stat_result.st_size, stat_result.st_mtime_ns]


class Manifest:
  """{path relative to the folder: (size, mtime_ns, FileFacts)} for one data folder."""

  def __init__(self, root: str, settings: Mapping, entries: Optional[Dict[str, list]] = None):
    self.root = os.path.realpath(root)
    self.settings = dict(settings)
    self._entries = dict(entries or {})

  def lookup(self, relative_path: str, key: list) -> Optional[FileFacts]:
    """The cached facts of a file, if it is unchanged since they were recorded."""
    entry = self._entries.get(relative_path)
    if entry is None or entry[:2] != key:
      return None
    return FileFacts.from_list(entry[2])

  def record(self, relative_path: str, key: list, facts: FileFacts) -> None:
    self._entries[relative_path] = key + [facts.to_list()]

  def keep_only(self, relative_paths) -> None:
    """Forgets files that are gone, so the manifest does not grow with every deletion."""
    wanted = set(relative_paths)
    self._entries = {p: e for p, e in self._entries.items() if p in wanted}

  def __len__(self):
    return len(self._entries)

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    paths = sorted(self._entries)
    entries = [self._entries[p] for p in paths]
    columns = {"path": paths, "size": [e[0] for e in entries],
               "mtime_ns": [e[1] for e in entries]}
    for index, name in enumerate(_FACT_COLUMNS):
      columns[name] = [e[2][index] for e in entries]
    record = {"format": FORMAT, "version": VERSION, "root": self.root, "settings": self.settings,
              "files": columns}
    with files.atomic_write(path) as f:
      json.dump(record, f, separators=(",", ":"))


def _entries_from_columns(columns) -> Dict[str, list]:
  """{path: [size, mtime_ns, facts]} from the stored columns; ValueError if they do not fit."""
  if not isinstance(columns, dict) or set(columns) != set(_KEY_COLUMNS + _FACT_COLUMNS):
    raise ValueError("its columns are not this version's")
  lengths = {len(column) for column in columns.values() if isinstance(column, list)}
  if len(lengths) != 1 or len(columns) != len(_KEY_COLUMNS + _FACT_COLUMNS):
    raise ValueError("its columns differ in length")
  facts = zip(*(columns[name] for name in _FACT_COLUMNS))
  return {path: [size, mtime, list(fact)] for path, size, mtime, fact in
          zip(columns["path"], columns["size"], columns["mtime_ns"], facts)}


def load(root: str, path: str, settings: Mapping) -> Manifest:
  """The manifest at `path` if it is one for this folder and these settings; else an empty one.

  Anything else (damaged, another version, other settings, another folder) is ignored with a
  warning: a wrong verdict would let a bad file into training or keep a good one out.
  """
  empty = Manifest(root, settings)
  if not os.path.exists(path):
    return empty
  problem = None
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
      problem = "it is not a scan manifest"
    elif record.get("version") != VERSION:
      problem = f"it was written by manifest version {record.get('version')}, this is {VERSION}"
    elif record.get("root") != empty.root:
      problem = f"it belongs to {record.get('root')}"
    elif record.get("settings") != empty.settings:
      problem = f"it was made with other check settings ({record.get('settings')})"
    else:
      entries = _entries_from_columns(record.get("files"))
  except (OSError, ValueError, TypeError) as e:
    problem = f"it cannot be read ({e})"
  if problem:
    logger.warning("Ignoring the scan manifest %s (%s): every file of %s is checked again.",
                   path, problem, root)
    return empty
  valid = {p: e for p, e in entries.items()
           if isinstance(p, str) and isinstance(e[0], int) and isinstance(e[1], int)}
  if len(valid) != len(entries):
    logger.warning("Scan manifest %s: %d damaged entries ignored (those files are checked again).",
                   path, len(entries) - len(valid))
  return Manifest(root, settings, valid)
