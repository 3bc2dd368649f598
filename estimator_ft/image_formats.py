"""Image-file checks that need no TensorFlow: shared by the training scan and `predict`.

Standard library only, so `estimator-ft predict` (which loads a SavedModel with TensorFlow alone)
can use them without importing training code. Everything here reads headers and file metadata,
never pixels: it runs before any decoder is handed the bytes.
"""

import os
import stat
from typing import Optional, Tuple

# Pillow's Image.MAX_IMAGE_PIXELS (its decompression-bomb limit): 89,478,485 pixels, a 9459 x 9459
# image, 256 MiB per byte of a pixel. Photographs stay far below it (a 50-megapixel camera's
# frames fit); a small file that claims more is a decompression bomb, or an image to shrink first.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_PIXELS_FLAG = "--max_image_pixels"

# Formats by their first bytes, the way TensorFlow's decode_image tells them apart.
JPEG, PNG, GIF, BMP = "JPEG", "PNG", "GIF", "BMP"
_MAGIC = ((b"\xff\xd8\xff", JPEG), (b"\x89PNG\r\n\x1a\n", PNG), (b"GIF8", GIF), (b"BM", BMP))
# JPEG start-of-frame markers (they carry the size): C0-CF except DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])
_JPEG_APP1 = 0xE1
_JPEG_START_OF_SCAN = 0xDA
_GIF_EXTENSION, _GIF_IMAGE = 0x21, 0x2C
_EXIF_ORIENTATION_TAG = 0x0112

_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


# ---------------------------------------------------------------- reading a file safely

def _not_regular(mode: int) -> Optional[str]:
  if stat.S_ISREG(mode):
    return None
  kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
  return f"{kind}, not a regular file: not read"


def read_image_file(path: str) -> Tuple[Optional[bytes], Optional[str]]:
  """(bytes, None) for a regular file, (None, reason) otherwise.

  Named pipes, sockets and devices are refused from their metadata and never opened for reading:
  reading a FIFO blocks until some other process writes to it (a scan would hang for ever), and a
  device can be endless (/dev/zero) or have side effects. The file is opened non-blocking and
  checked again, in case it was swapped for one of those between the two looks.
  """
  try:
    reason = _not_regular(os.stat(path).st_mode)
    if reason:
      return None, reason
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    return None, f"cannot be read ({e.strerror or e})"
  try:
    reason = _not_regular(os.fstat(descriptor).st_mode)
    if reason:
      return None, reason
    with os.fdopen(descriptor, "rb", closefd=False) as f:
      return f.read(), None
  except OSError as e:
    return None, f"cannot be read ({e.strerror or e})"
  finally:
    os.close(descriptor)


# ---------------------------------------------------------------- sizes from the header

def image_format(data: bytes) -> Optional[str]:
  """JPEG, PNG, GIF or BMP from the first bytes (what decode_image goes by), or None."""
  for magic, name in _MAGIC:
    if data.startswith(magic):
      return name
  return None


def _jpeg_segments(data: bytes):
  """(marker, payload start, payload end) of each segment before the image data."""
  position = 2
  while position + 4 <= len(data):
    if data[position] != 0xFF:
      return
    marker = data[position + 1]
    if marker == 0xFF:  # a fill byte
      position += 1
      continue
    if marker in _JPEG_STANDALONE_MARKERS:
      position += 2
      continue
    length = int.from_bytes(data[position + 2:position + 4], "big")
    yield marker, position + 4, min(position + 2 + length, len(data))
    if marker == _JPEG_START_OF_SCAN:
      return
    position += 2 + length


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
  for marker, start, end in _jpeg_segments(data):
    if marker in _JPEG_SOF_MARKERS and end - start >= 5:
      height = int.from_bytes(data[start + 1:start + 3], "big")
      width = int.from_bytes(data[start + 3:start + 5], "big")
      return width, height
  return None


