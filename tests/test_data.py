"""Tests of estimator_ft.data: decoding, the tf.data pipeline, folder scan and bad input, TFDS."""

import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from estimator_ft import contract
from estimator_ft import image_formats
from estimator_ft import sample_data
from estimator_ft.config import Config
from estimator_ft.data import folders as folders_lib
from estimator_ft.data import images as images_lib
from estimator_ft.data import loading as loading_lib
from estimator_ft.data import pipeline as pipeline_lib
from estimator_ft.data import split as split_lib
from estimator_ft.data import synthetic as synthetic_lib
from estimator_ft.data import tfds_source
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path

SIZE = 32
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_config(tmp_path, train_dir="", validation_dir="", **overrides) -> Config:
  values = dict(train_dir=str(train_dir), validation_dir=str(validation_dir),
                model_dir=str(tmp_path / "m"), image_size=SIZE, batch_size=4, seed=7)
  values.update(overrides)
  return Config(**values)


def expected_image(path, size=SIZE) -> np.ndarray:
  """What eval must yield for one file: decode -> resize -> preprocess, nothing else."""
  with open(path, "rb") as f:
    return images_lib.decode_and_preprocess(f.read(), size).numpy()


def take(dataset, n):
  return list(dataset.take(n).as_numpy_iterator())


# ------------------------------------------------------------------ a small labelled folder set

# Class folders created in an order different from the sorted one, to test the label mapping.
CLASS_COUNTS = {"zebra": 3, "ant": 4, "bee": 2}  # 9 images: batch 4 leaves a partial batch of 1


def example_red(example_id: int) -> int:
  return 10 + 20 * example_id


def write_identified_set(root, counts=CLASS_COUNTS):
  """Solid-colour PNGs whose red value encodes a unique id; returns {path: (id, class)}."""
  written, example_id = {}, 0
  for class_name, count in counts.items():
    for i in range(count):
      path = os.path.join(root, class_name, f"img{i}.png")
      images.write_png(path, size=20, solid=(example_red(example_id), 50, 200))
      written[os.path.abspath(path)] = (example_id, class_name)
      example_id += 1
  return written


def ids_of(batch_images) -> list:
  """Example ids back from preprocessed solid images (red sits in channel 2 after BGR)."""
  red = batch_images[..., 2].mean(axis=(1, 2)) + 123.68
  return [int(round((r - 10) / 20)) for r in red]


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder_set")
  train = write_identified_set(root / "train")
  validation = write_identified_set(root / "validation")
  return root, train, validation


@pytest.fixture(scope="module")
def splits(folder_set, tmp_path_factory):
  root, _, _ = folder_set
  config = make_config(tmp_path_factory.mktemp("cfg"), root / "train", root / "validation")
  return loading_lib.load_splits(config)


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("kind", sorted(images.GOOD_FORMATS))
def test_every_format_decodes_to_rgb_float_in_range(kind):
  pattern = images_lib.decode_image(images.encoded_bytes(kind, size=24), SIZE).numpy()
  assert pattern.shape == (SIZE, SIZE, 3) and pattern.dtype == np.float32
  assert 0.0 <= pattern.min() and pattern.max() <= 255.0
  assert pattern.max() > 200  # real 0..255 values, not 0..1 or a 16-bit value cut to zero

  red = images_lib.decode_image(images.encoded_bytes(kind, size=24, solid=images.RED), SIZE).numpy()
  if kind in ("png_gray", "jpeg_gray", "png_16bit"):
    # Grayscale: three equal channels, at red's luma (0.299 * 255 = 76).
    np.testing.assert_allclose(red[..., 0], red[..., 1], atol=0.01)
    np.testing.assert_allclose(red[..., 0], red[..., 2], atol=0.01)
    np.testing.assert_allclose(red, 76.0, atol=1.5)
  else:
    tolerance = 3.0 if kind.startswith("jpeg") else 0.0  # JPEG is lossy
    np.testing.assert_allclose(red, np.broadcast_to([255.0, 0.0, 0.0], red.shape),
                               atol=tolerance)


def test_every_format_through_the_pipeline_matches_eager_decode(tmp_path):
  # In a tf.data map shapes are not known statically, unlike eager calls: the graph path must
  # still give 3 channels for gray, RGBA and 16-bit files.
  files = images.all_format_files(tmp_path / "train" / "a", size=24)
  images.all_format_files(tmp_path / "train" / "b", size=24, seed=1)
  split = folders_lib.scan_image_folder(str(tmp_path / "train"), "train")
  assert split.num_examples == 2 * len(files) and split.skipped == ()
  config = make_config(tmp_path, batch_size=32)
  (features, labels), = list(pipeline_lib.make_dataset(split, config, "eval").as_numpy_iterator())
  assert features["image"].shape == (len(split.paths), SIZE, SIZE, 3)
  for path, image in zip(split.paths, features["image"]):
    np.testing.assert_array_equal(image, expected_image(path))


def test_animated_gif_gives_its_first_frame():
  image = images_lib.decode_image(images.encoded_bytes("gif_animated", size=24), SIZE).numpy()
  np.testing.assert_array_equal(image, np.broadcast_to([255.0, 0.0, 0.0], image.shape))


def test_gray_image_has_equal_channels():
  gray = images_lib.decode_image(images.encoded_bytes("png_gray", size=24), SIZE).numpy()
  assert np.ptp(gray) > 100  # a real pattern, not a flat image
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_rgba_drops_alpha_without_blending():
  rgb = images_lib.decode_image(images.encoded_bytes("png_rgb", size=24), SIZE).numpy()
  rgba = images_lib.decode_image(images.encoded_bytes("png_rgba", size=24), SIZE).numpy()
  np.testing.assert_array_equal(rgba, rgb)


def test_16bit_png_is_scaled_to_8_bit_range():
  sixteen = images_lib.decode_image(images.encoded_bytes("png_16bit", size=24), 24).numpy()
  eight = images_lib.decode_image(images.encoded_bytes("png_gray", size=24), 24).numpy()
  # The 16-bit file holds gray * 257, so scaled back it must match the 8-bit file.
  np.testing.assert_allclose(sixteen, eight, atol=1.0)


