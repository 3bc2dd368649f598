"""The run's resolved configuration as a TensorBoard text summary (TEXT tab), both paths."""

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
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
