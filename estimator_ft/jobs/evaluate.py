"""`estimator-ft evaluate`: the report a person reads before shipping a model.

The model: a checkpoint of a training model_dir (either path; `latest`, `best` or a path), or an
exported SavedModel. The data: an image folder of the model's classes (by default the run's own
validation folder). Predictions go through the pipeline the model was validated with - a
checkpoint through data/pipeline.make_dataset(split, config, "predict") and the run's own graph
(Estimator) or model (Keras), a SavedModel through its `serving_default` signature on the encoded
files, which decodes and preprocesses with the same functions (export.py) - so a checkpoint and
its export give the same numbers.

The statistics are reports/metrics.py's pure function of (labels, probabilities, class names);
this job only gathers the predictions and writes, in --output_dir:

  report.json         everything: model, data, every statistic, what training recorded for these
                      weights, the most confident mistakes
  per_class.csv       precision, recall, F1 and support per class
  misclassified.csv   every wrongly classified image, most confident first
  confusion_matrix.png, reliability.png, roc_pr.png (two classes)
"""

import csv
import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from estimator_ft import contract
from estimator_ft import estimator as estimator_path
from estimator_ft import export as export_lib
from estimator_ft import files
from estimator_ft import image_formats
from estimator_ft import keras_path
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import serving
from estimator_ft.config import Config
from estimator_ft.data import folders
from estimator_ft.data import pipeline
from estimator_ft.reports import metrics as metrics_lib
from estimator_ft.reports import plots
from estimator_ft.run import events
from estimator_ft.run import model_dir as model_dir_lib

logger = logging.getLogger("estimator_ft")

REPORT_JSON = "report.json"
PER_CLASS_CSV = "per_class.csv"
MISCLASSIFIED_CSV = "misclassified.csv"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
ROC_PR_PNG = "roc_pr.png"
CHECKPOINT_CHOICES = ("latest", "best")
# The mistakes listed in report.json and on the terminal (misclassified.csv has all of them).
REPORTED_MISTAKES = 10
SHOWN_MISTAKES = 5


@dataclasses.dataclass(frozen=True)
class Model:
  """The weights to evaluate and what is known about them."""
  kind: str                 # "checkpoint" or "saved_model"
  path: str                 # the checkpoint prefix or the SavedModel version folder
  class_names: tuple
  image_size: int
  training_path: str        # "estimator", "keras" or "" (unknown)
  global_step: Optional[int]
  model_dir: str = ""       # the training model_dir, when known
  config: Optional[Config] = None  # the run's configuration (checkpoints)
  validation_dir: str = ""  # the run's validation folder, when known
  recorded: Optional[dict] = None  # what training measured for these weights on validation_dir
  # The run's --max_image_pixels: its graphs refuse larger images, so the scan must too.
  max_image_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS

  def describe(self) -> dict:
    return {"kind": self.kind, "path": self.path, "training_path": self.training_path or None,
            "global_step": self.global_step, "model_dir": self.model_dir or None,
            "class_names": list(self.class_names), "image_size": self.image_size}


# ---------------------------------------------------------------- which model

def _run_record(model_dir: str, flag: str = "--model_dir") -> dict:
  record = model_dir_lib.read_run_config(model_dir)
  if record is None:
    raise ValueError(f"{flag}={model_dir} has no {model_dir_lib.CONFIG_FILE}: it is not a "
                     "model_dir written by `estimator-ft train`. Give a training model_dir, or "
                     "--saved_model=DIR for an exported model.")
  return record


def _checkpoint_exists(prefix: str) -> bool:
  return os.path.exists(prefix + ".index")


def _listed_checkpoints(model_dir: str) -> list:
  state = tf.train.get_checkpoint_state(model_dir)
  return [os.path.basename(p) for p in state.all_model_checkpoint_paths] if state else []


def _recorded_for_checkpoint(config: Config, model_dir: str, step) -> Optional[dict]:
  """What training measured on its validation data for the checkpoint of `step`, if it did."""
  if step is None:
    return None
  if config.path == "keras":
    for entry in model_dir_lib.read_history(model_dir, model_dir_lib.KERAS_HISTORY_FILE):
      if entry.get("step") == step and "val_accuracy" in entry:
        return {"accuracy": entry["val_accuracy"], "loss": entry.get("val_loss"),
                "source": os.path.join(model_dir, model_dir_lib.KERAS_HISTORY_FILE)}
    return None
  evaluation = events.scalars_by_step(os.path.join(model_dir, estimator_path.EVAL_DIR)).get(step)
  if not evaluation or "accuracy" not in evaluation:
    return None
  return {"accuracy": evaluation["accuracy"], "loss": evaluation.get(model_fn_lib.EXAMPLE_LOSS),
          "source": os.path.join(model_dir, estimator_path.EVAL_DIR)}


