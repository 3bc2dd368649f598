"""TFDS datasets as a source: resolved like a folder split, read through the same decoder.

tensorflow_datasets is imported on first use only: it is slow to import and only this source needs it.
"""

import logging

import tensorflow as tf

from estimator_ft import image_formats
from estimator_ft.data import images
from estimator_ft.data.split import DataError, Split

# A split stored in generation order (a builder with disable_shuffling, possibly class-sorted) is
# shuffled through a buffer of the whole split when its encoded examples fit in this much memory:
# then every epoch is a uniform permutation, as for folders. 1 GiB holds ~40,000 typical
# 25 KB JPEGs (cats_vs_dogs' 23,262 images are ~0.8 GB).
WHOLE_SPLIT_BUFFER_BYTES = 1 << 30


def _tfds():
  # Imported on use: it is slow to import and only the TFDS source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def tfds_builder(name: str, data_dir: str):
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"--tfds_name={name!r} is not a TFDS dataset ({str(e).splitlines()[0]}). "
                    "See https://www.tensorflow.org/datasets/catalog for names.") from e


def _tfds_image_is_encoded(builder, image_key: str) -> bool:
  return isinstance(builder.info.features[image_key], _tfds().features.Image)


def _tfds_as_dataset(builder, split: str, image_key: str) -> tf.data.Dataset:
  """The raw TFDS examples, images still encoded when TFDS stores them encoded.

  Skipping TFDS' decoding lets the shuffle buffer hold small encoded strings rather than pixels,
  and makes TFDS images go through exactly the decoder the folder source uses.
  """
  decoders = None
  if _tfds_image_is_encoded(builder, image_key):
    decoders = {image_key: _tfds().decode.SkipDecoding()}
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)


def tfds_split(config, which: str) -> Split:
  name, data_dir = config.tfds_name, config.tfds_data_dir
  split = getattr(config, f"tfds_{which}_split")
  image_key, label_key = config.tfds_image_key, config.tfds_label_key
  builder = tfds_builder(name, data_dir)
  features = builder.info.features
  for flag, key in (("tfds_image_key", image_key), ("tfds_label_key", label_key)):
    if key not in features:
      raise DataError(f"--{flag}={key!r}: {name} has no such feature; it has "
                      f"{', '.join(sorted(features.keys()))}.")
  label_feature = features[label_key]
  class_names = tuple(getattr(label_feature, "names", None) or ())
  if not class_names:
    raise DataError(f"--tfds_label_key={label_key!r}: feature {label_key!r} of {name} is not a "
                    "ClassLabel with class names; pick the dataset's class label feature.")
  try:
    dataset = _tfds_as_dataset(builder, split, image_key)
  except AssertionError as e:  # how TFDS 4.9 says the data was never prepared in data_dir
    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    raise DataError(
        f"TFDS dataset {name} is not prepared in {where}. This package never downloads: run "
        f"`tfds build {name} --data_dir=DIR` on a machine with internet, copy DIR here, and pass "
        "--tfds_data_dir=DIR.") from e
  except (ValueError, KeyError) as e:
    known = ", ".join(builder.info.splits.keys()) or "unknown"
    raise DataError(f"--tfds_{which}_split={split!r} does not work for {name} ({e}). Its splits: "
                    f"{known}; slices like 'train[:80%]' are fine.") from e
  num_examples = None
  if builder.info.splits:
    # Prepared data records every split's size, which also resolves slices like train[:80%].
    num_examples = builder.info.splits[split].num_examples
  else:
    # Data without split metadata (tfds.testing.mock_data does this): ask the dataset itself.
    cardinality = int(dataset.cardinality())
    num_examples = cardinality if cardinality >= 0 else None
  if not num_examples:
    raise DataError(f"--tfds_{which}_split={split!r} of {name} has no examples (or an unknown "
                    "number); pick another split or slice.")
  return Split(name=which, class_names=class_names, num_examples=int(num_examples),
               tfds_name=name, tfds_split=split, tfds_data_dir=data_dir,
               tfds_image_key=image_key, tfds_label_key=label_key,
               tfds_generation_order=bool(builder.info.disable_shuffling),
               tfds_num_bytes=_estimated_num_bytes(builder, int(num_examples)))


