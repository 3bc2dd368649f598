"""`estimator-ft compare`: keras and estimator agree to float32 round-off; the naive loop departs.

One compare run (the real CLI, in a subprocess) is shared by every assertion about its outputs.
Tolerances come from measurements at 32 px, batch 6, 2 epochs, from scratch (see BUILD_NOTES):
keras vs estimator gave trainable weights bit-identical, BN moving statistics within 5e-7
relative, validation loss within 3e-7; naive vs estimator gave validation losses several units
apart and moving statistics 100 % off. Each bound sits well above the round-off and orders of
magnitude below what a missing update op or a wrong training flag produces.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from estimator_ft.jobs import compare
from estimator_ft.jobs import prepare
from estimator_ft.run import summaries

SIZE = 32
# tiny_dataset: 8 validation images -> batches of 6 and 2, the uneven last batch that a mean of
# per-batch means would over-weight.
BATCH = 6
EPOCHS = 2
PATHS = ("keras", "estimator", "naive")
COMPARE_TIMEOUT_S = 1200

CURVE_TOLERANCE = 1e-5          # |keras - estimator| of a loss (values ~0.7)
ACCURACY_TOLERANCE = 1e-6       # float32 vs float64 renderings of the same k/n
BN_RELATIVE_TOLERANCE = 1e-4    # moving statistics, max |difference| / max |value| per tensor
TRAINABLE_RELATIVE_TOLERANCE = 1e-5
NAIVE_MIN_VAL_LOSS_GAP = 1.0    # nats: the stale-statistics validation loss is far off
NAIVE_MIN_BN_RELATIVE_GAP = 0.1


@pytest.fixture(scope="module")
def compared(tiny_dataset, module_tmp_path):
  output_dir = module_tmp_path / "out"
  command = [sys.executable, "-m", "estimator_ft", "compare",
             f"--train_dir={tiny_dataset / 'train'}",
             f"--validation_dir={tiny_dataset / 'validation'}",
             f"--output_dir={output_dir}", f"--image_size={SIZE}", f"--batch_size={BATCH}",
             f"--epochs={EPOCHS}", "--weights=none", "--seed=5",
             # From scratch, 0.99 would leave the moving statistics near their initial values
             # after 8 steps and every inference-mode validation poor; 0.9 lets them settle.
             "--batchnorm_momentum=0.9"]
  finished = subprocess.run(command, capture_output=True, text=True, timeout=COMPARE_TIMEOUT_S)
  assert finished.returncode == 0, finished.stderr[-3000:]
  with open(output_dir / compare.COMPARISON_JSON) as f:
    comparison = json.load(f)
  return output_dir, comparison, finished.stdout


def test_check_paths_rejects_unknown_and_repeated_paths():
  assert compare.check_paths(["naive", " keras"]) == ("naive", "keras")
  with pytest.raises(ValueError, match="use one or more of keras, estimator, naive"):
    compare.check_paths(["keras", "tensorflow"])
  with pytest.raises(ValueError, match="use one or more of"):
    compare.check_paths([])
  with pytest.raises(ValueError, match="names a path twice"):
    compare.check_paths(["keras", "keras"])


@pytest.mark.slow
def test_every_path_has_a_full_history_in_json_and_csv(compared):
  output_dir, comparison, _ = compared
  assert set(comparison["paths"]) == set(PATHS)
  assert comparison["settings"]["dropout"] == 0.0 and comparison["settings"]["augment"] is False
  for name in PATHS:
    history = comparison["paths"][name]["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    for entry in history:
      assert np.isfinite([entry[m] for m in compare.METRICS]).all(), (name, entry)
    with open(os.path.join(output_dir, name, "results.json")) as f:
      assert json.load(f)["history"] == history
  with open(output_dir / compare.COMPARISON_CSV) as f:
    rows = list(csv.DictReader(f))
  assert [(r["path"], int(r["epoch"])) for r in rows] == [
      (name, epoch) for name in PATHS for epoch in range(1, EPOCHS + 1)]
  keras_last = comparison["paths"]["keras"]["history"][-1]
  assert float(rows[EPOCHS - 1]["val_loss"]) == keras_last["val_loss"]


@pytest.mark.slow
def test_plot_is_a_readable_png_of_exactly_the_recorded_curves(compared):
  output_dir, comparison, _ = compared
  with Image.open(output_dir / compare.COMPARISON_PNG) as image:
    assert image.format == "PNG"
    width, height = image.size
    colours = len(set(image.convert("RGB").getdata()))
  assert width >= 800 and height >= 400
  # Curves and text, not a blank canvas.
  assert colours > 50
  # What is drawn is what the runs recorded: each path's four curves, epoch by epoch.
  figure = compare.comparison_figure(comparison)
  loss_axis, accuracy_axis = figure.axes[:2]
  for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
    lines = {line.get_label(): line for line in axis.get_lines()}
    for name in PATHS:
      history = comparison["paths"][name]["history"]
      for label, key in ((f"{name}: validation (full pass)", f"val_{metric}"),
                         (f"{name}: training (running average)", metric)):
        line = lines[label]
        assert list(line.get_xdata()) == [h["epoch"] for h in history]
        np.testing.assert_allclose(line.get_ydata(), [h[key] for h in history], rtol=1e-12)


@pytest.fixture(scope="module")
def compared_on_records(tiny_dataset, module_tmp_path):
  """keras and estimator only, 1 epoch, on records (3 train shards: interleaved reads) written by
  `estimator-ft prepare` from the same tiny folders."""
  records_dir = module_tmp_path / "records"
  prepare.run_prepare(str(tiny_dataset / "train"), str(tiny_dataset / "validation"),
                      str(records_dir), num_shards=3)
  output_dir = module_tmp_path / "out_records"
  command = [sys.executable, "-m", "estimator_ft", "compare", f"--records_dir={records_dir}",
             f"--output_dir={output_dir}", f"--image_size={SIZE}", f"--batch_size={BATCH}",
             "--epochs=1", "--weights=none", "--seed=5", "--batchnorm_momentum=0.9",
             "--paths=keras,estimator", "--shuffle_buffer=8"]
  finished = subprocess.run(command, capture_output=True, text=True, timeout=COMPARE_TIMEOUT_S)
  assert finished.returncode == 0, finished.stderr[-3000:]
  with open(output_dir / compare.COMPARISON_JSON) as f:
    return json.load(f)


def _assert_keras_and_estimator_agree(comparison):
  absolute = comparison["max_abs_diff"]["keras_vs_estimator"]
  relative = comparison["max_rel_diff"]["keras_vs_estimator"]
  assert absolute["val_loss"] < CURVE_TOLERANCE
  assert absolute["loss"] < CURVE_TOLERANCE
  assert absolute["val_accuracy"] < ACCURACY_TOLERANCE
  assert absolute["accuracy"] < ACCURACY_TOLERANCE
  assert relative["bn_moving_statistics"] < BN_RELATIVE_TOLERANCE
  assert relative["trainable_weights"] < TRAINABLE_RELATIVE_TOLERANCE
  assert relative["head_weights"] < TRAINABLE_RELATIVE_TOLERANCE


@pytest.mark.slow
def test_keras_and_estimator_agree_to_float32_round_off(compared):
  _, comparison, _ = compared
  _assert_keras_and_estimator_agree(comparison)
  # Both trained: the agreement is not that of two untouched copies of the initial weights.
  histories = [comparison["paths"][name]["history"] for name in ("keras", "estimator")]
  assert all(h[0]["val_loss"] != h[-1]["val_loss"] for h in histories)


@pytest.mark.slow
def test_keras_and_estimator_agree_on_records_as_on_folders(compared_on_records):
  # Records: both paths read the same stream (seeded shard order, interleave, buffer).
  _assert_keras_and_estimator_agree(compared_on_records)
  assert set(compared_on_records["paths"]) == {"keras", "estimator"}


@pytest.mark.slow
def test_naive_validation_departs_while_its_training_matches(compared):
  _, comparison, _ = compared
  absolute = comparison["max_abs_diff"]["naive_vs_estimator"]
  relative = comparison["max_rel_diff"]["naive_vs_estimator"]
  assert absolute["val_loss"] > NAIVE_MIN_VAL_LOSS_GAP
  assert absolute["val_loss"] > 1e4 * comparison["max_abs_diff"]["keras_vs_estimator"]["val_loss"]
  assert relative["bn_moving_statistics"] > NAIVE_MIN_BN_RELATIVE_GAP
  # Training normalises with batch statistics, so the broken loop trains identically.
  assert absolute["loss"] < CURVE_TOLERANCE and absolute["accuracy"] < ACCURACY_TOLERANCE
  assert relative["trainable_weights"] < TRAINABLE_RELATIVE_TOLERANCE


@pytest.mark.slow
def test_report_names_running_averages_and_full_passes(compared):
  output_dir, comparison, stdout = compared
  assert "dropout 0.0, augmentation off" in stdout
  assert "running averages" in stdout and "one full pass in inference mode" in stdout
  assert "--update_ops=skip" in stdout
  for epoch in comparison["paths"]["naive"]["history"]:
    assert f"{epoch['val_loss']:.4f}" in stdout
  assert f"tensorboard --logdir {output_dir}" in stdout


def _tensorboard_run(folder):
  """TensorBoard's own reader of one run folder, keeping every event (no sampling)."""
  accumulator = event_accumulator.EventAccumulator(
      str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  return accumulator.Reload()


@pytest.mark.slow
def test_tensorboard_overlays_every_path_in_the_same_cards(compared):
  # One --logdir: each path is one run (its model_dir) holding the same tags at the same global
  # steps, so TensorBoard draws the paths in one card per figure; the values are the ones the
  # comparison reports.
  output_dir, comparison, _ = compared
  common = {summaries.TRAIN_LOSS, summaries.TRAIN_ACCURACY, summaries.LEARNING_RATE,
            summaries.VALIDATION_LOSS, summaries.VALIDATION_ACCURACY, "validation/auc",
            "validation/precision", "validation/recall"}
  steps_per_epoch = comparison["paths"]["keras"]["global_step"] // EPOCHS
  epoch_ends = [epoch * steps_per_epoch for epoch in range(1, EPOCHS + 1)]
  curves = {}
  for name in PATHS:
    run = _tensorboard_run(output_dir / name)
    assert common <= set(run.Tags()["scalars"]), name
    curves[name] = {tag: {e.step: e.value for e in run.Scalars(tag)} for tag in common}
    history = comparison["paths"][name]["history"]
    for key, tag in (("val_loss", summaries.VALIDATION_LOSS),
                     ("val_accuracy", summaries.VALIDATION_ACCURACY),
                     ("loss", summaries.TRAIN_LOSS), ("accuracy", summaries.TRAIN_ACCURACY)):
      np.testing.assert_allclose([curves[name][tag][step] for step in epoch_ends],
                                 [h[key] for h in history], rtol=1e-6, err_msg=f"{name} {tag}")
    # Each evaluation's confusion matrix, as an image, at the evaluated step.
    images = run.Images(summaries.CONFUSION_MATRIX_IMAGE)
    assert [image.step for image in images] == epoch_ends, name
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
  # The same x positions in every path, and keras on top of estimator within round-off.
  for tag in common:
    assert set(curves["keras"][tag]) == set(curves["estimator"][tag]) == set(curves["naive"][tag]), tag
    for step, value in curves["estimator"][tag].items():
      assert curves["keras"][tag][step] == pytest.approx(value, abs=CURVE_TOLERANCE), (tag, step)
  # The Keras callback's own tags, on their own x-axis, are no longer written.
  assert not os.path.exists(output_dir / "keras" / "validation")


@pytest.mark.slow
def test_comparison_json_says_what_it_ran_on(compared, tiny_dataset):
  _, comparison, stdout = compared
  data = comparison["data"]
  class_names = sorted(os.listdir(tiny_dataset / "train"))
  assert data["class_names"] == class_names
  for split, per_class in (("train", 12), ("validation", 4)):
    assert data["splits"][split]["examples"] == per_class * len(class_names)
    assert data["splits"][split]["per_class"] == {name: per_class for name in class_names}
    assert data["splits"][split]["skipped_images"] == 0
  # As each run recorded it.
  for name in PATHS:
    with open(os.path.join(comparison["paths"][name]["model_dir"], "config.json")) as f:
      assert json.load(f)["class_names"] == class_names
  assert f"2 classes ({', '.join(class_names)}); 24 train / 8 validation images" in stdout
