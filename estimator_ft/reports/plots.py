"""Figures of a classification report, drawn with matplotlib's object-oriented API (no pyplot).

Each function takes the JSON-ready statistics of reports.metrics and returns a `Figure`;
`png_bytes` and `save_png` render one. The confusion heat map is also what each evaluation of
either training path draws into TensorBoard.
"""

import io
import math

import numpy as np
# The object-oriented API: no pyplot, so no GUI backend is chosen or needed.
from matplotlib.figure import Figure

from estimator_ft import files

# Above this many classes the cells of the heat map carry no numbers (they would be illegible).
MAX_ANNOTATED_CLASSES = 20
DPI = 100


def png_bytes(figure: Figure, dpi: int = DPI) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi)
  return buffer.getvalue()


def save_png(figure: Figure, path: str, dpi: int = DPI) -> None:
  """Writes the figure as a PNG atomically (a reader never sees half an image)."""
  with files.atomic_write(path, "wb") as f:
    figure.savefig(f, format="png", dpi=dpi)


def confusion_matrix_figure(counts, class_names, title: str = "Confusion matrix") -> Figure:
  """Heat map of the row-normalised confusion matrix; each cell: its count and % of the true class.

  Rows are true classes (with their number of examples), columns predicted classes.
  """
  counts = np.asarray(counts, np.int64)
  class_names = list(class_names)
  num_classes = len(class_names)
  totals = counts.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    normalized = np.where(totals[:, None] > 0, counts / np.maximum(totals[:, None], 1), 0.0)
  side = min(4.0 + 0.55 * num_classes, 30.0)
  figure = Figure(figsize=(side + 1.5, side))
  axis = figure.subplots()
  image = axis.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  colorbar = figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
  colorbar.set_label("fraction of the true class")
  axis.set_xticks(range(num_classes))
  axis.set_yticks(range(num_classes))
  axis.set_xticklabels(class_names, rotation=45 if num_classes > 3 else 0,
                       ha="right" if num_classes > 3 else "center")
  axis.set_yticklabels([f"{name} (n={total})" for name, total in zip(class_names, totals)])
  axis.set_xlabel("predicted class")
  axis.set_ylabel("true class")
  if num_classes <= MAX_ANNOTATED_CLASSES:
    for row in range(num_classes):
      for column in range(num_classes):
        share = f"{100 * normalized[row, column]:.0f}%" if totals[row] else "-"
        axis.text(column, row, f"{counts[row, column]}\n{share}", ha="center", va="center",
                  fontsize=9 if num_classes <= 10 else 7,
                  color="white" if normalized[row, column] > 0.5 else "black")
  accuracy = np.trace(counts) / max(counts.sum(), 1)
  axis.set_title(f"{title}: {counts.sum()} examples, accuracy {accuracy:.3f}\n"
                 "rows: true class (% of the row), columns: predicted class", fontsize=10)
  figure.tight_layout()
  return figure


def roc_pr_figure(binary: dict) -> Figure:
  """ROC and precision-recall curves of a two-class report, the F1-best and 0.5 thresholds marked."""
  figure = Figure(figsize=(12, 5.5))
  roc_axis, pr_axis = figure.subplots(1, 2)
  positive = binary["positive_class"]
  if binary.get("roc_curve"):
    roc = binary["roc_curve"]
    roc_axis.plot(roc["fpr"], roc["tpr"], color="tab:blue", linewidth=2,
                  label=f"ROC, AUC {binary['roc_auc']:.3f}")
    pr = binary["pr_curve"]
    pr_axis.step(pr["recall"], pr["precision"], where="post", color="tab:orange", linewidth=2,
                 label=f"precision-recall, average precision {binary['pr_auc']:.3f}")
  else:
    for axis in (roc_axis, pr_axis):
      axis.text(0.5, 0.5, binary.get("note") or "undefined", ha="center", va="center", wrap=True)
  roc_axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
  total = binary["positives"] + binary["negatives"]
  prevalence = binary["positives"] / total if total else math.nan
  pr_axis.axhline(prevalence, linestyle=":", color="grey",
                  label=f"chance (share of positives {prevalence:.2f})")
  marks = [("F1-best", binary.get("best_f1"), "tab:red")]
  half = [row for row in binary["thresholds"] if row["threshold"] == 0.5]
  marks.append(("0.5", half[0] if half else None, "tab:green"))
  for name, row, colour in marks:
    if row is None or row["recall"] is None:
      continue
    negatives = row["false_positives"] + row["true_negatives"]
    fpr = row["false_positives"] / negatives if negatives else math.nan
    label = f"threshold {row['threshold']:.3g} ({name}): F1 {row['f1'] or 0:.3f}"
    roc_axis.plot([fpr], [row["recall"]], "o", color=colour, markersize=8, label=label)
    if row["precision"] is not None:
      pr_axis.plot([row["recall"]], [row["precision"]], "o", color=colour, markersize=8, label=label)
  roc_axis.set_xlabel("false positive rate")
  roc_axis.set_ylabel(f"true positive rate (recall of {positive})")
  roc_axis.set_title("ROC curve")
  pr_axis.set_xlabel(f"recall of {positive}")
  pr_axis.set_ylabel(f"precision of {positive}")
  pr_axis.set_title("Precision-recall curve")
  for axis in (roc_axis, pr_axis):
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right" if axis is roc_axis else "lower left", fontsize=8)
  figure.suptitle(f"Positive class: {positive} ({binary['positives']} positive, "
                  f"{binary['negatives']} negative examples); predicted positive when "
                  "p(positive) >= threshold", fontsize=10)
  figure.tight_layout(rect=(0, 0, 1, 0.95))
  return figure


def reliability_figure(calibration: dict) -> Figure:
  """Reliability diagram: accuracy per confidence bin against the diagonal; counts below."""
  figure = Figure(figsize=(6.5, 7))
  top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
  bins = calibration["bins"]
  lowers = [b["lower"] for b in bins]
  widths = [b["upper"] - b["lower"] for b in bins]
  filled = [b for b in bins if b["count"]]
  top.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled],
          width=[b["upper"] - b["lower"] for b in filled], align="edge", color="tab:blue",
          edgecolor="black", alpha=0.8, label="accuracy in the bin")
  top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o",
           color="tab:red", markersize=5, label="(mean confidence, accuracy)")
  top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
  top.set_ylim(0, 1.02)
  top.set_ylabel("accuracy")
  top.grid(alpha=0.3)
  top.legend(loc="upper left", fontsize=8)
  top.set_title(f"Reliability diagram: ECE {calibration['expected_calibration_error']:.3f}, "
                f"max gap {calibration['max_calibration_error']:.3f}\n"
                f"mean confidence {calibration['mean_confidence']:.3f}, accuracy "
                f"{calibration['accuracy']:.3f} ({len(bins)} equal-width bins)", fontsize=10)
  bottom.bar(lowers, [b["count"] for b in bins], width=widths, align="edge", color="grey",
             edgecolor="black")
  bottom.set_xlim(0, 1)
  bottom.set_xlabel("confidence (probability of the predicted class)")
  bottom.set_ylabel("examples")
  bottom.grid(alpha=0.3)
  figure.tight_layout()
  return figure
