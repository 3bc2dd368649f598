"""TFLite export: conversion with quantization, the files it writes, and how it compares.

The TFLite model is the classifier alone, converted by TF 2.15's own converter from a float32
copy of the trained Keras model (both paths' checkpoints load into it):

  input   `image`          float32 [1, size, size, 3]: the *preprocessed* image, i.e. what
                           data.images.decode_and_preprocess makes of an encoded one (RGB -> BGR,
                           ImageNet mean removed: Keras' ResNet50 "caffe" preprocessing)
  output  `probabilities`  float32 [1, C], one per class (also for the two-class sigmoid head),
                           in the order of labels.txt

The input is the preprocessed image, not RGB 0..255, because TF 2.15's full-integer quantizer
gives the channel flip of the preprocessing (REVERSE_V2) its own output scale while the int8
kernel only moves bytes: with the preprocessing inside the model, int8 agreed with the SavedModel
on 64 % of the validation images (measured). Outside it, `predict` runs the validation pipeline's
own decode_and_preprocess before the interpreter, and every quantization takes the same input.
Even int8 keeps float32 input and output tensors (the model quantizes and dequantizes them).

Quantizations (config.TFLITE_QUANTIZATIONS):
  none     float32, the SavedModel's numbers
  dynamic  int8 weights, float activations (dynamic-range quantization): ~1/4 of the size
  float16  float16 weights, computed in float32 on CPU: ~1/2 of the size
  int8     full integer (TFLITE_BUILTINS_INT8 only), activation ranges calibrated on
           representative images drawn from the run's training split: ~1/4 of the size

The class names travel as labels.txt beside the model file (one name per line, the outputs'
order) - the file convention of TFLite image classifiers - rather than as TFLite metadata, whose
writer (tflite-support) is a dependency TF 2.15 does not ship.

Where the files go: `estimator-ft export --format=tflite` publishes MODEL_DIR/export/tflite/
<version>/{model.tflite, labels.txt, export_info.json} (staging + rename, as SavedModel versions;
a base of its own, because TF Serving would try to load a version without a SavedModel);
--export_tflite writes model.tflite + labels.txt into each export/best version, beside the
SavedModel, while it is still staged (ExportExtras.write_beside).
"""

import json
import os
import statistics
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_ft import config as config_lib
from estimator_ft import contract
from estimator_ft import export as export_lib
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import serving
from estimator_ft import serving_tflite
from estimator_ft import storage
from estimator_ft.config import Config
from estimator_ft.data import images as images_lib

TFLITE_EXPORT = "tflite"  # MODEL_DIR/export/tflite: `estimator-ft export --format=tflite`
INFO_FILE = "export_info.json"
INPUT_DESCRIPTION = ("float32 [1, size, size, 3]: the image decoded, resized (bilinear) and "
                     "preprocessed as Keras ResNet50 'caffe' mode (RGB->BGR, minus ImageNet mean "
                     "103.939, 116.779, 123.68)")
LATENCY_WARMUP_RUNS = 3
_MEASURE_BATCH = 32


def check_quantize(quantize: str, flag: str = "quantize") -> None:
  config_lib.check_choice(flag, quantize, config_lib.TFLITE_QUANTIZATIONS)


def conversion_model(config: Config, num_classes: int, weights) -> tf.keras.Model:
  """A float32 inference copy of the classifier holding `weights` (in `model.weights` order),
  whatever precision or distribution strategy the run trained with."""
  model = model_lib.build_model(config.replace(precision="float32"), num_classes)
  model.set_weights(weights)
  return model


def _preprocessor(image_size: int):
  return tf.function(
      lambda image_bytes: images_lib.decode_and_preprocess(image_bytes, image_size)[tf.newaxis],
      input_signature=[tf.TensorSpec([], tf.string)])


