"""Inputs a hostile or careless user gives (issue 19): each gets a clear answer, nothing hangs,
nothing is allocated for a decompression bomb, nothing already in a model_dir is lost.

  * non-regular files (FIFO, socket, device) named like images: bad files, never opened;
  * decompression bombs (a huge PNG, a GIF of many frames): refused from the header, in the scan,
    the training pipeline, `predict` and the exported serving signatures;
  * one file under two classes (a class folder that links to another): refused, or left out;
  * EXIF orientation: read by a small stdlib function (TensorFlow ignores it);
  * an image or batch size that cannot fit in memory: refused before anything is written;
  * a setting that fails late (--fine_tune_from=no_such_layer): nothing written into model_dir;
  * `SUBCOMMAND --help`: that subcommand's flags, exit 0;
  * the progress line right after a resume: no "nan";
  * Ctrl-C and SIGTERM: one line, exit 130/143, no unlisted checkpoint, the re-run resumes.

The tests that would hang (FIFO) or allocate gigabytes (bombs) if the code regressed run their
call in a thread with a deadline; a FIFO read that blocks is released by opening the FIFO for
writing, so even a regression fails in seconds.
"""

import io
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from estimator_ft import cli
from estimator_ft import contract
from estimator_ft import estimator as estimator_lib
from estimator_ft import export
from estimator_ft import image_formats
from estimator_ft import keras_path
from estimator_ft import memory
from estimator_ft import messages
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import serving
from estimator_ft.config import Config
from estimator_ft.data import folders
from estimator_ft.data import images as images_lib
from estimator_ft.data import pipeline
from estimator_ft.data.split import DataError, Split
from estimator_ft.jobs import train as train_job
from estimator_ft.run import faults
from estimator_ft.run import model_dir as model_dir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
LIMIT = image_formats.DEFAULT_MAX_IMAGE_PIXELS
DEADLINE_S = 30
# Just over the default limit (90.25 MP): an 88 KB PNG that decodes into 270 MB of RGB.
BOMB_SIDE = 9500
# 23 frames of 2000 x 2000 = 92 MP, a 90 KB GIF: the GIF decoder holds every frame at once.
GIF_BOMB_FRAMES, GIF_BOMB_SIDE = 23, 2000


# ---------------------------------------------------------------- helpers

def png_bomb(width: int, height: int) -> bytes:
  """A grayscale PNG of zeros, its rows streamed through zlib (the pixels never exist)."""
  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
  compressor = zlib.compressobj(9)
  row = b"\x00" * (width + 1)  # filter byte + pixels
  data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _skip_sub_blocks(data: bytes, position: int) -> int:
  while data[position]:
    position += data[position] + 1
  return position + 1


def gif_bomb(frames: int, side: int) -> bytes:
  """A GIF of `frames` copies of one flat side x side frame (PIL writes one, we repeat it)."""
  buffer = io.BytesIO()
  Image.new("P", (side, side)).save(buffer, "GIF")
  data = buffer.getvalue()
  start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
  while data[start] == 0x21:  # extensions before the image
    start = _skip_sub_blocks(data, start + 2)
  assert data[start] == 0x2C
  packed = data[start + 9]
  end = _skip_sub_blocks(data, start + 11 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0))
  return data[:start] + data[start:end] * frames + b"\x3b"


def within(seconds, function, *args, unblock=None):
  """function(*args) in a thread; fails the test if it has not returned after `seconds`.

  unblock: a FIFO path to open for writing on timeout, which releases a reader blocked on it.
  """
  outcome = {}

  def target():
    try:
      outcome["value"] = function(*args)
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  started = time.monotonic()
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    if unblock:
      descriptor = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
      os.close(descriptor)
      thread.join(10)
    pytest.fail(f"{function.__name__} did not return within {seconds} s (it blocked)")
  outcome["seconds"] = time.monotonic() - started
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def image_bytes(width, height, kind, **save_args):
  mode = "L" if kind == "BMP8" else "RGB"
  rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
  image = Image.fromarray(rgb, "RGB").convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, "BMP" if kind == "BMP8" else kind, **save_args)
  return buffer.getvalue()


def small_class_folder(tiny_dataset, root, classes=("a", "b"), per_class=3):
  """root/<class>/ with a few of tiny_dataset's training images."""
  sources = sorted((tiny_dataset / "train" / "horizontal").iterdir())
  for class_name in classes:
    (root / class_name).mkdir(parents=True)
    for source in sources[:per_class]:
      shutil.copy(source, root / class_name / source.name)
  return root


