"""Classification statistics: a pure function of (labels, probabilities, class names).

No TensorFlow: the numbers come from scikit-learn's metrics, so they can be checked by hand on a
few examples (tests/test_evaluate.py) and mean what scikit-learn's documentation says.

Conventions, the same everywhere in a report:
  * predicted class: the most probable class (argmax; for two classes the model's own rule,
    p(class 1) > 0.5, since a tie goes to class 0 either way);
  * a value that is 0/0 - the recall of a class with no examples, the precision of a class never
    predicted - is None (null in JSON), and scikit-learn leaves it out of the macro and weighted
    averages (zero_division=nan);
  * two classes: class index 1 is the positive class, its probability the score; at a threshold
    t an example is predicted positive when score >= t (scikit-learn's curves use the same rule);
  * calibration: top-label confidence (the predicted class's probability) against accuracy, in
    equal-width bins (lower, upper]; ECE = sum over bins of (count / n) x |accuracy - confidence|.
"""

import math
from typing import Optional, Sequence

import numpy as np
from sklearn import metrics as skm

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_CALIBRATION_BINS = 10
# Top-k accuracies reported (only those with k < number of classes: top-C is always 1), plus the
# k the training paths report, min(5, C - 1).
TOP_K = (2, 3, 5)
MAX_TOP_K = 5
# The most points report.json keeps of a ROC or precision-recall curve. The PR curve has a point
# per distinct score: ~955,000 (62 MB of JSON) for 1M validation images; 1,000 draw the same plot.
# The areas and the F1-best threshold are computed on every point first.
MAX_CURVE_POINTS = 1000


def _number(value) -> Optional[float]:
  """A JSON-safe float: None for NaN and infinities."""
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _numbers(values) -> list:
  return [_number(v) for v in np.asarray(values, np.float64).ravel()]


def check_inputs(labels, probabilities, class_names):
  """(labels int64 [n], probabilities float64 [n, C]) checked; raises ValueError saying what is wrong."""
  class_names = list(class_names)
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, np.float64)
  if len(class_names) < 2:
    raise ValueError(f"A classification report needs at least 2 class names, got {class_names}.")
  if len(set(class_names)) != len(class_names):
    raise ValueError(f"Class names must be distinct: {class_names}.")
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array of class indices, got shape {labels.shape}.")
  if probabilities.shape != (labels.size, len(class_names)):
    raise ValueError(f"probabilities must have shape (examples, classes) = ({labels.size}, "
                     f"{len(class_names)}), got {probabilities.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
  if labels.min() < 0 or labels.max() >= len(class_names):
    raise ValueError(f"labels must be class indices in 0..{len(class_names) - 1}, got "
                     f"{labels.min()}..{labels.max()}.")
  if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
    raise ValueError("probabilities must be finite and non-negative (the model's outputs are not: "
                     "its weights may have become NaN).")
  sums = probabilities.sum(axis=1)
  if not np.allclose(sums, 1.0, atol=1e-3):
    raise ValueError(f"each row of probabilities must sum to 1 (got sums from {sums.min():.4f} "
                     f"to {sums.max():.4f}).")
  # float32 outputs sum to 1 only within round-off; scikit-learn's log loss wants them exact.
  return labels.astype(np.int64), probabilities / sums[:, np.newaxis]


def predicted_classes(probabilities) -> np.ndarray:
  return np.argmax(np.asarray(probabilities), axis=1)


def classification_report(labels, probabilities, class_names: Sequence[str],
                          thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                          calibration_bins: int = DEFAULT_CALIBRATION_BINS) -> dict:
  """Every statistic of the report, as JSON-ready values (see the module docstring).

  labels: int [n] class indices into class_names; probabilities: float [n, C], rows summing to 1.
  """
  labels, probabilities = check_inputs(labels, probabilities, class_names)
  class_names = list(class_names)
  num_classes = len(class_names)
  indices = list(range(num_classes))
  predicted = predicted_classes(probabilities)

  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, predicted, labels=indices, zero_division=np.nan)
  per_class = [{"class": name, "precision": _number(p), "recall": _number(r), "f1": _number(f),
                "support": int(s)}
               for name, p, r, f, s in zip(class_names, precision, recall, f1, support)]
  averages = {}
  for average in ("macro", "weighted"):
    p, r, f, _ = skm.precision_recall_fscore_support(labels, predicted, labels=indices,
                                                     average=average, zero_division=np.nan)
    averages[average] = {"precision": _number(p), "recall": _number(r), "f1": _number(f),
                         "support": int(labels.size)}

  counts = skm.confusion_matrix(labels, predicted, labels=indices)
  row_totals = counts.sum(axis=1)
  row_normalized = [
      [float(c) / total for c in row] if total else None for row, total in zip(counts, row_totals)]

  top_k = {}
  for k in sorted({k for k in TOP_K if k < num_classes} | {min(MAX_TOP_K, num_classes - 1)}):
    if k >= 2:
      top_k[str(k)] = _number(skm.top_k_accuracy_score(labels, probabilities, k=k, labels=indices))

  report = {
      "examples": int(labels.size),
      "class_names": class_names,
      "accuracy": _number(skm.accuracy_score(labels, predicted)),
      "log_loss": _number(skm.log_loss(labels, probabilities, labels=indices)),
      "top_k_accuracy": top_k,
      "per_class": per_class,
      "macro_avg": averages["macro"],
      "weighted_avg": averages["weighted"],
      "confusion_matrix": {"counts": counts.astype(int).tolist(), "row_normalized": row_normalized},
      "calibration": calibration(labels, probabilities, calibration_bins),
      "binary": None,
  }
  if num_classes == 2:
    report["binary"] = binary_statistics(labels, probabilities[:, 1], class_names[1], thresholds)
  return report


