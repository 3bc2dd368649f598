"""The image-folder source: `<root>/<class>/<image>`, listed and checked before training.

Every image is test-decoded by the pipeline's own decoder here, so bad data fails in seconds with
every bad file named, not hours into a run.
"""

import collections
import concurrent.futures
import logging
import os
import stat
import threading
from typing import Optional

import tensorflow as tf

from estimator_ft import config as config_lib
from estimator_ft import contract
from estimator_ft import image_formats
from estimator_ft import messages
from estimator_ft.data import images
from estimator_ft.data.split import DataError, Split

# How many bad files the skip warning names; the full list is in Split.skipped.
_MAX_LOGGED_BAD_FILES = 20
# How many files shared by two classes the error names.
_MAX_SHOWN_SHARED_FILES = 3
# Images above this size are test-decoded one at a time, so the scan's threads can never hold
# several of them at once: up to --max_image_pixels each, 3 bytes per pixel (~270 MB by default).
_LARGE_IMAGE_PIXELS = 16_000_000
_one_large_decode = threading.Lock()

logger = logging.getLogger("estimator_ft")


def check_image_file(path: str,
                     max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> Optional[str]:
  """Why the pipeline could not use this file, or None if it decodes.

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
  data, reason = image_formats.read_image_file(path)
  if reason:
    return reason
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



def _visible(name: str) -> bool:
  return not name.startswith(".")



def _list_class_files(class_dir: str) -> list:
  """Every non-hidden file under one class folder (nested folders too), in sorted order."""
  files = []
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f))
  return files



def _check_files(paths, max_pixels: int) -> list:
  """[(path, reason)] of the files that cannot be used, in the order of `paths`."""
  if not paths:
    return []
  # Decoding releases the GIL, so a few threads overlap file reads and decodes.
  workers = min(8, 2 * (os.cpu_count() or 1), len(paths))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    reasons = list(pool.map(lambda path: check_image_file(path, max_pixels), paths))
  return [(p, r) for p, r in zip(paths, reasons) if r is not None]



def _shared_between_classes(candidates) -> list:
  """Groups [(path, class index)] of one file reached under two or more classes.

  The same file is the same (device, inode), however it is reached: a class folder that is a
  link to another class, a linked file, a hard link. Files that cannot be stat'ed, and files
  that are not regular files, are left to check_image_file.
  """
  by_identity = collections.defaultdict(list)
  for path, index in candidates:
    try:
      status = os.stat(path)
    except OSError:
      continue
    if stat.S_ISREG(status.st_mode):
      by_identity[(status.st_dev, status.st_ino)].append((path, index))
  return [group for group in by_identity.values() if len({index for _, index in group}) > 1]



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



def _bad_files_message(root: str, name: str, bad: list) -> str:
  lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
  return (f"{len(bad)} file(s) in the {name} folder {root} cannot be used:\n{lines}\n"
          "Fix or remove them, or pass --bad_images=skip to train without them.")



def scan_image_folder(root: str, name: str, bad_images: str = "fail",
                      max_image_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS) -> Split:
  """Lists and checks `<root>/<class>/<image>`; every image is test-decoded here, before training.

  bad_images="fail" raises DataError naming every bad file; "skip" leaves them out and records
  them in `Split.skipped`. A file found under two classes (a class folder that links to another,
  say) is bad in both: it would be trained on under two contradicting labels.
  """
  config_lib.check_choice("bad_images", bad_images, config_lib.BAD_IMAGE_POLICIES, DataError)
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

  per_class = [(index, _list_class_files(os.path.join(root, c)))
               for index, c in enumerate(class_names)]
  candidates = [(path, index) for index, files in per_class for path in files]
  shared = _shared_between_classes(candidates)
  if shared and bad_images == "fail":
    raise DataError(_shared_files_message(root, name, class_names, shared))
  bad = _shared_reasons(shared)
  shared_paths = {path for path, _ in bad}
  bad += _check_files([p for p, _ in candidates if p not in shared_paths], max_image_pixels)
  order = {path: position for position, (path, _) in enumerate(candidates)}
  bad.sort(key=lambda item: order[item[0]])
  if bad and bad_images == "fail":
    raise DataError(_bad_files_message(root, name, bad))
  bad_paths = {p for p, _ in bad}
  kept = [(p, i) for p, i in candidates if p not in bad_paths]
  if bad:
    shown = "\n".join(f"  {p}: {r}" for p, r in bad[:_MAX_LOGGED_BAD_FILES])
    more = len(bad) - _MAX_LOGGED_BAD_FILES
    logger.warning("Skipping %d bad file(s) of %d in the %s folder %s (--bad_images=skip):\n%s%s",
                   len(bad), len(candidates), name, root, shown,
                   f"\n  ... and {more} more" if more > 0 else "")

  counts = [0] * len(class_names)
  for _, index in kept:
    counts[index] += 1
  empty = [os.path.join(root, c) for c, n in zip(class_names, counts) if n == 0]
  if empty:
    skipped_note = " (after skipping bad files)" if bad else ""
    raise DataError(f"Class folder(s) with no usable images{skipped_note} in the {name} data: "
                    f"{', '.join(empty)}. Add images ({', '.join(contract.IMAGE_EXTENSIONS)}) or "
                    "remove the folder.")
  return Split(name=name, class_names=class_names, num_examples=len(kept),
               paths=tuple(p for p, _ in kept), labels=tuple(i for _, i in kept),
               skipped=tuple(bad))