@pytest.fixture(scope="module")
def colour_export(module_tmp_path):
  """A tiny model (average colour -> 3 classes) exported by the real Keras export code."""
  inputs = tf.keras.Input((SIZE, SIZE, 3))
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="softmax")(
      tf.keras.layers.GlobalAveragePooling2D()(inputs)))
  base = str(module_tmp_path / "colour_model")
  export.export_keras_model(model, Config(image_size=SIZE, path="keras"), ("r", "g", "b"), base)
  return serving.newest_version(base)


@pytest.fixture(scope="module")
def bombs(module_tmp_path):
  folder = module_tmp_path / "bombs"
  folder.mkdir()
  png = folder / "bomb.png"
  png.write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
  gif = folder / "frames.gif"
  gif.write_bytes(gif_bomb(GIF_BOMB_FRAMES, GIF_BOMB_SIDE))
  return png, gif


# ---------------------------------------------------------------- FIFOs, sockets, devices

def test_non_regular_files_named_like_images_are_bad_files_never_opened(tiny_dataset, tmp_path):
  root = small_class_folder(tiny_dataset, tmp_path / "train")
  fifo = root / "a" / "pipe.png"
  os.mkfifo(fifo)
  (root / "b" / "null.jpg").symlink_to("/dev/null")
  server = socket.socket(socket.AF_UNIX)
  socket_path = root / "b" / "socket.png"
  if len(str(socket_path)) > 100:  # AF_UNIX paths are limited to 108 bytes
    pytest.skip(f"{socket_path} is too long for a socket")
  server.bind(str(socket_path))
  try:
    # Before: open() of the FIFO blocked until a writer came - the scan hung, printing nothing.
    with pytest.raises(DataError) as error:
      within(DEADLINE_S, folders.scan_image_folder, str(root), "train", unblock=str(fifo))
    message = str(error.value)
    assert f"{fifo}: a named pipe (FIFO), not a regular file: not read" in message
    assert "null.jpg: a character device, not a regular file" in message
    assert "socket.png: a socket, not a regular file" in message
    split = within(DEADLINE_S, folders.scan_image_folder, str(root), "train", "skip",
                   unblock=str(fifo))
    assert split.num_examples == 6 and len(split.skipped) == 3
  finally:
    server.close()


def test_predict_reports_a_fifo_without_reading_it(colour_export, tiny_dataset, tmp_path, capsys):
  fifo = tmp_path / "pipe.png"
  os.mkfifo(fifo)
  good = sorted((tiny_dataset / "validation" / "horizontal").iterdir())[0]
  code = within(DEADLINE_S, serving.predict_cli, colour_export, [str(fifo), str(good)], 32,
                unblock=str(fifo))
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert code == serving.EXIT_SOME_FILES_FAILED
  assert records[0] == {"path": str(fifo), "error": "a named pipe (FIFO), not a regular file: not read"}
  assert "class" in records[1]


# ---------------------------------------------------------------- the pixel limit

@pytest.fixture(scope="module")
def graph_header_pixels():
  """images.header_pixels as the pipeline and the signatures run it: in a graph (traced once)."""
  function = tf.function(images_lib.header_pixels,
                         input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)])
  return lambda data, limit=LIMIT: tuple(int(v) for v in function(tf.constant(data), limit))


def test_the_header_size_is_the_decoded_size_in_python_and_in_the_graph(graph_header_pixels):
  for kind, save_args in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}),
                          ("BMP", {}), ("BMP8", {})):
    data = image_bytes(37, 23, kind, **save_args)
    assert image_formats.image_size(data) == (37, 23), kind
    assert image_formats.decoded_pixels(data) == 37 * 23, kind
    assert images_lib.decode_rgb(data).shape == (23, 37, 3), kind
    assert graph_header_pixels(data) == (37, 23, 1), kind
  # A top-down BMP (negative height) decodes at the height's magnitude.
  bmp = bytearray(image_bytes(37, 23, "BMP"))
  bmp[22:26] = struct.pack("<i", -23)
  assert image_formats.image_size(bytes(bmp)) == (37, 23)
  assert graph_header_pixels(bytes(bmp)) == (37, 23, 1)


def test_gif_frames_are_counted_in_python_and_in_the_graph(bombs, graph_header_pixels):
  _, gif = bombs
  data = gif.read_bytes()
  assert image_formats.gif_frames(data) == GIF_BOMB_FRAMES
  assert image_formats.decoded_pixels(data) == GIF_BOMB_FRAMES * GIF_BOMB_SIDE ** 2
  assert graph_header_pixels(data) == (GIF_BOMB_SIDE, GIF_BOMB_SIDE, GIF_BOMB_FRAMES)
  # Under a lower limit the graph stops counting at the first frame past it.
  assert graph_header_pixels(data, 3 * GIF_BOMB_SIDE ** 2)[2] == 4
  small = gif_bomb(5, 16)
  assert image_formats.gif_frames(small) == 5
  assert graph_header_pixels(small) == (16, 16, 5)
  assert images_lib.decode_rgb(small).shape == (16, 16, 3)  # decodable, first frame kept


