"""The folder scan at scale: a first start (every file test-decoded) against a second start on
the same files (verdicts from the scan manifest)."""

import os
import time

import numpy as np
from PIL import Image

from estimator_ft.data import folders

SCAN_IMAGE_SIZE = 224  # the size users train at; decoding cost grows with it
_BASE_IMAGES = 64  # distinct backgrounds; every file also gets its own block, so no two are equal


def write_jpeg_folder(root: str, num_files: int, seed: int = 0) -> str:
  """`num_files` distinct 224-px JPEGs in two class folders."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, SCAN_IMAGE_SIZE, dtype=np.float32)
  bases = [np.clip(np.stack([ramp[:, None] * rng.uniform(0.2, 1) + np.zeros((1, SCAN_IMAGE_SIZE)),
                             ramp[None, :] * rng.uniform(0.2, 1) + np.zeros((SCAN_IMAGE_SIZE, 1)),
                             np.full((SCAN_IMAGE_SIZE, SCAN_IMAGE_SIZE), rng.uniform(0, 255))],
                            axis=-1), 0, 255).astype(np.uint8) for _ in range(_BASE_IMAGES)]
  for index in range(num_files):
    folder = os.path.join(root, f"class_{index % 2}")
    os.makedirs(folder, exist_ok=True)
    pixels = bases[index % _BASE_IMAGES].copy()
    top, left = rng.integers(0, SCAN_IMAGE_SIZE - 32, 2)
    pixels[top:top + 32, left:left + 32] = rng.integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{index:07d}.jpg"), "JPEG", quality=90)
  return root


def scan_rates(num_files: int, scratch: str) -> dict:
  """Files/s of a first and a second scan of `num_files` 224-px JPEGs, and their ratio."""
  root = write_jpeg_folder(os.path.join(scratch, "scan_data"), num_files)
  cache = os.path.join(scratch, "scan_cache")
  started = time.perf_counter()
  first = folders.survey_folder(root, "train", cache)
  first_s = time.perf_counter() - started
  started = time.perf_counter()
  second = folders.survey_folder(root, "train", cache)
  second_s = time.perf_counter() - started
  return {"files": num_files, "image_size": SCAN_IMAGE_SIZE,
          "first_scan_s": first_s, "second_scan_s": second_s,
          "first_files_per_s": num_files / first_s, "second_files_per_s": num_files / second_s,
          "second_over_first_speedup": first_s / second_s,
          "decoded": {"first": first.decoded, "second": second.decoded}}
