"""The image-folder source: `<root>/<class>/<image>`, listed and checked before training.

Every image is test-decoded by the pipeline's own decoder, so bad data fails in seconds with every
bad file named, not hours into a run. The verdicts are kept in a scan manifest (data/manifest.py):
a later start on the same folder decodes only the files that are new or changed.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import os
import stat
import threading
import time
from typing import List, Optional, Tuple

import tensorflow as tf
from PIL import Image

from estimator_ft import config as config_lib
from estimator_ft import contract
from estimator_ft import image_formats
from estimator_ft import messages
from estimator_ft import progress
from estimator_ft.data import images
from estimator_ft.data import manifest as manifest_lib
from estimator_ft.data.manifest import FileFacts
from estimator_ft.data.split import DataError, Split

# How many bad files the skip warning names; the full list is in Split.skipped.
_MAX_LOGGED_BAD_FILES = 20
# A scan longer than this logs a progress line this often.
PROGRESS_EVERY_S = 5.0
# A first scan of a large folder (1.3 M JPEGs: close to an hour) saves the verdicts it has so far
# this often, so an interrupted scan (preemption, kill, OOM) is not all redone at the next start.
MANIFEST_SAVE_EVERY_S = 300.0
# Files handed to the decoding threads at a time: ThreadPoolExecutor.map submits its whole input
# at once, and 1.28 M pending submissions cost 2.5 GB.
_EXAMINE_CHUNK_FILES = 4096
# The EXIF tag that says how a camera held the picture; TF's decoders ignore it.
_EXIF_ORIENTATION_TAG = 0x0112
# How many files shared by two classes the error names.
_MAX_SHOWN_SHARED_FILES = 3
# Images above this size are test-decoded one at a time, so the scan's threads can never hold
# several of them at once: up to --max_image_pixels each, 3 bytes per pixel (~270 MB by default).
_LARGE_IMAGE_PIXELS = 16_000_000
_one_large_decode = threading.Lock()

logger = logging.getLogger("estimator_ft")


@dataclasses.dataclass(frozen=True)
class FolderSurvey:
  """Every file of an image folder with what its check found; no policy applied yet."""
  root: str
  name: str
  class_names: tuple
  files: tuple          # ((path, class index, FileFacts), ...) in folder order
  decoded: int          # files test-decoded by this survey (the others came from the manifest)
  manifest: str = ""    # the manifest file read and written ("" with use_manifest=False)
  shared: tuple = ()    # groups of ((path, class index), ...): one file under several classes

  def bad(self) -> List[Tuple[str, str]]:
    return [(path, facts.reason) for path, _, facts in self.files if facts.reason]


def check_image_data(path: str, data: bytes,
                     max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
  """Why the pipeline could not use these bytes of file `path`, or None if they decode.

  Named pipes, sockets and devices are refused unread (see image_formats.read_image_file), and
  an image whose header declares more than `max_pixels` pixels is refused before it is decoded.
  Everything else goes through the pipeline's own decoder (tf.io.decode_image), which in TF 2.15
  rejects every truncated JPEG, PNG, GIF and BMP we tried, down to one missing byte (it is
  stricter than PIL there).
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in contract.IMAGE_EXTENSIONS:
    return (f"unsupported format ({ext or 'no extension'}); use "
            f"{', '.join(e[1:].upper() for e in contract.IMAGE_EXTENSIONS)}")
  if not data:
    return "empty file (0 bytes)"
  reason = image_formats.pixel_limit_problem(data, max_pixels)
  if reason:
    return reason
  pixels = image_formats.decoded_pixels(data) or 0
  try:
    if pixels > _LARGE_IMAGE_PIXELS:
      with _one_large_decode:
        images.decode_rgb(data, max_pixels)
    else:
      images.decode_rgb(data, max_pixels)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError,
          tf.errors.DataLossError, tf.errors.ResourceExhaustedError) as e:
    return f"cannot be decoded ({messages.short_tf_error(e)})"
  return image_formats.bmp_palette_problem(data)