def test_unknown_and_short_bytes_have_no_size():
  for data in (b"", b"BM", b"\x89PNG", b"GIF89a", b"\xff\xd8\xff", b"hello world" * 4):
    assert image_formats.decoded_pixels(data) is None or image_formats.decoded_pixels(data) >= 0
    assert image_formats.pixel_limit_problem(data, LIMIT) is None


def test_the_scan_refuses_bombs_from_their_header(tiny_dataset, tmp_path, bombs):
  root = small_class_folder(tiny_dataset, tmp_path / "train")
  png, gif = bombs
  shutil.copy(png, root / "a" / "bomb.png")
  shutil.copy(gif, root / "b" / "frames.gif")
  # Before: accepted; the scan decoded 20000 x 20000 into 1.2 GB per file, in 8 threads.
  with pytest.raises(DataError) as error:
    within(DEADLINE_S, folders.scan_image_folder, str(root), "train")
  message = str(error.value)
  assert (f"bomb.png: image of {BOMB_SIDE} x {BOMB_SIDE} pixels is over the limit of {LIMIT} "
          "pixels (--max_image_pixels): shrink it") in message
  assert (f"frames.gif: image of {GIF_BOMB_SIDE} x {GIF_BOMB_SIDE} pixels x {GIF_BOMB_FRAMES} GIF "
          "frames is over the limit") in message
  split = within(DEADLINE_S, folders.scan_image_folder, str(root), "train", "skip")
  assert split.num_examples == 6 and len(split.skipped) == 2
  # The limit is a setting: 40 x 40 images are over a limit of 1000 pixels.
  with pytest.raises(DataError, match="image of 40 x 40 pixels is over the limit of 1000"):
    folders.scan_image_folder(str(tiny_dataset / "validation"), "validation", "fail",
                              max_image_pixels=1000)
  with pytest.raises(ValueError, match="--max_image_pixels=0 must be at least 1"):
    Config(train_dir="t", validation_dir="v", model_dir="m", max_image_pixels=0).validate()


def test_the_training_pipeline_drops_an_image_over_the_limit(tiny_dataset, tmp_path, bombs):
  png, _ = bombs
  good = sorted((tiny_dataset / "validation" / "horizontal").iterdir())[0]
  # A file that passed the scan and was replaced by a bomb before training read it.
  split = Split(name="validation", class_names=("a", "b"), num_examples=2,
                paths=(str(good), str(png)), labels=(0, 1))
  config = Config(image_size=SIZE, batch_size=2)
  batches = within(DEADLINE_S, lambda: list(pipeline.make_dataset(split, config, "eval")))
  assert [labels.numpy().tolist() for _, labels in batches] == [[0]]
  with pytest.raises(tf.errors.InvalidArgumentError, match="is over the limit of"):
    tf.function(images_lib.decode_rgb)(tf.constant(png.read_bytes()))


def test_a_folder_scanned_without_gifs_skips_the_frame_walk_and_refuses_a_gif_that_appears(
    tiny_dataset, tmp_path):
  animation = gif_bomb(5, 16)
  folders_seen = {}
  for name, disguise_before_scan in (("plain", False), ("with_gif", True)):
    root = tmp_path / name
    shutil.copytree(tiny_dataset / "validation", root)
    replaced = sorted((root / "vertical").iterdir())[0]
    if disguise_before_scan:  # a GIF under another name: the scan reads its content
      replaced.write_bytes(animation)
    split = folders.scan_image_folder(str(root), "validation")
    if not disguise_before_scan:
      replaced.write_bytes(animation)  # after the scan
    folders_seen[name] = split
    config = Config(image_size=SIZE, batch_size=16)
    labels = np.concatenate([y.numpy() for _, y in pipeline.make_dataset(split, config, "eval")])
    # Scanned without a GIF: the one that appeared is refused; scanned with it: decoded.
    assert len(labels) == split.num_examples - (0 if disguise_before_scan else 1), name
  assert not folders_seen["plain"].holds_gif and folders_seen["with_gif"].holds_gif
  uncounted = tf.function(lambda data: images_lib.decode_rgb(data, LIMIT, count_gif_frames=False))
  with pytest.raises(tf.errors.InvalidArgumentError, match="changed after the scan"):
    uncounted(tf.constant(animation))
  for kind in ("JPEG", "PNG", "BMP"):
    assert uncounted(tf.constant(image_bytes(37, 23, kind))).shape == (23, 37, 3), kind
  # Over the limit by its size, refused without the frame walk too.
  with pytest.raises(tf.errors.InvalidArgumentError, match="is over the limit of"):
    tf.function(lambda data: images_lib.decode_rgb(data, 1000, count_gif_frames=False))(
        tf.constant(image_bytes(37, 37, "PNG")))


