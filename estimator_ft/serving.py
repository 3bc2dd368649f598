"""`estimator-ft predict` on image files, and the TF Serving layout of exported versions.

This module imports TensorFlow, numpy and the standard-library modules of this package only
(contract, image_formats, messages) - nothing of the training code - so `estimator-ft predict`
shows that an export stands on its own: the class names, the decoder and the preprocessing all
come from the SavedModel, whose signatures contract.py names.

A TFLite model (`--model=FILE.tflite`) is predicted by serving_tflite.TFLitePredictor, which runs
the decoding and preprocessing outside the interpreter and so also imports data/images; this
module only recognises such a model (`model_kind`), so predicting a SavedModel still loads
nothing of the data layer.
"""

import json
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from estimator_ft import contract
from estimator_ft import image_formats
from estimator_ft import messages

EXIT_OK = 0
EXIT_SOME_FILES_FAILED = 1

# A TFLite export (export_tflite.py): the model and its class names, one per line, side by side.
TFLITE_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
SAVED_MODEL = "saved_model"
TFLITE = "tflite"


# ---------------------------------------------------------------- versions (TF Serving layout)
# Read through tf.io.gfile, so an export base on any TensorFlow file system (gs://, ram://) is
# listed as a local one is (what TF Serving itself reads them with).

def is_saved_model_dir(path: str) -> bool:
  saved_model = os.path.join(path, contract.SAVED_MODEL_FILE)
  return tf.io.gfile.exists(saved_model) and not tf.io.gfile.isdir(saved_model)


def _names_in(folder: str) -> List[str]:
  return [name.rstrip("/") for name in tf.io.gfile.listdir(folder)] if tf.io.gfile.isdir(folder) else []


def version_dirs(export_base: str) -> List[Tuple[int, str]]:
  """[(version, path)] of the complete versions under `export_base`, oldest first.

  A version is what TF Serving would load: a folder named by an integer, holding a SavedModel.
  Hidden staging folders of an export in progress (or of one that was killed) are not versions.
  """
  versions = []
  for name in _names_in(export_base):
    path = os.path.join(export_base, name)
    if name.isdigit() and is_saved_model_dir(path):
      versions.append((int(name), path))
  return sorted(versions)


def newest_version(export_base: str) -> Optional[str]:
  versions = version_dirs(export_base)
  return versions[-1][1] if versions else None


def _newest_numbered_dir(export_base: str) -> Optional[str]:
  numbered = [int(name) for name in _names_in(export_base)
              if name.isdigit() and tf.io.gfile.isdir(os.path.join(export_base, name))]
  return os.path.join(export_base, str(max(numbered))) if numbered else None


def model_kind(path: str) -> Tuple[str, str]:
  """(SAVED_MODEL or TFLITE, the path to load) for a `predict --model` argument.

  A .tflite file is a TFLite model; so is a folder holding model.tflite but no SavedModel (a
  version of `estimator-ft export --format=tflite`), or an export base whose newest version is
  one. Anything else is taken as a SavedModel (resolve_saved_model explains what is wrong).
  """
  if path.endswith(".tflite") and not os.path.isdir(path):
    return TFLITE, path
  if os.path.isdir(path) and not is_saved_model_dir(path):
    candidate = path if os.path.isfile(os.path.join(path, TFLITE_FILE)) else _newest_numbered_dir(path)
    if (candidate and os.path.isfile(os.path.join(candidate, TFLITE_FILE))
        and not is_saved_model_dir(candidate)):
      return TFLITE, os.path.join(candidate, TFLITE_FILE)
  return SAVED_MODEL, path


def resolve_saved_model(path: str) -> str:
  """A SavedModel folder, or the newest version of an export base (as TF Serving would pick)."""
  if is_saved_model_dir(path):
    return path
  newest = newest_version(path)
  if newest is None:
    raise ValueError(
        f"--saved_model={path} is not a SavedModel (no {contract.SAVED_MODEL_FILE}) nor a folder of "
        "exported versions. Give MODEL_DIR/export/latest (its newest version is used) or one "
        "version folder such as MODEL_DIR/export/latest/1712345678; `estimator-ft export "
        "--model_dir=MODEL_DIR` writes one from the latest checkpoint.")
  return newest


