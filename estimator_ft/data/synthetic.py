"""Random in-memory batches with the structure of the real pipeline's, for tests and benchmarks."""

import tensorflow as tf

from estimator_ft import contract
from estimator_ft.data import images
from estimator_ft.data.pipeline import check_mode, stream_options


def synthetic_dataset(config, num_classes: int, mode: str, num_examples: int = 64
                      ) -> tf.data.Dataset:
  """Random in-memory images with the element structure of make_dataset, for tests/benchmarks.

  Images come from stateless random ops rather than a numpy constant, so an Estimator graph
  (and the graph.pbtxt it writes) stays small at any image size.
  """
  check_mode(mode)
  if num_classes < 1 or num_examples < 1:
    raise ValueError(f"synthetic_dataset needs num_classes >= 1 and num_examples >= 1, got "
                     f"{num_classes} and {num_examples}.")
  size, seed = config.image_size, config.seed

  def make(index):
    image = tf.random.stateless_uniform([size, size, 3], seed=tf.stack(
        [tf.constant(seed, tf.int64), index]), minval=0.0, maxval=255.0)
    label = tf.cast(index % num_classes, tf.int32)
    return images.preprocess_for_model(image), label

  dataset = tf.data.Dataset.range(num_examples).map(make, num_parallel_calls=tf.data.AUTOTUNE)
  # Cached so a benchmark measures the model, not the random number generator.
  dataset = dataset.cache()
  if mode == "train":
    dataset = dataset.repeat()
  if mode == "predict":
    dataset = dataset.map(lambda image, label: {contract.FEATURE_KEY: image})
  else:
    dataset = dataset.map(lambda image, label: ({contract.FEATURE_KEY: image}, label))
  dataset = dataset.batch(config.batch_size, drop_remainder=mode == "train")
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(stream_options())


def make_synthetic_input_fn(config, num_classes: int, mode: str, num_examples: int = 64):
  check_mode(mode)

  def input_fn():
    return synthetic_dataset(config, num_classes, mode, num_examples)

  return input_fn
