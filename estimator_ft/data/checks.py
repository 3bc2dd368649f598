"""What is wrong with a data set as a whole (no TensorFlow): class imbalance, duplicated files,
files shared between the training and validation splits.

`load_splits` logs these as warnings before a run; `estimator-ft inspect` reports them in full.
"""

import collections
from typing import Dict, List, Sequence

# Above this largest/smallest class ratio a run is warned (and `inspect` flags it): a classifier
# trained on it drifts towards the large classes, and accuracy hides that.
IMBALANCE_WARNING_RATIO = 3.0


def class_counts(labels: Sequence[int], num_classes: int) -> List[int]:
  counts = [0] * num_classes
  for label in labels:
    counts[label] += 1
  return counts


def imbalance_ratio(counts: Sequence[int]) -> float:
  """Largest over smallest class count (inf when a class is empty)."""
  smallest = min(counts)
  return float("inf") if smallest == 0 else max(counts) / smallest


def duplicate_groups(paths: Sequence[str], hashes: Sequence[str]) -> List[List[str]]:
  """Groups (2 or more paths) of files with identical bytes, largest group first."""
  by_hash: Dict[str, List[str]] = collections.defaultdict(list)
  for path, digest in zip(paths, hashes):
    if digest:
      by_hash[digest].append(path)
  groups = [sorted(group) for group in by_hash.values() if len(group) > 1]
  return sorted(groups, key=lambda g: (-len(g), g[0]))


def shared_files(train_paths, train_hashes, validation_paths, validation_hashes) -> List[tuple]:
  """[(validation path, a training path with the same bytes)], in validation order: leakage."""
  train_by_hash = {}
  for path, digest in zip(train_paths, train_hashes):
    if digest:
      train_by_hash.setdefault(digest, path)
  return [(path, train_by_hash[digest]) for path, digest in zip(validation_paths, validation_hashes)
          if digest in train_by_hash]


def imbalance_warning(split_name: str, class_names, counts) -> str:
  """The warning for a split more than IMBALANCE_WARNING_RATIO apart, or ""."""
  ratio = imbalance_ratio(counts)
  if ratio <= IMBALANCE_WARNING_RATIO:
    return ""
  ordered = sorted(zip(counts, class_names), reverse=True)
  largest, smallest = ordered[0], ordered[-1]
  return (f"The {split_name} classes are imbalanced: {largest[1]!r} has {largest[0]} images, "
          f"{smallest[1]!r} {smallest[0]} ({ratio:.1f}:1). Accuracy will favour the large "
          "classes: train with --class_weight=balanced (weights n / (k * n_c) in the training loss), "
          "resample the classes, or add images to the small ones.")


def leakage_warning(shared: Sequence[tuple]) -> str:
  if not shared:
    return ""
  validation, train = shared[0]
  return (f"{len(shared)} validation file(s) have the same bytes as a training file (e.g. "
          f"{validation} = {train}): validation figures will overstate how well the model "
          "generalises. Remove them from one split; `estimator-ft inspect` lists them all.")
