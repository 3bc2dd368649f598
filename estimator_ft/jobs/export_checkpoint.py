"""`estimator-ft export`: a SavedModel or a TFLite model from the latest checkpoint of a model_dir.

The run's config.json says which path wrote it and with which settings, so the same serving
signatures come out whichever path trained the model (see export.py). The images an export
carries or is measured with come from the run's own data (data.samples), read here:
  SavedModel  --serving_warmup_requests training images -> TF Serving warm-up requests
  TFLite      --quantize=int8: --representative_images training images calibrate it;
              --measure_images validation images compare it with the SavedModel of the same
              checkpoint (exported into the staging folder for the purpose, then discarded)
Checks run cheapest first - config.json, a writable destination, a checkpoint, the data - so a
bad call fails before any model is built, and nothing is published unless all of it worked.
"""

import logging
import os
from typing import Optional

import tensorflow as tf

from estimator_ft import estimator as estimator_path
from estimator_ft import export as export_lib
from estimator_ft import export_tflite
from estimator_ft import keras_path
from estimator_ft import config as config_lib
from estimator_ft import model as model_lib
from estimator_ft.config import Config
from estimator_ft.data import loading
from estimator_ft.data import samples
from estimator_ft.data.split import DataError
from estimator_ft.run import faults
from estimator_ft.run import model_dir as model_dir_lib

logger = logging.getLogger("estimator_ft")

DEFAULT_MEASURE_IMAGES = 500
DEFAULT_LATENCY_RUNS = 50


def export_from_checkpoint(model_dir: str, export_dir=None, *, export_format: str = "saved_model",
                           quantize: str = "none", representative_images: Optional[int] = None,
                           serving_warmup_requests: Optional[int] = None,
                           measure_images: int = DEFAULT_MEASURE_IMAGES,
                           latency_runs: int = DEFAULT_LATENCY_RUNS,
                           train_dir: str = "", validation_dir: str = "") -> str:
  """Exports the latest checkpoint of a training model_dir (either path); returns the version.

  export_dir is the export base (default MODEL_DIR/export/manual, for a TFLite model
  MODEL_DIR/export/tflite); the version goes below it. representative_images and
  serving_warmup_requests default to the run's settings; train_dir / validation_dir replace the
  run's image folders (data moved since training). A TFLite version's export_info.json holds the
  measurements (export_tflite.read_info).
  """
  config_lib.check_choice("format", export_format, config_lib.EXPORT_FORMATS)
  export_tflite.check_quantize(quantize)
  if export_format == "saved_model" and quantize != "none":
    raise ValueError(f"--quantize={quantize} applies to --format=tflite only; a SavedModel is "
                     "always float32.")
  config_lib.check_at_least("measure_images", measure_images, 0, "0 skips the measurement.")
  config_lib.check_at_least("latency_runs", latency_runs, 1)
  record = model_dir_lib.read_run_config(model_dir)
  if record is None:
    raise ValueError(f"--model_dir={model_dir} has no {model_dir_lib.CONFIG_FILE}: it is not a "
                     "model_dir written by `estimator-ft train`.")
  class_names = tuple(record["class_names"])
  # The model_dir may have moved since training; a distribution strategy plays no part in export.
  config = Config.from_dict(record["config"]).replace(model_dir=model_dir, distribution="none")
  overrides = {key: value for key, value in (("train_dir", train_dir),
                                             ("validation_dir", validation_dir)) if value}
  if representative_images is not None:
    overrides["representative_images"] = representative_images
  if serving_warmup_requests is not None:
    overrides["serving_warmup_requests"] = serving_warmup_requests
  config = config.replace(**overrides)
  config_lib.check_at_least("serving_warmup_requests", config.serving_warmup_requests, 0,
                            "0 writes none.")
  config_lib.check_representative_images(config.representative_images,
                                         quantize if export_format == "tflite" else "none")
  default_base = export_tflite.TFLITE_EXPORT if export_format == "tflite" else export_lib.MANUAL_EXPORT
  export_base = export_dir or os.path.join(model_dir, export_lib.EXPORT_DIR, default_base)
  # Before the model is built: an unwritable destination fails at once, saying what to do.
  model_dir_lib.ensure_writable_dir(
      export_base, "--export_dir" if export_dir else "--model_dir",
      local_only=("--measure_images loads the staged model.tflite in the TFLite interpreter, which "
                  "reads local files only; or pass --measure_images=0"
                  if export_format == "tflite" and measure_images else ""))
  checkpoint_path = _latest_checkpoint(config)
  with faults.explained_write_failures(export_base, job="export"):
    if export_format == "tflite":
      path = _export_tflite(config, class_names, checkpoint_path, export_base, quantize,
                            measure_images, latency_runs)
    else:
      extras = export_lib.ExportExtras(warmup_images=_training_images(
          config, config.serving_warmup_requests, "the TF Serving warm-up requests",
          "--serving_warmup_requests=0 to export without them"))
      path = _export_saved_model(config, class_names, checkpoint_path, export_base, extras)
  logger.info("Exported %s", path)
  return path


