"""`estimator-ft compare`: keras vs estimator vs the naive loop, same start, same batches.

Each path trains into `<output_dir>/<path>/` through the train job (so each is an ordinary,
resumable model_dir with its own results.json), starting from one initial-weights checkpoint
written once in `<output_dir>/initial_weights/`, on the same batches in the same order.
The comparison then reads what the runs recorded and writes comparison.json/.csv/.png;
comparison.json also says what it ran on (class names, images per split and class). In
TensorBoard (`--logdir <output_dir>`) each path is one run, its model_dir, and the paths share
the common tags of run/summaries.py at the global step, so they overlay in the same cards.

Which figures mean what (the original question mixed them up):
  loss, accuracy          training, running averages over the epoch while the weights change -
                          what Keras' progress bar shows
  val_loss, val_accuracy  one full pass over the validation set in inference mode, per example
"""

import csv
import logging
import math
import os

import numpy as np
import tensorflow as tf
# The object-oriented API: no pyplot, so no GUI backend is chosen or needed.
from matplotlib.figure import Figure

from estimator_ft import files
from estimator_ft import keras_path
from estimator_ft import model as model_lib
from estimator_ft import storage
from estimator_ft.config import Config
from estimator_ft.data import loading
from estimator_ft.jobs import train as train_job
from estimator_ft.run import model_dir as model_dir_lib

logger = logging.getLogger("estimator_ft")

# path name -> the Config fields that make it that path.
PATH_SETTINGS = {
    "keras": {"path": "keras", "update_ops": "apply"},
    "estimator": {"path": "estimator", "update_ops": "apply"},
    "naive": {"path": "estimator", "update_ops": "skip"},
}
PATH_DESCRIPTIONS = {
    "keras": "Keras model.fit",
    "estimator": "Estimator model_fn (training flag from the mode, BN updates in the train op)",
    "naive": ("Estimator with --update_ops=skip: the original broken loop (BN statistics never "
              "updated)"),
}
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
METRIC_LABELS = {"loss": "train loss", "accuracy": "train acc", "val_loss": "val loss",
                 "val_accuracy": "val acc"}
TRAINING_NOTE = ("train loss/acc: running averages over each epoch while the weights change "
                 "(what Keras' progress bar shows), not a measurement of the final weights")
VALIDATION_NOTE = ("val loss/acc: one full pass over the validation set in inference mode after "
                   "each epoch, averaged per example")
VALIDATION_HEADING = "Validation: one full pass in inference mode after each epoch, per example"
TRAINING_HEADING = ("Training: running averages over each epoch (Keras' progress bar), not a "
                    "measurement of the final weights")
PATH_COLOURS = {"keras": "tab:blue", "estimator": "tab:orange", "naive": "tab:red"}
# A loss panel whose curves span more than this ratio is drawn on a log scale, so a runaway
# naive validation loss does not flatten the other curves into one line.
LOG_SCALE_RATIO = 10.0

COMPARISON_JSON = "comparison.json"
COMPARISON_CSV = "comparison.csv"
COMPARISON_PNG = "comparison.png"
# Weight groups compared between two final checkpoints.
WEIGHT_GROUPS = ("bn_moving_statistics", "head_weights", "trainable_weights")


def check_paths(paths) -> tuple:
  """The requested paths, validated; raises ValueError saying what is allowed."""
  paths = tuple(p.strip() for p in paths if p.strip())
  unknown = [p for p in paths if p not in PATH_SETTINGS]
  if not paths or unknown:
    raise ValueError(f"--paths={','.join(paths)}: use one or more of {', '.join(PATH_SETTINGS)} "
                     "(comma-separated), e.g. --paths=keras,estimator,naive.")
  if len(set(paths)) != len(paths):
    raise ValueError(f"--paths={','.join(paths)} names a path twice; name each once.")
  return paths


def _in_path_order(names) -> list:
  """PATH_SETTINGS' order (keras, estimator, naive), whatever order a dict or JSON file gave."""
  return [name for name in PATH_SETTINGS if name in names]


def path_config(config: Config, output_dir: str, name: str) -> Config:
  return config.replace(model_dir=os.path.join(output_dir, name), **PATH_SETTINGS[name])


