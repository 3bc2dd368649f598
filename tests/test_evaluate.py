"""`estimator-ft evaluate`: hand-computed statistics, then checkpoints and exports of both paths.

The statistics (reports/metrics.py) are a pure function of (labels, probabilities, class names):
the first tests feed it small sets whose every figure is worked out by hand in the comments. The
end-to-end tests train one tiny run per path (module fixtures) and check that a checkpoint and
its SavedModel give the same report, that its accuracy is what training recorded for it, and how
unknown classes, missing classes and unreadable images are handled.
"""

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from estimator_ft.reports import metrics
from estimator_ft.reports import plots
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path

SIZE = 32
BATCH = 8
CLI_TIMEOUT_S = 300

# ---------------------------------------------------------------- three classes, by hand
#
# example  label  probabilities (a, b, c)   predicted  confidence  p(true)  in top 2
#    0       a     .75  .15  .10               a         .75         .75      yes
#    1       a     .25  .45  .30               b         .45         .25      no
#    2       a     .55  .35  .10               a         .55         .55      yes
#    3       b     .05  .85  .10               b         .85         .85      yes
#    4       b     .20  .65  .15               b         .65         .65      yes
#    5       c     .10  .18  .72               c         .72         .72      yes
#    6       c     .62  .08  .30               a         .62         .30      yes
#    7       c     .14  .52  .34               b         .52         .34      yes
#
# confusion (rows true a, b, c): [2 1 0] [0 2 0] [1 1 1]; accuracy 5/8; top-2 7/8.
# a: TP 2 FP 1 FN 1 -> precision 2/3, recall 2/3, F1 2/3, support 3
# b: TP 2 FP 2 FN 0 -> precision 1/2, recall 1,   F1 2/3, support 2
# c: TP 1 FP 0 FN 2 -> precision 1,   recall 1/3, F1 1/2, support 3
# macro: precision (2/3 + 1/2 + 1)/3 = 13/18, recall 2/3, F1 (2/3 + 2/3 + 1/2)/3 = 11/18
# weighted (3, 2, 3 of 8): precision 6/8, recall 5/8, F1 (2 + 4/3 + 3/2)/8 = 29/48
# calibration, bins (0.4, 0.5] .. (0.8, 0.9]: {.45: wrong} {.55 right, .52 wrong}
#   {.65 right, .62 wrong} {.75 right, .72 right} {.85 right}
#   gaps .45, .035, .135, .265, .15 -> ECE (.45 + 2 x .035 + 2 x .135 + 2 x .265 + .15)/8 = .18375
THREE = ("a", "b", "c")
THREE_LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
THREE_PROBABILITIES = [[.75, .15, .10], [.25, .45, .30], [.55, .35, .10], [.05, .85, .10],
                       [.20, .65, .15], [.10, .18, .72], [.62, .08, .30], [.14, .52, .34]]
THREE_TRUE_PROBABILITIES = (.75, .25, .55, .85, .65, .72, .30, .34)


def test_three_class_report_matches_the_hand_computed_figures():
  report = metrics.classification_report(THREE_LABELS, THREE_PROBABILITIES, THREE)
  assert report["examples"] == 8 and report["class_names"] == list(THREE)
  assert report["accuracy"] == pytest.approx(5 / 8)
  assert report["top_k_accuracy"] == {"2": pytest.approx(7 / 8)}
  expected = {"a": (2 / 3, 2 / 3, 2 / 3, 3), "b": (1 / 2, 1, 2 / 3, 2), "c": (1, 1 / 3, 1 / 2, 3)}
  for row in report["per_class"]:
    assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
        expected[row["class"]]), row
  assert report["macro_avg"] == pytest.approx(
      {"precision": 13 / 18, "recall": 2 / 3, "f1": 11 / 18, "support": 8})
  assert report["weighted_avg"] == pytest.approx(
      {"precision": 6 / 8, "recall": 5 / 8, "f1": 29 / 48, "support": 8})
  matrix = report["confusion_matrix"]
  assert matrix["counts"] == [[2, 1, 0], [0, 2, 0], [1, 1, 1]]
  np.testing.assert_allclose(matrix["row_normalized"],
                             [[2 / 3, 1 / 3, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]])
  assert report["log_loss"] == pytest.approx(
      -sum(math.log(p) for p in THREE_TRUE_PROBABILITIES) / 8)
  assert report["binary"] is None