# ---------------------------------------------------------------- predicting files

def _undecodable_reason(image_bytes: bytes, max_pixels: int) -> Optional[str]:
  """Why the signature's decoder would reject these bytes, or None.

  The header's size first (the signature refuses what is over its limit before decoding; here
  it is never decoded at all), then the same op the SavedModel decodes with, run eagerly per
  file, so one bad file is reported on its own line instead of failing the whole batch it would
  have been part of.
  """
  if not image_bytes:
    return "empty file (0 bytes)"
  reason = image_formats.pixel_limit_problem(image_bytes, max_pixels)
  if reason:
    return reason
  try:
    # data.decode_rgb's call, spelled out: `predict` imports none of the training modules.
    tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.DataLossError,
          tf.errors.ResourceExhaustedError) as e:
    return f"not a decodable image ({messages.short_tf_error(e)})"
  return image_formats.bmp_palette_problem(image_bytes)


def read_image_bytes(path: str, max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS
                     ) -> Tuple[Optional[bytes], Optional[str]]:
  """(bytes, None) for a usable file, (None, reason) otherwise (a FIFO or device is never read)."""
  data, reason = image_formats.read_image_file(path)
  if reason:
    return None, reason
  reason = _undecodable_reason(data, max_pixels)
  return (None, reason) if reason else (data, None)


def export_pixel_limit(saved_model: str) -> int:
  """The pixel limit an export's signatures enforce (recorded in its export_info.json).

  Exports made before the limit existed record none: their signatures decode anything, and
  `predict` holds them to the default limit.
  """
  try:
    with open(os.path.join(saved_model, contract.EXPORT_INFO_FILE)) as f:
      value = json.load(f).get(contract.MAX_IMAGE_PIXELS_INFO)
  except (OSError, ValueError, AttributeError):
    value = None
  return value if isinstance(value, int) and value > 0 else image_formats.DEFAULT_MAX_IMAGE_PIXELS


