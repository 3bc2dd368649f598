"""The training pipeline on three sources of the same photos: an image folder, its prepared
records, and records prepared with --max_side (issue 14's speed goal: records with max_side >= 2x
the folder pipeline at 224 px).

Why this shape, learnt from the sessions that measured it by hand:
- The ratio depends on how costly the source files are to decode, so the files are photo-sized:
  ILSVRC's typical 500x375, with noise tuned so that they compress to ILSVRC's mean file size
  (~110 KB). Small or flat images flatter the folder path.
- Every window runs in a process of its own, and the sources take turns, in a reversed order every
  other round: on a shared 2-core VM the speed moves between processes by 15 % or more, and a
  pipeline built earlier in the same process keeps threads of its own.
- Each window reports wall img/s and CPU ms an image (the process's CPU time, every thread):
  per CPU-second is the fairer figure when the VM's share of the cores moves.
"""

import concurrent.futures
import io
import logging
import multiprocessing
import os
import statistics
import time

import numpy as np
from PIL import Image

from estimator_ft import progress
from estimator_ft.bench.machine import cpu_environment
from estimator_ft.config import Config
from estimator_ft.data import loading
from estimator_ft.data import pipeline
from estimator_ft.jobs import prepare

logger = logging.getLogger("estimator_ft")

# ILSVRC-2012's typical training photo, and its mean file size (138 GB over 1.28 M files).
PHOTO_WIDTH, PHOTO_HEIGHT = 500, 375
ILSVRC_MEAN_FILE_BYTES = 110_000
PHOTO_JPEG_QUALITY = 90
# Smooth colour fields (a few control points, bicubic) plus Gaussian pixel noise: the noise sets
# how much entropy-coded data a file holds, which is what decoding costs. Measured with PIL 10 at
# quality 90: sigma 20 -> 98 KB, 26 -> 110 KB, 32 -> 120 KB a file.
PHOTO_NOISE_SIGMA = 26.0
_COLOUR_FIELD_SHAPE = (6, 8, 3)

# The goal's setting: prepare re-encodes what is larger than this, for training at 224 px.
PREPARED_MAX_SIDE = 256
SOURCES = ("folder", "records", f"records_max_side_{PREPARED_MAX_SIDE}")
SPEED_GOAL = 2.0  # records with max_side over the folder pipeline
WARMUP_BATCHES = 8  # fills the pipeline's buffers and thread pools before the clock starts
VALIDATION_PER_CLASS = 4  # prepare needs a validation split; nothing here reads it
PROGRESS_EVERY_S = 5.0


def photo_like_jpeg(rng: np.random.Generator, width: int = PHOTO_WIDTH,
                    height: int = PHOTO_HEIGHT, noise_sigma: float = PHOTO_NOISE_SIGMA) -> bytes:
  """A JPEG that costs about what a photo of that size costs to decode."""
  field = rng.uniform(0, 255, _COLOUR_FIELD_SHAPE).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), np.float32)
  pixels = np.clip(smooth + rng.normal(0, noise_sigma, smooth.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=PHOTO_JPEG_QUALITY)
  return buffer.getvalue()


def write_photo_folders(root: str, train_images: int, seed: int = 0,
                        width: int = PHOTO_WIDTH, height: int = PHOTO_HEIGHT) -> dict:
  """root/train/class_{0,1}/ with `train_images` photo-like JPEGs and root/validation/ with a few.

  Returns what was written: the count, the photo size and the train files' mean size in bytes.
  """
  rng = np.random.default_rng(seed)
  train_bytes = []
  started = last_report = time.monotonic()
  for split, count in (("train", train_images), ("validation", 2 * VALIDATION_PER_CLASS)):
    for index in range(count):
      if split == "train" and time.monotonic() - last_report >= PROGRESS_EVERY_S:
        last_report = time.monotonic()
        rate = progress.steps_per_second(index, last_report - started)
        logger.info("Writing photo-like JPEGs: %d of %d (ETA %s)", index, train_images,
                    progress.format_seconds((train_images - index) / rate if rate else None))
      folder = os.path.join(root, split, f"class_{index % 2}")
      os.makedirs(folder, exist_ok=True)
      data = photo_like_jpeg(rng, width, height)
      with open(os.path.join(folder, f"{index:06d}.jpg"), "wb") as f:
        f.write(data)
      if split == "train":
        train_bytes.append(len(data))
  return {"train_images": train_images, "mean_file_bytes": statistics.mean(train_bytes),
          "width": width, "height": height}


def _pipeline_config(image_size: int, batch_size: int, **source) -> Config:
  return Config(image_size=image_size, batch_size=batch_size, weights="none", augment=True,
                **source).validate(require_model_dir=False)


def time_source(source: dict, image_size: int, batch_size: int, warmup_batches: int,
                batches: int) -> dict:
  """One window, run in a fresh process: the training pipeline (train mode, augmenting) on
  `source` (Config fields: train_dir + validation_dir, or records_dir), `warmup_batches` untimed,
  then `batches` timed."""
  config = _pipeline_config(image_size, batch_size, **source)
  split = loading.load_splits(config).train
  batches_left = iter(pipeline.make_dataset(split, config, "train"))
  for _ in range(warmup_batches):
    next(batches_left)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(batches_left)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  images = batches * batch_size
  return {"img_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images,
          "wall_s": wall, "images": images, "process_id": os.getpid()}


def _ratio_figures(numerator: list, denominator: list, goal: float = 0.0) -> dict:
  """Per-round ratios of two sources' windows (round i against round i), with their spread."""
  ratios = [n / d for n, d in zip(numerator, denominator)]
  figures = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
             "rounds": ratios}
  if goal:
    figures["rounds_at_goal"] = sum(r >= goal for r in ratios)
  return figures