def test_calibration_error_and_bins_match_the_hand_computed_figures():
  calibration = metrics.classification_report(THREE_LABELS, THREE_PROBABILITIES, THREE)["calibration"]
  assert calibration["expected_calibration_error"] == pytest.approx(0.18375)
  assert calibration["max_calibration_error"] == pytest.approx(0.45)
  assert calibration["accuracy"] == pytest.approx(5 / 8)
  assert calibration["mean_confidence"] == pytest.approx(np.mean([.75, .45, .55, .85, .65, .72, .62, .52]))
  filled = [(b["lower"], b["upper"], b["count"], b["accuracy"], b["confidence"])
            for b in calibration["bins"] if b["count"]]
  np.testing.assert_allclose(filled, [(0.4, 0.5, 1, 0.0, .45), (0.5, 0.6, 2, 0.5, .535),
                                      (0.6, 0.7, 2, 0.5, .635), (0.7, 0.8, 2, 1.0, .735),
                                      (0.8, 0.9, 1, 1.0, .85)])
  assert len(calibration["bins"]) == 10
  assert all(b["accuracy"] is None for b in calibration["bins"] if not b["count"])


def test_misclassified_are_listed_most_confident_first():
  paths = [f"img{i}.png" for i in range(8)]
  rows = metrics.misclassified(THREE_LABELS, THREE_PROBABILITIES, THREE, paths)
  assert [(r["path"], r["true_class"], r["predicted_class"]) for r in rows] == [
      ("img6.png", "c", "a"), ("img7.png", "c", "b"), ("img1.png", "a", "b")]
  assert [r["confidence"] for r in rows] == pytest.approx([.62, .52, .45])
  assert [r["true_class_probability"] for r in rows] == pytest.approx([.30, .34, .25])


# ---------------------------------------------------------------- two classes, by hand
#
# label  0    0    0    1    1    1      (class "pos" = index 1 is the positive class)
# score  .2   .6   .3   .7   .45  .9     p(pos); the model predicts pos when score > .5
# ROC AUC: positive-negative pairs ranked right: .7 > all 3, .45 > .2 and .3, .9 > all 3 -> 8/9
# by score: .9 P, .7 P, .6 N, .45 P, .3 N, .2 N -> average precision
#   1/3 x 1 (at .9) + 1/3 x 1 (at .7) + 1/3 x 3/4 (at .45) = 11/12
# thresholds (score >= t): .4 -> TP 3 FP 1 FN 0 TN 2: P 3/4, R 1, F1 6/7
#                          .5 -> TP 2 FP 1 FN 1 TN 2: P 2/3, R 2/3, F1 2/3
#                          .8 -> TP 1 FP 0 FN 2 TN 3: P 1, R 1/3, F1 1/2
#                          .95 -> nothing predicted positive: P undefined, R 0, F1 0
# the F1-best of the data's own thresholds: .45 (TP 3 FP 1) with F1 6/7 (.3: 3/4, .7: 4/5, .6: 2/3)
BINARY = ("neg", "pos")
BINARY_LABELS = [0, 0, 0, 1, 1, 1]
BINARY_SCORES = [.2, .6, .3, .7, .45, .9]


def _binary_report(**kwargs):
  probabilities = [[1 - s, s] for s in BINARY_SCORES]
  return metrics.classification_report(BINARY_LABELS, probabilities, BINARY, **kwargs)