def test_serving_signatures_refuse_a_bomb_before_decoding(colour_export, tiny_dataset, bombs):
  png, gif = bombs
  good = sorted((tiny_dataset / "validation" / "horizontal").iterdir())[0].read_bytes()
  loaded = tf.saved_model.load(colour_export)
  predict = loaded.signatures[contract.SERVING_SIGNATURE]
  classify = loaded.signatures[contract.CLASSIFY_SIGNATURE]
  assert predict(image_bytes=tf.constant([good]))[contract.CLASS_NAME].shape == (1,)
  for bomb, fragment in ((png, f"image of {BOMB_SIDE} x {BOMB_SIDE} pixels is over the limit"),
                         (gif, f"x at least {GIF_BOMB_FRAMES} GIF frames is over the limit")):
    # Before: one request of a 389 KB PNG made the server decode 1.2 GB.
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
      within(DEADLINE_S, lambda: predict(image_bytes=tf.constant([good, bomb.read_bytes()])))
    assert fragment in messages.short_tf_error(error.value)
    example = tf.train.Example(features=tf.train.Features(feature={
        contract.EXAMPLE_IMAGE_FEATURE: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[bomb.read_bytes()]))}))
    with pytest.raises(tf.errors.InvalidArgumentError, match="is over the limit"):
      within(DEADLINE_S, lambda: classify(inputs=tf.constant([example.SerializeToString()])))
  info = export.read_export_info(colour_export)
  assert info[contract.MAX_IMAGE_PIXELS_INFO] == LIMIT
  # The Estimator's receiver (a TF1 graph) applies the same check.
  with tf.Graph().as_default():
    receiver = export.serving_input_receiver_fn(SIZE, 1000)()
    features = receiver.features[contract.FEATURE_KEY]
    with tf.compat.v1.Session() as session:
      with pytest.raises(tf.errors.InvalidArgumentError) as error:
        session.run(features, {receiver.receiver_tensors[contract.IMAGE_BYTES_INPUT]: [good]})
  assert messages.short_tf_error(error.value).startswith(
      "assertion failed: [image of 40 x 40 pixels is over the limit of 1000 pixels")


def test_predict_reports_bombs_as_error_lines(colour_export, tiny_dataset, bombs, capsys):
  png, gif = bombs
  good = sorted((tiny_dataset / "validation" / "horizontal").iterdir())[0]
  code = within(DEADLINE_S, serving.predict_cli, colour_export, [str(png), str(good), str(gif)], 32)
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert code == serving.EXIT_SOME_FILES_FAILED
  assert records[0]["error"].startswith(f"image of {BOMB_SIDE} x {BOMB_SIDE} pixels is over the limit")
  assert "class" in records[1]
  assert f"x {GIF_BOMB_FRAMES} GIF frames is over the limit" in records[2]["error"]


# ---------------------------------------------------------------- one file under two classes

def test_a_class_folder_linked_to_another_is_refused(tiny_dataset, tmp_path):
  root = small_class_folder(tiny_dataset, tmp_path / "train", classes=("face", "other"))
  (root / "alias").symlink_to("face")
  # Before: accepted, face's images counted twice under two contradicting labels.
  with pytest.raises(DataError) as error:
    folders.scan_image_folder(str(root), "train")
  message = str(error.value)
  assert "alias and face share 3 file(s) (alias is a link to face)" in message
  assert "--bad_images=skip" in message
  # --bad_images=skip leaves the shared files out of both classes, which empties both here.
  with pytest.raises(DataError, match="no usable images .*alias, .*face"):
    folders.scan_image_folder(str(root), "train", "skip")


def test_a_file_linked_into_another_class_is_left_out_of_both_with_skip(tiny_dataset, tmp_path):
  root = small_class_folder(tiny_dataset, tmp_path / "train", classes=("a", "b"))
  shared = sorted((root / "a").iterdir())[0]
  (root / "b" / "linked.png").symlink_to(shared)
  os.link(sorted((root / "a").iterdir())[1], root / "b" / "hard_link.png")
  with pytest.raises(DataError, match="a and b share 2 file"):
    folders.scan_image_folder(str(root), "train")
  split = folders.scan_image_folder(str(root), "train", "skip")
  skipped = dict(split.skipped)
  assert len(skipped) == 4 and split.num_examples == 4
  assert str(root / "b" / "linked.png") in skipped[str(shared)]
  assert "cannot have two labels" in skipped[str(root / "b" / "linked.png")]


# ---------------------------------------------------------------- EXIF orientation

