"""Image-format checks that need no TensorFlow: shared by the training scan and `predict`.

Standard library only, so `estimator-ft predict` (which loads a SavedModel with TensorFlow alone)
can use them without importing training code.
"""

from typing import Optional


def bmp_palette_problem(data: bytes) -> Optional[str]:
  """Why TF would silently mis-decode this BMP, or None.

  tf.io.decode_bmp reads the pixel values of a <=8-bit BMP as gray levels and ignores its colour
  table, so a palette BMP decodes without error into wrong pixels (checked on TF 2.15). Only a
  palette that is the identity gray ramp (what PIL writes for grayscale) decodes correctly.
  """
  if len(data) < 54 or data[:2] != b"BM":
    return None
  header_size = int.from_bytes(data[14:18], "little")
  bits = int.from_bytes(data[28:30], "little")
  if header_size < 40 or bits > 8:
    return None
  colours = int.from_bytes(data[46:50], "little") or 2 ** bits
  table = data[14 + header_size:14 + header_size + 4 * colours]
  if bits == 8 and len(table) == 4 * colours and all(
      table[4 * i] == table[4 * i + 1] == table[4 * i + 2] == i for i in range(colours)):
    return None
  return (f"{bits}-bit palette BMP, which TensorFlow decodes to wrong colours; re-save it as "
          "24-bit BMP, PNG or JPEG")
