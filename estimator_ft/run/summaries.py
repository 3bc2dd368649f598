"""What both paths write for TensorBoard: the run's config, the common training curves, and the
run's settings with its final validation metrics for the HParams tab.

The common curves - the same tags, at the same x (the global step), in each path's model_dir
itself - let one `tensorboard --logdir` overlay the paths in one card per figure (run names: the
model_dirs, e.g. keras, estimator, naive under a `compare` output):

  train/loss, train/accuracy   running averages over the epoch so far (what Keras' progress bar
                               shows), every --save_summary_steps steps and at each epoch end
  learning_rate                the rate of the step that just ran, at the same steps
  validation/loss, validation/accuracy, validation/<metric>
                               one full validation pass (per example) at each evaluation
  validation/confusion_matrix  its confusion matrix as a heat map with the class names (image)

The paths' own summaries stay where they were (the Estimator's `loss` per batch and its eval/
folder, which the history is read from), under other tags.
"""

import json
import logging
import os
import struct
import time
from typing import Dict, Optional

import numpy as np

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from estimator_ft import model_fn as model_fn_lib
from estimator_ft.reports import plots

logger = logging.getLogger("estimator_ft")

CONFIG_SUMMARY_DIR = "config"

TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
LEARNING_RATE = "learning_rate"
VALIDATION_PREFIX = "validation/"
VALIDATION_LOSS = VALIDATION_PREFIX + "loss"
VALIDATION_ACCURACY = VALIDATION_PREFIX + "accuracy"
CONFUSION_MATRIX_IMAGE = VALIDATION_PREFIX + "confusion_matrix"
# TensorBoard shows images at their size: this keeps a 2-class heat map about 500 px wide, and
# no heat map wider than about 1200 px (rendering time grows with the pixels).
CONFUSION_MATRIX_DPI = 80
CONFUSION_MATRIX_MAX_PIXELS = 1200
# A PNG's width and height, big-endian, in its IHDR chunk right after the 8-byte signature.
_PNG_SIZE = struct.Struct(">II")
_PNG_SIZE_OFFSET = 16
_RGBA = 4


def write_config_summary(config, class_names) -> None:
  """The resolved config as a TensorBoard text summary (TEXT tab) in model_dir/config.

  Written with TensorBoard's own event writer rather than `tf.summary`, whose writers depend on
  process-wide state (eager mode, recording conditions, default writers) that a Keras callback or
  an earlier run in the same process can leave changed; in the full test suite the `tf.summary`
  version silently wrote nothing.
  """
  text = json.dumps({"config": config.to_dict(), "class_names": list(class_names)}, indent=2)
  value = summary_pb2.Summary.Value(
      tag="run_config", tensor=tensor_util.make_tensor_proto("```\n" + text + "\n```"),
      metadata=summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")))
  writer = EventFileWriter(os.path.join(config.model_dir, CONFIG_SUMMARY_DIR))
  writer.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                   summary=summary_pb2.Summary(value=[value])))
  writer.close()


# ---------------------------------------------------------------- the common curves