def check_image_file(path: str,
                     max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
  """Why the pipeline could not use this file, or None if it decodes."""
  return examine_image_file(path, max_pixels).reason


def _header_facts(data: bytes) -> dict:
  """Format, size, colour mode and EXIF orientation from the header (PIL reads no pixels here)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      orientation = 1
      if image.format == "JPEG":
        orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
      return {"format": image.format or "", "width": image.size[0], "height": image.size[1],
              "mode": image.mode, "orientation": orientation}
  except Exception:  # pylint: disable=broad-except - PIL raises many kinds; the facts are extras
    return {}


def examine_image_file(path: str,
                       max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> FileFacts:
  """Reads the file once (never a named pipe, socket or device: image_formats.read_image_file):
  its verdict, and for a usable image the facts `inspect` reports."""
  data, reason = image_formats.read_image_file(path)
  if reason:
    return FileFacts(reason=reason)
  reason = check_image_data(path, data, max_pixels)
  if reason:
    return FileFacts(reason=reason)
  return FileFacts(sha1=hashlib.sha1(data).hexdigest(), **_header_facts(data))


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _list_class_files(class_dir: str) -> list:
  """Every non-hidden file under one class folder (nested folders too), in sorted order."""
  files = []
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f))
  return files


def _examine_all(paths, name: str, max_pixels: int, progress_every_s: float,
                 save_partial=None, save_every_s: float = MANIFEST_SAVE_EVERY_S) -> list:
  """FileFacts of each path, in order; a progress line every few seconds on a long scan.

  save_partial(results so far), when given, is called every save_every_s (and not after the
  last file: the caller saves the whole result).
  """
  if not paths:
    return []
  # Decoding releases the GIL, so a few threads overlap file reads and decodes.
  workers = min(8, 2 * (os.cpu_count() or 1), len(paths))
  results = []
  started = last_report = last_save = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for first in range(0, len(paths), _EXAMINE_CHUNK_FILES):
      chunk = paths[first:first + _EXAMINE_CHUNK_FILES]
      for facts in pool.map(lambda path: examine_image_file(path, max_pixels), chunk):
        results.append(facts)
        now = time.monotonic()
        if len(results) == len(paths):
          break
        if save_partial is not None and now - last_save >= save_every_s:
          save_partial(results)
          last_save = time.monotonic()
        if now - last_report >= progress_every_s:
          last_report = now
          rate = progress.steps_per_second(len(results), now - started)
          eta = (len(paths) - len(results)) / rate if rate else float("nan")
          logger.info("Checking the %s images: %d of %d files (%.0f files/s, ETA %s)", name,
                      len(results), len(paths), rate or 0.0, progress.format_seconds(eta))
  return results


def _stat(path: str):
  try:
    return os.stat(path)
  except OSError:
    return None  # gone or unreadable: examined (and reported) like any other file


def _check_folder_root(root: str, name: str) -> Tuple[str, tuple]:
  """The absolute root and its class names; DataError when it is not an image-folder layout."""
  flag = f"--{name}_dir"
  if not root:
    raise DataError(f"{flag} is empty: give the folder that holds one sub-folder per class.")
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.exists(root):
    raise DataError(f"{flag}={root} does not exist. Give the folder that holds one sub-folder "
                    "per class (e.g. data/sample/train after `make demo`).")
  if not os.path.isdir(root):
    raise DataError(f"{flag}={root} is a file, not a folder. Give the folder that holds one "
                    "sub-folder per class.")
  entries = sorted(e for e in os.listdir(root) if _visible(e))
  class_names = tuple(e for e in entries if os.path.isdir(os.path.join(root, e)))
  if not class_names:
    loose = [e for e in entries if e.lower().endswith(contract.IMAGE_EXTENSIONS)]
    hint = (f" It holds {len(loose)} image file(s) directly; move them into one sub-folder per "
            "class." if loose else "")
    raise DataError(f"{flag}={root} has no class sub-folders. Expected {root}/<class name>/"
                    f"<image>, one sub-folder per class.{hint}")
  return root, class_names


def _shared_between_classes(candidates, statuses) -> list:
  """Groups [(path, class index)] of one file reached under two or more classes.

  The same file is the same (device, inode), however it is reached: a class folder that is a
  link to another class, a linked file, a hard link. Files that cannot be stat'ed (status None),
  and files that are not regular files, are left to check_image_file.
  """
  by_identity = collections.defaultdict(list)
  for candidate, status in zip(candidates, statuses):
    if status is not None and stat.S_ISREG(status.st_mode):
      by_identity[status.st_dev, status.st_ino].append(candidate)
  # Nearly every file is alone in its group: test the length first (a 20,000-file second start
  # spent a third of its time building one-element sets here).
  return [group for group in by_identity.values()
          if len(group) > 1 and len({index for _, index in group}) > 1]



def _shared_reasons(groups) -> list:
  """[(path, reason)] for every path of the groups: each names where else the file is."""
  bad = []
  for group in groups:
    for path, index in group:
      others = ", ".join(p for p, i in group if i != index)
      bad.append((path, f"the same file as {others} (another class): a file cannot have two "
                        "labels"))
  return bad



def _shared_files_message(root: str, name: str, class_names, groups) -> str:
  pairs = collections.Counter()
  for group in groups:
    classes = sorted({index for _, index in group})
    pairs.update((a, b) for position, a in enumerate(classes) for b in classes[position + 1:])
  described = []
  for (first, second), count in sorted(pairs.items()):
    notes = [f"{class_names[c]} is a link to {os.readlink(os.path.join(root, class_names[c]))}"
             for c in (first, second) if os.path.islink(os.path.join(root, class_names[c]))]
    described.append(f"{class_names[first]} and {class_names[second]} share {count} file(s)"
                     f"{' (' + '; '.join(notes) + ')' if notes else ''}")
  examples = "\n".join(f"  {group[0][0]} is {group[1][0]}" for group in groups[:_MAX_SHOWN_SHARED_FILES])
  return (f"The same files are under two classes of the {name} folder {root}: "
          f"{'; '.join(described)}. A file can have one label only, e.g.:\n{examples}\n"
          "Remove the duplicate class folder or link, or pass --bad_images=skip to leave those "
          "files out of every class.")


def survey_folder(root: str, name: str, cache_dir: str = "", rescan: bool = False,
                  use_manifest: bool = True,
                  max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS,
                  progress_every_s: float = PROGRESS_EVERY_S,
                  manifest_save_every_s: float = MANIFEST_SAVE_EVERY_S) -> FolderSurvey:
  """Lists `<root>/<class>/<image>` and checks every file: the unchanged ones from the manifest,
  the others by decoding them (then the manifest is updated; during a long scan, every
  manifest_save_every_s too). rescan: decode every file.

  A file reached under two classes (a class folder linking to another, a hard link) is bad under
  both, whatever its bytes: it would be trained on with two contradicting labels.
  """
  root, class_names = _check_folder_root(root, name)
  listed = [(path, index) for index, class_name in enumerate(class_names)
            for path in _list_class_files(os.path.join(root, class_name))]
  # Every listed path starts with root + "/": slicing is what os.path.relpath computes, at a
  # fraction of its cost (it was half of a 20,000-file second start).
  relative = [path[len(root) + 1:] for path, _ in listed]
  statuses = [_stat(path) for path, _ in listed]
  keys = [manifest_lib.file_key(status) if status else None for status in statuses]
  # What a verdict depends on besides the file: a manifest made under other settings is ignored.
  settings = {"tensorflow": tf.__version__, "max_image_pixels": max_pixels}
  path = manifest_lib.manifest_path(root, cache_dir) if use_manifest else ""
  known = (manifest_lib.load(root, path, settings) if use_manifest and not rescan
           else manifest_lib.Manifest(root, settings))
  facts = [known.lookup(rel, key) if key is not None else None
           for rel, key in zip(relative, keys)]
  unknown = [i for i, f in enumerate(facts) if f is None]
  if len(unknown) < len(listed):
    logger.info("%s images: %d of %d files unchanged since the last scan (manifest %s); "
                "checking %d.", name.capitalize(), len(listed) - len(unknown), len(listed), path,
                len(unknown))
  recorded = 0

  def record(examined_so_far):
    nonlocal recorded
    for i, examined in zip(unknown[recorded:], examined_so_far[recorded:]):
      if keys[i] is not None:
        known.record(relative[i], keys[i], examined)
    recorded = len(examined_so_far)

  def save_partial(examined_so_far):
    record(examined_so_far)
    _save_manifest(known, path)

  examined_now = _examine_all([listed[i][0] for i in unknown], name, max_pixels,
                              progress_every_s, save_partial if use_manifest else None,
                              manifest_save_every_s)
  record(examined_now)
  for i, examined in zip(unknown, examined_now):
    facts[i] = examined
  if use_manifest and (unknown or len(known) != len(listed)):
    known.keep_only(relative)
    _save_manifest(known, path)
  # Not from the manifest: which files are one file depends on the whole folder, not on each.
  position = {path: k for k, (path, _) in enumerate(listed)}
  shared = _shared_between_classes(listed, statuses)
  for path, reason in _shared_reasons(shared):
    facts[position[path]] = FileFacts(reason=reason)
  return FolderSurvey(root=root, name=name, class_names=class_names,
                      files=tuple((p, i, f) for (p, i), f in zip(listed, facts)),
                      decoded=len(unknown), manifest=path, shared=tuple(map(tuple, shared)))


def _save_manifest(known: manifest_lib.Manifest, path: str) -> None:
  try:
    known.save(path)
  except OSError as e:
    logger.warning("Could not save the scan manifest %s (%s): the next start checks every file "
                   "again. Point --scan_cache_dir at a writable folder.", path, e.strerror or e)


def _bad_files_message(root: str, name: str, bad: list, job: str = "train") -> str:
  lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
  return (f"{len(bad)} file(s) in the {name} folder {root} cannot be used:\n{lines}\n"
          f"Fix or remove them, or pass --bad_images=skip to {job} without them.")


def scan_image_folder(root: str, name: str, bad_images: str = "fail", cache_dir: str = "",
                      rescan: bool = False, job: str = "train",
                      max_image_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> Split:
  """Lists and checks `<root>/<class>/<image>` (survey_folder), then applies the bad-file policy.

  bad_images="fail" raises DataError naming every bad file; "skip" leaves them out and records
  them in `Split.skipped`. A class left without images is a DataError either way. `job` (train,
  evaluate) is what the message says skipping lets run.
  """
  config_lib.check_choice("bad_images", bad_images, config_lib.BAD_IMAGE_POLICIES, DataError)
  survey = survey_folder(root, name, cache_dir, rescan, max_pixels=max_image_pixels)
  root, class_names = survey.root, survey.class_names
  if survey.shared and bad_images == "fail":
    raise DataError(_shared_files_message(root, name, class_names, list(survey.shared)))
  bad = survey.bad()
  if bad and bad_images == "fail":
    raise DataError(_bad_files_message(root, name, bad, job))
  kept = [(p, i, f) for p, i, f in survey.files if not f.reason]
  if bad:
    shown = "\n".join(f"  {p}: {r}" for p, r in bad[:_MAX_LOGGED_BAD_FILES])
    more = len(bad) - _MAX_LOGGED_BAD_FILES
    logger.warning("Skipping %d bad file(s) of %d in the %s folder %s (--bad_images=skip):\n%s%s",
                   len(bad), len(survey.files), name, root, shown,
                   f"\n  ... and {more} more" if more > 0 else "")

  counts = [0] * len(class_names)
  for _, index, _ in kept:
    counts[index] += 1
  empty = [os.path.join(root, c) for c, n in zip(class_names, counts) if n == 0]
  if empty:
    skipped_note = " (after skipping bad files)" if bad else ""
    raise DataError(f"Class folder(s) with no usable images{skipped_note} in the {name} data: "
                    f"{', '.join(empty)}. Add images ({', '.join(contract.IMAGE_EXTENSIONS)}) or "
                    "remove the folder.")
  return Split(name=name, class_names=class_names, num_examples=len(kept),
               paths=tuple(p for p, _, _ in kept), labels=tuple(i for _, i, _ in kept),
               skipped=tuple(bad), content_hashes=tuple(f.sha1 for _, _, f in kept),
               # A file whose format the scan could not name counts as a possible GIF.
               holds_gif=any(f.format in (image_formats.GIF, "") for _, _, f in kept))
