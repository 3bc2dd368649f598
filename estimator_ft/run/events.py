"""The one reader of TensorFlow event files (what TensorBoard reads), and the views runs need.

A process killed mid-write leaves a truncated last record; the records before it are valid, so
each view uses them and says that the file was damaged.
"""

import logging
from typing import Dict, Iterator

import tensorflow as tf

from estimator_ft import storage

logger = logging.getLogger("estimator_ft")

EVENT_FILE_PATTERN = "events.out.tfevents.*"


def iter_events(directory: str) -> Iterator:
  """Every event of every event file directly in `directory` (oldest file first)."""
  for path in storage.glob_in(directory, EVENT_FILE_PATTERN):
    try:
      yield from tf.compat.v1.train.summary_iterator(path)
    except tf.errors.DataLossError:
      logger.warning("Truncated event file %s: using the records before the damage.", path)


def _scalar(value):
  """The float of a scalar summary value (TF1 simple_value or TF2 scalar tensor), else None."""
  if value.HasField("simple_value"):
    return float(value.simple_value)
  if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
    array = tf.make_ndarray(value.tensor)
    if array.dtype.kind in "fiu":
      return float(array)
  return None


def scalars_by_step(directory: str) -> Dict[int, Dict[str, float]]:
  """{global step: {tag: value}} of the scalar summaries in `directory` (the later value wins)."""
  by_step = {}
  for event in iter_events(directory):
    for value in event.summary.value:
      scalar = _scalar(value)
      if scalar is not None:
        by_step.setdefault(int(event.step), {})[value.tag] = scalar
  return by_step


def checkpoint_times(directory: str) -> Dict[int, float]:
  """{global step: wall time} of every checkpoint a training session logged in its events."""
  return {int(event.step): event.wall_time for event in iter_events(directory)
          if event.HasField("session_log")
          and event.session_log.status == tf.compat.v1.SessionLog.CHECKPOINT}


def summary_times(directory: str) -> Dict[int, float]:
  """{global step: wall time} at which the summaries of each step were written (the latest)."""
  times = {}
  for event in iter_events(directory):
    if event.HasField("summary"):
      times[int(event.step)] = max(times.get(int(event.step), 0.0), event.wall_time)
  return times