def run_compare(config: Config, output_dir: str, paths) -> dict:
  """Trains each path from the same initial weights; writes and returns the comparison."""
  paths = check_paths(paths)
  model_dir_lib.ensure_writable_dir(
      output_dir, "--output_dir",
      local_only=("the comparison's CSV and plots are written with local-file calls; train "
                  "--model_dir may be on any TensorFlow file system"))
  if config.dropout or config.augment:
    logger.warning("compare with --dropout=%s --augment=%s: random dropout masks and crops differ "
                   "between paths, so keras and estimator will not agree closely. The compare "
                   "defaults (--dropout=0 --noaugment) give parity.", config.dropout,
                   config.augment)
  splits = loading.load_splits(config)
  num_classes = len(splits.class_names)
  initial_weights = os.path.join(output_dir, model_dir_lib.INITIAL_WEIGHTS_PREFIX)
  if not model_lib.initial_weights_exist(initial_weights):
    model_lib.save_initial_weights(config, num_classes, initial_weights, splits.class_names)

  results = {}
  for name in paths:
    logger.info("compare: training the %s path (%s) in %s", name, PATH_DESCRIPTIONS[name],
                os.path.join(output_dir, name))
    results[name] = train_job.run(path_config(config, output_dir, name),
                                 initial_weights=initial_weights)

  comparison = {
      "output_dir": output_dir,
      "data": data_summary(splits),
      "settings": {k: getattr(config, k) for k in (
          "dropout", "augment", "epochs", "batch_size", "image_size", "seed", "weights",
          "fine_tune_from", "optimizer", "learning_rate", "momentum", "batchnorm_momentum",
          "lr_schedule", "warmup_epochs", "lr_decay_epochs", "lr_decay_factor", "label_smoothing",
          "weight_decay", "class_weight", "early_stopping_patience", "early_stopping_min_delta",
          "warm_start_from", "head_epochs", "fine_tune_learning_rate")},
      "notes": {"training": TRAINING_NOTE, "validation": VALIDATION_NOTE},
      "paths": {name: {"description": PATH_DESCRIPTIONS[name], "model_dir": r["model_dir"],
                       "global_step": r["global_step"], "history": r["history"]}
                for name, r in results.items()},
  }
  comparison["max_abs_diff"], comparison["max_rel_diff"] = differences_from_estimator(
      config, output_dir, results, num_classes)
  comparison["files"] = {
      "json": os.path.join(output_dir, COMPARISON_JSON),
      "csv": os.path.join(output_dir, COMPARISON_CSV),
      "png": os.path.join(output_dir, COMPARISON_PNG),
  }
  files.write_json_atomic(comparison["files"]["json"], comparison)
  write_csv(comparison, comparison["files"]["csv"])
  plot(comparison, comparison["files"]["png"])
  return comparison


def _split_counts(split) -> dict:
  """{"examples": n, "per_class": {class: n} (folder sources; None for TFDS, which lists no labels)}."""
  per_class = None
  if split.labels:
    per_class = {name: 0 for name in split.class_names}
    for label in split.labels:
      per_class[split.class_names[label]] += 1
  return {"examples": split.num_examples, "per_class": per_class,
          "skipped_images": len(split.skipped)}


def data_summary(splits) -> dict:
  """What the comparison ran on: the class names (label i is class_names[i]) and each split's counts."""
  return {"class_names": list(splits.class_names),
          "splits": {"train": _split_counts(splits.train),
                     "validation": _split_counts(splits.validation)}}


# ---------------------------------------------------------------- differences

def differences_from_estimator(config: Config, output_dir: str, results: dict, num_classes: int):
  """({"<path>_vs_estimator": largest |difference| per curve and weight group}, {...: relative}).

  keras vs estimator measures parity; naive vs estimator shows what the missing updates cost.
  """
  pairs = [name for name in ("keras", "naive") if name in results and "estimator" in results]
  if not pairs:
    return {}, {}
  layout = weight_layout(config, num_classes)
  final = {name: final_weights(path_config(config, output_dir, name), num_classes, layout)
           for name in pairs + ["estimator"]}
  absolute, relative = {}, {}
  for name in pairs:
    pair = f"{name}_vs_estimator"
    weights_absolute, relative[pair] = weight_differences(final[name], final["estimator"], layout)
    curves = history_differences(results[name]["history"], results["estimator"]["history"])
    absolute[pair] = {**curves, **weights_absolute}
  return absolute, relative


