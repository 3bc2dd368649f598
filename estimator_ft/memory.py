"""Will a training run fit in this machine's memory? An estimate from the image and batch size.

Standard library only, so it is a pure function of its arguments (tested without TensorFlow)
plus one reader of the machine's available memory. The train job checks it before the data scan
and before anything is written into model_dir: a ResNet50 training step at --image_size=5000
asked for tens of gigabytes and ended in a segfault (rc 139) a minute in, leaving a model_dir
behind; it is now refused up front, naming the sizes that fit.

The model: peak resident memory = a base (TensorFlow, the graph, ResNet50's weights, gradients and
optimizer slots, the input pipeline: it does not depend on the sizes) + the activations that
backpropagation keeps, which grow with the pixels of every image in a batch:

    bytes = BASE_BYTES + BYTES_PER_PIXEL x image_size^2 x batch_size

Both constants come from the peak RSS of short CPU training runs (float32, TF 2.15, 2 cores,
one epoch with its evaluation; BUILD_NOTES has the table): the Estimator path, the larger of the
two, took 1.34 GiB at 64 px x 8, 1.48 at 128 x 8, 2.00 at 224 x 8 and 1.82 at 128 x 16 - about
1.9-2.8 KB per pixel of a batch above a 1.3 GiB base (the Keras path: 1.27 GiB at 128 x 8,
1.77 at 224 x 8). The constants bound every measurement from above (the 224 x 8 run by 17 %), so
the estimate errs high. Mixed precision keeps activations in 16 bits and needs less; the
estimate does not count on it.
"""

import math
import os
from typing import Optional

BASE_BYTES = 1_400 * 2**20
BYTES_PER_PIXEL = 2_800
# The image sizes suggested are multiples of this (ResNet50 downsamples 32x).
SIZE_STEP = 32
MIN_IMAGE_SIZE = 32
_GB = 2**30


def training_bytes(image_size: int, batch_size: int) -> int:
  """Estimated peak memory of training ResNet50 at this image and batch size, in bytes."""
  return BASE_BYTES + BYTES_PER_PIXEL * image_size * image_size * batch_size


def cache_bytes(num_images: int, image_size: int) -> int:
  """What --cache holds: every image decoded and resized, float32 RGB."""
  return num_images * image_size * image_size * 3 * 4


def largest_image_size(batch_size: int, budget: int, extra_bytes_per_pixel: float = 0) -> int:
  """The largest image size (a multiple of 32) whose training fits in `budget`; 0 if none does."""
  room = budget - BASE_BYTES
  per_pixel = BYTES_PER_PIXEL * batch_size + extra_bytes_per_pixel
  if room <= 0:
    return 0
  size = int(math.sqrt(room / per_pixel)) // SIZE_STEP * SIZE_STEP
  return size if size >= MIN_IMAGE_SIZE else 0


def largest_batch_size(image_size: int, budget: int, extra_bytes: int = 0) -> int:
  """The largest batch whose training at `image_size` fits in `budget`; 0 if not even 1 does."""
  room = budget - BASE_BYTES - extra_bytes
  return max(int(room // (BYTES_PER_PIXEL * image_size * image_size)), 0)


def _gb(value: float) -> str:
  return f"{value / _GB:,.1f} GB"


def memory_problem(image_size: int, batch_size: int, available: Optional[int],
                   cached_images: int = 0) -> Optional[str]:
  """Why training at these sizes would not fit in `available` bytes, with what would; or None.

  cached_images: the images --cache keeps in memory (0 without --cache).
  available None (unknown) is never a problem.
  """
  if available is None:
    return None
  cache = cache_bytes(cached_images, image_size)
  needed = training_bytes(image_size, batch_size) + cache
  if needed <= available:
    return None
  fitting_size = largest_image_size(batch_size, available, 12 * cached_images)
  fitting_batch = largest_batch_size(image_size, available, cache)
  cache_note = f", {_gb(cache)} of it the --cache of {cached_images} images" if cache else ""
  size_advice = (f"at --batch_size={batch_size} the largest --image_size that fits is "
                 f"{fitting_size}" if fitting_size else
                 f"at --batch_size={batch_size} no --image_size fits")
  batch_advice = (f"at --image_size={image_size} the largest --batch_size that fits is "
                  f"{fitting_batch}" if fitting_batch else
                  f"at --image_size={image_size} not even --batch_size=1 fits")
  return (f"--image_size={image_size} with --batch_size={batch_size} needs about {_gb(needed)} of "
          f"memory to train{cache_note} (estimated: {_gb(BASE_BYTES)} + {BYTES_PER_PIXEL:,} bytes "
          f"per pixel of each image in a batch), more than the {_gb(available)} available. "
          f"{size_advice[0].upper() + size_advice[1:]}; {batch_advice}"
          f"{'; or drop --cache' if cache else ''}. (224 is ResNet50's native size; "
          "--nocheck_memory skips this check.)")


# ---------------------------------------------------------------- the machine

def _read_int(path: str) -> Optional[int]:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _meminfo_available() -> Optional[int]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def _cgroup_available() -> Optional[int]:
  """What this process's memory cgroup (a container's limit) still allows, if it sets one."""
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    # cgroup v1 reports "no limit" as a huge number.
    if limit is not None and usage is not None and limit < 2**60:
      return max(limit - usage, 0)
  return None


def available_bytes() -> Optional[int]:
  """Memory this process can still take: the machine's MemAvailable, or less under a cgroup."""
  values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
  return min(values) if values else None
