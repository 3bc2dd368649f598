"""The one tf.data image pipeline, shared by every path.

The Estimator input_fn, the Keras `fit` path, the side-by-side comparison, the serving signature
and the benchmarks all read images through this module, so a difference between two paths can
never come from a difference in decoding, resizing, augmentation or preprocessing.

Sources: an image folder pair (`<root>/<class>/<image>`) or a TFDS dataset. `load_splits` resolves
and checks them before any training starts; `make_dataset` turns one resolved `Split` into batches
of `({"image": float32 [b, size, size, 3]}, int32 [b])`.
"""

import concurrent.futures
import dataclasses
import logging
import math
import os
from typing import Callable, Optional, Tuple

import tensorflow as tf

from estimator_ft import config as config_lib
from estimator_ft import image_formats
from estimator_ft import messages

FEATURE_KEY = "image"
MODES = ("train", "eval", "predict")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")

# Random resized crop: keep at least half of the image, so a small object (the sample data's
# shapes) is rarely cut away entirely, with mild aspect changes that ResNet50 tolerates.
CROP_AREA_RANGE = (0.5, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)

# ResNet50's caffe-mode input statistics (keras.applications.imagenet_utils), in BGR order.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)

# How many bad files the skip warning names; the full list is in Split.skipped.
_MAX_LOGGED_BAD_FILES = 20

logger = logging.getLogger("estimator_ft")


class DataError(ValueError):
  """Bad or missing input data, found before training. The message says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One resolved split (train or validation) of a folder or TFDS source."""
  name: str
  class_names: tuple
  num_examples: int
  paths: tuple = ()
  labels: tuple = ()
  skipped: tuple = ()
  tfds_name: str = ""
  tfds_split: str = ""
  tfds_data_dir: str = ""
  tfds_image_key: str = "image"
  tfds_label_key: str = "label"

  @property
  def is_tfds(self) -> bool:
    return bool(self.tfds_name)


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split
  validation: Split
  class_names: tuple


# ------------------------------------------------------------------ image ops


def decode_rgb(image_bytes) -> tf.Tensor:
  """Scalar string (JPEG, PNG, GIF, BMP) -> uint8 [h, w, 3] RGB at the file's own size.

  channels=3 turns grayscale into RGB and drops alpha; decode_image scales 16-bit PNGs to 8 bits;
  expand_animations=False keeps only the first GIF frame so every image has rank 3.
  """
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def decode_image(image_bytes, image_size: int) -> tf.Tensor:
  """Scalar string (JPEG, PNG, GIF, BMP) -> float32 [size, size, 3] RGB with values in 0..255."""
  return resize_image(decode_rgb(image_bytes), image_size)


def to_rgb(image) -> tf.Tensor:
  """Any [h, w, 1|3|4] image -> [h, w, 3], same dtype and size (gray repeated, alpha dropped)."""
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  if channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif channels == 4:
    image = image[..., :3]
  elif channels is not None and channels != 3:
    raise DataError(f"images have {channels} channels; only 1 (gray), 3 (RGB) and 4 (RGBA) work.")
  return image


def resize_image(image, image_size: int) -> tf.Tensor:
  """Any [h, w, 1|3|4] image -> float32 [size, size, 3], the resize every source goes through."""
  # Bilinear, no antialias: what tf.keras' image_dataset_from_directory does too. It never
  # overshoots, so values stay in 0..255.
  image = tf.image.resize(to_rgb(image), [image_size, image_size])
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return tf.cast(image, tf.float32)


def preprocess_for_model(images) -> tf.Tensor:
  """Float RGB 0..255 -> what Keras' ResNet50 expects (caffe mode: BGR, ImageNet mean removed).

  The same arithmetic as keras.applications.resnet50.preprocess_input, bit for bit (tested), so
  ImageNet weights see exactly the input they were trained on. Keras flips the channels with a
  strided slice, which made it the slowest op of the training map (3x the time of
  tf.reverse + subtract at 224 px, measured).
  """
  images = tf.cast(images, tf.float32)
  return tf.reverse(images, axis=[-1]) - tf.constant(IMAGENET_MEAN_BGR, tf.float32)