def test_exif_orientation_is_read_and_not_applied():
  image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
  exif = image.getexif()
  exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", exif=exif)
  rotated = buffer.getvalue()
  assert image_formats.exif_orientation(rotated) == 6
  # TensorFlow decodes the pixels as stored, in training and in serving alike.
  assert images_lib.decode_rgb(rotated).shape == (20, 30, 3)
  assert image_formats.exif_orientation(image_bytes(30, 20, "JPEG")) is None
  assert image_formats.exif_orientation(image_bytes(30, 20, "PNG")) is None
  # Big-endian (Motorola) TIFF: one IFD entry, orientation 8.
  tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(
      ">HHIHH", 0x0112, 3, 1, 8, 0) + b"\x00" * 4
  segment = b"Exif\x00\x00" + tiff
  jpeg = b"\xff\xd8" + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + b"\xff\xd9"
  assert image_formats.exif_orientation(jpeg) == 8
  assert image_formats.exif_orientation(b"\xff\xd8\xff\xe1\x00\x04Ex") is None


# ---------------------------------------------------------------- memory

def test_the_memory_estimate_names_what_fits():
  budget = 24 * 2**30
  assert memory.training_bytes(448, 8) - memory.BASE_BYTES == 4 * (
      memory.training_bytes(224, 8) - memory.BASE_BYTES)
  assert memory.training_bytes(224, 16) - memory.BASE_BYTES == 2 * (
      memory.training_bytes(224, 8) - memory.BASE_BYTES)
  assert memory.memory_problem(224, 32, budget) is None
  assert memory.memory_problem(5000, 32, None) is None  # unknown: never refused
  problem = memory.memory_problem(5000, 32, budget)
  size, batch = memory.largest_image_size(32, budget), memory.largest_batch_size(5000, budget)
  assert size % 32 == 0 and memory.training_bytes(size, 32) <= budget
  assert memory.training_bytes(size + 32, 32) > budget
  assert batch == 0
  assert f"the largest --image_size that fits is {size}" in problem
  assert "at --image_size=5000 not even --batch_size=1 fits" in problem
  batch = memory.largest_batch_size(1024, budget)
  assert memory.training_bytes(1024, batch) <= budget < memory.training_bytes(1024, batch + 1)
  assert f"the largest --batch_size that fits is {batch}" in memory.memory_problem(1024, 64, budget)
  # --cache keeps every image: 100k images at 224 px are 56 GB.
  assert "or drop --cache" in memory.memory_problem(224, 32, budget, cached_images=100_000)
  available = memory.available_bytes()
  assert available is None or available > 0


def test_an_image_size_that_cannot_fit_is_refused_before_anything_is_written(tiny_dataset,
                                                                            tmp_path):
  model_dir = tmp_path / "model"
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"), model_dir=str(model_dir),
                  image_size=5000, batch_size=32, weights="none").validate()
  # Before: a segfault (rc 139) after ~60 s at 14.5 GB, with lock, config.json and a checkpoint.
  with pytest.raises(ValueError, match=r"--image_size=5000 with --batch_size=32 needs about .* GB "
                                       r"of memory .*the largest --image_size that fits is \d+"):
    train_job.run(config)
  assert not model_dir.exists()


# ---------------------------------------------------------------- validated before model_dir is written

def test_a_setting_that_fails_late_writes_nothing_and_the_corrected_run_can_start(tiny_dataset,
                                                                                tmp_path):
  model_dir = tmp_path / "model"
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"), model_dir=str(model_dir),
                  image_size=SIZE, batch_size=8, epochs=1, weights="none").validate()
  # Before: the error came after config.json was written, and the corrected command was refused
  # ("holds a run with a different configuration").
  with pytest.raises(ValueError, match="'no_such_layer' is not a ResNet50 layer"):
    train_job.run(config.replace(fine_tune_from="no_such_layer"))
  with pytest.raises(ValueError, match="--export_best_metric=auc needs two classes"):
    train_job.validate_run(config.replace(export_best_metric="auc"), ("a", "b", "c"))
  assert not model_dir.exists() or not os.listdir(model_dir)
  assert model_dir_lib.plan_run(config.replace(fine_tune_from="conv5_block1_1_conv"),
                                ("horizontal", "vertical")) == ("new", [])


def _record_run(model_dir, config, checkpoint_steps=(), results=False):
  model_dir.mkdir(parents=True, exist_ok=True)
  model_dir_lib.write_run_config(config, ("a", "b"), str(model_dir))
  (model_dir / "initial_weights").mkdir()
  (model_dir / "initial_weights" / "weights.index").write_bytes(b"old")
  for step in checkpoint_steps:
    (model_dir / f"model.ckpt-{step}.index").write_bytes(b"x")
    (model_dir / f"model.ckpt-{step}.data-00000-of-00001").write_bytes(b"x")
  if checkpoint_steps:
    (model_dir / "checkpoint").write_text(
        f'model_checkpoint_path: "model.ckpt-{checkpoint_steps[-1]}"\n')
  if results:
    (model_dir / model_dir_lib.RESULTS_FILE).write_text("{}")