def _best_export(model_dir: str) -> Optional[str]:
  return serving.newest_version(os.path.join(model_dir, export_lib.EXPORT_DIR,
                                             export_lib.BEST_EXPORTER))


def checkpoint_model(model_dir: str, checkpoint: str = "latest") -> Model:
  """The checkpoint of a training model_dir: `latest`, `best` (the one export/best holds) or a path.

  `best` whose checkpoint was since deleted (--keep_checkpoint_max) is evaluated through its
  SavedModel in export/best: the same weights.
  """
  record = _run_record(model_dir)
  class_names = tuple(record["class_names"])
  # The model_dir may have moved since training; a distribution strategy plays no part here.
  config = Config.from_dict(record["config"]).replace(model_dir=model_dir, distribution="none",
                                                      cache=False)
  checkpoint = checkpoint or "latest"
  if checkpoint == "latest":
    path = tf.train.latest_checkpoint(model_dir)
    if path is None:
      raise ValueError(f"--model_dir={model_dir} holds no checkpoint yet: train first, or give "
                       "--saved_model=DIR.")
  elif checkpoint == "best":
    if config.path == "keras":
      raise ValueError(f"--checkpoint=best: --model_dir={model_dir} is a Keras-path run, which "
                       "keeps no best model (it checkpoints every epoch end). Use "
                       "--checkpoint=latest or --checkpoint=PATH (one of: "
                       f"{', '.join(_listed_checkpoints(model_dir)) or 'none'}).")
    best = _best_export(model_dir)
    if best is None:
      raise ValueError(f"--checkpoint=best: {model_dir} has no export/best version (was it trained "
                       "with --noexport_during_training?). Use --checkpoint=latest or a "
                       "checkpoint path.")
    recorded_path = export_lib.read_export_info(best).get("checkpoint") or ""
    path = os.path.join(model_dir, os.path.basename(recorded_path))
    if not recorded_path or not _checkpoint_exists(path):
      logger.info("The best checkpoint (%s) is no longer in %s; evaluating its SavedModel %s, "
                  "which holds the same weights.", os.path.basename(recorded_path) or "unknown",
                  model_dir, best)
      return saved_model_model(best)
  else:
    candidates = [checkpoint, os.path.join(model_dir, checkpoint)]
    found = [c for c in candidates if _checkpoint_exists(c)]
    if not found:
      raise ValueError(f"--checkpoint={checkpoint} is not a checkpoint of {model_dir} (no "
                       f"{checkpoint}.index). Use latest, best, or one of: "
                       f"{', '.join(_listed_checkpoints(model_dir)) or 'none'}.")
    path = found[0]
  step = export_lib.checkpoint_step(path)
  return Model(kind="checkpoint", path=path, class_names=class_names,
               image_size=config.image_size, training_path=config.path, global_step=step,
               model_dir=model_dir, config=config, validation_dir=config.validation_dir,
               recorded=_recorded_for_checkpoint(config, model_dir, step),
               max_image_pixels=config.max_image_pixels)


def saved_model_model(saved_model: str) -> Model:
  """An exported SavedModel (a version folder, or an export base: its newest version)."""
  path = serving.resolve_saved_model(saved_model)
  info = export_lib.read_export_info(path)
  if not info.get("class_names") or not info.get("image_size"):
    raise ValueError(f"--saved_model={saved_model}: {path} has no {export_lib.EXPORT_INFO_FILE} "
                     "with class names and image size, so it was not exported by estimator_ft. "
                     "Export one with `estimator-ft export --model_dir=MODEL_DIR`.")
  # MODEL_DIR/export/<exporter>/<version>: the training run it came from, when it is still there.
  export_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  model_dir = os.path.dirname(export_root)
  record = (model_dir_lib.read_run_config(model_dir)
            if os.path.basename(export_root) == export_lib.EXPORT_DIR else None)
  recorded = None
  metrics = info.get("metrics") or {}
  if "accuracy" in metrics:
    recorded = {"accuracy": metrics["accuracy"],
                "loss": metrics.get(model_fn_lib.EXAMPLE_LOSS, metrics.get("loss")),
                "source": os.path.join(path, export_lib.EXPORT_INFO_FILE)}
  return Model(kind="saved_model", path=path, class_names=tuple(info["class_names"]),
               image_size=int(info["image_size"]), training_path=info.get("path", ""),
               global_step=info.get("global_step"), model_dir=model_dir if record else "",
               validation_dir=(record or {}).get("config", {}).get("validation_dir", ""),
               recorded=recorded,
               # Exports from before the limit was recorded used the default.
               max_image_pixels=int(info.get(contract.MAX_IMAGE_PIXELS_INFO)
                                    or image_formats.DEFAULT_MAX_IMAGE_PIXELS))