def augment_image(image, seed, image_size: int) -> tf.Tensor:
  """Random resized crop plus random left-right flip, both stateless.

  image: [h, w, 1|3|4] of any size and dtype, ideally straight from the decoder: the crop is
  sampled from it and resized to [size, size] in one interpolation. (Resizing to [size, size]
  first and cropping that would interpolate twice, blur twice, and cost more time.)
  Stateless ops make the augmentation a pure function of (image, seed): it does not depend on how
  many map calls run in parallel, and a replayed pipeline augments every element the same way.
  seed: int32/int64 [2]. Returns float32 [size, size, 3] in the input's value range.
  """
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  seeds = tf.random.experimental.stateless_split(seed, num=2)
  image = to_rgb(image)
  # An empty box list plus use_image_if_no_bounding_boxes: sample crops of the whole image.
  crop_begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seeds[1],
      min_object_covered=CROP_AREA_RANGE[0], aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=CROP_AREA_RANGE, use_image_if_no_bounding_boxes=True)
  # Slice (a view of whole pixels, any dtype) then the same bilinear resize as resize_image: 1.3x
  # faster than crop_and_resize, whose per-pixel sampling is the costliest op of the map.
  image = tf.image.resize(tf.slice(image, crop_begin, crop_size), [image_size, image_size])
  # Flip after the crop: the same distribution as before it, on image_size² pixels only.
  image = tf.image.stateless_random_flip_left_right(image, seed=seeds[0])
  return tf.ensure_shape(tf.cast(image, tf.float32), [image_size, image_size, 3])


def decode_and_preprocess(image_bytes, image_size: int) -> tf.Tensor:
  """The eval/serving path for one encoded image: decode -> resize -> preprocess."""
  return preprocess_for_model(decode_image(image_bytes, image_size))


# ------------------------------------------------------------------ folder scan


