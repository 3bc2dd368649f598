"""A few encoded images of a split, for what an export carries or is checked with.

TF Serving warm-up requests, int8 calibration and the TFLite measurement need real images of the
run's data as *encoded bytes* (what `predict` and the serving signature take). The job layer
chooses how many; this module reads them, the same way for a folder, a records and a TFDS source.
"""

from typing import Tuple

import numpy as np
import tensorflow as tf

from estimator_ft.data import images
from estimator_ft.data import records
from estimator_ft.data import tfds_source
from estimator_ft.data.split import DataError, Split


def spread_indices(num_examples: int, count: int) -> list:
  """`count` indices evenly spread over 0..num_examples-1 (all of them if count >= num_examples).

  A folder split lists its classes one after the other, so the first N files would all be of one
  class; evenly spread ones cover every class.
  """
  if count <= 0 or num_examples <= 0:
    return []
  if count >= num_examples:
    return list(range(num_examples))
  return sorted({int(i) for i in np.linspace(0, num_examples - 1, count).round()})


def _decodes(data: bytes) -> bool:
  try:
    images.decode_rgb(data)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.DataLossError):
    return False
  return bool(data)


def encoded_images(split: Split, count: int) -> Tuple[bytes, ...]:
  """Up to `count` encoded images of `split` that the pipeline's decoder accepts.

  Folder split: files evenly spread over the split (see spread_indices), read as they are; a file
  that no longer decodes is passed over. TFDS split: its first `count` examples (TFDS mixed them
  when it prepared the data); images TFDS stores decoded are encoded as PNG, losslessly.
  Raises DataError if the split yields none.
  """
  if count <= 0:
    return ()
  found = []
  if split.is_records:
    # Records were written in a random order (prepare), so the first ones mix the classes.
    for encoded, _ in records.in_order(split).map(records.parse_record).take(count):
      if _decodes(encoded.numpy()):
        found.append(encoded.numpy())
  elif split.is_tfds:
    examples, _ = tfds_source.source_dataset(split)
    for image, _ in examples.take(count):
      found.append(image.numpy() if image.dtype == tf.string else
                   tf.io.encode_png(images.to_rgb(tf.cast(image, tf.uint8))).numpy())
  else:
    for index in spread_indices(len(split.paths), count):
      try:
        with open(split.paths[index], "rb") as f:
          data = f.read()
      except OSError:
        continue
      if _decodes(data):
        found.append(data)
  if not found:
    raise DataError(f"The {split.name} split yielded no decodable image: check that its files "
                    "are still there and readable.")
  return tuple(found)