def resolve_model(model_dir: str = "", checkpoint: str = "latest", saved_model: str = "") -> Model:
  if bool(model_dir) == bool(saved_model):
    raise ValueError("Give either --model_dir=DIR (a training run; --checkpoint=latest|best|PATH "
                     "picks its weights) or --saved_model=DIR (an exported model), not "
                     f"{'both' if model_dir else 'neither'}.")
  if saved_model:
    if checkpoint not in ("", "latest"):
      raise ValueError("--checkpoint applies to --model_dir; a --saved_model holds one set of "
                       "weights.")
    return saved_model_model(saved_model)
  return checkpoint_model(model_dir, checkpoint)


# ---------------------------------------------------------------- which data

def load_folder(folder: str, class_names: Sequence[str], bad_images: str = "fail",
                max_image_pixels: int = image_formats.DEFAULT_MAX_IMAGE_PIXELS):
  """(split labelled with the model's class indices, [missing class names]).

  A class folder the model does not know is refused: its images have no right answer. A class
  of the model without a folder is reported with zero support. An image over the model's pixel
  limit is a bad file (named before any prediction, skipped under bad_images="skip"), not a
  failed batch hours in.
  """
  split = folders.scan_image_folder(folder, "validation", bad_images, job="evaluate",
                                    max_image_pixels=max_image_pixels)
  class_names = tuple(class_names)
  unknown = [name for name in split.class_names if name not in class_names]
  if unknown:
    raise ValueError(
        f"--validation_dir={folder} has class folder(s) the model does not know: "
        f"{', '.join(unknown)}. The model's classes are {', '.join(class_names)}: remove or "
        "rename those folders, or evaluate a model trained on them.")
  missing = [name for name in class_names if name not in split.class_names]
  if missing:
    logger.warning("--validation_dir=%s has no folder for the model's class(es) %s: they are "
                   "reported with zero support.", folder, ", ".join(missing))
  index = {name: i for i, name in enumerate(class_names)}
  labels = tuple(index[split.class_names[label]] for label in split.labels)
  return dataclasses.replace(split, class_names=class_names, labels=labels), missing


# ---------------------------------------------------------------- predictions

def predict_probabilities(model: Model, split, batch_size: int = 32) -> np.ndarray:
  """float32 [n, C] class probabilities of every image of `split`, in its order."""
  if model.kind == "saved_model":
    return _predict_saved_model(model, split, batch_size)
  config = model.config.replace(batch_size=batch_size)
  num_classes = len(model.class_names)
  if model.training_path == "keras":
    keras_model = keras_path.restored_model(config, num_classes, model.path)
    outputs = keras_model.predict(pipeline.make_dataset(split, config, "predict"), verbose=0)
    return model_fn_lib.class_probabilities(tf.constant(outputs), num_classes).numpy()
  # steps_per_epoch only shapes the training schedule, which a PREDICT graph does not contain.
  estimator = estimator_path.make_estimator(config, model.class_names, steps_per_epoch=1)
  batches = estimator.predict(pipeline.make_input_fn(split, config, "predict"),
                              predict_keys=[contract.PROBABILITIES], checkpoint_path=model.path,
                              yield_single_examples=False)
  return np.concatenate([batch[contract.PROBABILITIES] for batch in batches])


