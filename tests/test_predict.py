"""`estimator-ft predict` (serving.predict_cli) on a small model exported by the real export code.

The model's class is the dominant colour of the image, so every prediction can be checked by
hand; tests/test_export.py runs the same command on a trained ResNet50 in a fresh process.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from estimator_ft import export
from estimator_ft import serving
from estimator_ft.config import Config
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path

SIZE = 32
# Names that no training folder holds: they can only have come from the SavedModel.
CLASS_NAMES = ("ant", "bee", "cat")
# The preprocessed image is BGR (Keras' caffe mode), so with an identity kernel class 0 (ant) is
# the blue channel, 1 (bee) green and 2 (cat) red.
CHANNEL_OF_CLASS = {"ant": "blue", "bee": "green", "cat": "red"}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
KERNEL_SCALE = 0.05
IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68])


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
  """The export base holding one version of the colour model."""
  inputs = tf.keras.Input((SIZE, SIZE, 3))
  head = tf.keras.layers.Dense(len(CLASS_NAMES), activation="softmax")
  model = tf.keras.Model(inputs, head(tf.keras.layers.GlobalAveragePooling2D()(inputs)))
  head.set_weights([np.eye(3, dtype=np.float32) * KERNEL_SCALE, np.zeros(3, np.float32)])
  base = str(tmp_path_factory.mktemp("colour_model"))
  export.export_keras_model(model, Config(image_size=SIZE, path="keras"), CLASS_NAMES, base)
  return base


@pytest.fixture(scope="module")
def saved_model(export_base):
  return serving.newest_version(export_base)


def expected_probabilities(rgb):
  """The colour model's output for a flat image of colour `rgb`, computed by hand."""
  logits = KERNEL_SCALE * (np.array(rgb, np.float64)[::-1] - IMAGENET_MEAN_BGR)
  exp = np.exp(logits - logits.max())
  return dict(zip(CLASS_NAMES, exp / exp.sum()))


def run_predict(capsys, saved_model, paths, batch_size=32):
  code = serving.predict_cli(saved_model, [str(p) for p in paths], batch_size)
  captured = capsys.readouterr()
  return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_every_format_is_classified_with_class_names_from_the_model(capsys, saved_model, tmp_path):
  paths = []
  for colour, rgb in COLOURS.items():
    paths.extend(images.all_format_files(tmp_path / colour, size=24, solid=rgb).values())

  code, records, _ = run_predict(capsys, saved_model, paths)

  assert code == serving.EXIT_OK
  assert [r["path"] for r in records] == paths
  for record in records:
    assert list(record["probabilities"]) == list(CLASS_NAMES)
    # The image is flat, so the model sees its colour after decoding (gray formats make it gray).
    with open(record["path"], "rb") as f:
      decoded = tf.io.decode_image(f.read(), channels=3, expand_animations=False).numpy()
    expected = expected_probabilities(decoded.reshape(-1, 3).mean(axis=0))
    # JPEG is not exactly flat after compression; the other formats are lossless.
    tolerance = 1e-3 if record["path"].endswith((".jpg", ".jpeg")) else 1e-5
    assert record["probabilities"] == pytest.approx(expected, abs=tolerance), record["path"]
    assert record["class"] == max(expected, key=expected.get)
  colour_records = [r for r in records if os.path.basename(r["path"]) == "png_rgb.png"]
  assert [CHANNEL_OF_CLASS[r["class"]] for r in colour_records] == list(COLOURS)


def test_bad_files_get_an_error_line_in_place_and_the_rest_are_still_predicted(
    capsys, saved_model, tmp_path):
  paths = [
      images.write_png(tmp_path / "1_red.png", solid=COLOURS["red"]),
      images.write_not_an_image(tmp_path / "2_text.jpg"),
      images.write_truncated(tmp_path / "3_cut.png"),
      images.write_bmp(tmp_path / "4_blue.bmp", solid=COLOURS["blue"]),
      images.write_empty(tmp_path / "5_empty.gif"),
      tmp_path / "6_missing.png",
      images.write_gif(tmp_path / "7_green.gif", solid=COLOURS["green"]),
      # Decodes without error into wrong colours in TF: refused like in training, not mis-classified.
      images.write_bmp(tmp_path / "8_palette.bmp", size=16, mode="P"),
  ]
  # Batches of 2 mix good and bad files in every batch.
  code, records, err = run_predict(capsys, saved_model, paths, batch_size=2)

  assert code == serving.EXIT_SOME_FILES_FAILED
  assert [r["path"] for r in records] == [str(p) for p in paths]
  assert [r.get("class") for r in records] == ["cat", None, None, "ant", None, None, "bee", None]
  errors = {os.path.basename(r["path"]): r["error"] for r in records if "error" in r}
  assert set(errors) == {"2_text.jpg", "3_cut.png", "5_empty.gif", "6_missing.png", "8_palette.bmp"}
  assert "palette BMP" in errors["8_palette.bmp"]
  assert "not a decodable image" in errors["2_text.jpg"]
  assert "not a decodable image" in errors["3_cut.png"]
  assert errors["5_empty.gif"] == "empty file (0 bytes)"
  assert "No such file" in errors["6_missing.png"]
  assert "5 of 8 input(s) could not be classified" in err
  # A prediction does not depend on which batch the image shared.
  _, alone, _ = run_predict(capsys, saved_model, [paths[3]], batch_size=1)
  assert alone[0] == records[3]


def test_folders_are_searched_recursively_and_files_are_tried_whatever_their_name(
    capsys, saved_model, tmp_path):
  folder = tmp_path / "photos"
  nested = images.write_png(folder / "holiday" / "day1" / "a.png", solid=COLOURS["red"])
  upper = images.write_png(folder / "B.PNG", solid=COLOURS["green"])
  images.write_png(folder / ".thumbnails" / "hidden.png", solid=COLOURS["blue"])
  (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
  renamed = images.write_png(tmp_path / "image.data", solid=COLOURS["blue"])
  (tmp_path / "empty_folder").mkdir()

  code, records, _ = run_predict(capsys, saved_model, [folder, renamed, tmp_path / "empty_folder"])

  assert [(r["path"], r.get("class")) for r in records] == [
      (upper, "bee"), (nested, "cat"), (renamed, "ant"), (str(tmp_path / "empty_folder"), None)]
  assert "no image files" in records[-1]["error"]
  assert code == serving.EXIT_SOME_FILES_FAILED


def test_an_export_base_means_its_newest_version(capsys, export_base, saved_model, tmp_path):
  red = images.write_png(tmp_path / "red.png", solid=COLOURS["red"])
  code, records, err = run_predict(capsys, export_base, [red])
  assert code == serving.EXIT_OK and records[0]["class"] == "cat"
  assert f"Predicting with {saved_model}" in err
  with pytest.raises(ValueError, match="not a SavedModel"):
    serving.predict_cli(str(tmp_path), [red], 1)
  with pytest.raises(ValueError, match="at least 1"):
    serving.predict_cli(saved_model, [red], 0)