def check_image_file(path: str) -> Optional[str]:
  """Why the pipeline could not use this file, or None if it decodes.

  Uses the pipeline's own decoder (tf.io.decode_image), which in TF 2.15 rejects every truncated
  JPEG, PNG, GIF and BMP we tried, down to one missing byte (it is stricter than PIL there).
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in IMAGE_EXTENSIONS:
    return (f"unsupported format ({ext or 'no extension'}); use "
            f"{', '.join(e[1:].upper() for e in IMAGE_EXTENSIONS)}")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return f"cannot be read ({e.strerror or e})"
  if not data:
    return "empty file (0 bytes)"
  try:
    decode_rgb(data)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError,
          tf.errors.DataLossError, tf.errors.ResourceExhaustedError) as e:
    return f"cannot be decoded ({messages.short_tf_error(e)})"
  return image_formats.bmp_palette_problem(data)


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _list_class_files(class_dir: str) -> list:
  """Every non-hidden file under one class folder (nested folders too), in sorted order."""
  files = []
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _visible(f))
  return files


def _check_files(paths) -> list:
  """[(path, reason)] of the files that cannot be used, in the order of `paths`."""
  if not paths:
    return []
  # Decoding releases the GIL, so a few threads overlap file reads and decodes.
  workers = min(8, 2 * (os.cpu_count() or 1), len(paths))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    reasons = list(pool.map(check_image_file, paths))
  return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _bad_files_message(root: str, name: str, bad: list) -> str:
  lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
  return (f"{len(bad)} file(s) in the {name} folder {root} cannot be used:\n{lines}\n"
          "Fix or remove them, or pass --bad_images=skip to train without them.")


def scan_image_folder(root: str, name: str, bad_images: str = "fail") -> Split:
  """Lists and checks `<root>/<class>/<image>`; every image is test-decoded here, before training.

  bad_images="fail" raises DataError naming every bad file; "skip" leaves them out and records
  them in `Split.skipped`.
  """
  if bad_images not in config_lib.BAD_IMAGE_POLICIES:
    raise DataError(f"--bad_images={bad_images!r} is not valid: use one of "
                    f"{', '.join(config_lib.BAD_IMAGE_POLICIES)}.")
  flag = f"--{name}_dir"
  if not root:
    raise DataError(f"{flag} is empty: give the folder that holds one sub-folder per class.")
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.exists(root):
    raise DataError(f"{flag}={root} does not exist. Give the folder that holds one sub-folder "
                    "per class (e.g. data/sample/train after `make demo`).")
  if not os.path.isdir(root):
    raise DataError(f"{flag}={root} is a file, not a folder. Give the folder that holds one "
                    "sub-folder per class.")
  entries = sorted(e for e in os.listdir(root) if _visible(e))
  class_names = tuple(e for e in entries if os.path.isdir(os.path.join(root, e)))
  if not class_names:
    loose = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
    hint = (f" It holds {len(loose)} image file(s) directly; move them into one sub-folder per "
            "class." if loose else "")
    raise DataError(f"{flag}={root} has no class sub-folders. Expected {root}/<class name>/"
                    f"<image>, one sub-folder per class.{hint}")

  per_class = [(index, _list_class_files(os.path.join(root, c)))
               for index, c in enumerate(class_names)]
  candidates = [(path, index) for index, files in per_class for path in files]
  bad = _check_files([p for p, _ in candidates])
  if bad and bad_images == "fail":
    raise DataError(_bad_files_message(root, name, bad))
  bad_paths = {p for p, _ in bad}
  kept = [(p, i) for p, i in candidates if p not in bad_paths]
  if bad:
    shown = "\n".join(f"  {p}: {r}" for p, r in bad[:_MAX_LOGGED_BAD_FILES])
    more = len(bad) - _MAX_LOGGED_BAD_FILES
    logger.warning("Skipping %d bad file(s) of %d in the %s folder %s (--bad_images=skip):\n%s%s",
                   len(bad), len(candidates), name, root, shown,
                   f"\n  ... and {more} more" if more > 0 else "")

  counts = [0] * len(class_names)
  for _, index in kept:
    counts[index] += 1
  empty = [os.path.join(root, c) for c, n in zip(class_names, counts) if n == 0]
  if empty:
    skipped_note = " (after skipping bad files)" if bad else ""
    raise DataError(f"Class folder(s) with no usable images{skipped_note} in the {name} data: "
                    f"{', '.join(empty)}. Add images ({', '.join(IMAGE_EXTENSIONS)}) or remove "
                    "the folder.")
  return Split(name=name, class_names=class_names, num_examples=len(kept),
               paths=tuple(p for p, _ in kept), labels=tuple(i for _, i in kept),
               skipped=tuple(bad))


# ------------------------------------------------------------------ TFDS source


def _tfds():
  # Imported on use: it is slow to import and only the TFDS source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _tfds_builder(name: str, data_dir: str):
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


def _tfds_split(config, which: str) -> Split:
  name, data_dir = config.tfds_name, config.tfds_data_dir
  split = getattr(config, f"tfds_{which}_split")
  image_key, label_key = config.tfds_image_key, config.tfds_label_key
  builder = _tfds_builder(name, data_dir)
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
               tfds_image_key=image_key, tfds_label_key=label_key)


# ------------------------------------------------------------------ splits


def _check_data_settings(config) -> None:
  """The data settings load_splits relies on, even when config.validate() was not called."""
  if config.image_size < config_lib.RESNET50_MIN_IMAGE_SIZE:
    raise DataError(f"--image_size={config.image_size} is too small: ResNet50 needs at least "
                    f"{config_lib.RESNET50_MIN_IMAGE_SIZE} pixels. Use --image_size=64 for quick "
                    f"CPU runs or {config_lib.RESNET50_NATIVE_IMAGE_SIZE} for full accuracy.")
  if config.batch_size < 1:
    raise DataError(f"--batch_size={config.batch_size} must be at least 1.")
  if config.bad_images not in config_lib.BAD_IMAGE_POLICIES:
    raise DataError(f"--bad_images={config.bad_images!r} is not valid: use one of "
                    f"{', '.join(config_lib.BAD_IMAGE_POLICIES)}.")
  has_folders = bool(config.train_dir or config.validation_dir)
  if has_folders and config.tfds_name:
    raise DataError("Give either --train_dir/--validation_dir or --tfds_name, not both.")
  if not config.tfds_name and not (config.train_dir and config.validation_dir):
    raise DataError("Give both --train_dir and --validation_dir (each with one sub-folder per "
                    "class), or --tfds_name=NAME for a TFDS dataset.")


def load_splits(config) -> Splits:
  """Resolves and checks the train and validation data of `config`; raises DataError if unusable.

  Every check runs here, before any model is built, so bad data fails in seconds, not mid-epoch.
  """
  _check_data_settings(config)
  if config.tfds_name:
    train = _tfds_split(config, "train")
    validation = _tfds_split(config, "validation")
    source = f"TFDS {config.tfds_name}"
  else:
    train = scan_image_folder(config.train_dir, "train", config.bad_images)
    validation = scan_image_folder(config.validation_dir, "validation", config.bad_images)
    if os.path.realpath(config.train_dir) == os.path.realpath(config.validation_dir):
      logger.warning("--train_dir and --validation_dir are the same folder: validation results "
                     "will not measure generalisation.")
    source = f"--train_dir={config.train_dir} and --validation_dir={config.validation_dir}"

  if len(train.class_names) < 2:
    raise DataError(f"{source} has only one class ({train.class_names[0]!r}); need at least 2 "
                    "classes (one sub-folder each for a folder source).")
  if train.class_names != validation.class_names:
    only_train = sorted(set(train.class_names) - set(validation.class_names))
    only_validation = sorted(set(validation.class_names) - set(train.class_names))
    raise DataError(
        f"Train and validation classes differ (only in train: {only_train or 'none'}; only in "
        f"validation: {only_validation or 'none'}). Both need the same class sub-folders, so "
        "that label i means the same class in both.")
  if config.batch_size > train.num_examples:
    raise DataError(f"The train split has {train.num_examples} images, smaller than "
                    f"--batch_size={config.batch_size}; lower --batch_size.")
  logger.info("Data from %s: %d train and %d validation images, %d classes.", source,
              train.num_examples, validation.num_examples, len(train.class_names))
  return Splits(train=train, validation=validation, class_names=train.class_names)


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Batches in one pass over `split`; the last one may be partial."""
  if batch_size < 1:
    raise DataError(f"--batch_size={batch_size} must be at least 1.")
  return math.ceil(split.num_examples / batch_size)


