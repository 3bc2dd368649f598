"""`make_dataset`: one resolved `Split` -> batches of `({"image": float32 [b, s, s, 3]}, int32 [b])`.

The order of the steps, and why:
  1. the order of examples - train: a fresh uniform permutation of the whole split every epoch
     (records: shard order, interleave and buffer, seeded the same way; see data/records.py),
     drawn from (seed, epoch) alone, so neither the folder layout (classes listed one after the
     other) nor the split's size decides which classes a batch holds, and a replayed stream is
     the same stream (--exact_resume); eval/predict: the split's own order, once;
  2. numbering each element by its position in the infinite stream, before anything can be
     dropped: that number seeds its augmentation;
  3. skipping to the resume position (indices only: nothing skipped is ever read);
  4. read + decode + augment per image, in parallel (images differ in size until resized, and
     each gets its own crop and flip);
  5. batch (in parallel), then preprocess for the model: the channel flip and mean work
     elementwise, so a batch gets the values its images would, in one op (0.09 instead of
     0.70 ms a 224-px image, see images.preprocess_for_model);
  6. prefetch, so decoding the next batches overlaps the training step.
"""

import tensorflow as tf

from estimator_ft import contract
from estimator_ft.data import images
from estimator_ft.data import records
from estimator_ft.data import tfds_source
from estimator_ft.data.split import DataError, Split

MODES = ("train", "eval", "predict")
# Permutations are drawn with Philox explicitly: "auto_select" may pick another algorithm on
# another device, and the same seed must give the same order on every machine of a comparison.
PERMUTATION_ALGORITHM = "philox"
# The functions tf.data traces here are TensorFlow ops with Python control flow on Python values
# only, so AutoGraph (which tf.data applies by default) has nothing to convert in them. Its source
# transformation was 1.2 s of the 1.4 s that cProfile gave a process's first pipeline (64 px,
# 2 cores); without it the build took 0.17 s.
traced_as_written = tf.autograph.experimental.do_not_convert


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not valid: use one of {', '.join(MODES)}.")


def epoch_permutation(num_examples: int, seed: int, epoch) -> tf.Tensor:
  """int64 [num_examples]: the order of epoch `epoch`, a uniform permutation of 0..n-1.

  A pure function of (seed, epoch): every epoch is a different permutation, and any epoch can be
  recomputed on its own (resume) without replaying the ones before it.
  """
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int64),
      seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]),
      alg=PERMUTATION_ALGORITHM)


def permuted_indices(num_examples: int, seed: int, start_example: int = 0) -> tf.data.Dataset:
  """The infinite training order: epoch 0's permutation, then epoch 1's, ..., from `start_example`.

  Starts directly in the epoch of `start_example` (an O(1) resume, whatever the epoch).
  """
  first_epoch, offset = divmod(start_example, num_examples)
  epochs = tf.data.Dataset.counter(first_epoch)
  indices = epochs.flat_map(traced_as_written(lambda epoch: tf.data.Dataset.from_tensor_slices(
      epoch_permutation(num_examples, seed, epoch))))
  return indices.skip(offset)


def _folder_items(split: Split):
  if not split.paths:
    raise DataError(f"The {split.name} split has no image paths and no TFDS source; build it "
                    "with load_splits or scan_image_folder.")
  return tf.constant(split.paths, tf.string), tf.constant(split.labels, tf.int32)


def _file_loader(split: Split, max_pixels: int):
  """`load(path)`: the file's image at its own size; over max_pixels, an error before decoding.

  The check runs for every file: one may have changed since the scan checked it.
  """
  return lambda path: images.decode_rgb(tf.io.read_file(path), max_pixels, split.holds_gif)


def _record_loader(split: Split, max_pixels: int):
  """`load(encoded bytes)` for records: their pixel limit was checked once, by prepare, under
  split.verified_max_pixels; checked again only under a lower --max_image_pixels (or for records
  prepared before the limit was recorded)."""
  if split.verified_max_pixels and split.verified_max_pixels <= max_pixels:
    return images.decode_verified_rgb
  return lambda encoded: images.decode_rgb(encoded, max_pixels)


def _one(item: tuple):
  """A map's arguments as one item: tf.data passes a tuple element (TFDS) as several."""
  return item if len(item) > 1 else item[0]


def stream_options() -> tf.data.Options:
  """The options of every stream this package makes, whatever its mode (make_dataset's, the
  synthetic ones)."""
  options = tf.data.Options()
  # No autotuning. Destroying an autotuned iterator waits for its model thread, and in TF 2.15
  # that thread can miss the wake-up and sleep out its optimisation period, which grows to tens
  # of seconds over the iterator's life (gdb: the main thread in ~RootDataset::Iterator, the
  # model thread in Model::OptimizeLoop's timed wait). Measured on 2-core EPYCs: 10-19 s stalls
  # in every second evaluation of `make demo` (the in-process evaluator re-initializes its
  # iterator for every pass), and 16-20 s at the end of Keras `fit` (its training iterator) in
  # about half of the 2-epoch 64-px runs. Without autotuning the parallel map and batch run on
  # as many threads as there are cores, and prefetch sizes its own buffer.
  options.autotune.enabled = False
  # The source is a list of file names (or TFDS records), which file-based auto-sharding cannot
  # split; say DATA up front instead of letting every multi-worker run warn and fall back to it.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return options