def _estimated_num_bytes(builder, num_examples: int) -> int:
  """The split's encoded size from the dataset's average example size (TFDS 4.9 records no
  size for a slice such as train[:80%]); 0 when the data has no split metadata."""
  full_splits = list(builder.info.splits.values())
  total_examples = sum(info.num_examples for info in full_splits)
  total_bytes = sum(info.num_bytes for info in full_splits)
  return round(total_bytes * num_examples / total_examples) if total_examples else 0


def training_shuffle_buffer(split: Split, shuffle_buffer: int) -> int:
  """The shuffle buffer of a TFDS split's training stream, in examples.

  TFDS stores a prepared split in the order of a hash of each example's key, so whatever order
  the builder generated (class after class, say) is already mixed on disk, and `--shuffle_buffer`
  only has to vary the order between epochs. A builder that disables that shuffling stores
  generation order: there the buffer is all that mixes, so it holds the whole split when that
  fits WHOLE_SPLIT_BUFFER_BYTES.
  """
  if split.tfds_generation_order and split.tfds_num_bytes <= WHOLE_SPLIT_BUFFER_BYTES:
    return split.num_examples
  return max(1, min(shuffle_buffer, split.num_examples))


def log_stored_order(split: Split, shuffle_buffer: int) -> None:
  """Says once, before training, how a TFDS training split will be mixed."""
  buffer = training_shuffle_buffer(split, shuffle_buffer)
  if not split.tfds_generation_order:
    return
  if buffer >= split.num_examples:
    logging.info("TFDS %s %s is stored in generation order (the builder disables shuffling): "
                 "shuffling the whole split (%d examples, ~%.0f MB encoded) each epoch.",
                 split.tfds_name, split.tfds_split, split.num_examples, split.tfds_num_bytes / 1e6)
  else:
    logging.warning(
        "TFDS %s %s is stored in generation order (the builder disables shuffling), which may be "
        "sorted by class, and at ~%.0f MB it is too large to shuffle whole in memory: a buffer of "
        "%d of its %d examples mixes only nearby examples. Prepare it with shuffling, or train "
        "from `estimator-ft prepare` records (written in a random order).",
        split.tfds_name, split.tfds_split, split.tfds_num_bytes / 1e6, buffer, split.num_examples)


def source_dataset(split: Split, max_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS):
  """(encoded or decoded image, int32 label) examples in the split's stored order, plus
  `load(item) -> [h, w, 1|3|4]`, the image at its own size (run inside the parallel map); an
  encoded image over `max_pixels` fails there before it is decoded."""
  builder = tfds_builder(split.tfds_name, split.tfds_data_dir)
  image_key, label_key = split.tfds_image_key, split.tfds_label_key
  examples = _tfds_as_dataset(builder, split.tfds_split, image_key)
  examples = examples.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))
  if _tfds_image_is_encoded(builder, image_key):
    load = lambda image_bytes: images.decode_rgb(image_bytes, max_pixels)  # pylint: disable=unnecessary-lambda-assignment
  else:
    load = tf.convert_to_tensor
  return examples, load


def shuffled_stream(examples: tf.data.Dataset, split: Split, config) -> tf.data.Dataset:
  """The infinite training stream of a TFDS split: a seeded shuffle buffer, reshuffled each epoch.

  A TFDS split is a stream of records, not an index, so it cannot be permuted whole the way a
  folder's file list is. TFDS itself shuffles the examples once when it prepares a dataset (by a
  hash of each example's key), so the stored order is already mixed; its `shuffle_files` would
  only reorder whole shards, which does nothing for a one-shard split and breaks the seeded,
  replayable order. The buffer holds encoded images (small), and mixes within its reach - the
  whole split for one stored in generation order (training_shuffle_buffer). Shuffling before
  repeat keeps epochs apart: each holds every example exactly once.
  """
  shuffle_buffer = training_shuffle_buffer(split, config.shuffle_buffer)
  return examples.shuffle(shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
