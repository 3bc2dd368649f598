"""Generates the small sample data set: horizontal vs vertical stripes, in the image-folder layout.

    python -m estimator_ft.sample_data --output_dir=data/sample [--seed=0] [--train_per_class=400]
        [--validation_per_class=100] [--image_size=96]

(`python data/make_sample_data.py ...` is the same) writes
<output_dir>/{train,validation}/{horizontal,vertical}/*.{png,jpg} and, last, <output_dir>/.complete.
The tests and `estimator-ft bench` generate their data with `generate`.

The task is learnable but not trivial: stripe colours (never closer than
MIN_STRIPE_COLOUR_DISTANCE), contrast, period, phase, the patch they cover, an orientation jitter of
up to +-20 degrees, background noise and clutter shapes are all random and shared by both classes,
so only the dominant orientation tells them apart. A texture cue was chosen over object shape on
purpose: ResNet50 trained from random init (the offline demo, --weights=none) generalises on it
within a few hundred steps, where circle-vs-square on 320 images only memorised the training set
(91% train / 48% validation accuracy after 160 steps, measured).
Horizontal flips and crops (the pipeline's augmentation) keep the class.
Every image comes from its own seeded generator, so the same arguments give byte-identical files.
Needs only numpy and PIL (no TensorFlow), and runs in a few seconds.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("horizontal", "vertical")
SPLITS = ("train", "validation")
COMPLETE_MARKER = ".complete"
# Shapes are drawn this many times larger and scaled down, for smooth (anti-aliased) edges.
_SUPERSAMPLE = 2


def _random_colour(rng) -> tuple:
  return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(rng, size: int) -> Image.Image:
  """A noisy two-colour gradient: no flat background for the model to latch onto."""
  top, bottom = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
  t = np.linspace(0.0, 1.0, size)[:, None, None]
  image = top * (1 - t) + bottom * t + np.zeros((size, size, 3))
  image += rng.normal(0.0, rng.uniform(5, 25), (size, size, 3))
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


# Orientation jitter around each class's axis; below 45 degrees so the classes never overlap.
MAX_ORIENTATION_JITTER_DEG = 20.0


def _draw_clutter(draw, rng, size: int) -> None:
  """Blobs and triangles with no orientation: distractors that belong to neither class."""
  for _ in range(rng.integers(1, 4)):
    centre = rng.uniform(0, size, 2)
    radius = rng.uniform(0.04, 0.10) * size
    if rng.random() < 0.5:
      draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius],
                   fill=_random_colour(rng))
    else:
      angle = rng.uniform(0, 2 * math.pi)
      triangle = [(centre[0] + radius * math.cos(angle + k * 2 * math.pi / 3),
                   centre[1] + radius * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
      draw.polygon(triangle, fill=_random_colour(rng))


# Stripe colours closer than this (RGB distance) let the grating vanish into the background noise,
# and the image shows neither class: about 10 % of colour pairs, but at least 6 of a trained demo
# model's 21 validation errors.
MIN_STRIPE_COLOUR_DISTANCE = 80.0


def _stripe_colours(rng) -> tuple:
  low = np.array(_random_colour(rng), float)
  while True:
    high = np.array(_random_colour(rng), float)
    if np.linalg.norm(high - low) >= MIN_STRIPE_COLOUR_DISTANCE:
      return low, high


def _stripes(rng, image: Image.Image, class_name: str) -> Image.Image:
  """Blends a sinusoidal grating of the class's orientation over a random patch of the image."""
  size = image.size[0]
  axis = 0.0 if class_name == "horizontal" else 90.0
  angle = math.radians(axis + rng.uniform(-MAX_ORIENTATION_JITTER_DEG, MAX_ORIENTATION_JITTER_DEG))
  period = rng.uniform(0.08, 0.25) * size
  y, x = np.mgrid[0:size, 0:size].astype(float)
  # Stripes run along `angle`: the intensity varies across it.
  phase = (-x * math.sin(angle) + y * math.cos(angle)) * 2 * math.pi / period + rng.uniform(0, 2 * math.pi)
  wave = 0.5 + 0.5 * np.sin(phase)
  if rng.random() < 0.5:
    wave = (wave > 0.5).astype(float)  # hard-edged bars as well as smooth gratings
  low, high = _stripe_colours(rng)
  grating = low + (high - low) * wave[..., None]
  # The patch: a random rectangle covering 50-100% of each side.
  w, h = (rng.uniform(0.5, 1.0, 2) * size).astype(int)
  left, top = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
  mask = np.zeros((size, size, 1))
  mask[top:top + h, left:left + w] = rng.uniform(0.6, 1.0)  # contrast against the background
  blended = np.asarray(image, float) * (1 - mask) + grating * mask
  return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")