def make_dataset(split: Split, config, mode: str, start_batch: int = 0) -> tf.data.Dataset:
  """Batches of `({"image": float32 [b, size, size, 3]}, int32 [b])`; predict: features only.

  train: infinite (the trainers count steps_per_epoch), each epoch a fresh permutation of the
  whole split (TFDS: a shuffle buffer, see tfds_source), augmented when config.augment.
  eval/predict: one pass in order, every example exactly once, last batch partial.

  start_batch (train only): start the stream at that batch. The stream is a pure function of the
  seed (seeded permutations, augmentation seeded by stream position), so a run resumed after N
  steps that starts at batch N sees exactly the batches an uninterrupted run would
  (--exact_resume). Skipping costs only index arithmetic: the skipped images are never read.
  """
  check_mode(mode)
  if start_batch < 0 or (start_batch and mode != "train"):
    raise ValueError(f"start_batch={start_batch}: only a train stream can start later, at a "
                     "batch >= 0.")
  size = config.image_size
  training = mode == "train"
  # Every training batch is full (drop_remainder), so batch N starts at example N x batch size.
  start_example = start_batch * config.batch_size
  augmenting = training and config.augment
  seed = config.seed
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def augmented(position, image):
    """image: resized, or (uncached and augmenting) as loaded, which the crop resizes."""
    if augmenting:
      # The seed is (run seed, position in the infinite stream): identical for any number of
      # parallel calls, and the same again when the pipeline is rebuilt and replayed.
      image = images.augment_image(image, tf.stack([tf.constant(seed, tf.int64), position]), size)
    return image

  def skip_broken(dataset):
    # A file that went bad after the scan (or a corrupt TFDS record) is dropped with a TF
    # warning instead of killing a run hours in. Not in predict: a dropped element would shift
    # every later prediction onto the wrong input.
    return dataset if mode == "predict" else dataset.ignore_errors(log_warning=True)

  # `examples`: the stream of cheap items in their final order (file indices, serialized records
  # or TFDS examples); `read(item)`: (the image at its own size, label), run in the one parallel
  # map per image below - each tf.data stage costs every element its own hand-off.
  if split.is_tfds:
    examples, load = tfds_source.source_dataset(split, config.max_image_pixels)
    if training:
      examples = tfds_source.shuffled_stream(examples, split, config)

    def read(item):
      return load(item[0]), item[1]
  elif split.is_records:
    # Serialized records in the order of data/records.py (shard order, interleaved reads and a
    # buffer, all seeded by (seed, epoch)).
    load = _record_loader(split, config.max_image_pixels)
    if training and not config.cache:
      examples = records.training_stream(split, seed, config.shuffle_buffer, start_example)
    elif training:
      examples = records.epoch_records(split, seed, 0, config.shuffle_buffer)
    else:
      examples = records.in_order(split)

    def read(serialized):
      encoded, label = records.parse_record(serialized)
      return load(encoded), label
  else:
    paths, labels = _folder_items(split)
    load = _file_loader(split, config.max_image_pixels)
    if training and not config.cache:
      examples = permuted_indices(split.num_examples, seed, start_example)
    elif training:
      # Cached: one pass is decoded and kept, so the order is fixed when it is cached - make it
      # a permutation (epoch 0's), never the class-sorted folder order; each epoch then mixes it
      # again through the shuffle buffer below.
      examples = tf.data.Dataset.from_tensor_slices(epoch_permutation(split.num_examples, seed, 0))
    else:
      examples = tf.data.Dataset.range(split.num_examples)

    def read(index):
      return load(tf.gather(paths, index)), tf.gather(labels, index)

  def read_resized(item):
    image, label = read(item)
    return images.resize_image(image, size), label

  if config.cache:
    # Decode+resize once and cache the un-augmented images; augmentation comes after the cache,
    # so every epoch still gets new crops. Cached images are resized (originals may not fit in
    # memory), so here crops come from the resized image.
    dataset = examples.map(traced_as_written(lambda *item: read_resized(_one(item))), **parallel)
    dataset = skip_broken(dataset).cache()
    if training:
      shuffle_buffer = max(1, min(config.shuffle_buffer, split.num_examples))
      dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      dataset = dataset.repeat().enumerate().skip(start_example)
    else:
      dataset = dataset.enumerate()
    dataset = dataset.map(traced_as_written(
        lambda position, example: (augmented(position, example[0]), example[1])), **parallel)
  else:
    if training and split.is_tfds:
      dataset = examples.enumerate().skip(start_example)
    else:
      # Folder and records train streams start at start_example already; number them from there.
      dataset = examples.enumerate(start=start_example if training else 0)
    # The crop resizes, so augmented images skip the resize and are interpolated once, from
    # the decoded pixels.
    read_one = read if augmenting else read_resized

    def read_augmented(position, item):
      image, label = read_one(item)
      return augmented(position, image), label

    dataset = dataset.map(traced_as_written(read_augmented), **parallel)
    dataset = skip_broken(dataset)

  # Train is infinite, so dropping the remainder loses nothing and gives a static batch size
  # (XLA and distribution strategies prefer it); eval keeps it so every example counts once.
  # In parallel: skip_broken between the map and the batch keeps tf.data from fusing the two, so
  # the batch is a stage of its own that copies every image once more (~0.1 ms of CPU less an
  # image at 224 px with these threads, measured on records).
  dataset = dataset.batch(config.batch_size, drop_remainder=training, **parallel)

  def for_model(batch, labels):
    features = {contract.FEATURE_KEY: images.preprocess_for_model(batch)}
    return features if mode == "predict" else (features, labels)

  dataset = dataset.map(traced_as_written(for_model), **parallel)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(stream_options())


def make_input_fn(split: Split, config, mode: str, start_batch: int = 0):
  """A zero-argument tf.estimator input_fn; the dataset is built inside the Estimator's graph."""
  check_mode(mode)

  def input_fn():
    return make_dataset(split, config, mode, start_batch)

  return input_fn