def test_binary_curves_areas_and_thresholds_match_the_hand_computed_figures():
  report = _binary_report(thresholds=(0.8, 0.4, 0.5, 0.95))
  binary = report["binary"]
  assert report["accuracy"] == pytest.approx(4 / 6)
  assert report["top_k_accuracy"] == {}  # top-2 of two classes says nothing
  assert binary["positive_class"] == "pos" and (binary["positives"], binary["negatives"]) == (3, 3)
  assert binary["roc_auc"] == pytest.approx(8 / 9)
  assert binary["pr_auc"] == pytest.approx(11 / 12)
  rows = {row["threshold"]: row for row in binary["thresholds"]}
  assert list(rows) == [0.4, 0.5, 0.8, 0.95]  # sorted
  for threshold, (tp, fp, fn, tn, precision, recall, f1) in {
      0.4: (3, 1, 0, 2, 3 / 4, 1, 6 / 7), 0.5: (2, 1, 1, 2, 2 / 3, 2 / 3, 2 / 3),
      0.8: (1, 0, 2, 3, 1, 1 / 3, 1 / 2)}.items():
    row = rows[threshold]
    assert (row["true_positives"], row["false_positives"], row["false_negatives"],
            row["true_negatives"]) == (tp, fp, fn, tn)
    assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1))
  assert rows[0.95]["precision"] is None and rows[0.95]["recall"] == 0 and rows[0.95]["f1"] == 0
  best = binary["best_f1"]
  assert best["threshold"] == pytest.approx(0.45) and best["f1"] == pytest.approx(6 / 7)
  # The curves: from (0, 0) to (1, 1), the first ROC threshold +inf (null in JSON).
  roc, pr = binary["roc_curve"], binary["pr_curve"]
  assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
  assert roc["thresholds"][0] is None
  assert pr["recall"][-1] == 0 and pr["precision"][-1] == 1
  assert len(pr["precision"]) == len(pr["thresholds"]) + 1
  json.dumps(report, allow_nan=False)  # JSON-ready: no NaN or infinity anywhere


