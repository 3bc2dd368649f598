"""`estimator-ft prepare`: an image-folder pair -> sharded TFRecords and dataset.json.

The folders are scanned exactly as training scans them (data/folders.scan_image_folder: the same
checks, the same scan manifest, the same --bad_images policy). Each split's examples are written
in a seeded random order, so every shard is a random sample of its split (what the records
stream's per-epoch shard order relies on, data/records.py).

Atomic and resumable: each shard is written under OUTPUT_DIR/.partial/ and renamed into place
when complete; dataset.json, written last, is what makes the folder a data set. An interrupted
prepare leaves no dataset.json, and the same command again keeps the shards already complete and
writes the rest. The plan (.partial/plan.json) holds a fingerprint of the inputs and settings: a
different data set is never written over (or mixed into) an existing one.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from typing import List

import numpy as np
import tensorflow as tf

from estimator_ft import image_formats
from estimator_ft import progress
from estimator_ft import storage
from estimator_ft.data import folders
from estimator_ft.data import records
from estimator_ft.data.split import DataError, Split

logger = logging.getLogger("estimator_ft")

PARTIAL_DIR = ".partial"
PLAN_FILE = "plan.json"
PROGRESS_EVERY_S = 5.0


def _fingerprint(splits: dict, shard_counts: dict, max_side: int, seed: int) -> str:
  digest = hashlib.sha1()
  digest.update(json.dumps({"format": records.RECORDS_FORMAT, "max_side": max_side,
                            "seed": seed, "shards": shard_counts}, sort_keys=True).encode())
  for name in records.SPLITS:
    split = splits[name]
    digest.update(json.dumps([name, list(split.class_names)]).encode())
    for path, label, sha1 in zip(split.paths, split.labels, split.content_hashes):
      digest.update(f"{os.path.basename(path)}\0{label}\0{sha1}\n".encode())
  return digest.hexdigest()


def _source_bytes(split: Split) -> int:
  return sum(os.path.getsize(p) for p in split.paths)


def _plan_shards(split: Split, num_shards: int, seed: int, stream: int) -> List[np.ndarray]:
  """Indices of the split's examples per shard: a seeded permutation cut into equal runs."""
  order = np.random.default_rng([seed, stream]).permutation(split.num_examples)
  return [chunk for chunk in np.array_split(order, num_shards)]


class _Progress:
  def __init__(self, total: int):
    self.total, self.done = total, 0
    self.started = self.last = time.monotonic()
    self.lock = threading.Lock()

  def add(self, count: int) -> None:
    with self.lock:
      self.done += count
      now = time.monotonic()
      if now - self.last >= PROGRESS_EVERY_S and self.done < self.total:
        self.last = now
        rate = progress.steps_per_second(self.done, now - self.started)
        eta = (self.total - self.done) / rate if rate else float("nan")
        logger.info("Writing records: %d of %d images (%.0f img/s, ETA %s)", self.done,
                    self.total, rate or 0.0, progress.format_seconds(eta))


def _encode(path: str, label: int, class_names, max_side: int):
  with open(path, "rb") as f:
    data = f.read()
  encoded, new_format = records.reencode_if_larger(data, max_side)
  image_format = new_format or os.path.splitext(path)[1].lower().lstrip(".").replace("jpg", "jpeg")
  return records.example_bytes(encoded, image_format, label, class_names[label],
                               os.path.basename(path)), new_format is not None


