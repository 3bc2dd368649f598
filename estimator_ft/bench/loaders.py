"""Input loaders: the tf.data pipeline against the original question's single-threaded Python/PIL loader."""

import dataclasses
import logging
import os
from typing import Iterator, Tuple

import numpy as np
from PIL import Image

from estimator_ft import sample_data
from estimator_ft.bench.plan import BenchPlan
from estimator_ft.bench.timing import time_iterations, window_rates
from estimator_ft.config import Config
from estimator_ft.data import images as images_lib
from estimator_ft.data import pipeline
from estimator_ft.data import records
from estimator_ft.data.split import Split

logger = logging.getLogger("estimator_ft")


# ResNet50's caffe preprocessing, as data.preprocess_for_model applies it.
CAFFE_MEAN_BGR = np.array(images_lib.IMAGENET_MEAN_BGR, np.float32)

# Generated when --data_dir is missing: enough images for several batches of any quick setting.
_GENERATED_TRAIN_PER_CLASS = 160

_GENERATED_VALIDATION_PER_CLASS = 40


def resolve_data_dir(data_dir: str, scratch_dir: str) -> str:
  """`data_dir` if it holds train/ and validation/; if it does not exist, generated sample data."""
  if data_dir and os.path.isdir(data_dir):
    for split in ("train", "validation"):
      if not os.path.isdir(os.path.join(data_dir, split)):
        raise ValueError(f"--data_dir={data_dir} has no {split}/ folder: give a folder with "
                         "train/<class>/ and validation/<class>/ image folders.")
    return data_dir
  generated = os.path.join(scratch_dir, "sample")
  logger.info("--data_dir=%s does not exist: generating sample images in %s", data_dir, generated)
  sample_data.generate(generated, seed=0, train_per_class=_GENERATED_TRAIN_PER_CLASS,
                                    validation_per_class=_GENERATED_VALIDATION_PER_CLASS)
  return generated


def _pil_load(path: str, image_size: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
  """What data.make_dataset does with TF, with PIL: decode, then resize the whole image, or
  (augment) resize a random crop of the decoded image in one step and maybe flip it."""
  with Image.open(path) as image:
    image = image.convert("RGB")
    if not augment:
      return np.asarray(image.resize((image_size, image_size), Image.BILINEAR), np.float32)
    full_width, full_height = image.size
    area = rng.uniform(*images_lib.CROP_AREA_RANGE) * full_width * full_height
    aspect = rng.uniform(*images_lib.CROP_ASPECT_RATIO_RANGE)
    width = min(full_width, max(1, int(round((area * aspect) ** 0.5))))
    height = min(full_height, max(1, int(round((area / aspect) ** 0.5))))
    left = int(rng.integers(0, full_width - width + 1))
    top = int(rng.integers(0, full_height - height + 1))
    image = image.resize((image_size, image_size), Image.BILINEAR,
                         box=(left, top, left + width, top + height))
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(image, np.float32)


def python_batches(split: Split, image_size: int, batch_size: int, augment: bool = True,
                   seed: int = 0) -> Iterator:
  """Endless (float32 images [b, s, s, 3] preprocessed for ResNet50, int32 labels [b]) batches.

  One thread, one image at a time: the ImageDataGenerator-style loader of the original question.
  """
  if batch_size > split.num_examples:
    raise ValueError(f"--batch_size={batch_size} is larger than the {split.num_examples} images of "
                     f"the {split.name} split; lower --batch_size or use a larger --data_dir.")
  rng = np.random.default_rng(seed)
  labels = np.asarray(split.labels, np.int32)
  while True:
    order = rng.permutation(split.num_examples)
    for start in range(0, len(order) - batch_size + 1, batch_size):
      chosen = order[start:start + batch_size]
      images = np.stack([_pil_load(split.paths[i], image_size, rng, augment) for i in chosen])
      yield images[..., ::-1] - CAFFE_MEAN_BGR, labels[chosen]


def subset(split: Split, count: int) -> Split:
  """The first `count` examples of a folder split, classes interleaved so every class stays in."""
  by_class = {}
  for path, label in zip(split.paths, split.labels):
    by_class.setdefault(label, []).append(path)
  interleaved = [(path, label) for group in zip(*by_class.values())
                 for path, label in zip(group, by_class.keys())]
  chosen = interleaved[:count]
  return dataclasses.replace(split, paths=tuple(p for p, _ in chosen),
                             labels=tuple(l for _, l in chosen), num_examples=len(chosen))


def input_loader_rates(split: Split, config: Config, plan: BenchPlan) -> dict:
  """img/s of the tf.data pipeline and of the Python/PIL loader, same work, same batch size."""
  count = plan.warmup_steps + plan.loader_batches * plan.repeats
  dataset_iterator = iter(pipeline.make_dataset(split, config, "train"))
  tf_data = time_iterations(lambda: next(dataset_iterator), count)
  python_iterator = python_batches(split, config.image_size, config.batch_size, config.augment,
                                   config.seed)
  python_loader = time_iterations(lambda: next(python_iterator), count)
  rate = lambda timestamps: window_rates(timestamps, plan.warmup_steps, plan.loader_batches,
                                         plan.repeats, config.batch_size)
  return {"pipeline": rate(tf_data), "python_loader": rate(python_loader)}


def records_source(records_dir: str, config: Config, num_classes: int) -> Tuple[Split, Config]:
  """The train split of prepared records and `config` reading it instead of the folders."""
  split = records.records_split(records_dir, "train")
  if len(split.class_names) != num_classes:
    raise ValueError(f"--records_dir={records_dir} has {len(split.class_names)} classes where "
                     f"--data_dir has {num_classes}: the bench trains one model on both, so prepare "
                     "the records from --data_dir (or from folders with as many classes).")
  return split, config.replace(train_dir="", validation_dir="", records_dir=records_dir)


def records_pipeline_rates(split: Split, config: Config, plan: BenchPlan) -> list:
  """img/s of the same tf.data pipeline reading the train split of prepared records instead
  (`records_source`)."""
  count = plan.warmup_steps + plan.loader_batches * plan.repeats
  dataset_iterator = iter(pipeline.make_dataset(split, config, "train"))
  timestamps = time_iterations(lambda: next(dataset_iterator), count)
  return window_rates(timestamps, plan.warmup_steps, plan.loader_batches, plan.repeats,
                      config.batch_size)