def test_curves_of_a_large_set_are_thinned_but_its_figures_use_every_point():
  """A PR point per distinct score made report.json grow with the data (62 MB at 1M images)."""
  from sklearn import metrics as skm
  generator = np.random.default_rng(0)
  labels = (generator.random(20_000) < 0.1).astype(np.int64)  # 10 % positives
  scores = np.clip(generator.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
  binary = metrics.binary_statistics(labels, scores, "b")
  roc, pr = binary["roc_curve"], binary["pr_curve"]
  full_precision, _, full_thresholds = skm.precision_recall_curve(labels, scores)
  assert len(full_thresholds) > 10 * metrics.MAX_CURVE_POINTS  # thinning had work to do
  assert len(pr["precision"]) == len(pr["recall"]) <= metrics.MAX_CURVE_POINTS
  assert len(pr["precision"]) == len(pr["thresholds"]) + 1  # still one point more
  assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"]) <= metrics.MAX_CURVE_POINTS
  assert pr["precision"][0] == pytest.approx(full_precision[0])  # both ends kept
  assert (pr["recall"][-1], pr["precision"][-1]) == (0, 1)
  assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
  assert np.all(np.diff(pr["thresholds"]) > 0) and np.all(np.diff(roc["fpr"]) >= 0)
  # The areas and the F1-best threshold come from every point, not the thinned ones.
  assert binary["pr_auc"] == pytest.approx(skm.average_precision_score(labels, scores))
  assert binary["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores))
  assert binary["best_f1"]["threshold"] in set(full_thresholds.tolist())
  assert len(json.dumps(binary)) < 6 * metrics.MAX_CURVE_POINTS * 25  # 6 arrays, ~20 chars a number


def test_a_class_without_examples_has_zero_support_and_undefined_recall():
  # c has no examples. Predicted once (example 3, a wrong guess): precision 0/1, recall 0/0.
  labels = [0, 0, 1, 1]
  probabilities = [[.8, .1, .1], [.7, .2, .1], [.1, .8, .1], [.1, .3, .6]]
  report = metrics.classification_report(labels, probabilities, THREE)
  c = report["per_class"][2]
  assert (c["support"], c["precision"], c["recall"], c["f1"]) == (0, 0.0, None, 0.0)
  assert report["confusion_matrix"]["row_normalized"][2] is None
  # Undefined (0/0) values are left out of the macro average: recall over a and b only.
  assert report["macro_avg"]["recall"] == pytest.approx((1 + 1 / 2) / 2)
  assert report["macro_avg"]["precision"] == pytest.approx((1 + 1 + 0) / 3)
  # Never predicted either: every figure of c is undefined.
  never = metrics.classification_report(labels, [[.8, .1, .1], [.7, .2, .1], [.1, .8, .1],
                                                 [.6, .3, .1]], THREE)["per_class"][2]
  assert (never["support"], never["precision"], never["recall"], never["f1"]) == (0, None, None, None)


def test_binary_data_of_one_class_has_no_curves_but_a_threshold_table():
  report = metrics.classification_report([0, 0, 0], [[.9, .1], [.4, .6], [.7, .3]], BINARY)
  binary = report["binary"]
  assert binary["roc_auc"] is None and binary["roc_curve"] is None and binary["best_f1"] is None
  assert "all negative" in binary["note"]
  half = [row for row in binary["thresholds"] if row["threshold"] == 0.5][0]
  assert (half["false_positives"], half["true_negatives"], half["precision"]) == (1, 2, 0.0)
  assert report["accuracy"] == pytest.approx(2 / 3)
  json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("labels, probabilities, message", [
    ([0, 1], [[.5, .5]], "shape"),
    ([0, 3], [[.5, .5], [.5, .5]], "class indices in 0..1"),
    ([0, 1], [[.5, .6], [.5, .5]], "sum to 1"),
    ([0, 1], [[np.nan, 1], [.5, .5]], "finite"),
    ([0.0, 1.0], [[.5, .5], [.5, .5]], "integer"),
])
def test_bad_inputs_say_what_is_wrong(labels, probabilities, message):
  with pytest.raises(ValueError, match=message):
    metrics.classification_report(labels, probabilities, BINARY)


def test_the_statistics_import_no_tensorflow():
  script = ("import sys\nimport estimator_ft.reports.metrics, estimator_ft.reports.plots\n"
            "assert 'tensorflow' not in sys.modules, sorted(sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_cli_default_thresholds_are_the_librarys():
  from estimator_ft import cli
  assert tuple(float(t) for t in cli._DEFAULT_THRESHOLDS) == metrics.DEFAULT_THRESHOLDS


# ---------------------------------------------------------------- plots

def test_plots_name_the_classes_and_render(tmp_path):
  report = metrics.classification_report(THREE_LABELS, THREE_PROBABILITIES, THREE)
  figure = plots.confusion_matrix_figure(report["confusion_matrix"]["counts"], THREE)
  axis = figure.axes[0]
  assert [t.get_text() for t in axis.get_xticklabels()] == list(THREE)
  assert [t.get_text() for t in axis.get_yticklabels()] == ["a (n=3)", "b (n=2)", "c (n=3)"]
  cells = [t.get_text() for t in axis.texts]
  assert "2\n67%" in cells and "1\n33%" in cells and len(cells) == 9
  reliability = plots.reliability_figure(report["calibration"])
  assert "ECE 0.184" in reliability.axes[0].get_title()
  roc = plots.roc_pr_figure(_binary_report()["binary"])
  assert "AUC 0.889" in " ".join(t.get_text() for t in roc.axes[0].get_legend().get_texts())
  for name, drawn in (("cm", figure), ("rel", reliability), ("roc", roc)):
    path = tmp_path / f"{name}.png"
    plots.save_png(drawn, str(path))
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size[0] >= 400
      assert len(set(image.convert("RGB").getdata())) > 20  # drawn, not blank


# ---------------------------------------------------------------- end to end

def _config(tiny_dataset, model_dir, **changes):
  from estimator_ft.config import Config
  return Config(train_dir=str(tiny_dataset / "train"), validation_dir=str(tiny_dataset / "validation"),
                model_dir=str(model_dir), image_size=SIZE, batch_size=BATCH, epochs=1,
                weights="none", dropout=0.0, augment=False, batchnorm_momentum=0.9,
                **changes).validate()


@pytest.fixture(scope="module")
def estimator_run(tiny_dataset, module_tmp_path):
  """One epoch (3 steps) of the Estimator path, with its latest and best exports."""
  from estimator_ft.jobs import train as train_job
  model_dir = module_tmp_path / "estimator"
  results = train_job.run(_config(tiny_dataset, model_dir))
  return model_dir, results


@pytest.fixture(scope="module")
def keras_run(tiny_dataset, module_tmp_path):
  """One epoch of the Keras path (no export: its checkpoint is what is evaluated)."""
  from estimator_ft.jobs import train as train_job
  model_dir = module_tmp_path / "keras"
  results = train_job.run(_config(tiny_dataset, model_dir, path="keras",
                                  export_during_training=False))
  return model_dir, results


def _assert_same_statistics(a, b, rtol=1e-5):
  assert a["confusion_matrix"]["counts"] == b["confusion_matrix"]["counts"]
  for key in ("accuracy", "log_loss"):
    assert a[key] == pytest.approx(b[key], rel=rtol), key
  assert a["per_class"] == b["per_class"]
  assert a["binary"]["roc_auc"] == pytest.approx(b["binary"]["roc_auc"], rel=rtol)
  assert a["calibration"]["expected_calibration_error"] == pytest.approx(
      b["calibration"]["expected_calibration_error"], rel=rtol, abs=1e-6)


@pytest.mark.slow
def test_a_checkpoint_and_its_export_give_the_same_report(estimator_run, tiny_dataset, tmp_path):
  from estimator_ft import export, serving
  from estimator_ft.jobs import evaluate
  model_dir, results = estimator_run
  from_checkpoint = evaluate.run_evaluate(str(tmp_path / "checkpoint"), model_dir=str(model_dir))
  # export/latest's newest version is the final checkpoint's model.
  version = serving.newest_version(str(model_dir / export.EXPORT_DIR / export.LATEST_EXPORTER))
  from_export = evaluate.run_evaluate(str(tmp_path / "export"), saved_model=version,
                                      validation_dir=str(tiny_dataset / "validation"))
  assert from_checkpoint["model"]["kind"] == "checkpoint"
  assert from_checkpoint["model"]["path"].endswith(f"model.ckpt-{results['global_step']}")
  assert from_export["model"]["kind"] == "saved_model"
  assert from_export["model"]["global_step"] == from_checkpoint["model"]["global_step"]
  _assert_same_statistics(from_checkpoint["metrics"], from_export["metrics"])
  # The accuracy (k of 8 images) is exactly what training's evaluation recorded for this
  # checkpoint, and the loss the same per-example mean.
  epoch = results["history"][-1]
  for report in (from_checkpoint, from_export):
    assert report["metrics"]["accuracy"] == pytest.approx(epoch["val_accuracy"], abs=1e-6)
    assert report["metrics"]["log_loss"] == pytest.approx(epoch["val_loss"], rel=1e-4)
    recorded = report["training_recorded"]
    assert recorded["on_this_folder"] is True
    assert recorded["accuracy"] == pytest.approx(epoch["val_accuracy"], abs=1e-6)
  # Both wrote every file.
  for report in (from_checkpoint, from_export):
    assert sorted(os.path.basename(p) for p in report["files"].values()) == sorted(
        [evaluate.REPORT_JSON, evaluate.PER_CLASS_CSV, evaluate.MISCLASSIFIED_CSV,
         evaluate.CONFUSION_MATRIX_PNG, evaluate.RELIABILITY_PNG, evaluate.ROC_PR_PNG])
    assert all(os.path.getsize(p) > 0 for p in report["files"].values())


@pytest.mark.slow
def test_keras_checkpoint_accuracy_is_what_training_recorded(keras_run, tmp_path):
  from estimator_ft.jobs import evaluate
  model_dir, results = keras_run
  report = evaluate.run_evaluate(str(tmp_path / "out"), model_dir=str(model_dir),
                                 checkpoint=f"ckpt-{results['global_step']}")
  epoch = results["history"][-1]
  assert report["model"]["training_path"] == "keras"
  assert report["metrics"]["accuracy"] == pytest.approx(epoch["val_accuracy"], abs=1e-6)
  assert report["metrics"]["log_loss"] == pytest.approx(epoch["val_loss"], rel=1e-4)
  assert report["training_recorded"]["accuracy"] == pytest.approx(epoch["val_accuracy"], abs=1e-6)
  assert report["training_recorded"]["on_this_folder"] is True
  # misclassified.csv: every mistake, most confident first, consistent with the confusion matrix.
  with open(report["files"][evaluate.MISCLASSIFIED_CSV]) as f:
    rows = list(csv.DictReader(f))
  counts = np.array(report["metrics"]["confusion_matrix"]["counts"])
  assert len(rows) == counts.sum() - np.trace(counts) == report["misclassified"]["count"]
  confidences = [float(r["confidence"]) for r in rows]
  assert confidences == sorted(confidences, reverse=True)
  assert all(r["true_class"] != r["predicted_class"] and os.path.isfile(r["path"]) for r in rows)
  with open(report["files"][evaluate.PER_CLASS_CSV]) as f:
    per_class = list(csv.DictReader(f))
  assert [(r["class"], int(r["support"])) for r in per_class] == [
      (row["class"], row["support"]) for row in report["metrics"]["per_class"]]


@pytest.mark.slow
def test_best_is_the_checkpoint_export_best_holds_or_its_savedmodel(estimator_run, tmp_path):
  from estimator_ft import export, serving
  from estimator_ft.jobs import evaluate
  model_dir, _ = estimator_run
  best_version = serving.newest_version(str(model_dir / export.EXPORT_DIR / export.BEST_EXPORTER))
  recorded = export.read_export_info(best_version)["checkpoint"]
  model = evaluate.resolve_model(model_dir=str(model_dir), checkpoint="best")
  assert model.kind == "checkpoint" and os.path.basename(model.path) == os.path.basename(recorded)
  # The same run without that checkpoint any more (--keep_checkpoint_max deleted it): its
  # SavedModel in export/best holds the same weights.
  moved = tmp_path / "moved"
  moved.mkdir()
  shutil.copy(model_dir / "config.json", moved / "config.json")
  os.symlink(model_dir / export.EXPORT_DIR, moved / export.EXPORT_DIR)
  fallback = evaluate.resolve_model(model_dir=str(moved), checkpoint="best")
  assert fallback.kind == "saved_model" and fallback.path.endswith(os.path.basename(best_version))
  with pytest.raises(ValueError, match="not a checkpoint of .*Use latest, best, or one of: model.ckpt-"):
    evaluate.resolve_model(model_dir=str(model_dir), checkpoint="model.ckpt-999")


@pytest.mark.slow
def test_keras_runs_have_no_best_and_unknown_classes_are_refused(keras_run, estimator_run, tmp_path):
  from estimator_ft.jobs import evaluate
  keras_dir, _ = keras_run
  with pytest.raises(ValueError, match="Keras-path run, which keeps no best model"):
    evaluate.resolve_model(model_dir=str(keras_dir), checkpoint="best")
  folder = tmp_path / "test"
  for name in ("horizontal", "diagonal"):
    images.write_png(folder / name / "x.png", size=SIZE, seed=1)
  model_dir, _ = estimator_run
  with pytest.raises(ValueError, match=r"class folder\(s\) the model does not know: diagonal\. "
                                       r"The model's classes are horizontal, vertical"):
    evaluate.run_evaluate(str(tmp_path / "out"), model_dir=str(model_dir), validation_dir=str(folder))
  assert not (tmp_path / "out").exists(), "a refused folder must not leave outputs behind"
  with pytest.raises(ValueError, match="either --model_dir=DIR .* or --saved_model=DIR"):
    evaluate.run_evaluate(str(tmp_path / "out"), validation_dir=str(folder))


@pytest.mark.slow
def test_a_missing_class_has_zero_support_and_bad_images_follow_the_policy(keras_run, tiny_dataset,
                                                                           tmp_path):
  from estimator_ft.jobs import evaluate
  model_dir, _ = keras_run
  folder = tmp_path / "only_horizontal"
  shutil.copytree(tiny_dataset / "validation" / "horizontal", folder / "horizontal")
  broken = images.write_truncated(folder / "horizontal" / "broken.jpg", kind="jpeg")
  with pytest.raises(ValueError, match=r"(?s)broken\.jpg.*--bad_images=skip to evaluate without"):
    evaluate.run_evaluate(str(tmp_path / "out"), model_dir=str(model_dir), validation_dir=str(folder))
  report = evaluate.run_evaluate(str(tmp_path / "out"), model_dir=str(model_dir),
                                 validation_dir=str(folder), bad_images="skip")
  good = len(os.listdir(tiny_dataset / "validation" / "horizontal"))
  assert report["data"]["examples"] == good
  assert [s["path"] for s in report["data"]["skipped_images"]] == [broken]
  assert report["data"]["missing_classes"] == ["vertical"]
  horizontal, vertical = report["metrics"]["per_class"]
  assert horizontal["support"] == good and vertical["support"] == 0 and vertical["recall"] is None
  assert "all negative" in report["metrics"]["binary"]["note"]
  # Not the run's validation folder: training's figures are shown, but as another folder's.
  assert report["training_recorded"]["on_this_folder"] is False


def test_images_over_the_runs_pixel_limit_are_bad_files_before_any_prediction(keras_run,
                                                                              estimator_run,
                                                                              tiny_dataset, tmp_path):
  """The scan holds images to the model's --max_image_pixels, not the default: its graphs refuse
  larger ones, which used to fail a batch with a traceback after hours of predictions."""
  from estimator_ft.jobs import evaluate
  from estimator_ft.run import model_dir as model_dir_lib
  limit = SIZE * SIZE - 1  # every 32 x 32 image of the folder is one pixel over
  model_dir = tmp_path / "keras_run"
  shutil.copytree(keras_run[0], model_dir)
  config_path = model_dir / model_dir_lib.CONFIG_FILE
  record = json.loads(config_path.read_text())
  record["config"]["max_image_pixels"] = limit
  config_path.write_text(json.dumps(record))
  assert evaluate.checkpoint_model(str(model_dir)).max_image_pixels == limit
  with pytest.raises(ValueError, match=rf"(?s)is over the limit of {limit} pixels.*"
                                       r"--bad_images=skip to evaluate without"):
    evaluate.run_evaluate(str(tmp_path / "out"), model_dir=str(model_dir),
                          validation_dir=str(tiny_dataset / "validation"))
  assert not (tmp_path / "out").exists()  # refused before anything was written
  # An export records its limit in export_info.json; one from before that has the default.
  best = tmp_path / "best"
  shutil.copytree(evaluate.saved_model_model(str(estimator_run[0] / "export" / "best")).path, best)
  info_path = best / "assets.extra" / "export_info.json"
  info = json.loads(info_path.read_text())
  assert evaluate.saved_model_model(str(best)).max_image_pixels == info["max_image_pixels"]
  info["max_image_pixels"] = limit
  info_path.write_text(json.dumps(info))
  assert evaluate.saved_model_model(str(best)).max_image_pixels == limit
  del info["max_image_pixels"]
  info_path.write_text(json.dumps(info))
  assert evaluate.saved_model_model(str(best)).max_image_pixels == 89_478_485  # PIL's default


@pytest.mark.slow
def test_each_evaluation_during_training_drew_its_confusion_matrix_in_both_paths(estimator_run,
                                                                                keras_run):
  from tensorboard.backend.event_processing import event_accumulator
  from estimator_ft.run import summaries
  for model_dir, results in (estimator_run, keras_run):
    run = event_accumulator.EventAccumulator(
        str(model_dir), size_guidance={event_accumulator.IMAGES: 0}).Reload()
    [image] = run.Images(summaries.CONFUSION_MATRIX_IMAGE)
    assert image.step == results["global_step"]
    with Image.open(io.BytesIO(image.encoded_image_string)) as png:
      assert png.format == "PNG" and png.size == (image.width, image.height)


@pytest.mark.slow
def test_cli_prints_the_table_and_refuses_bad_usage(keras_run, tmp_path):
  model_dir, results = keras_run
  output_dir = tmp_path / "report"
  command = [sys.executable, "-m", "estimator_ft", "evaluate", f"--model_dir={model_dir}",
             f"--output_dir={output_dir}", "--thresholds=0.25,0.5"]
  finished = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
  assert finished.returncode == 0, finished.stderr[-3000:]
  with open(output_dir / "report.json") as f:
    report = json.load(f)
  assert [row["threshold"] for row in report["metrics"]["binary"]["thresholds"]] == [0.25, 0.5]
  stdout = finished.stdout
  assert f"(keras path, step {results['global_step']})" in stdout
  assert f"accuracy {report['metrics']['accuracy']:.4f}" in stdout
  for row in report["metrics"]["per_class"]:
    assert row["class"] in stdout
  assert "macro avg" in stdout and "weighted avg" in stdout and "ROC AUC" in stdout
  assert "training recorded for these weights on this folder" in stdout
  for name in ("confusion_matrix.png", "reliability.png", "roc_pr.png"):
    with Image.open(output_dir / name) as image:
      assert image.format == "PNG"
  bad = subprocess.run(command[:5] + ["--checkpoint=best", f"--output_dir={tmp_path / 'x'}"],
                       capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
  assert bad.returncode == 2 and "estimator-ft: error: --checkpoint=best" in bad.stderr
  assert "Traceback" not in bad.stderr