def run_prepare(train_dir: str, validation_dir: str, output_dir: str, num_shards: int = 0,
                max_side: int = 0, bad_images: str = "fail", seed: int = 0,
                scan_cache_dir: str = "", rescan: bool = False, workers: int = 0) -> dict:
  """Writes the records and dataset.json (see the module docstring); returns dataset.json's value."""
  if not output_dir:
    raise ValueError("--output_dir is required: the folder for the shards and dataset.json.")
  if num_shards < 0 or max_side < 0:
    raise ValueError("--num_shards and --max_side must be >= 0 (0: sized automatically / keep "
                     "the original bytes).")
  # Every image is held to this limit here, once, and dataset.json says so: training from the
  # records then skips the per-image header check (the shards' CRCs guard the bytes since).
  pixel_limit = image_formats.DEFAULT_MAX_IMAGE_PIXELS
  splits = {name: folders.scan_image_folder(folder, name, bad_images, scan_cache_dir, rescan,
                                            max_image_pixels=pixel_limit)
            for name, folder in (("train", train_dir), ("validation", validation_dir))}
  class_names = splits["train"].class_names
  if splits["validation"].class_names != class_names:
    raise DataError(f"Train classes {list(class_names)} and validation classes "
                    f"{list(splits['validation'].class_names)} differ: both folders need the same "
                    "class sub-folders.")
  sizes = {name: _source_bytes(split) for name, split in splits.items()}
  train_shards = num_shards or records.default_num_shards(sizes["train"])
  if num_shards:
    validation_shards = max(1, round(num_shards * sizes["validation"] / max(1, sizes["train"])))
  else:
    validation_shards = records.default_num_shards(sizes["validation"])
  shard_counts = {"train": min(train_shards, splits["train"].num_examples),
                  "validation": min(validation_shards, splits["validation"].num_examples)}
  fingerprint = _fingerprint(splits, shard_counts, max_side, seed)

  description_path = records.join(output_dir, records.DATASET_JSON)
  partial = records.join(output_dir, PARTIAL_DIR)
  plan_path = records.join(partial, PLAN_FILE)
  if tf.io.gfile.exists(description_path):
    existing = records.read_dataset_json(output_dir)
    if existing.get("fingerprint") == fingerprint:
      logger.info("%s already holds this data set (same images and settings); nothing to do.",
                  output_dir)
      return existing
    raise DataError(f"--output_dir={output_dir} already holds a different data set (other images "
                    "or settings). Use another --output_dir, or delete that folder first.")
  if tf.io.gfile.exists(plan_path):
    if json.loads(storage.read_bytes(plan_path)).get("fingerprint") != fingerprint:
      raise DataError(f"--output_dir={output_dir} holds an interrupted prepare of a different "
                      "data set. Rerun that command to finish it, or delete the folder.")
    logger.info("Completing the interrupted prepare in %s.", output_dir)
  elif tf.io.gfile.exists(output_dir) and tf.io.gfile.listdir(output_dir):
    raise DataError(f"--output_dir={output_dir} is not empty and is not a prepared data set: "
                    "give a new or empty folder.")
  tf.io.gfile.makedirs(partial)
  storage.write_json_atomic(plan_path, {"fingerprint": fingerprint})

  started = time.time()
  total = sum(split.num_examples for split in splits.values())
  tracker = _Progress(total)
  workers = workers or min(8, 2 * (os.cpu_count() or 1))
  description = {"format": records.RECORDS_FORMAT, "fingerprint": fingerprint,
                 "class_names": list(class_names),
                 "encoding": {"max_side": max_side, "reencoded_format": "jpeg" if max_side else "",
                              "note": ("images with a longer side above max_side re-encoded as "
                                       "JPEG quality 95, the others kept byte for byte")
                              if max_side else "original bytes of every file"},
                 records.VERIFIED_MAX_PIXELS_KEY: pixel_limit,
                 "seed": seed, "splits": {}}
  reencoded = 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for stream, name in enumerate(records.SPLITS):
      split = splits[name]
      count = shard_counts[name]
      shards = []
      for index, members in enumerate(_plan_shards(split, count, seed, stream)):
        file_name = records.shard_name(name, index, count)
        final = records.join(output_dir, file_name)
        shards.append({"file": file_name, "num_examples": int(len(members))})
        if tf.io.gfile.exists(final):  # complete: renamed into place by the interrupted run
          tracker.add(len(members))
          continue
        tmp = records.join(partial, file_name)
        with tf.io.TFRecordWriter(tmp) as writer:
          # pool.map keeps the order; the reads, decodes and encodes overlap in the threads.
          for serialized, was_reencoded in pool.map(
              lambda i: _encode(split.paths[i], split.labels[i], class_names, max_side), members):
            writer.write(serialized)
            reencoded += was_reencoded
            tracker.add(1)
        tf.io.gfile.rename(tmp, final, overwrite=True)
      counts = [0] * len(class_names)
      for label in split.labels:
        counts[label] += 1
      description["splits"][name] = {
          "source_dir": os.path.abspath(train_dir if name == "train" else validation_dir),
          "num_examples": split.num_examples,
          "counts_per_class": dict(zip(class_names, counts)),
          "shards": shards,
          "skipped": [{"path": p, "reason": r} for p, r in split.skipped],
      }
  storage.write_json_atomic(description_path, description)
  tf.io.gfile.rmtree(partial)
  elapsed = time.time() - started
  logger.info("Prepared %d train shards and %d validation shards (%d images) in %s: %.1f s, "
              "%.0f img/s%s.", shard_counts["train"], shard_counts["validation"], total, output_dir,
              elapsed, total / elapsed if elapsed else 0.0,
              f"; {reencoded} images written by this run re-encoded (--max_side={max_side})"
              if max_side else "")
  if reencoded:
    logger.warning(
        "%d images were shrunk to a longer side of %d px (PIL, antialiased) and re-encoded: the "
        "model trains and validates on those. Its export resizes what it is sent straight to "
        "--image_size without antialiasing, so send it images shrunk the same way (longer side "
        "%d px) to get what validation measured; with photos far larger than --image_size the "
        "difference is largest.", reencoded, max_side, max_side)
  return description
