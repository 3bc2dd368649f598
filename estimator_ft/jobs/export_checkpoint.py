"""`estimator-ft export`: a SavedModel from the latest checkpoint of a model_dir, either path.

The run's config.json says which path wrote it and with which settings, so the same serving
signatures come out whichever path trained the model (see export.py).
"""

import logging
import os

import tensorflow as tf

from estimator_ft import estimator as estimator_path
from estimator_ft import export as export_lib
from estimator_ft import keras_path
from estimator_ft import model as model_lib
from estimator_ft.config import Config
from estimator_ft.run import faults
from estimator_ft.run import model_dir as model_dir_lib

logger = logging.getLogger("estimator_ft")


def export_from_checkpoint(model_dir: str, export_dir=None) -> str:
  """Exports the latest checkpoint of a training model_dir (either path); returns the version.

  export_dir is the export base (default MODEL_DIR/export/manual); the version goes below it.
  """
  record = model_dir_lib.read_run_config(model_dir)
  if record is None:
    raise ValueError(f"--model_dir={model_dir} has no {model_dir_lib.CONFIG_FILE}: it is not a "
                     "model_dir written by `estimator-ft train`.")
  class_names = tuple(record["class_names"])
  # The model_dir may have moved since training; a distribution strategy plays no part in export.
  config = Config.from_dict(record["config"]).replace(model_dir=model_dir, distribution="none")
  export_base = export_dir or os.path.join(model_dir, export_lib.EXPORT_DIR,
                                           export_lib.MANUAL_EXPORT)
  # Before the model is built: an unwritable destination fails at once, saying what to do.
  model_dir_lib.ensure_writable_dir(export_base, "--export_dir" if export_dir else "--model_dir")
  with faults.explained_write_failures(export_base, job="export"):
    if config.path == "keras":
      path = _export_keras_checkpoint(config, class_names, export_base)
    else:
      path = _export_estimator_checkpoint(config, class_names, export_base)
  logger.info("Exported %s", path)
  return path


def _no_checkpoint_error(model_dir: str) -> ValueError:
  return ValueError(f"--model_dir={model_dir} holds no checkpoint yet: train (or let the running "
                    "training reach its first checkpoint) before exporting.")


def _export_estimator_checkpoint(config: Config, class_names, export_base: str) -> str:
  checkpoint_path = tf.train.latest_checkpoint(config.model_dir)
  if checkpoint_path is None:
    raise _no_checkpoint_error(config.model_dir)
  # steps_per_epoch only shapes the training schedule, which a PREDICT graph does not contain.
  estimator = estimator_path.make_estimator(config, class_names, steps_per_epoch=1)
  return export_lib.export_estimator(estimator, config, class_names, export_base, checkpoint_path)


def _export_keras_checkpoint(config: Config, class_names, export_base: str) -> str:
  checkpoint_path = keras_path.latest_checkpoint(config.model_dir)
  if checkpoint_path is None:
    raise _no_checkpoint_error(config.model_dir)
  model = model_lib.build_model(config, len(class_names))
  model.set_weights(keras_path.checkpoint_weights(config, len(class_names), checkpoint_path))
  return export_lib.export_keras_model(model, config, class_names, export_base,
                                       global_step=export_lib.checkpoint_step(checkpoint_path))
