"""Sharded TFRecords as a source: what `estimator-ft prepare` writes, and how training reads it.

A records folder holds `train-00000-of-000NN.tfrecord`..., `validation-...` and `dataset.json`
(class names, per-shard counts, the encoding). Each record is a tf.train.Example with the encoded
image bytes and the usual keys (RECORD_KEYS). Every path goes through tf.io.gfile, so the folder
may be on any TensorFlow file system (gs://, hdfs://, ram://...).

The training order of a records split, epoch e (a pure function of (seed, e), so --exact_resume
replays it):
  1. the shard files in a permutation drawn from (seed, e);
  2. INTERLEAVE_CYCLE of them read at once, one record from each in turn (parallel reads);
  3. a buffer of `shuffle_buffer` serialized records: each run of that many records of the
     interleaved stream is permuted, by a permutation drawn from (seed, e, run).
What it gives and what it does not, next to a folder's exact permutation: prepare wrote the
examples in a seeded random order, so every shard is a uniform random sample of the split and any
record is equally likely to be anywhere in an epoch; but records that are close in one shard stay
within about a buffer of each other every epoch (which shards are read together changes per
epoch, the order inside a shard does not), so the epoch is not a uniform permutation - the
same trade-off tensorflow/models and NVIDIA's ResNet50 make. Every record is seen exactly once
per epoch either way.
"""

import dataclasses
import io
import json
import math
import posixpath
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

from estimator_ft import cluster as cluster_lib
from estimator_ft import storage
from estimator_ft.data.split import DataError, Split

DATASET_JSON = "dataset.json"
RECORDS_FORMAT = "estimator_ft.records/1"
SPLITS = ("train", "validation")
SHARD_SUFFIX = ".tfrecord"
# Shards read at once in training: parallel reads, and records of several shards mixed.
INTERLEAVE_CYCLE = 8
# Default shard size (the 100-200 MB of the tools this follows).
TARGET_SHARD_BYTES = 150 * 1024 * 1024

KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
# dataset.json: the --max_image_pixels limit prepare's scan held every image to (absent before it
# was recorded, and then the pipeline checks every image again).
VERIFIED_MAX_PIXELS_KEY = "verified_max_image_pixels"
KEY_LABEL = "image/class/label"
KEY_TEXT = "image/class/text"
KEY_FILENAME = "image/filename"
RECORD_KEYS = (KEY_ENCODED, KEY_FORMAT, KEY_LABEL, KEY_TEXT, KEY_FILENAME)
PERMUTATION_ALGORITHM = "philox"


def join(directory: str, name: str) -> str:
  """os.path.join for local folders and URLs (gs://b/x, ram://x) alike."""
  return posixpath.join(directory, name) if "://" in directory else (
      directory.rstrip("/") + "/" + name)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def default_num_shards(total_bytes: int) -> int:
  return max(1, math.ceil(total_bytes / TARGET_SHARD_BYTES))


# ---------------------------------------------------------------- writing (prepare)