def history_differences(history, reference) -> dict:
  """{metric: largest |difference| over the epochs both histories have}."""
  by_epoch = {h["epoch"]: h for h in reference}
  differences = {}
  for metric in METRICS:
    deltas = [abs(h[metric] - by_epoch[h["epoch"]][metric]) for h in history
              if h["epoch"] in by_epoch and h.get(metric) is not None
              and by_epoch[h["epoch"]].get(metric) is not None]
    differences[metric] = max(deltas) if deltas else None
  return differences


def weight_layout(config: Config, num_classes: int) -> list:
  """[(variable name, trainable)] in `model.weights` order, as the Estimator graph names them."""
  with tf.Graph().as_default():
    reference = model_lib.build_model(config, num_classes)
    trainable = {id(w) for w in reference.trainable_weights}
    return [(w.name.split(":")[0], id(w) in trainable) for w in reference.weights]


def final_weights(run_config: Config, num_classes: int, layout) -> list:
  """The latest checkpoint of one path as numpy arrays, in `model.weights` order."""
  if run_config.path == "keras":
    return keras_path.checkpoint_weights(
        run_config, num_classes, keras_path.latest_checkpoint(run_config.model_dir))
  reader = storage.checkpoint_reader(tf.train.latest_checkpoint(run_config.model_dir))
  return [reader.get_tensor(name) for name, _ in layout]


def _weight_group(name: str, trainable: bool) -> tuple:
  groups = []
  if "moving_" in name:
    groups.append("bn_moving_statistics")
  if name.startswith("head_"):
    groups.append("head_weights")
  if trainable:
    groups.append("trainable_weights")
  return tuple(groups)


def weight_differences(weights_a, weights_b, layout) -> tuple:
  """Largest absolute and relative differences between two lists of final weights, per group.

  Relative: per tensor, max |a - b| over max |b| (robust to entries near zero), then the max.
  """
  absolute = {group: 0.0 for group in WEIGHT_GROUPS}
  relative = {group: 0.0 for group in WEIGHT_GROUPS}
  for (name, trainable), a, b in zip(layout, weights_a, weights_b):
    delta = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    scale = float(np.max(np.abs(b)))
    for group in _weight_group(name, trainable):
      absolute[group] = max(absolute[group], delta)
      relative[group] = max(relative[group], delta / scale if scale > 0 else delta)
  return absolute, relative


# ---------------------------------------------------------------- outputs

def write_csv(comparison: dict, path: str) -> None:
  """One row per (path, epoch): the four figures of the history."""
  with files.atomic_write(path, newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("path", "epoch") + METRICS)
    for name in _in_path_order(comparison["paths"]):
      for entry in comparison["paths"][name]["history"]:
        writer.writerow([name, entry["epoch"]] + [entry.get(m, "") for m in METRICS])


def plot(comparison: dict, path: str) -> None:
  """Writes `comparison_figure` as a PNG."""
  figure = comparison_figure(comparison)
  with files.atomic_write(path, "wb") as f:
    figure.savefig(f, format="png", dpi=100)


def comparison_figure(comparison: dict) -> Figure:
  """Loss and accuracy panels; per path one colour, training dashed, validation solid."""
  figure = Figure(figsize=(12, 5))
  axes = figure.subplots(1, 2)
  for axis, (metric, title) in zip(axes, (("loss", "Loss"), ("accuracy", "Accuracy"))):
    for name in _in_path_order(comparison["paths"]):
      run = comparison["paths"][name]
      epochs = [h["epoch"] for h in run["history"]]
      # Keras is drawn wide and pale under the others: where the paths agree it shows as a halo.
      underneath = name == "keras"
      style = dict(color=PATH_COLOURS[name], linewidth=5 if underneath else 1.8,
                   alpha=0.45 if underneath else 1.0, marker="o", markersize=8 if underneath else 4,
                   zorder=1 if underneath else 2)
      axis.plot(epochs, [h.get(f"val_{metric}", math.nan) for h in run["history"]], linestyle="-",
                label=f"{name}: validation (full pass)", **style)
      axis.plot(epochs, [h.get(metric, math.nan) for h in run["history"]], linestyle="--",
                label=f"{name}: training (running average)", **style)
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.set_ylabel(title.lower())
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(alpha=0.3)
    if metric == "accuracy":
      axis.set_ylim(-0.02, 1.02)
    elif _spans_orders_of_magnitude(axis):
      axis.set_yscale("log")
      axis.set_ylabel("loss (log scale)")
  handles, labels = axes[0].get_legend_handles_labels()
  # Below the panels, so no curve is ever hidden behind it.
  figure.legend(handles, labels, loc="lower center", ncol=len(comparison["paths"]), fontsize=9,
                frameon=False, bbox_to_anchor=(0.5, 0.04))
  settings = comparison["settings"]
  augmentation = "on" if settings["augment"] else "off"
  figure.suptitle(f"{' vs '.join(_in_path_order(comparison['paths']))}: same initial weights, "
                  f"same batches (dropout {settings['dropout']}, augmentation {augmentation})")
  figure.text(0.5, 0.01, "solid: validation, one full pass in inference mode   |   dashed: "
              "training, running average over the epoch (Keras' progress bar)", ha="center",
              fontsize=9)
  figure.tight_layout(rect=(0, 0.16, 1, 0.95))
  return figure


