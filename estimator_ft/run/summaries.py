"""The run's resolved configuration as a TensorBoard text summary (TEXT tab) and its settings with
the final validation metrics for the HParams tab, both paths."""

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

CONFIG_SUMMARY_DIR = "config"


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


def add_scalars(writer, step: int, values: dict) -> None:
  """Scalars (TensorBoard's SCALARS tab) at `step` through one of TensorBoard's EventFileWriters."""
  summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                       for k, v in values.items()])
  writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))


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