def calibration(labels, probabilities, bins: int = DEFAULT_CALIBRATION_BINS) -> dict:
  """Top-label calibration: per equal-width bin of confidence, how often the prediction is right."""
  if bins < 1:
    raise ValueError(f"calibration bins={bins} must be at least 1.")
  labels = np.asarray(labels)
  probabilities = np.asarray(probabilities, np.float64)
  predicted = predicted_classes(probabilities)
  confidence = probabilities[np.arange(labels.size), predicted]
  correct = (predicted == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  # Bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of exactly 0 goes to bin 0.
  which = np.digitize(confidence, edges[1:-1], right=True)
  rows, ece, mce = [], 0.0, 0.0
  for index in range(bins):
    inside = which == index
    count = int(inside.sum())
    row = {"lower": round(float(edges[index]), 12), "upper": round(float(edges[index + 1]), 12),
           "count": count,
           "accuracy": None, "confidence": None}
    if count:
      accuracy, mean_confidence = float(correct[inside].mean()), float(confidence[inside].mean())
      row.update(accuracy=accuracy, confidence=mean_confidence)
      gap = abs(accuracy - mean_confidence)
      ece += count / labels.size * gap
      mce = max(mce, gap)
    rows.append(row)
  return {"bins": rows, "expected_calibration_error": ece, "max_calibration_error": mce,
          "mean_confidence": float(confidence.mean()), "accuracy": float(correct.mean())}


def _threshold_row(labels, predicted_positive, threshold) -> dict:
  tn, fp, fn, tp = skm.confusion_matrix(labels, predicted_positive, labels=[0, 1]).ravel()
  precision, recall, f1, _ = skm.precision_recall_fscore_support(
      labels, predicted_positive, labels=[0, 1], pos_label=1, average="binary", zero_division=np.nan)
  return {"threshold": float(threshold), "precision": _number(precision), "recall": _number(recall),
          "f1": _number(f1), "true_positives": int(tp), "false_positives": int(fp),
          "false_negatives": int(fn), "true_negatives": int(tn)}


def binary_statistics(labels, scores, positive_class: str,
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
  """ROC and precision-recall curves with their areas, a threshold table and the F1-best threshold.

  scores: p(positive class) per example; labels: 1 for the positive class, else 0.
  """
  labels = (np.asarray(labels) == 1).astype(np.int64)
  scores = np.asarray(scores, np.float64)
  for threshold in thresholds:
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold {threshold} is not a probability: use values in [0, 1].")
  result = {
      "positive_class": positive_class,
      "positives": int(labels.sum()),
      "negatives": int(labels.size - labels.sum()),
      "roc_auc": None,
      "pr_auc": None,
      "roc_curve": None,
      "pr_curve": None,
      "thresholds": [_threshold_row(labels, (scores >= t).astype(np.int64), t)
                     for t in sorted(set(float(t) for t in thresholds))],
      "best_f1": None,
      "note": None,
  }
  if labels.min() == labels.max():
    result["note"] = ("ROC and precision-recall curves need examples of both classes; these "
                      f"are all {'positive' if labels[0] else 'negative'}.")
    return result
  fpr, tpr, roc_thresholds = skm.roc_curve(labels, scores)
  precision, recall, pr_thresholds = skm.precision_recall_curve(labels, scores)
  result.update(
      roc_auc=_number(skm.roc_auc_score(labels, scores)),
      # The area under the precision-recall curve as a step function (average precision): the
      # trapezoidal area interpolates linearly between points, which over-states it.
      pr_auc=_number(skm.average_precision_score(labels, scores)),
      # The first ROC threshold is +inf (no example predicted positive): null in JSON.
      roc_curve=_thinned({"fpr": fpr, "tpr": tpr, "thresholds": roc_thresholds}),
      # precision/recall have one point more than thresholds: recall 0, precision 1, no threshold.
      pr_curve=_thinned({"precision": precision, "recall": recall, "thresholds": pr_thresholds}))
  # F1 at each threshold the data offers (the curve's points above), the best one reported.
  p, r = precision[:-1], recall[:-1]
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
  best = int(np.argmax(f1))
  result["best_f1"] = _threshold_row(labels, (scores >= pr_thresholds[best]).astype(np.int64),
                                     pr_thresholds[best])
  return result


def _thinned(curve: dict, max_points: int = MAX_CURVE_POINTS) -> dict:
  """The curve's arrays as JSON lists, at most max_points of each, both ends kept.

  Evenly spaced in point order, which follows the sorted scores: a point every n / max_points
  examples' worth of thresholds. A shorter array (PR thresholds) keeps the same indices.
  """
  length = max(len(values) for values in curve.values())
  if length <= max_points:
    return {name: _numbers(values) for name, values in curve.items()}
  kept = np.unique(np.linspace(0, length - 1, max_points).round().astype(np.int64))
  return {name: _numbers(np.asarray(values)[kept[kept < len(values)]])
          for name, values in curve.items()}


def misclassified(labels, probabilities, class_names: Sequence[str], paths: Sequence[str]) -> list:
  """The wrongly predicted examples, most confident first (ties: by path).

  [{"path", "true_class", "predicted_class", "confidence" (the predicted class's probability),
    "true_class_probability"}].
  """
  labels, probabilities = check_inputs(labels, probabilities, class_names)
  if len(paths) != labels.size:
    raise ValueError(f"{len(paths)} paths for {labels.size} examples.")
  predicted = predicted_classes(probabilities)
  rows = []
  for index in np.flatnonzero(predicted != labels):
    rows.append({"path": paths[index], "true_class": class_names[labels[index]],
                 "predicted_class": class_names[predicted[index]],
                 "confidence": float(probabilities[index, predicted[index]]),
                 "true_class_probability": float(probabilities[index, labels[index]])})
  return sorted(rows, key=lambda row: (-row["confidence"], row["path"]))