def _spans_orders_of_magnitude(axis) -> bool:
  values = np.concatenate([np.asarray(line.get_ydata(), float) for line in axis.get_lines()])
  values = values[np.isfinite(values)]
  return values.size > 0 and values.min() > 0 and values.max() / values.min() > LOG_SCALE_RATIO


def _format_number(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.4f}"


def _side_by_side(comparison: dict, metrics, heading: str) -> list:
  names = _in_path_order(comparison["paths"])
  width = max(10, max(len(n) for n in names) + 1)
  block = width * len(names)
  lines = [heading,
           "epoch " + "".join(f"  {METRIC_LABELS[m]:-^{block}}" for m in metrics),
           "      " + "".join("  " + "".join(f"{n:>{width}}" for n in names) for _ in metrics)]
  epochs = sorted({h["epoch"] for run in comparison["paths"].values() for h in run["history"]})
  by_path = {n: {h["epoch"]: h for h in comparison["paths"][n]["history"]} for n in names}
  for epoch in epochs:
    cells = []
    for metric in metrics:
      cells.append("".join(f"{_format_number(by_path[n].get(epoch, {}).get(metric)):>{width}}"
                           for n in names))
    lines.append(f"{epoch:5d} " + "".join(f"  {c}" for c in cells))
  return lines


def format_report(comparison: dict) -> str:
  """The terminal summary: settings, the side-by-side tables, the keras-estimator agreement."""
  settings = comparison["settings"]
  names = _in_path_order(comparison["paths"])
  lines = [
      "",
      f"Comparison of {', '.join(names)} in {comparison['output_dir']}",
      f"  same initial weights, same batches in the same order; dropout {settings['dropout']}, "
      f"augmentation {'on' if settings['augment'] else 'off'} (compare defaults: 0 and off, "
      "which parity needs)",
  ]
  data = comparison.get("data")
  if data:
    splits = data["splits"]
    lines.append(f"  data: {len(data['class_names'])} classes ({', '.join(data['class_names'])}); "
                 f"{splits['train']['examples']} train / {splits['validation']['examples']} "
                 "validation images")
  lines += [f"  {name:10s} {comparison['paths'][name]['description']}" for name in names]
  if "naive" in names and "estimator" in names:
    lines.append("  naive trains exactly like estimator (training normalises with batch "
                 "statistics); only its validation, which uses the never-updated moving "
                 "statistics, departs.")
  lines.append("")
  lines += _side_by_side(comparison, ("val_loss", "val_accuracy"), VALIDATION_HEADING)
  lines.append("")
  lines += _side_by_side(comparison, ("loss", "accuracy"), TRAINING_HEADING)
  for pair, absolute in comparison["max_abs_diff"].items():
    relative = comparison["max_rel_diff"].get(pair, {})
    figures = ", ".join(f"{METRIC_LABELS[m]} {absolute[m]:.2g}" for m in METRICS
                        if absolute.get(m) is not None)
    weights = ", ".join(
        f"{g.replace('_', ' ')} {absolute[g]:.2g} (relative {relative.get(g, 0):.2g})"
        for g in WEIGHT_GROUPS if g in absolute)
    lines += ["", f"{pair.replace('_vs_', ' vs ')}, largest |difference|:", f"  curves:  {figures}",
              f"  weights: {weights}"]
  files = comparison["files"]
  lines += ["", f"Written: {files['json']}, {files['csv']}, {files['png']}",
            f"TensorBoard (all paths overlaid in the train/*, validation/* and learning_rate cards, "
            f"one run per path): tensorboard --logdir {comparison['output_dir']}"]
  return "\n".join(lines)