def test_cmyk_and_progressive_jpeg_match_baseline():
  baseline = images_lib.decode_image(images.encoded_bytes("jpeg_rgb", size=24), SIZE).numpy()
  for kind in ("jpeg_progressive", "jpeg_cmyk"):
    other = images_lib.decode_image(images.encoded_bytes(kind, size=24), SIZE).numpy()
    assert np.abs(other - baseline).mean() < 4.0, kind


@pytest.mark.parametrize("content", [
    images.encoded_bytes("tiff"), images.truncated_bytes("jpeg"), images.truncated_bytes("png"),
    b"", b"not an image at all"], ids=["tiff", "truncated_jpeg", "truncated_png", "empty", "text"])
def test_undecodable_bytes_raise(content):
  with pytest.raises(tf.errors.InvalidArgumentError):
    images_lib.decode_image(content, SIZE)


def test_preprocess_is_keras_resnet50_preprocess_input():
  rng = np.random.default_rng(0)
  batch = rng.uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
  batch[1] = np.round(batch[1])  # decoded pixels are whole numbers
  ours = images_lib.preprocess_for_model(tf.constant(batch)).numpy()
  keras = tf.keras.applications.resnet50.preprocess_input(batch.copy())
  np.testing.assert_array_equal(ours, keras)  # bit for bit: ImageNet weights expect it
  # Caffe mode, spelled out: RGB -> BGR, then the ImageNet channel means removed.
  r, g, b = batch[0, 0, 0]
  np.testing.assert_allclose(ours[0, 0, 0], [b - 103.939, g - 116.779, r - 123.68], atol=1e-3)
  # One image, and a batch the size the pipeline preprocesses (other convolution kernels may
  # serve larger inputs): still Keras' values exactly, fractional pixels (resized) included.
  np.testing.assert_array_equal(images_lib.preprocess_for_model(tf.constant(batch[0])).numpy(),
                                keras[0])
  large = rng.uniform(0, 255, (8, 224, 224, 3)).astype(np.float32)
  np.testing.assert_array_equal(images_lib.preprocess_for_model(tf.constant(large)).numpy(),
                                tf.keras.applications.resnet50.preprocess_input(large.copy()))


def test_decode_and_preprocess_is_decode_then_preprocess():
  encoded = images.encoded_bytes("jpeg_rgb", size=40)
  np.testing.assert_array_equal(
      images_lib.decode_and_preprocess(encoded, SIZE).numpy(),
      images_lib.preprocess_for_model(images_lib.decode_image(encoded, SIZE)).numpy())


# ------------------------------------------------------------------ augmentation