# ------------------------------------------------------------------ datasets


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not valid: use one of {', '.join(MODES)}.")


def _source(split: Split) -> Tuple[tf.data.Dataset, Callable]:
  """(item, int32 label) dataset plus `load(item) -> [h, w, 1|3|4]`, the image at its own size.

  Items are file paths (folder source) or encoded/decoded images (TFDS): cheap to shuffle,
  and everything expensive happens in `load`, inside the parallel map.
  """
  if split.is_tfds:
    builder = _tfds_builder(split.tfds_name, split.tfds_data_dir)
    image_key, label_key = split.tfds_image_key, split.tfds_label_key
    encoded = _tfds_image_is_encoded(builder, image_key)
    examples = _tfds_as_dataset(builder, split.tfds_split, image_key)
    source = examples.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))
    return source, (decode_rgb if encoded else tf.convert_to_tensor)
  if not split.paths:
    raise DataError(f"The {split.name} split has no image paths and no TFDS source; build it "
                    "with load_splits or scan_image_folder.")
  source = tf.data.Dataset.from_tensor_slices(
      (tf.constant(split.paths, tf.string), tf.constant(split.labels, tf.int32)))
  return source, lambda path: decode_rgb(tf.io.read_file(path))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # The source is a list of file names (or TFDS records), which file-based auto-sharding cannot
  # split; say DATA up front instead of letting every multi-worker run warn and fall back to it.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return options