def test_a_run_that_never_trained_does_not_block_the_corrected_command(tmp_path, caplog):
  old = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path / "m"), image_size=64)
  new = old.replace(learning_rate=1e-3)
  _record_run(tmp_path / "m", old, checkpoint_steps=(0,))  # stopped before its first step
  assert model_dir_lib.plan_run(new, ("a", "b"))[0] == "replace"
  assert model_dir_lib.plan_run(old, ("a", "b")) == ("resume", [])
  with caplog.at_level(logging.WARNING, "estimator_ft"):
    assert model_dir_lib.prepare_model_dir(new, ("a", "b")) is False
  aside = [p for p in (tmp_path / "m").iterdir() if p.name.startswith("untrained-")]
  assert len(aside) == 1 and "never trained" in caplog.text and str(aside[0]) in caplog.text
  # Nothing lost: the old run's files are kept aside, and the new run starts clean.
  assert sorted(p.name for p in aside[0].iterdir()) == [
      "checkpoint", "config.json", "initial_weights", "model.ckpt-0.data-00000-of-00001",
      "model.ckpt-0.index"]
  assert json.loads((aside[0] / "config.json").read_text())["config"]["learning_rate"] == 1e-4
  assert model_dir_lib.read_run_config(str(tmp_path / "m"))["config"]["learning_rate"] == 1e-3
  assert not (tmp_path / "m" / "checkpoint").exists()
  # A run that trained (a checkpoint past step 0, or results) is still refused.
  for steps, results in (((0, 3), False), ((), True)):
    folder = tmp_path / f"trained-{len(steps)}"
    _record_run(folder, old.replace(model_dir=str(folder)), steps, results)
    with pytest.raises(ValueError, match="holds a run with a different configuration"):
      model_dir_lib.plan_run(new.replace(model_dir=str(folder)), ("a", "b"))


# ---------------------------------------------------------------- interrupted saves

def test_a_checkpoint_whose_save_was_interrupted_is_listed_not_lost(tmp_path):
  with tf.Graph().as_default():
    variable = tf.compat.v1.get_variable("v", initializer=1.0)
    saver = tf.compat.v1.train.Saver(max_to_keep=5)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      for step in (1, 2):
        saver.save(session, str(tmp_path / "model.ckpt"), global_step=step)
      # Interrupted between writing the files and recording them in model_dir/checkpoint.
      saver.save(session, str(tmp_path / "model.ckpt"), global_step=3, write_state=False)
      del variable
  # And one whose data was written but not its index.
  (tmp_path / "model.ckpt-4.data-00000-of-00001").write_bytes(b"partial")
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-2")
  added = faults.list_unlisted_checkpoints(str(tmp_path), "model.ckpt")
  assert [os.path.basename(p) for p in added] == ["model.ckpt-3"]
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-3")
  state = tf.train.get_checkpoint_state(str(tmp_path))
  assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
      "model.ckpt-1", "model.ckpt-2", "model.ckpt-3"]
  assert not (tmp_path / "model.ckpt-4.data-00000-of-00001").exists()
  assert faults.list_unlisted_checkpoints(str(tmp_path), "model.ckpt") == []


# ---------------------------------------------------------------- --help