def due(step: int, previous_step: Optional[int], every_n_steps: int, steps_per_epoch: int) -> bool:
  """Whether the training curves are written at `step`: a multiple of every_n_steps or an epoch
  end was reached since `previous_step` (an asynchronous cluster's shared step can jump over one)."""
  if previous_step is None:
    previous_step = step - 1
  return any(step // n > previous_step // n for n in (every_n_steps, steps_per_epoch) if n > 0)


def training_scalars(loss: float, accuracy: float, learning_rate: float) -> Dict[str, float]:
  return {TRAIN_LOSS: float(loss), TRAIN_ACCURACY: float(accuracy),
          LEARNING_RATE: float(learning_rate)}


def validation_scalars(metrics: dict) -> Dict[str, float]:
  """{validation/<name>: value} from either path's validation metrics.

  Estimator: its eval metrics (example_loss is the per-example validation loss). Keras: the
  epoch logs' val_* entries (val_loss is already per example). Non-scalar entries are left out.
  """
  scalars = {}
  for name, value in metrics.items():
    if name.startswith("val_"):
      name = name[len("val_"):]
    elif name == "loss":
      continue  # the Estimator's own "loss" is a mean of per-batch means; example_loss is the loss
    if name == model_fn_lib.EXAMPLE_LOSS:
      name = "loss"
    try:
      scalars[VALIDATION_PREFIX + name] = float(value)
    except (TypeError, ValueError):
      continue
  return scalars


def partial_validation_warning(matrix, expected_examples: int) -> Optional[str]:
  """Logs and returns a warning when a validation pass read fewer examples than its split holds
  (the sum of the pass's confusion matrix against `expected_examples`; 0: not known, no check).

  The pipeline drops what cannot be read - a file changed or damaged since the scan, or a damaged
  records shard, whose remaining records are lost with it - with only a TensorFlow warning, which
  the CLI hides with the rest of TensorFlow's C++ log unless --verbosity is given; the metrics
  then describe part of the split, which nobody should mistake for the whole.
  """
  evaluated = int(np.rint(np.sum(matrix)))
  if not expected_examples or evaluated >= expected_examples:
    return None
  message = (f"The validation pass read {evaluated} of {expected_examples} examples: the other "
             f"{expected_examples - evaluated} could not be read, so these validation metrics "
             "cover only part of the split. TensorFlow names each error in a warning (shown with "
             "--verbosity=0); fix or remove the damaged files (or prepare the records again) and "
             "evaluate again.")
  logger.warning(message)
  return message


def confusion_matrix_png(matrix, class_names) -> bytes:
  """The validation confusion matrix as the heat map `estimator-ft evaluate` draws, as a PNG."""
  figure = plots.confusion_matrix_figure(matrix, class_names, title="Validation confusion matrix")
  dpi = min(CONFUSION_MATRIX_DPI, CONFUSION_MATRIX_MAX_PIXELS / max(figure.get_size_inches()))
  return plots.png_bytes(figure, dpi=dpi)


def curve_summary(scalars: Dict[str, float], images: Optional[Dict[str, bytes]] = None
                  ) -> summary_pb2.Summary:
  """One Summary of scalars (simple values) and PNG images, as TensorBoard's readers expect them."""
  values = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
            for tag, value in sorted(scalars.items())]
  for tag, png in sorted((images or {}).items()):
    width, height = _PNG_SIZE.unpack_from(png, _PNG_SIZE_OFFSET)
    values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
        height=height, width=width, colorspace=_RGBA, encoded_image_string=png)))
  return summary_pb2.Summary(value=values)


class CurveWriter:
  """Writes the common curves into one model_dir with TensorBoard's own event writer (Keras path).

  The Estimator path writes the same summaries through the Estimator's own writer of model_dir
  instead (estimator.py), so that folder has one event file per process, not two growing ones.
  """

  def __init__(self, model_dir: str):
    self._writer = EventFileWriter(model_dir)

  def write(self, step: int, summary: summary_pb2.Summary) -> None:
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


HPARAMS_DIR = "hparams"
# Final validation figures written beside the settings: the HParams tab's metric columns.
# (Keras' validation loss and the Estimator's are both "example_loss" there: per-example means.)
HPARAMS_METRICS = {"val_loss": "example_loss", "val_accuracy": "accuracy", "val_auc": "auc"}


def write_hparams_summary(config, final_evaluation: dict, global_step: int) -> str:
  """The run's settings and final validation metrics for TensorBoard's HParams tab (both paths).

  One session per model_dir, in model_dir/hparams (its own run, so the tab's metric columns are
  just these, not every training curve): with several runs under one --logdir, the HParams tab
  lists them side by side by recipe. Metrics are `val_<name>` scalars at the final step.
  Written with TensorBoard's event writer for the reason write_config_summary gives.
  """
  settings = {k: v for k, v in config.to_dict().items() if isinstance(v, (bool, int, float, str))}
  directory = os.path.join(config.model_dir, HPARAMS_DIR)
  writer = EventFileWriter(directory)
  now = time.time()
  session = hparams_summary.hparams_pb(settings, trial_id=os.path.basename(
      os.path.normpath(config.model_dir)), start_time_secs=now)
  writer.add_event(event_pb2.Event(wall_time=now, step=0, summary=session))
  values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(final_evaluation[key]))
            for tag, key in HPARAMS_METRICS.items() if final_evaluation.get(key) is not None]
  if values:
    writer.add_event(event_pb2.Event(wall_time=now, step=int(global_step),
                                     summary=summary_pb2.Summary(value=values)))
  writer.close()
  return directory
