"""Small test images in every format the pipeline must accept (and some it must refuse).

Generated in the test with PIL + numpy, so no binary fixtures live in the repo. Shared by the
data, export and serving tests. Every writer returns the path it wrote.

Good images have a known content so a test can check what decoding did to it:
  * `solid=(r, g, b)` gives one flat colour (e.g. pure red survives decode for lossless formats);
  * otherwise a smooth gradient pattern, so a flip or crop visibly changes pixels.
"""

import io
import os
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

RED = (255, 0, 0)


def pattern(size: int, seed: int = 0) -> np.ndarray:
  """uint8 [size, size, 3]: a left-right asymmetric gradient, so flips and crops are visible."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
  r = 255 * x
  g = 255 * y
  b = 255 * (x * y) ** 0.5
  image = np.stack([r, g, b], axis=-1) + rng.uniform(-8, 8, (size, size, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def _rgb(size: int, solid: Optional[Tuple[int, int, int]], seed: int) -> np.ndarray:
  if solid is not None:
    return np.broadcast_to(np.array(solid, np.uint8), (size, size, 3)).copy()
  return pattern(size, seed)


def _ensure_parent(path) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  return path


def _rgb_image(size, solid, seed) -> Image.Image:
  return Image.fromarray(_rgb(size, solid, seed), "RGB")


# ------------------------------------------------------------------ image writers


def jpeg_image_bytes(size: int = 16, mode: str = "RGB", progressive: bool = False,
                     solid=None, seed: int = 0, quality: int = 95) -> bytes:
  image = _rgb_image(size, solid, seed)
  if mode == "CMYK":
    image = image.convert("CMYK")
  elif mode == "L":
    image = image.convert("L")
  elif mode != "RGB":
    raise ValueError(f"write_jpeg: mode {mode!r} not one of RGB, CMYK, L")
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=quality, progressive=progressive)
  return buffer.getvalue()


def png_image_bytes(size: int = 16, mode: str = "RGB", solid=None, seed: int = 0) -> bytes:
  rgb = _rgb(size, solid, seed)
  if mode == "RGB":
    image = Image.fromarray(rgb, "RGB")
  elif mode == "RGBA":
    # A half-transparent alpha ramp: decoding must drop it, not blend it into the colour.
    alpha = np.linspace(0, 255, size * size).reshape(size, size).astype(np.uint8)
    image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
  elif mode == "L":
    image = Image.fromarray(rgb, "RGB").convert("L")
  elif mode == "I;16":
    # 16-bit grayscale spanning the whole 0..65535 range, so a decoder that forgot to scale
    # down to 8 bits (or wrapped around) shows up as out-of-range or garbled values.
    gray = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), np.uint16) * 257
    image = Image.fromarray(gray.astype("<u2"))  # a little-endian uint16 array is mode I;16
    if image.mode != "I;16":
      raise RuntimeError(f"PIL made a {image.mode} image, not I;16; update tests/images.py")
  else:
    raise ValueError(f"write_png: mode {mode!r} not one of L, RGB, RGBA, I;16")
  buffer = io.BytesIO()
  image.save(buffer, "PNG")
  return buffer.getvalue()


def gif_image_bytes(size: int = 16, solid=None, seed: int = 0) -> bytes:
  buffer = io.BytesIO()
  _rgb_image(size, solid, seed).save(buffer, "GIF")
  return buffer.getvalue()


def animated_gif_bytes(size: int = 16, colours=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> bytes:
  """An animated GIF with one flat frame per colour; decoders should keep the first frame."""
  frames = [Image.fromarray(_rgb(size, c, 0), "RGB") for c in colours]
  buffer = io.BytesIO()
  frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
  return buffer.getvalue()


def bmp_image_bytes(size: int = 16, solid=None, seed: int = 0, mode: str = "RGB") -> bytes:
  """mode RGB: 24-bit; L: 8-bit gray ramp palette; P: 8-bit colour palette (TF mis-decodes it)."""
  if mode not in ("RGB", "L", "P"):
    raise ValueError(f"write_bmp: mode {mode!r} not one of RGB, L, P")
  buffer = io.BytesIO()
  _rgb_image(size, solid, seed).convert(mode).save(buffer, "BMP")
  return buffer.getvalue()


def tiff_image_bytes(size: int = 16, solid=None, seed: int = 0) -> bytes:
  buffer = io.BytesIO()
  _rgb_image(size, solid, seed).save(buffer, "TIFF")
  return buffer.getvalue()


def _write(path, data: bytes) -> str:
  path = _ensure_parent(path)
  with open(path, "wb") as f:
    f.write(data)
  return path


def write_jpeg(path, size: int = 16, mode: str = "RGB", progressive: bool = False,
               solid=None, seed: int = 0) -> str:
  return _write(path, jpeg_image_bytes(size, mode, progressive, solid, seed))


def write_png(path, size: int = 16, mode: str = "RGB", solid=None, seed: int = 0) -> str:
  return _write(path, png_image_bytes(size, mode, solid, seed))


def write_gif(path, size: int = 16, solid=None, seed: int = 0) -> str:
  return _write(path, gif_image_bytes(size, solid, seed))


def write_bmp(path, size: int = 16, solid=None, seed: int = 0, mode: str = "RGB") -> str:
  return _write(path, bmp_image_bytes(size, solid, seed, mode))


def write_tiff(path, size: int = 16, solid=None, seed: int = 0) -> str:
  return _write(path, tiff_image_bytes(size, solid, seed))


def write_image(path, size: int = 16, solid=None, seed: int = 0) -> str:
  """Writes a good image in the format named by the path's extension."""
  ext = os.path.splitext(os.fspath(path))[1].lower()
  writers = {".jpg": write_jpeg, ".jpeg": write_jpeg, ".png": write_png, ".gif": write_gif,
             ".bmp": write_bmp, ".tif": write_tiff, ".tiff": write_tiff}
  if ext not in writers:
    raise ValueError(f"write_image: no writer for extension {ext!r} of {path}")
  return writers[ext](path, size=size, solid=solid, seed=seed)