def _predict_saved_model(model: Model, split, batch_size: int) -> np.ndarray:
  predictor = serving.Predictor(model.path)
  chunks = []
  for start in range(0, split.num_examples, batch_size):
    encoded = []
    for path in split.paths[start:start + batch_size]:
      with open(path, "rb") as f:
        encoded.append(f.read())
    outputs = predictor.predict_bytes(encoded)
    names = tuple(name.decode("utf-8") for name in outputs[contract.ALL_CLASS_NAMES][0])
    if names != model.class_names:
      raise ValueError(f"{model.path} labels its outputs {list(names)}, but its "
                       f"{export_lib.EXPORT_INFO_FILE} says {list(model.class_names)}: the "
                       "export is inconsistent; export it again.")
    chunks.append(outputs[contract.PROBABILITIES])
  return np.concatenate(chunks)


# ---------------------------------------------------------------- the job

def run_evaluate(output_dir: str, validation_dir: str = "", model_dir: str = "",
                 checkpoint: str = "latest", saved_model: str = "", bad_images: str = "fail",
                 batch_size: int = 32,
                 thresholds: Sequence[float] = metrics_lib.DEFAULT_THRESHOLDS,
                 calibration_bins: int = metrics_lib.DEFAULT_CALIBRATION_BINS) -> dict:
  """Evaluates one model on one folder; writes the report files into output_dir; returns report.json's dict."""
  if not output_dir:
    raise ValueError("--output_dir is required: the folder for report.json, the CSV files and "
                     "the plots.")
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be at least 1.")
  if calibration_bins < 1:
    raise ValueError(f"--calibration_bins={calibration_bins} must be at least 1 (10 is usual).")
  for threshold in thresholds:
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"--thresholds: {threshold} is not a probability; use values in [0, 1].")
  model = resolve_model(model_dir, checkpoint, saved_model)
  folder = validation_dir or model.validation_dir
  if not folder:
    source = ("with --saved_model" if model.kind == "saved_model"
              else "here: the run trained on TFDS, not on a folder")
    raise ValueError(f"--validation_dir is required {source}: give the image folder to evaluate "
                     "on (one sub-folder per class of the model).")
  if not validation_dir:
    logger.info("Evaluating on the run's validation folder %s (--validation_dir picks another).",
                folder)
  split, missing = load_folder(folder, model.class_names, bad_images, model.max_image_pixels)
  model_dir_lib.ensure_writable_dir(
      output_dir, "--output_dir",
      local_only="the report's CSV files and plots are written with local-file calls")
  logger.info("Predicting %d images with %s", split.num_examples, model.path)
  probabilities = predict_probabilities(model, split, batch_size)
  labels = np.asarray(split.labels, np.int64)
  statistics = metrics_lib.classification_report(labels, probabilities, model.class_names,
                                                 thresholds, calibration_bins)
  mistakes = metrics_lib.misclassified(labels, probabilities, model.class_names, split.paths)
  same_folder = bool(model.validation_dir) and (
      os.path.realpath(folder) == os.path.realpath(model.validation_dir))
  recorded = dict(model.recorded, on_this_folder=same_folder) if model.recorded else None
  paths = {name: os.path.join(output_dir, name) for name in (
      REPORT_JSON, PER_CLASS_CSV, MISCLASSIFIED_CSV, CONFUSION_MATRIX_PNG, RELIABILITY_PNG)}
  if statistics["binary"] is not None:
    paths[ROC_PR_PNG] = os.path.join(output_dir, ROC_PR_PNG)
  report = {
      "model": model.describe(),
      "data": {"folder": os.path.abspath(folder), "examples": split.num_examples,
               "class_folders": sorted(set(model.class_names) - set(missing)),
               "missing_classes": missing,
               "skipped_images": [{"path": p, "reason": r} for p, r in split.skipped]},
      "metrics": statistics,
      "training_recorded": recorded,
      "misclassified": {"count": len(mistakes), "most_confident": mistakes[:REPORTED_MISTAKES]},
      "files": paths,
  }
  _write_outputs(report, mistakes, paths)
  return report


