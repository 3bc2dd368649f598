"""The image-folder source: `<root>/<class>/<image>`, listed and checked before training.

Every image is test-decoded by the pipeline's own decoder here, so bad data fails in seconds with
every bad file named, not hours into a run.
"""

import concurrent.futures
import logging
import os
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

logger = logging.getLogger("estimator_ft")


def check_image_file(path: str) -> Optional[str]:
  """Why the pipeline could not use this file, or None if it decodes.

  Uses the pipeline's own decoder (tf.io.decode_image), which in TF 2.15 rejects every truncated
  JPEG, PNG, GIF and BMP we tried, down to one missing byte (it is stricter than PIL there).
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in contract.IMAGE_EXTENSIONS:
    return (f"unsupported format ({ext or 'no extension'}); use "
            f"{', '.join(e[1:].upper() for e in contract.IMAGE_EXTENSIONS)}")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return f"cannot be read ({e.strerror or e})"
  if not data:
    return "empty file (0 bytes)"
  try:
    images.decode_rgb(data)
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



def _check_files(paths) -> list:
  """[(path, reason)] of the files that cannot be used, in the order of `paths`."""
  if not paths:
    return []
  # Decoding releases the GIL, so a few threads overlap file reads and decodes.
  workers = min(8, 2 * (os.cpu_count() or 1), len(paths))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    reasons = list(pool.map(check_image_file, paths))
  return [(p, r) for p, r in zip(paths, reasons) if r is not None]



def _bad_files_message(root: str, name: str, bad: list, job: str = "train") -> str:
  lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
  return (f"{len(bad)} file(s) in the {name} folder {root} cannot be used:\n{lines}\n"
          f"Fix or remove them, or pass --bad_images=skip to {job} without them.")



def scan_image_folder(root: str, name: str, bad_images: str = "fail", job: str = "train") -> Split:
  """Lists and checks `<root>/<class>/<image>`; every image is test-decoded here, before training.

  bad_images="fail" raises DataError naming every bad file; "skip" leaves them out and records
  them in `Split.skipped`. `job` (train, evaluate) is what the message says skipping lets run.
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
  bad = _check_files([p for p, _ in candidates])
  if bad and bad_images == "fail":
    raise DataError(_bad_files_message(root, name, bad, job))
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
