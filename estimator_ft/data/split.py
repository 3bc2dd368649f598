"""What a resolved data source is: `Split` (one split of a folder or TFDS source) and `Splits`.

No TensorFlow here: the CLI, the run layer and the reports can name a split cheaply.
"""

import dataclasses
import math


class DataError(ValueError):
  """Bad or missing input data, found before training. The message says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One resolved split (train or validation) of a folder, TFDS or records source."""
  name: str
  class_names: tuple
  num_examples: int
  paths: tuple = ()
  labels: tuple = ()
  skipped: tuple = ()
  # SHA-1 of each file's bytes, aligned with `paths` (folder sources): leakage checks.
  content_hashes: tuple = ()
  # Whether any image may be a GIF (folder sources: by content, as the scan saw it). Only then
  # does the pipeline's pixel check count GIF frames (see images.check_pixel_limit); True when
  # unknown.
  holds_gif: bool = True
  tfds_name: str = ""
  tfds_split: str = ""
  tfds_data_dir: str = ""
  tfds_image_key: str = "image"
  tfds_label_key: str = "label"
  # True when the TFDS builder stored the split in generation order (its `disable_shuffling`),
  # which may be class-sorted; TFDS otherwise stores examples in the order of a hash of their keys.
  tfds_generation_order: bool = False
  # An estimate of the split's encoded size (for the shuffle buffer's memory); 0 if unknown.
  tfds_num_bytes: int = 0
  # A records source (data/records.py): the shard files and the examples in each.
  record_files: tuple = ()
  record_counts: tuple = ()
  # The pixel limit every image's header was checked against when the source was written (records:
  # by prepare's scan; the shards' CRCs guard the bytes since), so the pipeline need not check it
  # again under a limit at least as high; 0 when unknown.
  verified_max_pixels: int = 0

  @property
  def is_tfds(self) -> bool:
    return bool(self.tfds_name)

  @property
  def is_records(self) -> bool:
    return bool(self.record_files)


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split
  validation: Split
  class_names: tuple


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Batches in one pass over `split`; the last one may be partial."""
  if batch_size < 1:
    raise DataError(f"--batch_size={batch_size} must be at least 1.")
  return math.ceil(split.num_examples / batch_size)
