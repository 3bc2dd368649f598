"""Process-wide TensorFlow state a run sets up: its distribution strategy and op determinism."""

import contextlib
import functools

import tensorflow as tf
# TF 2.15 exports only the enabling call; the query and the reset live next to it.
from tensorflow.python.framework import config as tf_framework_config  # pylint: disable=g-direct-tensorflow-import


def distribution_strategy(config):
  """The tf.distribute strategy of `config.distribution`, or None for the default.

  The default covers a TF_CONFIG cluster with parameter servers on the Estimator path. The
  MultiWorkerMirroredStrategy (Keras path) is made once per process: TensorFlow sets up its
  collective ops only before the process runs its first op, and only once.
  """
  if config.distribution == "mirrored":
    return tf.distribute.MirroredStrategy()
  if config.distribution == "multi_worker_mirrored":
    return _multi_worker_mirrored_strategy()
  return None


@functools.lru_cache(maxsize=None)
def _multi_worker_mirrored_strategy():
  return tf.distribute.MultiWorkerMirroredStrategy()


@contextlib.contextmanager
def op_determinism(enabled: bool):
  """--deterministic: TensorFlow ops give bit-identical results run after run, for this run only.

  The switch is process-wide, so it is turned off again afterwards: a later run in the same process
  (tests, compare) must not inherit it (it makes unseeded random ops raise).
  """
  if not enabled:
    yield
    return
  was_enabled = tf_framework_config.is_op_determinism_enabled()
  tf.config.experimental.enable_op_determinism()
  try:
    yield
  finally:
    if not was_enabled:
      tf_framework_config.disable_op_determinism()