def _no_checkpoint_error(model_dir: str) -> ValueError:
  return ValueError(f"--model_dir={model_dir} holds no checkpoint yet: train (or let the running "
                    "training reach its first checkpoint) before exporting.")


def _latest_checkpoint(config: Config) -> str:
  if config.path == "keras":
    checkpoint_path = keras_path.latest_checkpoint(config.model_dir)
  else:
    checkpoint_path = tf.train.latest_checkpoint(config.model_dir)
  if checkpoint_path is None:
    raise _no_checkpoint_error(config.model_dir)
  return checkpoint_path


def _splits(config: Config, purpose: str, instead: str):
  try:
    return loading.load_splits(config)
  except DataError as e:
    raise ValueError(f"{purpose} need the run's images, which cannot be read: {e} Pass "
                     "--train_dir and --validation_dir where the data is now, or "
                     f"{instead}.") from e


def _training_images(config: Config, count: int, purpose: str, instead: str) -> tuple:
  if count <= 0:
    return ()
  return samples.encoded_images(_splits(config, purpose, instead).train, count)


def _checkpoint_weights(config: Config, class_names, checkpoint_path: str) -> list:
  if config.path == "keras":
    return keras_path.checkpoint_weights(config, len(class_names), checkpoint_path)
  return estimator_path.checkpoint_weights(config, len(class_names), checkpoint_path)


def _export_saved_model(config: Config, class_names, checkpoint_path: str, export_base: str,
                        extras: export_lib.ExportExtras) -> str:
  if config.path == "keras":
    model = model_lib.build_model(config, len(class_names))
    model.set_weights(keras_path.checkpoint_weights(config, len(class_names), checkpoint_path))
    return export_lib.export_keras_model(model, config, class_names, export_base,
                                         global_step=export_lib.checkpoint_step(checkpoint_path),
                                         extras=extras)
  # steps_per_epoch only shapes the training schedule, which a PREDICT graph does not contain.
  estimator = estimator_path.make_estimator(config, class_names, steps_per_epoch=1)
  return export_lib.export_estimator(estimator, config, class_names, export_base, checkpoint_path,
                                     extras=extras)


def _export_tflite(config: Config, class_names, checkpoint_path: str, export_base: str,
                   quantize: str, measure_images: int, latency_runs: int) -> str:
  representative, validation = (), ()
  if quantize == "int8" or measure_images:
    splits = _splits(config, "int8 calibration and the measurement",
                     "--quantize=dynamic --measure_images=0")
    if quantize == "int8":
      representative = samples.encoded_images(splits.train, config.representative_images)
    if measure_images:
      validation = samples.encoded_images(splits.validation, measure_images)
  logger.info("Converting %s to TFLite (quantize=%s%s)", checkpoint_path, quantize,
              f", calibrated on {len(representative)} training images" if representative else "")
  tflite_model = export_tflite.convert(
      config, class_names, _checkpoint_weights(config, class_names, checkpoint_path), quantize,
      representative)
  info = {"path": config.path, "class_names": list(class_names), "image_size": config.image_size,
          "global_step": export_lib.checkpoint_step(checkpoint_path), "checkpoint": checkpoint_path,
          "quantize": quantize, "representative_images": len(representative)}

  def reference(scratch_dir):
    logger.info("Measuring on %d validation images against the SavedModel of the same checkpoint",
                len(validation))
    return _export_saved_model(config, class_names, checkpoint_path, scratch_dir,
                               export_lib.NO_EXTRAS)

  return export_tflite.export_version(export_base, tflite_model, class_names, info, reference,
                                      validation, latency_runs)