def make_dataset(split: Split, config, mode: str, start_batch: int = 0) -> tf.data.Dataset:
  """Batches of `({"image": float32 [b, size, size, 3]}, int32 [b])`; predict: features only.

  train: shuffled, infinite (the trainers count steps_per_epoch), augmented when config.augment.
  eval/predict: one pass in order, every example exactly once, last batch partial.

  start_batch (train only): start the stream at that batch. The stream is a pure function of the
  seed (seeded shuffle, augmentation seeded by stream position), so a run resumed after N steps
  that starts at batch N sees exactly the batches an uninterrupted run would (--exact_resume).
  Skipping costs only file-name shuffling: the skipped images are never read.
  """
  _check_mode(mode)
  if start_batch < 0 or (start_batch and mode != "train"):
    raise ValueError(f"start_batch={start_batch}: only a train stream can start later, at a "
                     "batch >= 0.")
  size = config.image_size
  training = mode == "train"
  skipped_examples = start_batch * config.batch_size
  source, load_original = _source(split)
  augmenting = training and config.augment
  shuffle_buffer = max(1, min(config.shuffle_buffer, split.num_examples))
  seed = config.seed

  def load_resized(item):
    return resize_image(load_original(item), size)

  def augment_and_preprocess(index, image):
    """image: resized, or (uncached and augmenting) as loaded, which the crop resizes."""
    if augmenting:
      # The seed is (run seed, position in the infinite stream): identical for any number of
      # parallel calls, and the same again when the pipeline is rebuilt and replayed.
      image = augment_image(image, tf.stack([tf.constant(seed, tf.int64), index]), size)
    return preprocess_for_model(image)

  def skip_broken(dataset):
    # A file that went bad after the scan (or a corrupt TFDS record) is dropped with a TF
    # warning instead of killing a run hours in. Not in predict: a dropped element would shift
    # every later prediction onto the wrong input.
    return dataset if mode == "predict" else dataset.ignore_errors(log_warning=True)

  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if config.cache:
    # Decode+resize once and cache the un-augmented images; shuffle and augmentation come after
    # the cache, so every epoch still gets a new order and new crops. The cache must come before
    # shuffle/repeat, or it would freeze the first epoch's order. Cached images are resized
    # (originals may not fit in memory), so here crops come from the resized image.
    dataset = source.map(lambda item, label: (load_resized(item), label), **parallel)
    dataset = skip_broken(dataset).cache()
    if training:
      # Same buffer size and seed as the uncached branch, so both yield the same order.
      dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      # Every batch is full (drop_remainder), so batch N starts at example N x batch size.
      dataset = dataset.repeat().enumerate().skip(skipped_examples)
    else:
      dataset = dataset.enumerate()
    dataset = dataset.map(
        lambda index, example: (augment_and_preprocess(index, example[0]), example[1]),
        **parallel)
  else:
    dataset = source
    if training:
      # Shuffle file names (not pixels) so the buffer is cheap; shuffle before repeat so each
      # epoch is a fresh permutation and no example repeats before all were seen.
      dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      dataset = dataset.repeat()
    # Number elements before anything can be dropped, so a skipped file does not shift the
    # augmentation seeds of the elements after it.
    dataset = dataset.enumerate()
    if training:
      # Before the map, so skipped images are not read. A file that fails to decode later (after
      # the scan) would shift this by one example; the scan makes that rare.
      dataset = dataset.skip(skipped_examples)
    # Read, decode and augment per image before batching: images differ in size until resized,
    # and each one gets its own crop and flip. The crop resizes, so augmented images skip
    # load_resized and are interpolated once, from the decoded pixels.
    load = load_original if augmenting else load_resized
    dataset = dataset.map(
        lambda index, example: (augment_and_preprocess(index, load(example[0])), example[1]),
        **parallel)
    dataset = skip_broken(dataset)

  if mode == "predict":
    dataset = dataset.map(lambda image, label: {FEATURE_KEY: image})
  else:
    dataset = dataset.map(lambda image, label: ({FEATURE_KEY: image}, label))
  # Train is infinite, so dropping the remainder loses nothing and gives a static batch size
  # (XLA and distribution strategies prefer it); eval keeps it so every example counts once.
  dataset = dataset.batch(config.batch_size, drop_remainder=training)
  # Last, so decoding the next batches overlaps with the training step on this one.
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


def make_input_fn(split: Split, config, mode: str, start_batch: int = 0):
  """A zero-argument tf.estimator input_fn; the dataset is built inside the Estimator's graph."""
  _check_mode(mode)

  def input_fn():
    return make_dataset(split, config, mode, start_batch)

  return input_fn


def synthetic_dataset(config, num_classes: int, mode: str, num_examples: int = 64
                      ) -> tf.data.Dataset:
  """Random in-memory images with the element structure of make_dataset, for tests/benchmarks.

  Images come from stateless random ops rather than a numpy constant, so an Estimator graph
  (and the graph.pbtxt it writes) stays small at any image size.
  """
  _check_mode(mode)
  if num_classes < 1 or num_examples < 1:
    raise ValueError(f"synthetic_dataset needs num_classes >= 1 and num_examples >= 1, got "
                     f"{num_classes} and {num_examples}.")
  size, seed = config.image_size, config.seed

  def make(index):
    image = tf.random.stateless_uniform([size, size, 3], seed=tf.stack(
        [tf.constant(seed, tf.int64), index]), minval=0.0, maxval=255.0)
    label = tf.cast(index % num_classes, tf.int32)
    return preprocess_for_model(image), label

  dataset = tf.data.Dataset.range(num_examples).map(make, num_parallel_calls=tf.data.AUTOTUNE)
  # Cached so a benchmark measures the model, not the random number generator.
  dataset = dataset.cache()
  if mode == "train":
    dataset = dataset.repeat()
  if mode == "predict":
    dataset = dataset.map(lambda image, label: {FEATURE_KEY: image})
  else:
    dataset = dataset.map(lambda image, label: ({FEATURE_KEY: image}, label))
  dataset = dataset.batch(config.batch_size, drop_remainder=mode == "train")
  return dataset.prefetch(tf.data.AUTOTUNE)


def make_synthetic_input_fn(config, num_classes: int, mode: str, num_examples: int = 64):
  _check_mode(mode)

  def input_fn():
    return synthetic_dataset(config, num_classes, mode, num_examples)

  return input_fn
