"""The error a run stops with when training produces NaNs, and its one what-to-do message."""

import os

import numpy as np
import tensorflow as tf

from estimator_ft import storage


class NaNLossError(ValueError):
  """Training produced a NaN loss; checkpoints written before it are intact."""


def last_finite_checkpoint(model_dir: str):
  """The newest checkpoint of model_dir whose float tensors are all finite, or None."""
  state = tf.train.get_checkpoint_state(model_dir)
  for path in reversed(list(state.all_model_checkpoint_paths) if state else []):
    try:
      reader = storage.checkpoint_reader(path)
    except (tf.errors.OpError, ValueError):
      continue
    dtypes = reader.get_variable_to_dtype_map()
    if all(np.all(np.isfinite(reader.get_tensor(name))) for name, dtype in dtypes.items()
           if dtype.is_floating):
      return path
  return None


def nan_loss_error(config, what: str) -> NaNLossError:
  """The error for either path: what became NaN, what to change, and where a resume would start."""
  model_dir = config.model_dir
  good = last_finite_checkpoint(model_dir)
  latest = tf.train.latest_checkpoint(model_dir)
  if good is None:
    resume = ("No checkpoint with finite weights was written, so there is nothing to resume: "
              "start again in a new --model_dir.")
  elif good == latest:
    resume = (f"The latest checkpoint, {os.path.basename(good)}, has finite weights; re-running "
              "the same command would resume from it with the same settings.")
  else:
    name = os.path.basename(good).rsplit("-", 1)[0]
    resume = (f"The newest checkpoint with finite weights is {os.path.basename(good)}: to resume "
              f"from it, delete the newer {name}-* files and point "
              f"{os.path.join(model_dir, 'checkpoint')} at it; or start again in a new --model_dir.")
  return NaNLossError(
      f"Training stopped: {what}. Nothing already written was removed. Lower --learning_rate "
      f"(now {config.learning_rate}; a new rate needs a new --model_dir, since checkpoints hold the "
      f"optimizer's settings), check the input images, or use --precision=float32. {resume}")