def gif_frames(data: bytes) -> int:
  """How many frames (image blocks) a GIF holds.

  Walks the block structure - extensions and images, each a chain of length-prefixed sub-blocks
  - without decompressing anything. A truncated file counts the frames seen before its end.
  """
  if len(data) < 13:
    return 0
  position = 13
  if data[10] & 0x80:  # a global colour table follows the screen descriptor
    position += 3 << ((data[10] & 0x07) + 1)
  frames = 0
  while position < len(data):
    block = data[position]
    if block == _GIF_EXTENSION:  # introducer, label
      position += 2
    elif block == _GIF_IMAGE:
      frames += 1
      if position + 10 > len(data):
        return frames
      packed = data[position + 9]
      local_colour_table = 3 << ((packed & 0x07) + 1) if packed & 0x80 else 0
      # The 10-byte image descriptor, its colour table, the LZW minimum code size.
      position += 10 + local_colour_table + 1
    else:  # the trailer (0x3B), or bytes the decoder will refuse anyway
      return frames
    while position < len(data) and data[position]:  # sub-blocks, up to their 0 terminator
      position += data[position] + 1
    position += 1
  return frames


def image_size(data: bytes) -> Optional[Tuple[int, int]]:
  """(width, height) that the header declares (a GIF's: its logical screen), or None."""
  kind = image_format(data)
  if kind == PNG and len(data) >= 24 and data[12:16] == b"IHDR":
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  if kind == GIF and len(data) >= 10:
    return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
  if kind == BMP and len(data) >= 26:
    if int.from_bytes(data[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
      return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
    # A negative height means rows stored top-down.
    return (abs(int.from_bytes(data[18:22], "little", signed=True)),
            abs(int.from_bytes(data[22:26], "little", signed=True)))
  if kind == JPEG:
    return _jpeg_size(data)
  return None


def decoded_pixels(data: bytes) -> Optional[int]:
  """The pixels TensorFlow's decoder would allocate for these bytes, from the header; or None.

  width x height, times the frames for a GIF: decode_image keeps only the first frame, but the
  GIF library under it decodes every frame into memory first (measured with TF 2.15: 100 frames
  of 2000 x 2000, a 394 KB file, took 400 MB).
  """
  size = image_size(data)
  if size is None:
    return None
  width, height = size
  if image_format(data) != GIF or width * height == 0:
    return width * height
  return width * height * max(gif_frames(data), 1)


def pixel_limit_message(width, height, frames_note, max_pixels: int) -> list:
  """The pieces of the pixel-limit error, joined by the caller: here (str) or in a graph.

  frames_note: "" or " x N GIF frames". One wording for the scan, `predict`, the training
  pipeline and the serving signatures.
  """
  return ["image of ", width, " x ", height, " pixels", frames_note,
          f" is over the limit of {max_pixels} pixels ({MAX_IMAGE_PIXELS_FLAG}): shrink it"]


def pixel_limit_problem(data: bytes, max_pixels: int) -> Optional[str]:
  """Why decoding these bytes would exceed `max_pixels`, or None (also when the header is unknown:
  then the decoder refuses the bytes itself)."""
  pixels = decoded_pixels(data)
  if pixels is None or pixels <= max_pixels:
    return None
  width, height = image_size(data)
  frames = pixels // (width * height)
  note = f" x {frames} GIF frames" if frames > 1 else ""
  return "".join(str(p) for p in pixel_limit_message(width, height, note, max_pixels))


# ---------------------------------------------------------------- EXIF

def exif_orientation(data: bytes) -> Optional[int]:
  """The EXIF orientation tag (1-8) of a JPEG, or None when it has none.

  TensorFlow's decoders ignore it: an image whose camera stored it rotated (orientation 6 = turn
  90 degrees clockwise to view) is trained on and served as stored, sideways. Both paths and
  serving decode it the same way, so a model is consistent with itself; `inspect` counts them.
  """
  if image_format(data) != JPEG:
    return None
  for marker, start, end in _jpeg_segments(data):
    if marker != _JPEG_APP1 or data[start:start + 6] != b"Exif\x00\x00":
      continue
    tiff = data[start + 6:end]
    if tiff[:4] == b"II*\x00":
      order = "little"
    elif tiff[:4] == b"MM\x00*":
      order = "big"
    else:
      return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
      return None
    for entry in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
      offset = ifd + 2 + 12 * entry
      if offset + 12 > len(tiff):
        return None
      if int.from_bytes(tiff[offset:offset + 2], order) == _EXIF_ORIENTATION_TAG:
        value = int.from_bytes(tiff[offset + 8:offset + 10], order)  # a SHORT, left-justified
        return value if 1 <= value <= 8 else None
    return None
  return None


# ---------------------------------------------------------------- BMP palettes

BMP_PALETTE_TAIL = ("-bit palette BMP, which TensorFlow decodes to wrong colours; re-save it as "
                    "24-bit BMP, PNG or JPEG")


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
  return f"{bits}{BMP_PALETTE_TAIL}"