def expand_paths(paths: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
  """[(file, None)] for the files to predict, in order; [(path, reason)] for arguments that yield none.

  A folder is searched recursively for image files (hidden entries skipped, sorted); a file
  argument is always tried, whatever its extension.
  """
  expanded = []
  for path in paths:
    if not os.path.isdir(path):
      expanded.append((path, None))
      continue
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      found.extend(os.path.join(dirpath, name) for name in sorted(filenames)
                   if not name.startswith(".") and name.lower().endswith(contract.IMAGE_EXTENSIONS))
    if found:
      expanded.extend((p, None) for p in found)
    else:
      expanded.append((path, f"folder holds no image files ({', '.join(contract.IMAGE_EXTENSIONS)})"))
  return expanded


class FilePredictor:
  """What `predict` needs of a model: `path`, and `predict_bytes` for a batch of encoded images
  returning the serving signature's outputs ({PROBABILITIES, CLASS_INDEX, CLASS_NAME,
  ALL_CLASS_NAMES: numpy}); predict_files turns them into one record per file."""

  path = ""
  # Files whose header announces more pixels are refused unread (the signatures do the same).
  max_pixels = image_formats.DEFAULT_MAX_IMAGE_PIXELS

  def predict_bytes(self, encoded_images: Sequence[bytes]) -> dict:
    raise NotImplementedError

  def predict_files(self, paths: Sequence[str]) -> List[dict]:
    """One record per path, in order: a prediction, or {"path", "error"}."""
    records = [None] * len(paths)
    good = []
    for position, path in enumerate(paths):
      data, reason = read_image_bytes(path, self.max_pixels)
      if reason:
        records[position] = {"path": path, "error": reason}
      else:
        good.append((position, path, data))
    if good:
      try:
        outputs = self.predict_bytes([data for _, _, data in good])
        for row, (position, path, _) in enumerate(good):
          records[position] = prediction_record(path, outputs, row)
      except tf.errors.OpError:
        # Something the eager check let through still broke the batch: find it file by file.
        for position, path, data in good:
          records[position] = self._predict_one(path, data)
    return records

  def _predict_one(self, path: str, data: bytes) -> dict:
    try:
      return prediction_record(path, self.predict_bytes([data]), 0)
    except tf.errors.OpError as e:
      return {"path": path, "error": f"the model could not process it ({messages.short_tf_error(e)})"}


class Predictor(FilePredictor):
  """Classifies encoded images through a SavedModel's `serving_default` signature."""

  def __init__(self, saved_model: str):
    self.path = resolve_saved_model(saved_model)
    # Kept: the signature functions need the loaded object (and its variables) alive.
    self._loaded = tf.saved_model.load(self.path)
    signature = self._loaded.signatures.get(contract.SERVING_SIGNATURE)
    inputs = signature.structured_input_signature[1] if signature is not None else {}
    if contract.IMAGE_BYTES_INPUT not in inputs:
      raise ValueError(f"{self.path} has no {contract.SERVING_SIGNATURE!r} signature taking "
                       f"{contract.IMAGE_BYTES_INPUT!r}: it was not exported by estimator_ft. Export one "
                       "with `estimator-ft export --model_dir=MODEL_DIR`.")
    self._signature = signature
    self.max_pixels = export_pixel_limit(self.path)

  def predict_bytes(self, encoded_images: Sequence[bytes]) -> dict:
    """{output: numpy array} for a batch of encoded images."""
    outputs = self._signature(**{contract.IMAGE_BYTES_INPUT: tf.constant(list(encoded_images), tf.string)})
    return {key: value.numpy() for key, value in outputs.items()}

  def predict_decoded(self, images) -> dict:
    """{output: numpy array} for float RGB 0..255 images [b, h, w, 3] (the predict_images
    signature: resized and preprocessed in the graph)."""
    signature = self._loaded.signatures[contract.IMAGES_SIGNATURE]
    outputs = signature(**{contract.IMAGES_INPUT: tf.convert_to_tensor(images, tf.float32)})
    return {key: value.numpy() for key, value in outputs.items()}


def prediction_record(path: str, outputs: dict, row: int) -> dict:
  names = [name.decode("utf-8") for name in outputs[contract.ALL_CLASS_NAMES][row]]
  probabilities = np.asarray(outputs[contract.PROBABILITIES][row], np.float64)
  return {"path": path, "class": outputs[contract.CLASS_NAME][row].decode("utf-8"),
          "probabilities": dict(zip(names, probabilities.tolist()))}


def predict_cli(model: str, paths: Sequence[str], batch_size: int,
                make_predictor: Callable[[str], FilePredictor] = Predictor) -> int:
  """`estimator-ft predict`: one JSON line per image on stdout; 1 if any file failed, else 0.

  make_predictor(model) loads the model: a SavedModel by default (the CLI passes
  serving_tflite.TFLitePredictor for a TFLite model).
  """
  if batch_size < 1:
    raise ValueError(f"--predict_batch_size={batch_size} must be at least 1.")
  if not paths:
    raise ValueError("Give one or more image files or folders to classify.")
  predictor = make_predictor(model)
  print(f"Predicting with {predictor.path}", file=sys.stderr)
  files = expand_paths(paths)
  failures = 0
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    to_predict = [path for path, reason in chunk if reason is None]
    predicted = iter(predictor.predict_files(to_predict))
    for path, reason in chunk:
      record = {"path": path, "error": reason} if reason else next(predicted)
      failures += "error" in record
      print(json.dumps(record), flush=True)
  if failures:
    print(f"{failures} of {len(files)} input(s) could not be classified (see their \"error\").",
          file=sys.stderr)
  return EXIT_SOME_FILES_FAILED if failures else EXIT_OK