def convert(config: Config, class_names, weights, quantize: str,
            representative_images: Sequence[bytes] = ()) -> bytes:
  """The .tflite flatbuffer of the classifier with these weights, quantized as `quantize`."""
  check_quantize(quantize)
  if quantize == "int8" and not representative_images:
    raise ValueError("--quantize=int8 calibrates on training images, and none were given: set "
                     "--representative_images=N (100 is usual) with the run's training data in "
                     "place, or use --quantize=dynamic, which needs none.")
  num_classes = len(class_names)
  model = conversion_model(config, num_classes, weights)
  size = config.image_size

  @tf.function(input_signature=[
      tf.TensorSpec([1, size, size, 3], tf.float32, name=contract.FEATURE_KEY)])
  def classify(image):
    probabilities = tf.cast(model(image, training=False), tf.float32)
    return {contract.PROBABILITIES: model_fn_lib.class_probabilities(probabilities, num_classes)}

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [classify.get_concrete_function()], model)
  # Convert the frozen function itself. TF 2.15's default writes the model out as a temporary
  # SavedModel and converts that: the same flatbuffer for this graph (no resources or control
  # flow left once frozen), but ResNet50 at 32 px took 23 s instead of 6 s (measured).
  converter.experimental_lower_to_saved_model = False
  if quantize != "none":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantize == "float16":
    converter.target_spec.supported_types = [tf.float16]
  if quantize == "int8":
    preprocess = _preprocessor(size)
    converter.representative_dataset = lambda: (
        [preprocess(tf.constant(data, tf.string)).numpy()] for data in representative_images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  with warnings.catch_warnings():
    # The frozen-function path asks for input statistics whenever the inference type is int8,
    # though the input stays float32 and calibration sets every scale (tested): not a problem.
    warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
    return converter.convert()


def write_files(folder: str, tflite_model: bytes, class_names) -> dict:
  """model.tflite and labels.txt into `folder` (a staging folder: published by its rename)."""
  for name in class_names:
    if "\n" in name or "\r" in name:
      raise ValueError(f"Class name {name!r} holds a line break, which labels.txt (one name per "
                       "line) cannot carry: rename that class folder.")
  storage.makedirs(folder)
  storage.write_bytes(os.path.join(folder, serving.TFLITE_FILE), tflite_model)
  storage.write_bytes(os.path.join(folder, serving.LABELS_FILE),
                      "".join(f"{name}\n" for name in class_names).encode("utf-8"))
  return {"file": serving.TFLITE_FILE, "labels": serving.LABELS_FILE, "bytes": len(tflite_model)}


def beside_writer(config: Config, class_names, weights_of: Callable[[Optional[str]], list],
                  representative_images: Sequence[bytes] = ()):
  """ExportExtras.write_beside for --export_tflite: converts the exported weights
  (`weights_of(checkpoint_path)`) as --tflite_quantize and writes the files into the version."""
  class_names = tuple(class_names)
  quantize = config.tflite_quantize
  representative_images = tuple(representative_images)

  def write(version_dir: str, checkpoint_path: Optional[str]) -> dict:
    tflite_model = convert(config, class_names, weights_of(checkpoint_path), quantize,
                           representative_images)
    files = write_files(version_dir, tflite_model, class_names)
    return {"tflite": {**files, "quantize": quantize, "input": INPUT_DESCRIPTION}}

  return write


# ---------------------------------------------------------------- measuring against the SavedModel

def _median_ms(call, runs: int) -> float:
  for _ in range(LATENCY_WARMUP_RUNS):
    call()
  times = []
  for _ in range(runs):
    started = time.perf_counter()
    call()
    times.append(time.perf_counter() - started)
  return round(1000 * statistics.median(times), 3)


def measure(tflite_path: str, saved_model_dir: str, encoded_images: Sequence[bytes],
            latency_runs: int = 50, num_threads: Optional[int] = None) -> dict:
  """How the TFLite model compares with the SavedModel on these (validation) images.

  Both run as `predict` runs them: the SavedModel's serving_default signature on the encoded
  bytes, the TFLite model after the pipeline's decode_and_preprocess. Latency: the median of
  `latency_runs` single-image calls after warm-up - the interpreter's set_tensor/invoke/get_tensor
  on a preprocessed image, and for comparison the SavedModel's predict_images signature on the
  decoded image at the training size (both from the decoded image to the probabilities).
  """
  encoded_images = list(encoded_images)
  if not encoded_images:
    raise ValueError("No validation images to measure with: set --measure_images=N (the run's "
                     "validation data in place), or --measure_images=0 to skip the measurement.")
  lite = serving_tflite.TFLitePredictor(tflite_path, num_threads=num_threads)
  saved = serving.Predictor(saved_model_dir)
  expected = [saved.predict_bytes(encoded_images[start:start + _MEASURE_BATCH])
              for start in range(0, len(encoded_images), _MEASURE_BATCH)]
  expected_probabilities = np.concatenate([e[contract.PROBABILITIES] for e in expected])
  expected_classes = np.concatenate([e[contract.CLASS_INDEX] for e in expected])
  got = lite.predict_bytes(encoded_images)
  preprocessed = lite.preprocess(encoded_images[0])
  decoded = images_lib.resize_image(images_lib.decode_rgb(encoded_images[0]),
                                    lite.image_size)[tf.newaxis].numpy()
  return {
      "images": len(encoded_images),
      "top1_agreement": float(np.mean(got[contract.CLASS_INDEX] == expected_classes)),
      "max_abs_probability_difference": float(
          np.abs(got[contract.PROBABILITIES] - expected_probabilities).max()),
      "tflite_bytes": os.path.getsize(tflite_path),
      "latency_runs": latency_runs,
      "tflite_latency_ms_median": _median_ms(lambda: lite.invoke(preprocessed), latency_runs),
      "saved_model_latency_ms_median": _median_ms(lambda: saved.predict_decoded(decoded),
                                                  latency_runs),
      "interpreter_threads": num_threads if num_threads else "TFLite default",
  }


# ---------------------------------------------------------------- a TFLite version of its own

def export_version(export_base: str, tflite_model: bytes, class_names, info: dict,
                   reference: Optional[Callable[[str], str]] = None,
                   measure_images: Sequence[bytes] = (), latency_runs: int = 50) -> str:
  """Publishes EXPORT_BASE/<version>/{model.tflite, labels.txt, export_info.json}.

  `reference(scratch_dir)` exports the SavedModel of the same weights into scratch_dir and
  returns it; with measure_images, the staged model is measured against it (see `measure`) and
  the figures go into export_info.json. The scratch SavedModel lives in the staging folder and
  goes with it; if anything fails, no version appears.
  """

  def write(staging):
    version = os.path.join(staging, "version")
    record = {**info, "format": "tflite", "input": INPUT_DESCRIPTION,
              **write_files(version, tflite_model, class_names), "measurements": None}
    if measure_images and reference is not None:
      saved_model_dir = reference(os.path.join(staging, "reference"))
      record["measurements"] = measure(os.path.join(version, serving.TFLITE_FILE), saved_model_dir,
                                       measure_images, latency_runs)
    storage.write_bytes(os.path.join(version, INFO_FILE),
                        json.dumps(record, indent=2, sort_keys=True).encode("utf-8"))
    return version

  return export_lib.publish_version(export_base, write)


def read_info(version_dir: str) -> dict:
  return storage.read_json(os.path.join(version_dir, INFO_FILE), {})


def format_measurements(info: dict) -> str:
  """export's own report of a TFLite version: one line per figure."""
  m = info.get("measurements")
  size_mb = info.get("bytes", 0) / 1e6
  lines = [f"  quantize:           {info.get('quantize')}   file {size_mb:.1f} MB"]
  if not m:
    lines.append("  (not measured: --measure_images=0)")
    return "\n".join(lines)
  lines += [
      f"  validation images:  {m['images']}",
      f"  top-1 agreement with the SavedModel: {100 * m['top1_agreement']:.2f} %",
      f"  max |probability difference|:        {m['max_abs_probability_difference']:.2e}",
      f"  single-image CPU latency (median of {m['latency_runs']}): TFLite "
      f"{m['tflite_latency_ms_median']:.2f} ms, SavedModel {m['saved_model_latency_ms_median']:.2f} ms "
      f"(interpreter threads: {m['interpreter_threads']})",
  ]
  return "\n".join(lines)