def summarize(windows: dict) -> dict:
  """Ratios of the records sources to the folder, wall and per CPU-second, round by round."""
  folder = windows["folder"]
  summary = {}
  for source in SOURCES[1:]:
    goal = SPEED_GOAL if source == SOURCES[-1] else 0.0
    summary[f"{source}_over_folder"] = {
        "wall": _ratio_figures([w["img_per_s"] for w in windows[source]],
                               [w["img_per_s"] for w in folder], goal),
        # Fewer CPU ms an image is more images per CPU-second.
        "per_cpu_second": _ratio_figures([w["cpu_ms_per_image"] for w in folder],
                                         [w["cpu_ms_per_image"] for w in windows[source]], goal)}
  return summary


def source_order(round_index: int) -> tuple:
  """Which source runs first alternates, so a drift in the VM's speed within a round does not
  favour one of them every time."""
  return SOURCES if round_index % 2 == 0 else tuple(reversed(SOURCES))


def sources_rates(scratch: str, train_images: int, image_size: int = 224, batch_size: int = 32,
                  batches: int = 48, rounds: int = 8, warmup_batches: int = WARMUP_BATCHES,
                  photo_size: tuple = (PHOTO_WIDTH, PHOTO_HEIGHT)) -> dict:
  """Generates the photos, prepares them twice, then times `rounds` x the three sources."""
  if train_images < 2:
    raise ValueError(f"--source_images={train_images}: give at least 2 (the photos go into two "
                     "class folders); 800 or more for figures worth comparing.")
  started = time.monotonic()
  photos = os.path.join(scratch, "photos")
  data = write_photo_folders(photos, train_images, width=photo_size[0], height=photo_size[1])
  logger.info("Wrote %d photo-like %dx%d JPEGs (%.1f KB a file) in %.0f s", train_images,
              *photo_size, data["mean_file_bytes"] / 1000, time.monotonic() - started)
  folder_source = {"train_dir": os.path.join(photos, "train"),
                   "validation_dir": os.path.join(photos, "validation"),
                   "scan_cache_dir": os.path.join(scratch, "scan_cache")}
  sources = {"folder": folder_source}
  for name, max_side in zip(SOURCES[1:], (0, PREPARED_MAX_SIDE)):
    output_dir = os.path.join(scratch, name)
    prepare.run_prepare(folder_source["train_dir"], folder_source["validation_dir"], output_dir,
                        max_side=max_side, scan_cache_dir=folder_source["scan_cache_dir"])
    sources[name] = {"records_dir": output_dir}
    data[f"{name}_bytes"] = sum(os.path.getsize(os.path.join(output_dir, f))
                                for f in os.listdir(output_dir) if f.startswith("train-"))

  windows = {name: [] for name in SOURCES}
  total, done = rounds * len(SOURCES), 0
  timing_started = time.monotonic()
  # A fresh interpreter per window (spawn, not fork: a forked child would inherit this process's
  # TensorFlow runtime and thread pools half-initialised).
  context = multiprocessing.get_context("spawn")
  for round_index in range(rounds):
    for name in source_order(round_index):
      with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as window_process:
        window = window_process.submit(time_source, sources[name], image_size, batch_size,
                                       warmup_batches, batches).result()
      windows[name].append(window)
      done += 1
      elapsed = time.monotonic() - timing_started
      logger.info("Round %d of %d, %s: %.0f img/s, %.2f CPU ms an image (window %d of %d, ETA %s)",
                  round_index + 1, rounds, name, window["img_per_s"], window["cpu_ms_per_image"],
                  done, total, progress.format_seconds(elapsed / done * (total - done)))
  return {"settings": {"image_size": image_size, "batch_size": batch_size, "batches": batches,
                       "warmup_batches": warmup_batches, "rounds": rounds,
                       "max_side": PREPARED_MAX_SIDE, "goal": SPEED_GOAL},
          "data": data, "windows": windows, **summarize(windows),
          "environment": cpu_environment(), "wall_time_s": time.monotonic() - started}


def format_summary(results: dict) -> str:
  lines = [f"Training pipeline at {results['settings']['image_size']} px on "
           f"{results['data']['train_images']} photo-like {results['data']['width']}x"
           f"{results['data']['height']} JPEGs ({results['data']['mean_file_bytes'] / 1000:.1f} KB "
           f"a file), {results['settings']['rounds']} rounds of alternated processes "
           f"({results['environment']['device']}):"]
  for name in SOURCES:
    windows = results["windows"][name]
    lines.append(f"  {name:22s} img/s {statistics.median(w['img_per_s'] for w in windows):7.0f}"
                 f"   CPU ms an image {statistics.median(w['cpu_ms_per_image'] for w in windows):.2f}"
                 "   (medians)")
  for name in SOURCES[1:]:
    figures = results[f"{name}_over_folder"]
    for kind in ("wall", "per_cpu_second"):
      ratio = figures[kind]
      at_goal = (f", {ratio['rounds_at_goal']} of {len(ratio['rounds'])} rounds >= "
                 f"{SPEED_GOAL:g}x" if "rounds_at_goal" in ratio else "")
      lines.append(f"  {name} / folder, {kind.replace('_', ' ')}: median {ratio['median']:.2f}x "
                   f"[{ratio['min']:.2f}-{ratio['max']:.2f}]{at_goal}")
  return "\n".join(lines)