def example_bytes(encoded: bytes, image_format: str, label: int, text: str, filename: str) -> bytes:
  """One serialized tf.train.Example with the keys of RECORD_KEYS."""
  def bytes_feature(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
  feature = {
      KEY_ENCODED: bytes_feature(encoded),
      KEY_FORMAT: bytes_feature(image_format.encode()),
      KEY_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      KEY_TEXT: bytes_feature(text.encode()),
      KEY_FILENAME: bytes_feature(filename.encode()),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def reencode_if_larger(data: bytes, max_side: int) -> Tuple[bytes, Optional[str]]:
  """(bytes, None) when the image's longer side is at most max_side (0: never re-encode); else the
  image resized to that longer side and re-encoded as JPEG, (bytes, "jpeg")."""
  if not max_side:
    return data, None
  from PIL import Image  # pylint: disable=g-import-not-at-top - only prepare with --max_side
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
    if max(width, height) <= max_side:
      return data, None
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if image.format == "JPEG":
      image.draft("RGB", size)  # DCT-domain downscale: decodes a 4000-px JPEG ~8x faster
    # convert("RGB") drops alpha and expands palettes and gray, as the pipeline's decode_rgb does.
    resized = image.convert("RGB").resize(size, Image.BILINEAR, reducing_gap=3.0)
  out = io.BytesIO()
  resized.save(out, format="JPEG", quality=95)
  return out.getvalue(), "jpeg"


# ---------------------------------------------------------------- reading

def read_dataset_json(records_dir: str) -> dict:
  path = join(records_dir, DATASET_JSON)
  if not tf.io.gfile.exists(path):
    hint = (" An interrupted `estimator-ft prepare` leaves none: run the same command again to "
            "complete it." if tf.io.gfile.isdir(records_dir) else "")
    raise DataError(f"--records_dir={records_dir} has no {DATASET_JSON}: give a folder written by "
                    f"`estimator-ft prepare --output_dir=DIR`.{hint}")
  value = json.loads(storage.read_bytes(path))
  if value.get("format") != RECORDS_FORMAT:
    raise DataError(f"{path} is not an estimator_ft records description (format "
                    f"{value.get('format')!r}, expected {RECORDS_FORMAT!r}); prepare it again.")
  return value


def records_split(records_dir: str, which: str) -> Split:
  """The `which` split (train or validation) of a prepared records folder; DataError if unusable."""
  if which not in SPLITS:
    raise ValueError(f"split {which!r}: use one of {', '.join(SPLITS)}.")
  description = read_dataset_json(records_dir)
  split = description["splits"][which]
  files = tuple(join(records_dir, shard["file"]) for shard in split["shards"])
  missing = [f for f in files if not tf.io.gfile.exists(f)]
  if missing:
    raise DataError(f"--records_dir={records_dir}: {len(missing)} shard(s) listed in "
                    f"{DATASET_JSON} are missing (e.g. {missing[0]}); copy the whole folder, or "
                    "prepare it again.")
  counts = tuple(int(shard["num_examples"]) for shard in split["shards"])
  return Split(name=which, class_names=tuple(description["class_names"]),
               num_examples=sum(counts), record_files=files, record_counts=counts,
               skipped=tuple((s["path"], s["reason"]) for s in split.get("skipped", ())),
               verified_max_pixels=int(description.get(VERIFIED_MAX_PIXELS_KEY, 0)))


def trainer_split(split: Split, task: Optional["cluster_lib.Task"]) -> Split:
  """The part of a records train split that this trainer of a TF_CONFIG cluster reads
  (cluster.trainer_shards: disjoint between trainers); the whole split outside a cluster."""
  files = cluster_lib.trainer_shards(split.record_files, task)
  if len(files) == len(split.record_files):
    return split
  chosen = set(files)
  counts = tuple(c for f, c in zip(split.record_files, split.record_counts) if f in chosen)
  return dataclasses.replace(split, record_files=tuple(files), record_counts=counts,
                             num_examples=sum(counts))


def parse_record(serialized) -> Tuple[tf.Tensor, tf.Tensor]:
  """Serialized Example -> (encoded image bytes, int32 label)."""
  parsed = tf.io.parse_single_example(serialized, {
      KEY_ENCODED: tf.io.FixedLenFeature([], tf.string),
      KEY_LABEL: tf.io.FixedLenFeature([], tf.int64),
  })
  return parsed[KEY_ENCODED], tf.cast(parsed[KEY_LABEL], tf.int32)


def in_order(split: Split) -> tf.data.Dataset:
  """Every serialized record once, in shard order (evaluation, prediction)."""
  return tf.data.TFRecordDataset(tf.constant(split.record_files, tf.string))


def _epoch_seed(seed, epoch, stream: int) -> tf.Tensor:
  return tf.stack([tf.cast(seed, tf.int64) * 3 + stream, tf.cast(epoch, tf.int64)])


def _interleaved_records(split: Split, seed: int, epoch) -> tf.data.Dataset:
  """Epoch `epoch`'s records before the buffer: its shard order, read INTERLEAVE_CYCLE at a time."""
  files = tf.constant(split.record_files, tf.string)
  count = len(split.record_files)
  order = tf.random.experimental.stateless_shuffle(
      tf.range(count, dtype=tf.int64), seed=_epoch_seed(seed, epoch, 1), alg=PERMUTATION_ALGORITHM)
  return tf.data.Dataset.from_tensor_slices(tf.gather(files, order)).interleave(
      tf.data.TFRecordDataset, cycle_length=min(count, INTERLEAVE_CYCLE), block_length=1,
      num_parallel_calls=min(count, INTERLEAVE_CYCLE), deterministic=True)


def _permuted_blocks(split: Split, seed: int, epoch, buffer: int) -> tf.data.Dataset:
  """Epoch `epoch` as blocks of `buffer` serialized records (the last one shorter), each permuted."""
  # A block shuffle rather than Dataset.shuffle: tf.data's shuffle mixes TensorFlow's global seed
  # into its own, which would make the stream depend on more than (seed, epoch).
  block_seed = _epoch_seed(seed, epoch, 2)

  def permute(index, block):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(block, out_type=tf.int64)[0]),
        seed=tf.random.experimental.stateless_fold_in(block_seed, index),
        alg=PERMUTATION_ALGORITHM)
    return tf.gather(block, order)

  return _interleaved_records(split, seed, epoch).batch(buffer).enumerate().map(permute)


def _shuffle_block(split: Split, shuffle_buffer: int) -> int:
  return max(1, min(shuffle_buffer, split.num_examples))


def epoch_records(split: Split, seed: int, epoch, shuffle_buffer: int) -> tf.data.Dataset:
  """The serialized records of epoch `epoch`, in its training order (module docstring)."""
  buffer = _shuffle_block(split, shuffle_buffer)
  if buffer == 1:
    return _interleaved_records(split, seed, epoch)
  return _permuted_blocks(split, seed, epoch, buffer).unbatch()


def training_stream(split: Split, seed: int, shuffle_buffer: int,
                    start_example: int = 0) -> tf.data.Dataset:
  """The infinite training stream of serialized records, epoch after epoch, from `start_example`.

  Whole epochs before it are skipped for free (each epoch's size is known from dataset.json and
  its order depends on (seed, epoch) alone); within its epoch the records before it are read and
  dropped before they are parsed or decoded.
  The stream is epoch_records of epoch 0, 1, ... back to back, read one block ahead: no record of
  a block leaves before the whole block is read, so without it every block boundary (each epoch
  of a split smaller than the buffer) stalled the whole pipeline while the next block was read -
  measured on 800 records at 224 px, 48-136 ms every 25 batches of ~15 ms, 17 % of the time. The
  price is memory: up to two blocks of encoded records (2 x --shuffle_buffer records) instead of
  one. Across epochs too, so the block stream is flattened before the read-ahead.
  """
  first_epoch, offset = divmod(start_example, split.num_examples)
  epochs = tf.data.Dataset.counter(first_epoch)
  buffer = _shuffle_block(split, shuffle_buffer)
  if buffer == 1:
    stream = epochs.flat_map(lambda epoch: _interleaved_records(split, seed, epoch))
  else:
    stream = epochs.flat_map(
        lambda epoch: _permuted_blocks(split, seed, epoch, buffer)).prefetch(1).unbatch()
  return stream.skip(offset)


def describe_shards(files: Sequence[str]) -> List[str]:
  """Shard file names without their folder, for a log line."""
  return [posixpath.basename(f) for f in files]