# ------------------------------------------------------------------ bad files


def truncated_bytes(kind: str = "jpeg", size: int = 32) -> bytes:
  """A real image cut in half, as a partial download or full disk leaves it."""
  data = encoded_bytes(kind, size=size)
  return data[: len(data) // 2]


def write_truncated(path, kind: Optional[str] = None, size: int = 32) -> str:
  """A truncated image; the kind defaults from the extension (jpeg unless .png)."""
  if kind is None:
    kind = "png" if os.fspath(path).lower().endswith(".png") else "jpeg"
  return _write(path, truncated_bytes(kind, size))


def write_empty(path) -> str:
  return _write(path, b"")


def write_not_an_image(path) -> str:
  return _write(path, b"this is a text file that someone named like an image\n" * 4)


# ------------------------------------------------------------------ collections

# Each good format the pipeline accepts: name -> (file name, writer kwargs).
GOOD_FORMATS = {
    "jpeg_rgb": "jpeg_rgb.jpg",
    "jpeg_progressive": "jpeg_progressive.jpeg",
    "jpeg_cmyk": "jpeg_cmyk.jpg",
    "jpeg_gray": "jpeg_gray.jpg",
    "png_rgb": "png_rgb.png",
    "png_gray": "png_gray.png",
    "png_rgba": "png_rgba.png",
    "png_16bit": "png_16bit.png",
    "gif": "gif.gif",
    "bmp": "bmp.bmp",
}


def encoded_bytes(kind: str, size: int = 16, solid=None, seed: int = 0) -> bytes:
  """Encoded bytes of one image: a GOOD_FORMATS name, "jpeg", "png", "gif_animated" or "tiff"."""
  makers = {
      "jpeg": lambda: jpeg_image_bytes(size, "RGB", False, solid, seed),
      "jpeg_rgb": lambda: jpeg_image_bytes(size, "RGB", False, solid, seed),
      "jpeg_progressive": lambda: jpeg_image_bytes(size, "RGB", True, solid, seed),
      "jpeg_cmyk": lambda: jpeg_image_bytes(size, "CMYK", False, solid, seed),
      "jpeg_gray": lambda: jpeg_image_bytes(size, "L", False, solid, seed),
      "png": lambda: png_image_bytes(size, "RGB", solid, seed),
      "png_rgb": lambda: png_image_bytes(size, "RGB", solid, seed),
      "png_gray": lambda: png_image_bytes(size, "L", solid, seed),
      "png_rgba": lambda: png_image_bytes(size, "RGBA", solid, seed),
      "png_16bit": lambda: png_image_bytes(size, "I;16", solid, seed),
      "gif": lambda: gif_image_bytes(size, solid, seed),
      "gif_animated": lambda: animated_gif_bytes(size),
      "bmp": lambda: bmp_image_bytes(size, solid, seed),
      "tiff": lambda: tiff_image_bytes(size, solid, seed),
  }
  if kind not in makers:
    raise ValueError(f"encoded_bytes: unknown kind {kind!r}; use one of {sorted(makers)}")
  return makers[kind]()


def all_format_files(directory, size: int = 16, solid=None, seed: int = 0) -> Dict[str, str]:
  """Writes one file of each good format into `directory`; returns {format name: path}."""
  directory = os.fspath(directory)
  return {kind: _write(os.path.join(directory, file_name),
                       encoded_bytes(kind, size=size, solid=solid, seed=seed))
          for kind, file_name in GOOD_FORMATS.items()}