def _is_flipped(image) -> bool:
  # The pattern's red grows left to right; a crop keeps that direction, only a flip reverses it.
  return image[:, : SIZE // 2, 0].mean() > image[:, SIZE // 2:, 0].mean()


def test_augment_is_random_per_seed_and_deterministic():
  original = tf.constant(images.pattern(SIZE), tf.float32)
  assert not _is_flipped(original.numpy())
  outputs = [images_lib.augment_image(original, tf.constant([3, i], tf.int64), SIZE).numpy()
             for i in range(40)]
  for out in outputs:
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
  flipped = [_is_flipped(o) for o in outputs]
  # An always-on or never-on flip fails here.
  assert 8 <= sum(flipped) <= 32, sum(flipped)
  # Crops: un-flipped outputs still differ from the original (not only flips happen)...
  unflipped_changed = [np.abs(o - original.numpy()).mean() > 2.0
                       for o, f in zip(outputs, flipped) if not f]
  assert sum(unflipped_changed) >= len(unflipped_changed) // 2
  # ...and from each other.
  assert len({hashlib.sha1(o.tobytes()).hexdigest() for o in outputs}) >= 35
  again = images_lib.augment_image(original, tf.constant([3, 5], tf.int32), SIZE).numpy()
  np.testing.assert_array_equal(again, outputs[5])


def test_crops_resize_to_the_same_values_by_both_routes_of_resize_crop():
  rng = np.random.default_rng(0)
  ratio = images_lib.CAST_FIRST_MAX_PIXEL_RATIO
  # (height, width, output size): an upscale and a crop within `ratio` x the output's pixels
  # (cast to float32 first), one over it (read as uint8), and a --max_side=256 record at 224 px.
  cases = ((12, 10, SIZE), (40, 50, SIZE), (200, 240, SIZE), (256, 341, 224))
  assert [h * w <= ratio * size * size for h, w, size in cases] == [True, True, False, True]
  for height, width, size in cases:
    crop = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    from_float = tf.image.resize(tf.constant(crop, tf.float32), [size, size]).numpy()
    # TensorFlow's own uint8 route gives the float route's values: what makes a cast exact.
    np.testing.assert_array_equal(tf.image.resize(tf.constant(crop), [size, size]).numpy(),
                                  from_float)
    resized = images_lib.resize_crop(tf.constant(crop), size)
    assert resized.dtype == tf.float32
    np.testing.assert_array_equal(resized.numpy(), from_float)
  # And so augmenting a decoded (uint8) image gives what augmenting its float copy does.
  for height, width in ((40, 48), (200, 240)):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for index in range(4):
      seed = tf.constant([7, index], tf.int64)
      np.testing.assert_array_equal(
          images_lib.augment_image(tf.constant(image), seed, SIZE).numpy(),
          images_lib.augment_image(tf.constant(image, tf.float32), seed, SIZE).numpy())


# ------------------------------------------------------------------ folder pipeline


def test_scan_maps_sorted_class_names_to_labels(folder_set, splits):
  _, train_written, _ = folder_set
  assert splits.class_names == ("ant", "bee", "zebra")
  assert splits.train.class_names == splits.validation.class_names == splits.class_names
  assert splits.train.num_examples == 9 and len(splits.train.paths) == 9
  assert set(splits.train.paths) == set(train_written)
  for path, label in zip(splits.train.paths, splits.train.labels):
    assert splits.class_names[label] == train_written[path][1]
  assert splits.train.skipped == ()


def test_eval_yields_every_example_once_in_order_with_partial_batch(folder_set, splits, tmp_path):
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation", augment=True)
  batches = list(pipeline_lib.make_dataset(splits.validation, config, "eval").as_numpy_iterator())
  assert [len(labels) for _, labels in batches] == [4, 4, 1]
  features, labels = batches[0]
  assert set(features) == {contract.FEATURE_KEY}
  assert features["image"].dtype == np.float32 and labels.dtype == np.int32
  got_images = np.concatenate([f["image"] for f, _ in batches])
  got_labels = np.concatenate([l for _, l in batches])
  # Eval is not augmented even with augment=True: exactly decode + resize + preprocess.
  want = np.stack([expected_image(p) for p in splits.validation.paths])
  np.testing.assert_array_equal(got_images, want)
  np.testing.assert_array_equal(got_labels, splits.validation.labels)
  assert split_lib.steps_per_epoch(splits.validation, 4) == 3


def test_predict_yields_features_only(folder_set, splits, tmp_path):
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation")
  batches = list(pipeline_lib.make_dataset(splits.validation, config, "predict").as_numpy_iterator())
  assert all(set(b) == {contract.FEATURE_KEY} for b in batches)
  assert sum(len(b["image"]) for b in batches) == 9


@pytest.mark.parametrize("cache", [False, True])
def test_no_stream_is_autotuned(folder_set, splits, tmp_path, cache):
  # An autotuned iterator's destruction can wait out its model thread's optimisation period:
  # every second evaluation of `make demo` stalled 10-19 s (2-core AVX2 EPYC), the end of Keras
  # `fit` 16-20 s in about half the runs (Zen 4), closing a 40-step Estimator session on the
  # synthetic stream 4.9 and 9.3 s in 2 of 3 runs (Zen 5).
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation", cache=cache)
  datasets = {}
  for mode, split in (("train", splits.train), ("eval", splits.validation),
                      ("predict", splits.validation)):
    datasets[mode] = pipeline_lib.make_dataset(split, config, mode)
    generated = synthetic_lib.synthetic_dataset(config, 2, mode, num_examples=4)
    # None would be tf.data's default: on.
    assert datasets[mode].options().autotune.enabled is False, mode
    assert generated.options().autotune.enabled is False, f"synthetic {mode}"
  # Complete without it: the eval stream still yields every example, in order.
  eval_labels = np.concatenate([labels for _, labels in datasets["eval"].as_numpy_iterator()])
  np.testing.assert_array_equal(eval_labels, splits.validation.labels)


def test_train_shuffles_each_epoch_and_repeats(folder_set, splits, tmp_path):
  root, train_written, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation", batch_size=3,
                       augment=False)
  dataset = pipeline_lib.make_dataset(splits.train, config, "train")
  batches = take(dataset, 7)  # 21 elements: more than two epochs of 9
  assert all(f["image"].shape == (3, SIZE, SIZE, 3) for f, _ in batches)
  ids = [i for f, _ in batches for i in ids_of(f["image"])]
  labels = [l for _, ls in batches for l in ls]
  epoch1, epoch2 = ids[:9], ids[9:18]
  assert sorted(epoch1) == sorted(epoch2) == list(range(9))  # each example once per epoch
  assert epoch1 != list(range(9)) and epoch1 != epoch2  # shuffled, and differently each epoch
  class_of_id = {i: c for i, c in train_written.values()}
  assert [splits.class_names[l] for l in labels] == [class_of_id[i] for i in ids]


def test_train_is_deterministic_per_seed(folder_set, splits, tmp_path):
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation")

  def first_batches(cfg):
    return take(pipeline_lib.make_dataset(splits.train, cfg, "train"), 3)

  one, two = first_batches(config), first_batches(config)
  for (f1, l1), (f2, l2) in zip(one, two):
    np.testing.assert_array_equal(f1["image"], f2["image"])
    np.testing.assert_array_equal(l1, l2)
  other = first_batches(config.replace(seed=8))
  assert any(not np.array_equal(f1["image"], f3["image"]) for (f1, _), (f3, _) in zip(one, other))