def make_image(seed: int, split_index: int, class_index: int, index: int,
               image_size: int) -> Image.Image:
  """One sample image. Its own generator: independent of how many others are made, or in what
  order."""
  rng = np.random.default_rng([seed, split_index, class_index, index])
  big = image_size * _SUPERSAMPLE
  image = _stripes(rng, _background(rng, big), CLASSES[class_index])
  # Clutter in front of the stripes, so the texture is sometimes partly hidden.
  _draw_clutter(ImageDraw.Draw(image), rng, big)
  return image.resize((image_size, image_size), Image.Resampling.BILINEAR)


def _write_split(directory: str, seed: int, split_index: int, per_class: int,
                 image_size: int) -> None:
  for class_index, class_name in enumerate(CLASSES):
    class_dir = os.path.join(directory, class_name)
    os.makedirs(class_dir)
    for index in range(per_class):
      image = make_image(seed, split_index, class_index, index, image_size)
      # Alternate formats so the sample exercises both decoders the pipeline meets most.
      if index % 2 == 0:
        image.save(os.path.join(class_dir, f"{class_name}_{index:04d}.png"), "PNG")
      else:
        image.save(os.path.join(class_dir, f"{class_name}_{index:04d}.jpg"), "JPEG", quality=90)


def generate(output_dir: str, seed: int = 0, train_per_class: int = 400,
             validation_per_class: int = 100, image_size: int = 96) -> str:
  """Writes the sample set into output_dir (replacing an earlier sample there); returns its path.

  Everything goes into a temporary sibling folder that is renamed into place at the end, so an
  interrupted run never leaves a half-made set that looks complete.
  """
  for name, value, low in (("train_per_class", train_per_class, 1),
                           ("validation_per_class", validation_per_class, 1),
                           ("image_size", image_size, 8)):
    if value < low:
      raise ValueError(f"--{name}={value} must be at least {low}.")
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.exists(os.path.join(output_dir, COMPLETE_MARKER)):
    if not os.path.isdir(output_dir) or os.listdir(output_dir):
      raise ValueError(f"--output_dir={output_dir} exists and is not a sample set made by this "
                       "script (no .complete marker). Remove it or pick another --output_dir.")
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
  try:
    for split_index, (split, per_class) in enumerate(
        zip(SPLITS, (train_per_class, validation_per_class))):
      _write_split(os.path.join(tmp, split), seed, split_index, per_class, image_size)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
      f.write(f"seed={seed} train_per_class={train_per_class} "
              f"validation_per_class={validation_per_class} image_size={image_size}\n")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the sample is ordinary data
    if os.path.exists(output_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
      os.rename(output_dir, os.path.join(old, "sample"))
      os.rename(tmp, output_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output_dir", required=True, help="Where to write the sample set.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--train_per_class", type=int, default=400)
  parser.add_argument("--validation_per_class", type=int, default=100)
  parser.add_argument("--image_size", type=int, default=96)
  args = parser.parse_args(argv)
  try:
    path = generate(args.output_dir, args.seed, args.train_per_class, args.validation_per_class,
                    args.image_size)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  total = len(CLASSES) * (args.train_per_class + args.validation_per_class)
  print(f"Wrote {total} images ({', '.join(CLASSES)}) to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
