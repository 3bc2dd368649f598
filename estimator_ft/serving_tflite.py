"""`estimator-ft predict --model=FILE.tflite`: a TFLite export, predicted like a SavedModel.

Same JSON lines, same per-file errors, same exit status as a SavedModel (serving.FilePredictor
does the bookkeeping). The interpreter holds the model alone (export_tflite.py): its input is one
preprocessed image, float32 [1, size, size, 3], and its output the class probabilities [1, C]. The
decoding, resizing and preprocessing run before it, eagerly, through the validation pipeline's
own function (data.images.decode_and_preprocess), so a TFLite prediction sees exactly the input
the SavedModel's signature and the validation pass see. The class names come from labels.txt
beside the .tflite file (one per line, in the order of the outputs).

Imports: TensorFlow, numpy, serving, contract, messages, and data.images (which imports only
data.split, standard library) - the pipeline's image functions, but no model, pipeline, estimator
or other training code. tests/test_layout.py checks exactly that set.
"""

import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_ft import contract
from estimator_ft import serving
from estimator_ft.data import images as images_lib


def read_labels(path: str) -> tuple:
  with open(path, encoding="utf-8") as f:
    return tuple(line.rstrip("\n") for line in f)


def labels_path(model_path: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(model_path)), serving.LABELS_FILE)


class TFLitePredictor(serving.FilePredictor):
  """Classifies encoded images with a .tflite model and the labels.txt beside it."""

  def __init__(self, model_path: str, num_threads: Optional[int] = None):
    self.path = model_path
    if not os.path.isfile(model_path):
      raise ValueError(f"--model={model_path}: no such file. Give a .tflite file written by "
                       "`estimator-ft export --model_dir=MODEL_DIR --format=tflite` (in "
                       "MODEL_DIR/export/tflite/VERSION/).")
    labels = labels_path(model_path)
    if not os.path.isfile(labels):
      raise ValueError(f"{model_path} has no {serving.LABELS_FILE} beside it: the class names travel "
                       f"in that file. Copy it along with the model (both are in the export's "
                       "version folder).")
    self.class_names = read_labels(labels)
    try:
      self._interpreter = tf.lite.Interpreter(model_path=model_path, num_threads=num_threads)
      self._interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"{model_path} is not a usable TFLite model ({first_line}). Export one with "
                       "`estimator-ft export --model_dir=MODEL_DIR --format=tflite`.") from e
    inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
    shape = tuple(inputs[0]["shape"]) if len(inputs) == 1 else ()
    if (len(shape) != 4 or shape[0] != 1 or shape[1] != shape[2] or shape[3] != 3
        or inputs[0]["dtype"] != np.float32 or len(outputs) != 1):
      raise ValueError(f"{model_path} takes {[(tuple(d['shape']), d['dtype'].__name__) for d in inputs]}, "
                       "not one float32 [1, size, size, 3] image: it was not exported by "
                       "estimator_ft. Export one with `estimator-ft export --format=tflite`.")
    num_outputs = int(outputs[0]["shape"][-1])
    if num_outputs != len(self.class_names):
      raise ValueError(f"{labels} names {len(self.class_names)} classes but {model_path} has "
                       f"{num_outputs} outputs: they are not from the same export. Copy the "
                       f"{serving.LABELS_FILE} of that export's version folder beside it.")
    self.image_size = int(shape[1])
    self._input_index = inputs[0]["index"]
    self._output_index = outputs[0]["index"]
    size = self.image_size
    # Traced once: the pipeline's own decode -> resize -> preprocess for one encoded image.
    self._preprocess = tf.function(
        lambda image_bytes: images_lib.decode_and_preprocess(image_bytes, size)[tf.newaxis],
        input_signature=[tf.TensorSpec([], tf.string)])

  def preprocess(self, image_bytes: bytes) -> np.ndarray:
    """Encoded image -> float32 [1, size, size, 3], the interpreter's input."""
    return self._preprocess(tf.constant(image_bytes, tf.string)).numpy()

  def invoke(self, preprocessed: np.ndarray) -> np.ndarray:
    """float32 [1, size, size, 3] -> the class probabilities, float32 [C]."""
    self._interpreter.set_tensor(self._input_index, preprocessed)
    self._interpreter.invoke()
    return np.array(self._interpreter.get_tensor(self._output_index)[0])

  def predict_bytes(self, encoded_images: Sequence[bytes]) -> dict:
    """The serving signature's outputs for a batch of encoded images, one interpreter call each."""
    probabilities = np.stack([self.invoke(self.preprocess(data)) for data in encoded_images])
    # The SavedModel's class_index: argmax, which for two classes is p(second) > 0.5 as well.
    classes = probabilities.argmax(axis=1).astype(np.int32)
    names = np.array([name.encode("utf-8") for name in self.class_names], dtype=object)
    return {contract.PROBABILITIES: probabilities, contract.CLASS_INDEX: classes,
            contract.CLASS_NAME: names[classes],
            contract.ALL_CLASS_NAMES: np.tile(names[np.newaxis, :], (len(encoded_images), 1))}