def test_train_augments_only_when_enabled(tmp_path):
  # One asymmetric image per class, so flips and crops are visible in every element.
  for class_name in ("a", "b"):
    images.write_png(tmp_path / "train" / class_name / "x.png", size=SIZE, seed=1)
  split = folders_lib.scan_image_folder(str(tmp_path / "train"), "train")
  plain = expected_image(split.paths[0])
  config = make_config(tmp_path, batch_size=2, augment=True)

  augmented = np.concatenate([f["image"] for f, _ in take(
      pipeline_lib.make_dataset(split, config, "train"), 10)])
  differs = [not np.allclose(a, plain) for a in augmented]
  assert sum(differs) >= 15  # nearly every element is flipped and/or cropped
  # Flip test on preprocessed images: red is channel 2 after the BGR swap.
  flipped = [a[:, : SIZE // 2, 2].mean() > a[:, SIZE // 2:, 2].mean() for a in augmented]
  assert 3 <= sum(flipped) <= 17, sum(flipped)

  not_augmented = np.concatenate([f["image"] for f, _ in take(
      pipeline_lib.make_dataset(split, config.replace(augment=False), "train"), 3)])
  for image in not_augmented:
    np.testing.assert_array_equal(image, plain)
  # Eval never augments, whatever config.augment says.
  for mode in ("eval", "predict"):
    for batch in pipeline_lib.make_dataset(split, config, mode).as_numpy_iterator():
      for image in (batch[0] if mode == "eval" else batch)["image"]:
        np.testing.assert_array_equal(image, plain)


def test_train_crops_from_the_decoded_image_with_one_interpolation(tmp_path):
  # A detailed image 3x the training size, the same file in both classes: element i of the
  # stream is that image augmented with seed (config seed, i).
  for class_name in ("a", "b"):
    images.write_png(tmp_path / "train" / class_name / "x.png", size=3 * SIZE, seed=2)
  split = folders_lib.scan_image_folder(str(tmp_path / "train"), "train")
  config = make_config(tmp_path, batch_size=2, augment=True)
  with open(split.paths[0], "rb") as f:
    decoded = images_lib.decode_rgb(f.read())
  assert decoded.dtype == tf.uint8 and decoded.shape == (3 * SIZE, 3 * SIZE, 3)
  got = np.concatenate([f["image"] for f, _ in take(pipeline_lib.make_dataset(split, config, "train"), 3)])

  def augmented(index, image):
    seed = tf.constant([config.seed, index], tf.int64)
    return images_lib.preprocess_for_model(images_lib.augment_image(image, seed, SIZE)).numpy()

  from_decoded = np.stack([augmented(i, decoded) for i in range(6)])
  np.testing.assert_allclose(got, from_decoded, atol=1e-3)
  # The old way, resize to SIZE and crop that, interpolates twice: measurably different pixels.
  resized = images_lib.resize_image(decoded, SIZE)
  from_resized = np.stack([augmented(i, resized) for i in range(6)])
  assert np.abs(got - from_resized).mean() > 1.0, np.abs(got - from_resized).mean()


def test_cache_gives_the_same_eval_batches_and_a_permuted_train_stream(folder_set, splits, tmp_path):
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation", batch_size=3, augment=False)
  plain = take(pipeline_lib.make_dataset(splits.train, config, "eval"), 3)
  cached = take(pipeline_lib.make_dataset(splits.train, config.replace(cache=True), "eval"), 3)
  assert len(plain) == len(cached) == 3
  for (f1, l1), (f2, l2) in zip(plain, cached):
    np.testing.assert_allclose(f1["image"], f2["image"], atol=1e-4)
    np.testing.assert_array_equal(l1, l2)
  # Cached training: what is cached is already a permutation (never the folder order), and each
  # epoch behind the buffer still holds every example once.
  batches = take(pipeline_lib.make_dataset(splits.train, config.replace(cache=True), "train"), 6)
  ids = [i for f, _ in batches for i in ids_of(f["image"])]
  assert sorted(ids[:9]) == sorted(ids[9:18]) == list(range(9))
  assert ids[:9] != list(range(9))


# ------------------------------------------------------------------ class-sorted folders at scale

SORTED_BATCH = 32
SORTED_BATCHES_CHECKED = 20


def write_class_sorted_folder(root, class_count, per_class):
  """`per_class` files per class folder, hard links of one tiny PNG per class (fast to write)."""
  for index in range(class_count):
    folder = root / f"class_{index:02d}"
    folder.mkdir(parents=True)
    original = images.write_png(folder / "00000.png", size=8, solid=(index * 20, 0, 0))
    for number in range(1, per_class):
      os.link(original, folder / f"{number:05d}.png")
  return root


@pytest.fixture(scope="module", params=[(2, 3000), (10, 600)], ids=["2x3000", "10x600"])
def class_sorted_split(request, tmp_path_factory):
  class_count, per_class = request.param
  root = write_class_sorted_folder(tmp_path_factory.mktemp("sorted"), class_count, per_class)
  return folders_lib.scan_image_folder(str(root), "train"), class_count


def test_every_early_batch_of_a_class_sorted_folder_mixes_the_classes(class_sorted_split, tmp_path):
  # The folder lists class after class; a 1024-name shuffle buffer fed the first ~3,000 images of
  # one class (every one of the first 20 batches held only class 0). A full permutation mixes.
  split, class_count = class_sorted_split
  config = make_config(tmp_path, batch_size=SORTED_BATCH, augment=False)
  dataset = pipeline_lib.make_dataset(split, config, "train")
  assert config.shuffle_buffer < split.num_examples
  for _, labels in take(dataset, SORTED_BATCHES_CHECKED):
    shares = np.bincount(labels, minlength=class_count) / len(labels)
    if class_count == 2:
      assert 0.2 <= shares[0] <= 0.8, shares
    else:
      # 32 draws over 10 classes: no class dominates and at least half of them appear.
      assert shares.max() <= 0.4 and (shares > 0).sum() >= 5, shares


def test_each_epoch_is_a_new_permutation_of_the_whole_split(class_sorted_split):
  split, _ = class_sorted_split
  n = split.num_examples
  stream = list(pipeline_lib.permuted_indices(n, seed=7).take(2 * n).as_numpy_iterator())
  first, second = stream[:n], stream[n:]
  assert sorted(first) == sorted(second) == list(range(n))  # every file exactly once per epoch
  assert first != second
  # Uniform over the split: the first tenth of an epoch draws from the whole folder, not its start.
  assert np.mean(first[:n // 10]) == pytest.approx((n - 1) / 2, rel=0.1)
  # A resumed stream starts in the middle of any epoch without replaying the earlier ones.
  resumed = list(pipeline_lib.permuted_indices(n, seed=7, start_example=n + 5).take(10)
                 .as_numpy_iterator())
  assert resumed == second[5:15]


def test_cache_reads_each_file_once(tmp_path):
  written = write_identified_set(tmp_path / "train", {"a": 2, "b": 2})
  split = folders_lib.scan_image_folder(str(tmp_path / "train"), "train")
  config = make_config(tmp_path, batch_size=2, cache=True)
  dataset = pipeline_lib.make_dataset(split, config, "eval")
  first = [ids_of(f["image"]) for f, _ in dataset.as_numpy_iterator()]
  for path in written:
    os.remove(path)
  # A second pass is served from the cache: the files are gone, yet nothing is missing.
  assert [ids_of(f["image"]) for f, _ in dataset.as_numpy_iterator()] == first == [[0, 1], [2, 3]]


def test_input_fn_builds_in_graph_mode(splits, tmp_path):
  config = make_config(tmp_path, "x", "y")
  input_fn = pipeline_lib.make_input_fn(splits.train, config, "train")
  with tf.Graph().as_default():  # how tf.estimator calls it
    features, labels = tf.compat.v1.data.make_one_shot_iterator(input_fn()).get_next()
    assert features["image"].shape.as_list() == [4, SIZE, SIZE, 3]
    assert labels.dtype == tf.int32
    with tf.compat.v1.Session() as session:
      images_value, labels_value = session.run([features["image"], labels])
  assert images_value.shape == (4, SIZE, SIZE, 3) and labels_value.shape == (4,)


def test_file_corrupted_after_scan_is_skipped_not_fatal(tmp_path):
  written = write_identified_set(tmp_path / "train", {"a": 3, "b": 3})
  split = folders_lib.scan_image_folder(str(tmp_path / "train"), "train")
  broken = split.paths[1]
  images.write_not_an_image(broken)  # after the scan said it was fine
  config = make_config(tmp_path, batch_size=4, augment=False)
  eval_ids = [i for f, _ in pipeline_lib.make_dataset(split, config, "eval").as_numpy_iterator()
              for i in ids_of(f["image"])]
  assert sorted(eval_ids) == sorted(i for p, (i, _) in written.items() if p != broken)
  train = take(pipeline_lib.make_dataset(split, config, "train"), 4)
  assert len(train) == 4 and written[broken][0] not in ids_of(
      np.concatenate([f["image"] for f, _ in train]))


def test_steps_per_epoch():
  split = split_lib.Split(name="train", class_names=("a", "b"), num_examples=10)
  assert [split_lib.steps_per_epoch(split, b) for b in (1, 3, 5, 10, 11)] == [10, 4, 2, 1, 1]
  with pytest.raises(ValueError, match="batch_size"):
    split_lib.steps_per_epoch(split, 0)


def test_invalid_mode_is_refused(splits, tmp_path):
  with pytest.raises(ValueError, match="mode"):
    pipeline_lib.make_dataset(splits.train, make_config(tmp_path, "x", "y"), "training")


# ------------------------------------------------------------------ bad files


def write_set_with_bad_files(root):
  """A 2-class set with one bad file of each kind; returns {path: expected reason fragment}."""
  for class_name in ("cat", "dog"):
    for i in range(2):
      images.write_jpeg(root / class_name / f"good{i}.jpg", size=20, seed=i)
  return {
      images.write_truncated(root / "cat" / "truncated.jpg"): "cannot be decoded",
      images.write_truncated(root / "dog" / "truncated.png"): "cannot be decoded",
      images.write_empty(root / "cat" / "empty.png"): "empty file",
      images.write_not_an_image(root / "dog" / "notes.jpg"): "cannot be decoded",
      images.write_tiff(root / "dog" / "scan.tif"): "unsupported format (.tif)",
      images.write_not_an_image(root / "cat" / "readme.txt"): "unsupported format (.txt)",
  }


def test_bad_files_fail_with_every_path_listed(tmp_path):
  bad = write_set_with_bad_files(tmp_path / "train")
  with pytest.raises(split_lib.DataError) as error:
    folders_lib.scan_image_folder(str(tmp_path / "train"), "train", bad_images="fail")
  message = str(error.value)
  lines = message.splitlines()
  for path, reason in bad.items():
    assert any(path in line and reason in line for line in lines), (path, message)
  assert "--bad_images=skip" in message
  assert "good0.jpg" not in message


def test_bad_files_skipped_and_recorded(tmp_path, caplog):
  bad = write_set_with_bad_files(tmp_path / "train")
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    split = folders_lib.scan_image_folder(str(tmp_path / "train"), "train", bad_images="skip")
  assert split.num_examples == 4 and len(split.paths) == 4
  assert all(os.path.basename(p).startswith("good") for p in split.paths)
  assert sorted(split.labels) == [0, 0, 1, 1]
  assert {p for p, _ in split.skipped} == set(bad)
  for path, reason in split.skipped:
    assert bad[path] in reason
  assert "Skipping 6 bad file(s)" in caplog.text and "truncated.jpg" in caplog.text


def test_palette_bmp_is_refused_but_rgb_and_gray_bmp_pass(tmp_path):
  root = tmp_path / "train"
  images.write_bmp(root / "a" / "rgb.bmp", size=16)
  images.write_bmp(root / "a" / "gray.bmp", size=16, mode="L")
  palette = images.write_bmp(root / "b" / "palette.bmp", size=16, mode="P")
  # Why it is refused: TF decodes it without error, into the wrong pixels.
  wrong = images_lib.decode_image(open(palette, "rb").read(), 16).numpy()
  right = images_lib.decode_image(images.encoded_bytes("png_rgb", size=16), 16).numpy()
  assert np.abs(wrong - right).mean() > 20
  images.write_bmp(root / "b" / "ok.bmp", size=16, seed=3)
  split = folders_lib.scan_image_folder(str(root), "train", bad_images="skip")
  assert [os.path.basename(p) for p, _ in split.skipped] == ["palette.bmp"]
  assert "palette BMP" in split.skipped[0][1]
  assert split.num_examples == 3


def test_the_serving_graph_refuses_palette_bmps_by_the_scans_rules():
  """TF Serving clients reach only the graph: it must refuse what the scan and predict refuse."""

  def pil_bmp(mode):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).convert(mode).save(buffer, "BMP")
    return buffer.getvalue()

  palette = images.bmp_image_bytes(16, mode="P")
  gray = images.bmp_image_bytes(16, mode="L")
  header_size = int.from_bytes(gray[14:18], "little")
  broken_ramp = bytearray(gray)
  broken_ramp[14 + header_size + 4 * 7] = 99  # entry 7's blue is no longer 7
  samples = {
      "rgb": images.bmp_image_bytes(16), "gray": gray, "palette": palette, "one_bit": pil_bmp("1"),
      "broken_ramp": bytes(broken_ramp), "png": images.encoded_bytes("png_rgb", size=16),
      "jpeg": images.encoded_bytes("jpeg", size=16),
      "cut_header": palette[:30], "cut_table": palette[:14 + header_size + 4 * 10 + 2],
      "not_an_image": b"BM", "empty": b""}
  check = tf.function(images_lib.refuse_palette_bmp, input_signature=[tf.TensorSpec([], tf.string)])
  refused_by_graph = {}
  for name, data in samples.items():
    try:
      check(tf.constant(data))
      refused_by_graph[name] = False
    except tf.errors.InvalidArgumentError as e:
      refused_by_graph[name] = True
      assert "palette BMP, which TensorFlow decodes to wrong colours" in e.message, name
  refused_in_python = {name: image_formats.bmp_palette_problem(data) is not None
                       for name, data in samples.items()}
  assert refused_by_graph == refused_in_python
  assert {n for n, refused in refused_by_graph.items() if refused} == {
      "palette", "one_bit", "broken_ramp", "cut_table"}
  # The signatures' path (export.preprocess_image_bytes) refuses it; a 24-bit BMP goes through.
  serve = tf.function(lambda data: images_lib.decode_and_preprocess(data, 16),
                      input_signature=[tf.TensorSpec([], tf.string)])
  assert serve(tf.constant(samples["rgb"])).shape == (16, 16, 3)
  with pytest.raises(tf.errors.InvalidArgumentError, match="8-bit palette BMP"):
    serve(tf.constant(palette))
  with pytest.raises(tf.errors.InvalidArgumentError, match="8-bit palette BMP"):
    images_lib.refuse_palette_bmp(palette)  # eagerly: the Python rules


def test_hidden_files_and_folders_are_ignored(tmp_path):
  root = tmp_path / "train"
  write_identified_set(root, {"a": 2, "b": 2})
  (root / ".DS_Store").write_bytes(b"junk")
  (root / "a" / ".DS_Store").write_bytes(b"junk")
  images.write_not_an_image(root / ".hidden_class" / "x.jpg")
  images.write_not_an_image(root / "b" / ".thumbs" / "x.jpg")
  images.write_jpeg(root / "b" / "UPPER.JPG", size=16)  # extensions are case-insensitive
  split = folders_lib.scan_image_folder(str(root), "train")
  assert split.class_names == ("a", "b") and split.num_examples == 5


def test_nested_folders_inside_a_class_are_read(tmp_path):
  root = tmp_path / "train"
  write_identified_set(root, {"a": 1, "b": 1})
  images.write_png(root / "a" / "more" / "deep.png", size=16)
  split = folders_lib.scan_image_folder(str(root), "train")
  assert split.num_examples == 3 and sorted(split.labels) == [0, 0, 1]


# ------------------------------------------------------------------ folder errors


def test_missing_folder(tmp_path):
  with pytest.raises(split_lib.DataError, match="--train_dir=.*does not exist"):
    folders_lib.scan_image_folder(str(tmp_path / "nope"), "train")
  (tmp_path / "file").write_text("x")
  with pytest.raises(split_lib.DataError, match="is a file"):
    folders_lib.scan_image_folder(str(tmp_path / "file"), "train")


def test_folder_without_class_subfolders(tmp_path):
  images.write_png(tmp_path / "train" / "loose.png")
  with pytest.raises(split_lib.DataError, match="no class sub-folders.*1 image file"):
    folders_lib.scan_image_folder(str(tmp_path / "train"), "train")


def test_empty_class_folder(tmp_path):
  write_identified_set(tmp_path / "train", {"a": 2})
  (tmp_path / "train" / "b").mkdir()
  with pytest.raises(split_lib.DataError, match=r"no usable images.*train[/\\]b"):
    folders_lib.scan_image_folder(str(tmp_path / "train"), "train")


def test_class_empty_after_skipping(tmp_path):
  write_identified_set(tmp_path / "train", {"a": 2})
  images.write_empty(tmp_path / "train" / "b" / "x.png")
  with pytest.raises(split_lib.DataError, match="after skipping bad files"):
    folders_lib.scan_image_folder(str(tmp_path / "train"), "train", bad_images="skip")


def test_single_class(tmp_path):
  write_identified_set(tmp_path / "train", {"only": 4})
  write_identified_set(tmp_path / "validation", {"only": 2})
  config = make_config(tmp_path, tmp_path / "train", tmp_path / "validation")
  with pytest.raises(split_lib.DataError, match="need at least 2 classes"):
    loading_lib.load_splits(config)


def test_mismatched_class_sets_name_the_differences(tmp_path):
  write_identified_set(tmp_path / "train", {"cat": 2, "dog": 2, "fox": 1})
  write_identified_set(tmp_path / "validation", {"cat": 1, "dog": 1, "owl": 1})
  config = make_config(tmp_path, tmp_path / "train", tmp_path / "validation")
  with pytest.raises(split_lib.DataError) as error:
    loading_lib.load_splits(config)
  assert "only in train: ['fox']" in str(error.value)
  assert "only in validation: ['owl']" in str(error.value)


def test_image_size_below_32_is_refused(folder_set, tmp_path):
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation", image_size=31)
  with pytest.raises(ValueError, match="--image_size=31"):
    loading_lib.load_splits(config)
  with pytest.raises(ValueError, match="--image_size=31"):
    config.validate()


def test_batch_larger_than_train_split(folder_set, tmp_path):
  root, _, _ = folder_set
  config = make_config(tmp_path, root / "train", root / "validation", batch_size=10)
  with pytest.raises(split_lib.DataError, match="has 9 images, smaller than --batch_size=10"):
    loading_lib.load_splits(config)
  assert loading_lib.load_splits(config.replace(batch_size=9)).train.num_examples == 9


def test_bad_images_setting_and_missing_sources(tmp_path):
  with pytest.raises(ValueError, match="--bad_images='keep'"):
    folders_lib.scan_image_folder(str(tmp_path), "train", bad_images="keep")
  with pytest.raises(split_lib.DataError, match="--validation_dir"):
    loading_lib.load_splits(make_config(tmp_path, tmp_path))
  with pytest.raises(split_lib.DataError, match="not both"):
    loading_lib.load_splits(make_config(tmp_path, tmp_path, tmp_path, tfds_name="cats_vs_dogs"))


# ------------------------------------------------------------------ TFDS


def test_tfds_source_through_the_same_pipeline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = make_config(tmp_path, tfds_name="cats_vs_dogs", tfds_data_dir=str(tmp_path / "tfds"),
                       batch_size=4)
  with tfds.testing.mock_data(num_examples=10):
    splits = loading_lib.load_splits(config)
    assert splits.class_names == ("cat", "dog")
    assert splits.train.num_examples == splits.validation.num_examples == 10
    assert splits.train.tfds_split == "train[:80%]" and splits.train.paths == ()
    batches = list(pipeline_lib.make_dataset(splits.validation, config, "eval").as_numpy_iterator())
    train = take(pipeline_lib.make_dataset(splits.train, config, "train"), 4)
    with tf.Graph().as_default():  # the Estimator builds the TFDS input_fn in a graph too
      features, _ = tf.compat.v1.data.make_one_shot_iterator(
          pipeline_lib.make_input_fn(splits.train, config, "train")()).get_next()
      assert features["image"].shape.as_list() == [4, SIZE, SIZE, 3]
  assert [len(l) for _, l in batches] == [4, 4, 2]
  for features, labels in batches + train:
    assert features["image"].shape[1:] == (SIZE, SIZE, 3)
    assert features["image"].dtype == np.float32 and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {0, 1}
  # Mock images are random noise: preprocessed values spread over the whole caffe range.
  assert batches[0][0]["image"].min() < -90 and batches[0][0]["image"].max() > 120


def test_tfds_bad_label_key(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = make_config(tmp_path, tfds_name="cats_vs_dogs", tfds_label_key="class")
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(split_lib.DataError, match="--tfds_label_key='class'.*image, image/filename"):
      loading_lib.load_splits(config)


def test_tfds_not_prepared_explains_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  config = make_config(tmp_path, tfds_name="cats_vs_dogs", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(split_lib.DataError, match="not prepared.*tfds build cats_vs_dogs"):
    loading_lib.load_splits(config)
  with pytest.raises(split_lib.DataError, match="--tfds_name='no_such_dataset_xyz'"):
    loading_lib.load_splits(config.replace(tfds_name="no_such_dataset_xyz"))


# TFDS splits larger than the shuffle buffer, generated class after class: 3x the default buffer.
TFDS_PER_CLASS = 1536


@pytest.fixture(scope="module")
def class_sorted_tfds(tmp_path_factory):
  """Two small TFDS datasets prepared locally (no download), both generated class 0 then class 1,
  each image's pixels holding its generation index: class_sorted_hashed with TFDS' default
  storage (examples shuffled by a hash of their keys when written), class_sorted_unshuffled with
  that shuffling disabled (stored in generation order: class-sorted). Returns their data_dir."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class ClassSorted(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    DISABLE_SHUFFLING = False

    def _info(self):
      features = tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(names=["first", "second"])})
      return tfds.core.DatasetInfo(builder=self, features=features,
                                   disable_shuffling=self.DISABLE_SHUFFLING)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for index in range(2 * TFDS_PER_CLASS):
        pixels = np.zeros((8, 8, 3), np.uint8)
        pixels[..., 0], pixels[..., 1] = divmod(index, 256)
        yield index, {"image": pixels, "label": index // TFDS_PER_CLASS}

  # Subclasses register under their snake_case class names, so tfds.builder(name) finds them.
  registered = set(tfds.list_builders(with_community_datasets=False))
  if "class_sorted_hashed" not in registered:
    class ClassSortedHashed(ClassSorted):  # pylint: disable=unused-variable
      pass

    class ClassSortedUnshuffled(ClassSorted):  # pylint: disable=unused-variable
      DISABLE_SHUFFLING = True

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for name in ("class_sorted_hashed", "class_sorted_unshuffled"):
    tfds.builder(name, data_dir=data_dir).download_and_prepare()
  return data_dir


def generation_indices(images):
  """The generation index each preprocessed (caffe: BGR minus the mean) image encodes."""
  red = np.rint(images[:, 0, 0, 2] + images_lib.IMAGENET_MEAN_BGR[2]).astype(int)
  green = np.rint(images[:, 0, 0, 1] + images_lib.IMAGENET_MEAN_BGR[1]).astype(int)
  return red * 256 + green


@pytest.mark.parametrize("name", ["class_sorted_hashed", "class_sorted_unshuffled"])
def test_a_class_sorted_tfds_split_larger_than_the_buffer_is_mixed_every_epoch(
    class_sorted_tfds, name, tmp_path):
  config = make_config(tmp_path, tfds_name=name, tfds_data_dir=class_sorted_tfds, tfds_train_split="train",
                       tfds_validation_split="train", batch_size=SORTED_BATCH, augment=False)
  split = loading_lib.load_splits(config).train
  n = split.num_examples
  assert n == 2 * TFDS_PER_CLASS > 2 * config.shuffle_buffer
  stored = generation_indices(np.concatenate([f["image"] for f, _ in pipeline_lib.make_dataset(
      split, config, "eval").as_numpy_iterator()]))
  # What TFDS' own storage gives: the default writes a hash-shuffled order; the other keeps the
  # class-sorted generation order, which only a whole-split buffer mixes.
  assert split.tfds_generation_order == (name == "class_sorted_unshuffled")
  first_class_share = np.mean(stored[:n // 4] < TFDS_PER_CLASS)
  assert first_class_share == (1.0 if split.tfds_generation_order else pytest.approx(0.5, abs=0.1))
  batches = take(pipeline_lib.make_dataset(split, config, "train"), 2 * n // SORTED_BATCH)
  indices = generation_indices(np.concatenate([f["image"] for f, _ in batches]))
  labels = np.concatenate([l for _, l in batches])
  np.testing.assert_array_equal(labels, indices // TFDS_PER_CLASS)
  first, second = indices[:n], indices[n:]
  assert sorted(first) == sorted(second) == list(range(n))  # every example exactly once per epoch
  assert list(first) != list(second)
  for batch_labels in labels[:SORTED_BATCHES_CHECKED * SORTED_BATCH].reshape(-1, SORTED_BATCH):
    assert 0.2 <= np.mean(batch_labels) <= 0.8, batch_labels


def test_only_a_tfds_split_in_generation_order_gets_a_whole_split_buffer(caplog):
  hashed = split_lib.Split(name="train", class_names=("a", "b"), num_examples=50_000,
                           tfds_name="d", tfds_split="train", tfds_num_bytes=10**9)
  assert tfds_source.training_shuffle_buffer(hashed, 1024) == 1024
  assert tfds_source.training_shuffle_buffer(dataclasses.replace(hashed, num_examples=100), 1024) == 100
  ordered = dataclasses.replace(hashed, tfds_generation_order=True)
  assert tfds_source.training_shuffle_buffer(ordered, 1024) == 50_000
  too_large = dataclasses.replace(ordered, tfds_num_bytes=tfds_source.WHOLE_SPLIT_BUFFER_BYTES + 1)
  assert tfds_source.training_shuffle_buffer(too_large, 1024) == 1024
  with caplog.at_level(logging.INFO):
    tfds_source.log_stored_order(hashed, 1024)
    assert not caplog.records
    tfds_source.log_stored_order(ordered, 1024)
    tfds_source.log_stored_order(too_large, 1024)
  (whole,), (warned,) = ([r for r in caplog.records if r.levelno == level]
                         for level in (logging.INFO, logging.WARNING))
  assert "shuffling the whole split (50000 examples" in whole.getMessage()
  assert "a buffer of 1024 of its 50000 examples" in warned.getMessage()
  assert "estimator-ft prepare" in warned.getMessage()


# ------------------------------------------------------------------ synthetic data


def test_synthetic_dataset_has_the_same_structure(tmp_path):
  config = make_config(tmp_path, batch_size=4)
  train = take(synthetic_lib.synthetic_dataset(config, num_classes=3, mode="train", num_examples=6), 5)
  assert len(train) == 5  # repeats past its 6 examples
  for features, labels in train:
    assert features["image"].shape == (4, SIZE, SIZE, 3) and labels.dtype == np.int32
    assert set(labels) <= {0, 1, 2}
  evaluated = list(synthetic_lib.synthetic_dataset(config, 3, "eval", num_examples=6).as_numpy_iterator())
  assert [len(l) for _, l in evaluated] == [4, 2]
  np.testing.assert_array_equal(np.concatenate([l for _, l in evaluated]), [0, 1, 2, 0, 1, 2])
  predicted = list(synthetic_lib.make_synthetic_input_fn(config, 3, "predict", 6)().as_numpy_iterator())
  assert all(set(b) == {contract.FEATURE_KEY} for b in predicted)
  # Same element structure as the real pipeline.
  real_spec = pipeline_lib.make_dataset(
      split_lib.Split("train", ("a", "b"), 1, paths=("x.png",), labels=(0,)), config, "eval"
  ).element_spec
  synthetic_spec = synthetic_lib.synthetic_dataset(config, 3, "eval").element_spec
  assert real_spec == synthetic_spec


# ------------------------------------------------------------------ the sample data generator


def tree_digest(root) -> dict:
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def test_sample_generator_is_deterministic_and_loadable(tmp_path):
  generator = sample_data
  first = generator.generate(str(tmp_path / "a"), seed=0, train_per_class=6,
                             validation_per_class=2, image_size=48)
  second = generator.generate(str(tmp_path / "b"), seed=0, train_per_class=6,
                              validation_per_class=2, image_size=48)
  other = generator.generate(str(tmp_path / "c"), seed=1, train_per_class=6,
                             validation_per_class=2, image_size=48)
  assert tree_digest(first) == tree_digest(second)
  assert tree_digest(first).keys() == tree_digest(other).keys()
  assert tree_digest(first) != tree_digest(other)
  assert os.path.exists(os.path.join(first, ".complete"))
  files = [p for p in pathlib.Path(first).rglob("*") if p.is_file() and p.name != ".complete"]
  assert {p.suffix for p in files} == {".png", ".jpg"}
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]  # no temporary folders left behind

  config = make_config(tmp_path, os.path.join(first, "train"),
                       os.path.join(first, "validation"), batch_size=4)
  splits = loading_lib.load_splits(config)
  assert splits.class_names == ("horizontal", "vertical")
  assert (splits.train.num_examples, splits.validation.num_examples) == (12, 4)

  # Regenerating over an earlier sample replaces it; a foreign folder is never overwritten.
  generator.generate(first, seed=1, train_per_class=6, validation_per_class=2, image_size=48)
  assert tree_digest(first) == tree_digest(other)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "thesis.txt").write_text("precious")
  with pytest.raises(ValueError, match="not a sample set"):
    generator.generate(str(tmp_path / "mine"), train_per_class=1, validation_per_class=1)
  assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_sample_stripes_always_stand_out_from_each_other():
  """Two near-equal stripe colours make a grating that vanishes in the background noise."""
  distances = []
  for seed in range(500):
    low, high = sample_data._stripe_colours(np.random.default_rng(seed))
    distances.append(np.linalg.norm(high - low))
  assert min(distances) >= sample_data.MIN_STRIPE_COLOUR_DISTANCE
  # Two uniform colours fall closer than that about 10 % of the time: the redraw is exercised.
  rngs = [np.random.default_rng(seed) for seed in range(500)]
  naive = [np.linalg.norm(np.subtract(sample_data._random_colour(rng), sample_data._random_colour(rng)))
           for rng in rngs]
  assert 0.01 < np.mean(np.array(naive) < sample_data.MIN_STRIPE_COLOUR_DISTANCE) < 0.2


def test_sample_generator_cli_needs_no_tensorflow(tmp_path):
  # `make demo` runs it before anything else; data/make_sample_data.py is the same command.
  script = (
      "import runpy, sys\n"
      f"sys.argv = ['make_sample_data.py', '--output_dir={tmp_path / 's'}', "
      "'--train_per_class=2', '--validation_per_class=1', '--image_size=32']\n"
      "try:\n"
      f"  runpy.run_path({str(REPO / 'data' / 'make_sample_data.py')!r}, run_name='__main__')\n"
      "except SystemExit as e:\n"
      "  assert not e.code, e.code\n"
      "heavy = [m for m in sys.modules if m.startswith('tensorflow')]\n"
      "assert not heavy, heavy\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  assert "Wrote 6 images" in result.stdout
  assert (tmp_path / "s" / ".complete").exists()