def _write_outputs(report: dict, mistakes: list, paths: dict) -> None:
  statistics = report["metrics"]
  files.write_json_atomic(paths[REPORT_JSON], report)
  with files.atomic_write(paths[PER_CLASS_CSV], newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("class", "precision", "recall", "f1", "support"))
    for row in statistics["per_class"]:
      writer.writerow([row["class"]] + [_csv(row[k]) for k in ("precision", "recall", "f1")]
                      + [row["support"]])
  with files.atomic_write(paths[MISCLASSIFIED_CSV], newline="") as f:
    columns = ("path", "true_class", "predicted_class", "confidence", "true_class_probability")
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in mistakes:
      writer.writerow([row[c] for c in columns])
  plots.save_png(plots.confusion_matrix_figure(statistics["confusion_matrix"]["counts"],
                                               statistics["class_names"]),
                 paths[CONFUSION_MATRIX_PNG])
  plots.save_png(plots.reliability_figure(statistics["calibration"]), paths[RELIABILITY_PNG])
  if ROC_PR_PNG in paths:
    plots.save_png(plots.roc_pr_figure(statistics["binary"]), paths[ROC_PR_PNG])


def _csv(value) -> str:
  return "" if value is None else repr(float(value))


# ---------------------------------------------------------------- the terminal summary

def _figure(value, width: int = 9) -> str:
  return f"{'-' if value is None else f'{value:.4f}':>{width}}"


def format_report(report: dict) -> str:
  """The short table printed after an evaluation."""
  model, data, statistics = report["model"], report["data"], report["metrics"]
  step = f", step {model['global_step']}" if model["global_step"] is not None else ""
  trained = f" ({model['training_path']} path{step})" if model["training_path"] else ""
  lines = ["", f"Evaluation of {model['path']}{trained}",
           f"  on {data['folder']}: {data['examples']} images, {len(statistics['class_names'])} "
           "classes"]
  if data["missing_classes"]:
    lines.append(f"  no images of: {', '.join(data['missing_classes'])} (zero support)")
  if data["skipped_images"]:
    lines.append(f"  skipped {len(data['skipped_images'])} unreadable image(s) (listed in "
                 "report.json)")
  top_k = "".join(f"   top-{k} {v:.4f}" for k, v in statistics["top_k_accuracy"].items())
  lines.append(f"  accuracy {statistics['accuracy']:.4f}   log loss {statistics['log_loss']:.4f}"
               f"{top_k}")
  recorded = report.get("training_recorded")
  if recorded:
    where = "on this folder" if recorded["on_this_folder"] else "on its validation folder"
    loss = f", loss {recorded['loss']:.4f}" if recorded.get("loss") is not None else ""
    lines.append(f"  training recorded for these weights {where}: accuracy "
                 f"{recorded['accuracy']:.4f}{loss}")
  width = max([len("weighted avg")] + [len(name) for name in statistics["class_names"]])
  lines += ["", f"  {'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
  for row in statistics["per_class"]:
    lines.append(f"  {row['class']:<{width}} {_figure(row['precision'])} {_figure(row['recall'])} "
                 f"{_figure(row['f1'])} {row['support']:>8}")
  for name, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
    row = statistics[key]
    lines.append(f"  {name:<{width}} {_figure(row['precision'])} {_figure(row['recall'])} "
                 f"{_figure(row['f1'])} {row['support']:>8}")
  binary = statistics["binary"]
  if binary is not None:
    lines.append("")
    if binary["roc_auc"] is None:
      lines.append(f"  {binary['note']}")
    else:
      best = binary["best_f1"]
      lines.append(f"  positive class {binary['positive_class']}: ROC AUC {binary['roc_auc']:.4f}, "
                   f"PR AUC (average precision) {binary['pr_auc']:.4f}; best F1 {best['f1']:.4f} "
                   f"at threshold {best['threshold']:.4g} (precision {best['precision']:.4f}, "
                   f"recall {best['recall']:.4f})")
  calibration = statistics["calibration"]
  lines.append(f"  calibration: ECE {calibration['expected_calibration_error']:.4f} over "
               f"{len(calibration['bins'])} bins (mean confidence "
               f"{calibration['mean_confidence']:.4f}, accuracy {calibration['accuracy']:.4f})")
  mistakes = report["misclassified"]
  lines += ["", f"  misclassified: {mistakes['count']} of {data['examples']}"
            + (", most confident first:" if mistakes["count"] else "")]
  for row in mistakes["most_confident"][:SHOWN_MISTAKES]:
    lines.append(f"    {row['confidence']:.3f}  {row['true_class']} -> {row['predicted_class']}  "
                 f"{row['path']}")
  folder = os.path.dirname(report["files"][REPORT_JSON])
  lines += ["", f"Written in {folder}: " + ", ".join(os.path.basename(p) for p in report["files"].values())]
  return "\n".join(lines)