def test_subcommand_help_lists_its_own_flags_and_exits_0():
  for name, flag in (("train", "--max_image_pixels"), ("predict", "--saved_model")):
    # Before: "USAGE ... Try --helpfull", no flags, exit 1.
    result = subprocess.run([sys.executable, "-m", "estimator_ft", name, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: estimator-ft {name} [--flags]")
    assert flag in result.stdout and "Try --helpfull" not in result.stdout
  assert "Largest image accepted" in subprocess.run(
      [sys.executable, "-m", "estimator_ft", "train", "-h"], cwd=REPO, capture_output=True,
      text=True, timeout=120).stdout
  full = subprocess.run([sys.executable, "-m", "estimator_ft", "predict", "--helpfull"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert full.returncode == 0 and "--verbosity" in full.stdout and "--saved_model" in full.stdout
  # launch-local's training flags come after `--`: a --help there is not launch-local's.
  assert cli._help_wanted(["--workers=1", "--", "--help"]) == ""  # pylint: disable=protected-access
  assert cli._help_wanted(["--workers=1", "-h"]) == "short"  # pylint: disable=protected-access


# ---------------------------------------------------------------- the progress line after a resume

class _FrozenClock:
  """time.time() that only moves when told: a resumed run's first steps can share a timestamp."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_the_first_progress_lines_after_a_resume_have_no_nan(monkeypatch, caplog):
  clock = _FrozenClock()
  monkeypatch.setattr(time, "time", clock)
  # The Estimator path: resumed from the checkpoint at step 14 of 38, checkpoints every 7 steps.
  with tf.Graph().as_default():
    tf.compat.v1.train.create_global_step()
    tf.constant(0.0, name=model_fn_lib.BATCH_LOSS_TENSOR)
    tf.constant(0, name=model_fn_lib.BATCH_SIZE_TENSOR)
    hook = estimator_lib.ProgressHook(steps_per_epoch=19, max_steps=38, batch_size=8,
                                      every_n_steps=1, checkpoint_every_n_steps=7)
    hook.begin()
  with caplog.at_level(logging.INFO, "estimator_ft"):
    for step_before in range(14, 38):
      hook.before_run(None)
      if step_before > 16:
        clock.now += 0.5  # the first steps after the restore take no measurable time
      hook.after_run(None, tf.estimator.SessionRunValues(
          results=[step_before, np.float32(4.0), np.int32(8)], options=None, run_metadata=None))
    # The Keras path: resumed after epoch 1 of 2 (19 steps each), same clock.
    callback = keras_path._Progress(  # pylint: disable=protected-access
        Config(epochs=2, batch_size=8, log_every_n_steps=1), steps_per_epoch=19)
    callback.on_epoch_begin(1)
    for batch in range(19):
      if batch > 2:
        clock.now += 0.5
      callback.on_train_batch_end(batch, {"loss": 0.5})
  lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
  # The first line after the restore: its window took no measurable time, so no rate.
  assert lines[0].startswith("epoch 1  step 16/38  - steps/s  - img/s"), lines
  assert any("step 20/38" in line for line in lines) and any("step 38/38" in line for line in lines)
  assert not [line for line in lines if "nan" in line], lines
  assert any("- steps/s  - img/s" in line and "ETA ?" in line for line in lines), lines


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

_BLOCKED_IN_CPP = """
import sys, threading, time
import tensorflow as tf
from estimator_ft import interrupts
server = tf.distribute.Server.create_local_server()
main = threading.main_thread().ident

def say_ready_once_the_main_thread_is_in_cpp():
  # Not before: a signal that arrived while the main thread still ran Python would be raised
  # there (a traceback, exit 1), which is not what this tests.
  def in_server_join():
    code = sys._current_frames()[main].f_code
    return code.co_name == "join" and code.co_filename.endswith("server_lib.py")

  deadline = time.monotonic() + 60  # never a hung test: past it, the assertions below fail
  while not in_server_join() and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.5)  # from server_lib's join() into the C++ wait
  print("ready", flush=True)

threading.Thread(target=say_ready_once_the_main_thread_is_in_cpp, daemon=True).start()
with interrupts.stop_on_signals(force_exit_after_s=1):
  server.join()  # C++: the Python handler never gets to run
"""


_DROPPED_IN_A_FINALIZER = """
import os, signal, sys
from estimator_ft import interrupts

class Garbage:
  def __del__(self):  # the handler runs here; Python prints "Exception ignored" and goes on
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(1000))

with interrupts.stop_on_signals(force_exit_after_s=60):
  Garbage()  # collected at once
  print("the job went on", flush=True)
  if sys.argv[1] == "step":  # what each training and evaluation step of either path runs
    from estimator_ft import estimator, keras_path
    for next_step in (lambda: estimator.StopOnSignalHook().before_run(None),
                      lambda: keras_path._StopOnSignal().on_train_batch_begin(0),
                      lambda: keras_path._StopOnSignal().on_test_batch_begin(0)):
      try:
        next_step()
      except interrupts.Interrupted as e:
        print("delivered at the next step:", e.signal_name, flush=True)
    raise SystemExit(130)
print("not reached", flush=True)
"""


@pytest.fixture
def sigint_as_in_a_terminal():
  """Children start with SIGINT's default action, as a command typed in a terminal does.

  A suite started in the background by a script (`make test &`) has SIGINT ignored, its children
  inherit that, and the package rightly keeps an ignored SIGINT ignored (interrupts.
  stop_on_signals): the tests that send one would then test nothing. A handler here (not
  SIG_IGN) is reset to the default in a child when it starts.
  """
  previous = signal.getsignal(signal.SIGINT)
  if previous is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["step", "end"])
def test_a_signal_whose_interrupted_python_dropped_still_stops_the_job(where,
                                                                       sigint_as_in_a_terminal):
  process = subprocess.run([sys.executable, "-c", _DROPPED_IN_A_FINALIZER, where], cwd=REPO,
                           text=True, capture_output=True, timeout=60, check=False)
  assert "Exception ignored" in process.stderr  # the handler's own Interrupted was dropped
  assert "the job went on" in process.stdout and "not reached" not in process.stdout
  if where == "step":
    assert process.stdout.count("delivered at the next step: SIGINT") == 3, process.stdout
  else:  # no step came: the block's end raises it, with what happened
    assert "interrupts.Interrupted: SIGINT" in process.stderr.strip().splitlines()[-1]
    assert process.returncode == 1  # (an uncaught exception here; the CLI prints the line, 130)


def test_a_signal_the_main_thread_cannot_notice_still_ends_the_process(monkeypatch):
  process = subprocess.Popen([sys.executable, "-c", _BLOCKED_IN_CPP], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 143
  assert err.strip().splitlines()[-1].startswith(
      "estimator-ft: interrupted (SIGTERM); still running 1 s later")
  # A parameter server waits in server.join() for good: it keeps the default actions.
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["127.0.0.1:1"],
                                                          "ps": ["127.0.0.1:2"]},
                                              "task": {"type": "ps", "index": 0}}))
  assert not cli._stops_cleanly_on_signals()  # pylint: disable=protected-access
  monkeypatch.delenv("TF_CONFIG")
  assert cli._stops_cleanly_on_signals()  # pylint: disable=protected-access


# ---------------------------------------------------------------- Ctrl-C and SIGTERM, end to end

def _train_command(tiny_dataset, model_dir):
  # tiny_dataset: 24 train images, batch 8 -> 3 steps per epoch; 2 epochs -> 6 steps, a checkpoint
  # (and its evaluation) every 2: interrupted after 2 and after 4, the last run trains 5 and 6.
  return [sys.executable, "-m", "estimator_ft", "train",
          f"--train_dir={tiny_dataset / 'train'}", f"--validation_dir={tiny_dataset / 'validation'}",
          f"--model_dir={model_dir}", f"--image_size={SIZE}", "--batch_size=8", "--epochs=2",
          "--weights=none", "--save_checkpoints_steps=2", "--log_every_n_steps=1",
          "--noexport_during_training"]


def _wait_for_checkpoint(process, model_dir, log, beyond: int, timeout=600):
  """The step of the first checkpoint model_dir/checkpoint lists past step `beyond`."""
  state = pathlib.Path(model_dir) / "checkpoint"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if state.exists():
      steps = [int(s) for s in re.findall(r'model_checkpoint_path: ".*?-(\d+)"', state.read_text())]
      if steps and steps[0] > beyond:
        return steps[0]
    if process.poll() is not None:
      pytest.fail(f"the run ended (exit {process.returncode}) first:\n{log.read_text()}")
    time.sleep(0.2)
  process.kill()
  pytest.fail("no new checkpoint in time")


def _assert_every_checkpoint_listed(model_dir):
  state = tf.train.get_checkpoint_state(str(model_dir))
  listed = {os.path.basename(p) for p in state.all_model_checkpoint_paths}
  on_disk = {name.rsplit(".", 1)[0] if name.endswith(".index") else name.split(".data-")[0]
             for name in os.listdir(model_dir) if name.startswith("model.ckpt-")}
  assert on_disk <= listed, f"checkpoint files no model_dir/checkpoint lists: {on_disk - listed}"
  assert not [n for n in os.listdir(model_dir) if n.endswith("_temp")]


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_with_one_line_and_the_rerun_resumes(tiny_dataset, tmp_path,
                                                                     sigint_as_in_a_terminal):
  model_dir = tmp_path / "model"
  command = _train_command(tiny_dataset, model_dir)
  previous_step = 0
  for signal_number, exit_status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    log = tmp_path / f"{signal_number}.log"
    with open(log, "w") as output:
      process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    resumed_from = previous_step
    try:
      previous_step = _wait_for_checkpoint(process, model_dir, log, previous_step)
      # Signalled as soon as the checkpoint is listed: its evaluation is starting, and the first
      # one builds its graph, where the handler often runs inside a finalizer whose exception
      # Python drops (before interrupts recorded it, such a run trained on and exited 0).
      process.send_signal(signal_number)
      process.wait(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
    text = log.read_text()
    # Before: exit 130 with an 85-line traceback, and SIGTERM killed the process silently.
    assert process.returncode == exit_status, text
    assert "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    name = signal.Signals(signal_number).name
    assert re.fullmatch(rf"estimator-ft: interrupted \({name}\) at step \d+; the latest checkpoint "
                        rf"is {re.escape(str(model_dir))}/model\.ckpt-\d+; re-run the same "
                        r"command to resume from it\.", last), last
    _assert_every_checkpoint_listed(model_dir)
    if signal_number == signal.SIGTERM:  # the second run is the rerun of the first
      assert f"resuming from {model_dir}/model.ckpt-{resumed_from}" in text, text
      assert " nan " not in text and "nan steps/s" not in text
    previous_step = int(re.search(r"model\.ckpt-(\d+)", last).group(1))
