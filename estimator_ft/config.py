"""The one configuration object of a run, its defaults, flag help and validation.

Every default and every flag's help text lives here, beside its field (`help` in the field's
metadata, `choices` for enumerations): the CLI defines one flag per field from them, builds one
`Config`, validates it before any TensorFlow work starts, and the run layer writes it into
`model_dir` as config.json. Library code receives a `Config` (never absl flags).

The small `check_*` functions are the validators: `Config.validate` uses them, and so does every
other entry point that takes one of these settings (the data loader, the benchmark plan), so a bad
value gets the same message wherever it comes in.
"""

import dataclasses
import math
import os
from typing import Sequence

from estimator_ft import files
from estimator_ft import image_formats
from estimator_ft import recipes

# ResNet50's native resolution; the smallest it accepts with include_top=False is 32.
RESNET50_NATIVE_IMAGE_SIZE = 224
RESNET50_MIN_IMAGE_SIZE = 32

OPTIMIZERS = ("momentum", "adam")
LR_SCHEDULES = recipes.LR_SCHEDULES
BAD_IMAGE_POLICIES = ("fail", "skip")
UPDATE_OPS_MODES = ("apply", "skip")
PATHS = ("estimator", "keras")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker_mirrored")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
EXPORT_METRICS = ("loss", "accuracy", "auc")
# TFLite weight/activation quantization (export_tflite.py): none = float32, dynamic = int8 weights
# with float activations, float16 = float16 weights, int8 = full integer, calibrated on training
# images.
TFLITE_QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
# What `estimator-ft export --format` writes.
EXPORT_FORMATS = ("saved_model", "tflite")

# Fields that change what a checkpoint in model_dir means. Resuming with any of them changed
# would silently mix two different runs, so it is refused (see run.model_dir.check_resumable). The
# optimizer's hyperparameters are among them because both paths checkpoint them as variables: a
# resumed run would silently keep the old learning rate and momentum.
CHECKPOINT_DEFINING_FIELDS = (
    "path", "image_size", "fine_tune_from", "optimizer", "precision", "dropout", "lr_schedule",
    "learning_rate", "momentum", "warmup_epochs", "lr_decay_epochs", "lr_decay_factor",
    "label_smoothing", "weight_decay", "class_weight", "warm_start_from", "head_epochs",
    "fine_tune_learning_rate",
)
# Fields whose change on resume depends on the schedule (recipes.resume_changes): refused where
# they would shift it, else applied and stated in the log.
SCHEDULE_DEPENDENT_FIELDS = ("epochs", "batch_size")


def _setting(default, help_text: str, choices: Sequence[str] = ()):
  """A Config field whose flag help (and allowed values) travel with it."""
  metadata = {"help": help_text}
  if choices:
    metadata["choices"] = tuple(choices)
  return dataclasses.field(default=default, metadata=metadata)


# ------------------------------------------------------------------ validators

def check_choice(name: str, value, allowed: Sequence[str], error=ValueError) -> None:
  if value not in allowed:
    raise error(f"--{name}={value!r} is not valid: use one of {', '.join(allowed)}.")


def check_at_least(name: str, value: int, minimum: int, hint: str = "", error=ValueError) -> None:
  if value < minimum:
    raise error(f"--{name}={value} must be at least {minimum}.{' ' + hint if hint else ''}")


def check_image_size(image_size: int, error=ValueError) -> None:
  if image_size < RESNET50_MIN_IMAGE_SIZE:
    raise error(f"--image_size={image_size} is too small: ResNet50 needs at least "
                f"{RESNET50_MIN_IMAGE_SIZE} pixels (it downsamples 32x). Use --image_size=64 for "
                f"quick CPU runs or {RESNET50_NATIVE_IMAGE_SIZE} for ImageNet-like accuracy.")


def check_representative_images(count: int, quantize: str, quantize_flag: str = "quantize",
                                error=ValueError) -> None:
  check_at_least("representative_images", count, 0, error=error)
  if quantize == "int8" and count < 1:
    raise error(f"--{quantize_flag}=int8 calibrates on training images: set "
                "--representative_images to at least 1 (100 is usual), or use "
                f"--{quantize_flag}=dynamic, which needs none.")


@dataclasses.dataclass(frozen=True)
class Config:
  """A fine-tuning run, fully resolved. Construct, then call `validate()`."""

  # Data: either an image folder pair or a TFDS dataset.
  train_dir: str = _setting(
      "", "Training images: one sub-folder per class (<dir>/<class>/*.jpg|png|gif|bmp).")
  validation_dir: str = _setting("", "Validation images, same classes and layout as --train_dir.")
  records_dir: str = _setting(
      "", "Sharded TFRecords written by `estimator-ft prepare` (train-*-of-*.tfrecord, "
      "validation-*, dataset.json) instead of folders; any TensorFlow file system (gs://...).")
  tfds_name: str = _setting(
      "", "TFDS dataset name (e.g. cats_vs_dogs) instead of folders; needs prepared data offline.")
  tfds_data_dir: str = _setting(
      "", "TFDS data_dir holding the prepared dataset (default: TFDS' own default).")
  tfds_train_split: str = _setting("train[:80%]", "TFDS split used for training.")
  tfds_validation_split: str = _setting("train[80%:]", "TFDS split used for validation.")
  tfds_image_key: str = _setting("image", "Feature key of the image in the TFDS dataset.")
  tfds_label_key: str = _setting("label", "Feature key of the class label in the TFDS dataset.")
  image_size: int = _setting(
      RESNET50_NATIVE_IMAGE_SIZE,
      "Square input size in pixels (>= 32; 224 is ResNet50's native size, 64 is quick on CPU).")
  batch_size: int = _setting(32, "Images per training step.")
  augment: bool = _setting(True, "Random flip and crop/scale while training (never in evaluation).")
  shuffle_buffer: int = _setting(
      1024, "Shuffle buffer of decoded images behind --cache (the file order itself is a full "
      "permutation of the split every epoch, whatever this is); with --records_dir, also the "
      "buffer of encoded records behind the per-epoch shard order (two such blocks in memory: the "
      "next is read ahead).")
  cache: bool = _setting(False, "Cache decoded, resized images in memory (before augmentation).")
  bad_images: str = _setting(
      "fail", "What to do with files that cannot be decoded: fail (list them and stop) or skip them.",
      BAD_IMAGE_POLICIES)
  max_image_pixels: int = _setting(
      image_formats.DEFAULT_MAX_IMAGE_PIXELS,
      "Largest image accepted, in pixels (width x height, x frames for a GIF), read from the file "
      "header before decoding: larger files are bad files in the scan, and are refused by the "
      "exported model. The default is Pillow's decompression-bomb limit (about 9459 x 9459).")
  seed: int = _setting(42, "Seed for initial weights, shuffling, augmentation and dropout.")
  scan_cache_dir: str = _setting(
      "", "Folder for the scan manifests that let a later start re-check only new or changed "
      "image files (default: $XDG_CACHE_HOME/estimator_ft/manifests, else "
      "~/.cache/estimator_ft/manifests).")
  rescan: bool = _setting(
      False, "Test-decode every image file again, ignoring the scan manifest.")

  # Model.
  weights: str = _setting(
      "imagenet", "imagenet (downloaded once by Keras), none (random init, works offline) or PATH.h5.")
  warm_start_from: str = _setting(
      "", "MODEL_DIR or CHECKPOINT of an earlier run (either path): start from its weights, "
      "BatchNorm moving statistics included, instead of --weights; its head too when the classes "
      "are the same, else a fresh head.")
  fine_tune_from: str = _setting(
      "all", "all: train the whole base; none: head only; LAYER_NAME: train from that layer on.")
  head_epochs: int = _setting(
      0, "Two-phase fine-tuning (the Keras transfer-learning guide's recipe): train the new head "
      "alone for this many epochs at --learning_rate, the whole base frozen with its BatchNorm in "
      "inference mode, then the rest of --epochs from --fine_tune_from at "
      "--fine_tune_learning_rate; the head's optimizer state carries over. 0 = one phase.")
  fine_tune_learning_rate: float = _setting(
      0.0, "--head_epochs: the base learning rate of phase 2 (0 = --learning_rate / "
      f"{recipes.FINE_TUNE_RATE_DIVISOR}: pretrained features need smaller steps than a new head). "
      "--lr_schedule and --warmup_epochs shape both phases over the whole run.")
  dropout: float = _setting(0.2, "Dropout rate before the Dense head.")
  # Keras ResNet50's own BN momentum. Moving statistics need ~1/(1-momentum) steps to settle: a short
  # from-scratch run (e.g. the demo) evaluates far better with 0.9.
  batchnorm_momentum: float = _setting(
      0.99, "Momentum of the BN moving statistics (0.99 = ResNet50's own; 0.9 settles faster in "
      "short runs from scratch).")

  # Optimisation. Momentum SGD at 1e-4 / 0.9 is the setting of the original problem.
  optimizer: str = _setting("momentum", "momentum (SGD with --momentum) or adam.", OPTIMIZERS)
  learning_rate: float = _setting(
      1e-4, "Learning rate (1e-4 with momentum 0.9 is the fine-tuning default).")
  momentum: float = _setting(0.9, "Momentum of the SGD optimizer.")
  lr_schedule: str = _setting(
      "constant", "constant; cosine: decay to 0 over the whole run (after any warm-up); step: "
      "multiply by --lr_decay_factor at each of --lr_decay_epochs. Same schedule in both paths.",
      LR_SCHEDULES)
  warmup_epochs: float = _setting(
      0.0, "Epochs of linear learning-rate warm-up from 0 to --learning_rate before the schedule "
      "(may be fractional; 0 = none).")
  lr_decay_epochs: str = _setting(
      "30,60,80", "--lr_schedule=step: the epochs (counted from the start) at which the learning "
      "rate is multiplied by --lr_decay_factor.")
  lr_decay_factor: float = _setting(0.1, "--lr_schedule=step: the factor applied at each decay epoch.")
  label_smoothing: float = _setting(
      0.0, "Label smoothing in [0, 1), Keras' semantics: softmax targets y*(1-s) + s/k, the sigmoid "
      "target y*(1-s) + s/2 (the reported losses include it, as in Keras).")
  weight_decay: float = _setting(
      0.0, "L2 weight decay: adds weight_decay * sum(w**2)/2 over the kernels of the trainable "
      "Conv2D and Dense layers to the loss; BatchNorm gamma/beta, biases and frozen layers get none.")
  class_weight: str = _setting(
      "none", "Training-loss weight per class: " + recipes.CLASS_WEIGHT_HELP + ". Validation loss "
      "and metrics stay unweighted.")
  epochs: int = _setting(5, "Epochs to train in total (a resumed run continues up to this many).")
  update_ops: str = _setting(
      "apply", "apply: BatchNorm moving statistics are updated (correct). skip: DIAGNOSTIC ONLY - "
      "reproduces the broken hand-written loop whose evaluation uses stale statistics.",
      UPDATE_OPS_MODES)
  precision: str = _setting(
      "float32", "float32, mixed_bfloat16 (CPUs with AVX512_BF16) or mixed_float16 (GPUs).",
      PRECISIONS)
  jit: bool = _setting(False, "Compile with XLA.")

  # Run.
  path: str = _setting(
      "estimator", "estimator (tf.estimator model_fn) or keras (model.fit reference path).", PATHS)
  model_dir: str = _setting(
      "", "Folder for checkpoints, TensorBoard logs, config.json, results.json and exports.")
  save_checkpoints_steps: int = _setting(
      0, "Checkpoint (and evaluate) every N steps; 0 = once per epoch.")
  keep_checkpoint_max: int = _setting(5, "Checkpoints kept.")
  save_summary_steps: int = _setting(20, "TensorBoard training summaries every N steps.")
  log_every_n_steps: int = _setting(10, "Progress line (steps/s, images/s, ETA) every N steps.")
  distribution: str = _setting(
      "none", "none (default; also for TF_CONFIG clusters with parameter servers), mirrored, or "
      "multi_worker_mirrored.", DISTRIBUTIONS)
  check_memory: bool = _setting(
      True, "Refuse an --image_size and --batch_size whose training would not fit in this "
      "machine's available memory (an estimate for ResNet50 on the CPU; the error names the "
      "sizes that fit).")
  exact_resume: bool = _setting(
      False, "Resume the input stream exactly where the checkpoint left it (replayed from the "
      "seed), so a resumed run sees exactly the batches an uninterrupted one would.")
  deterministic: bool = _setting(
      False, "Deterministic TensorFlow ops (enable_op_determinism): with --exact_resume and "
      "--dropout=0 a killed and resumed run ends with an uninterrupted run's weights.")
  export_during_training: bool = _setting(
      True, "Export SavedModels during training: export/best whenever validation improves, "
      "export/latest of the final weights.")
  export_latest_every_epoch: bool = _setting(
      False, "Also export every evaluated checkpoint to export/latest (one more SavedModel per "
      "epoch), not only the final one.")
  export_best_metric: str = _setting(
      "loss", "Validation metric that picks the 'best' export (loss: lowest; else highest).",
      EXPORT_METRICS)
  exports_to_keep: int = _setting(3, "Exported versions kept per exporter.")
  early_stopping_patience: int = _setting(
      0, "Stop after this many evaluations without an improvement of --export_best_metric "
      "(0 = never stop early). A resumed run keeps the count.")
  early_stopping_min_delta: float = _setting(
      0.0, "Smallest change of --export_best_metric that counts as an improvement.")
  serving_warmup_requests: int = _setting(
      3, "TF Serving warm-up: PredictRequests (one training image each) written to every "
      "SavedModel export's assets.extra/tf_serving_warmup_requests, so TF Serving runs the graph "
      "once before the first live request; 0 = none.")
  export_tflite: bool = _setting(
      False, "Also write model.tflite + labels.txt into every export/best version (Keras path: "
      "export/keras), quantized as --tflite_quantize.")
  tflite_quantize: str = _setting(
      "none", "Quantization of --export_tflite: none (float32), dynamic (int8 weights), float16, "
      "or int8 (full integer, calibrated on --representative_images training images).",
      TFLITE_QUANTIZATIONS)
  representative_images: int = _setting(
      100, "Training images that calibrate int8 quantization (evenly spread over the split).")

  # ---------------------------------------------------------------- validation

  def validate_data_settings(self, error=ValueError) -> None:
    """The settings the data loader relies on: one source, a usable image and batch size."""
    has_folders = bool(self.train_dir or self.validation_dir)
    sources = [name for name, given in (("--train_dir/--validation_dir", has_folders),
                                        ("--records_dir", bool(self.records_dir)),
                                        ("--tfds_name", bool(self.tfds_name))) if given]
    if len(sources) > 1:
      raise error(f"Give one data source, not {'both' if len(sources) == 2 else 'all of'} "
                  f"{' and '.join(sources)}.")
    if not sources:
      raise error("No data given: pass --train_dir=DIR and --validation_dir=DIR (one sub-folder "
                  "per class), --records_dir=DIR (written by `estimator-ft prepare`), or "
                  "--tfds_name=NAME for a TFDS dataset. `make demo` shows an example.")
    if has_folders and not (self.train_dir and self.validation_dir):
      raise error("Give both --train_dir and --validation_dir (each with one sub-folder per class).")
    check_image_size(self.image_size, error)
    check_at_least("batch_size", self.batch_size, 1, error=error)
    check_choice("bad_images", self.bad_images, BAD_IMAGE_POLICIES, error)
    check_at_least("max_image_pixels", self.max_image_pixels, 1,
                   f"The default, {image_formats.DEFAULT_MAX_IMAGE_PIXELS}, is Pillow's limit.",
                   error)

  def validate_phases(self) -> None:
    """--head_epochs and --fine_tune_learning_rate (two-phase fine-tuning)."""
    if not 0 <= self.head_epochs < self.epochs:
      raise ValueError(f"--head_epochs={self.head_epochs} must be in [0, --epochs={self.epochs}): "
                       "the head trains alone for that many epochs, then the rest fine-tunes. "
                       f"Raise --epochs above {self.head_epochs}, or use --head_epochs=0.")
    if not (self.fine_tune_learning_rate >= 0 and math.isfinite(self.fine_tune_learning_rate)):
      raise ValueError(f"--fine_tune_learning_rate={self.fine_tune_learning_rate} must be >= 0 (0 "
                       f"= --learning_rate / {recipes.FINE_TUNE_RATE_DIVISOR}).")
    if self.fine_tune_learning_rate and not self.head_epochs:
      raise ValueError("--fine_tune_learning_rate is the rate of phase 2 of --head_epochs: set "
                       "--head_epochs=N (N epochs of the head alone first), or drop it and use "
                       "--learning_rate.")
    if self.head_epochs and self.fine_tune_from == recipes.HEAD_ONLY:
      raise ValueError(f"--head_epochs={self.head_epochs} with --fine_tune_from=none: phase 2 "
                       "would unfreeze nothing, so both phases would train the head alone. Set "
                       "--fine_tune_from=all or a layer (e.g. conv5_block1_1_conv) to fine-tune "
                       "after the head, or use --head_epochs=0 to train the head only.")

  def validate(self, require_model_dir: bool = True) -> "Config":
    """Raises ValueError naming the bad setting and what to do; returns self."""
    self.validate_data_settings()
    check_at_least("epochs", self.epochs, 1)
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"--learning_rate={self.learning_rate} must be a positive number (try 1e-4).")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"--momentum={self.momentum} must be in [0, 1) (0.9 is usual).")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"--dropout={self.dropout} must be in [0, 1).")
    if not 0 < self.batchnorm_momentum < 1:
      raise ValueError(f"--batchnorm_momentum={self.batchnorm_momentum} must be in (0, 1) (0.99 is "
                       "ResNet50's own).")
    check_at_least("shuffle_buffer", self.shuffle_buffer, 1)
    check_at_least("save_checkpoints_steps", self.save_checkpoints_steps, 0,
                   "0 means once per epoch.")
    check_at_least("keep_checkpoint_max", self.keep_checkpoint_max, 1)
    check_at_least("save_summary_steps", self.save_summary_steps, 1)
    check_at_least("log_every_n_steps", self.log_every_n_steps, 1)
    check_at_least("exports_to_keep", self.exports_to_keep, 1)
    check_at_least("early_stopping_patience", self.early_stopping_patience, 0, "0 = never stop early.")
    if not (self.early_stopping_min_delta >= 0 and math.isfinite(self.early_stopping_min_delta)):
      raise ValueError(f"--early_stopping_min_delta={self.early_stopping_min_delta} must be >= 0.")
    self.validate_phases()
    if not (0 <= self.warmup_epochs < self.epochs):
      raise ValueError(f"--warmup_epochs={self.warmup_epochs} must be in [0, --epochs={self.epochs}).")
    if self.lr_schedule == "step":
      recipes.parse_decay_epochs(self.lr_decay_epochs)
    if not 0 < self.lr_decay_factor <= 1:
      raise ValueError(f"--lr_decay_factor={self.lr_decay_factor} must be in (0, 1] (0.1 is usual).")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"--label_smoothing={self.label_smoothing} must be in [0, 1) (0.1 is usual).")
    if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
      raise ValueError(f"--weight_decay={self.weight_decay} must be >= 0 (1e-4 is ResNet's).")
    recipes.parse_class_weight(self.class_weight)
    check_at_least("serving_warmup_requests", self.serving_warmup_requests, 0, "0 writes none.")
    check_representative_images(self.representative_images, self.tflite_quantize
                                if self.export_tflite else "none", "tflite_quantize")
    for field in dataclasses.fields(self):
      if "choices" in field.metadata:
        check_choice(field.name, getattr(self, field.name), field.metadata["choices"])
    if self.weights not in ("imagenet", "none") and not self.weights.endswith((".h5", ".keras")):
      raise ValueError(f"--weights={self.weights!r}: use imagenet, none, or the path of a Keras .h5 "
                       "weights file for ResNet50 without its top.")
    if self.weights not in ("imagenet", "none") and not os.path.isfile(self.weights):
      raise ValueError(f"--weights={self.weights}: no such file. Give the path of a Keras .h5 "
                       "weights file for ResNet50 without its top, or use --weights=imagenet or none.")
    # A URL (gs://...) is checked when the run reads it (model.resolve_warm_start, tf.io.gfile).
    if (self.warm_start_from and files.is_local(self.warm_start_from)
        and not os.path.exists(self.warm_start_from + (
            "" if os.path.isdir(self.warm_start_from) else ".index"))):
      raise ValueError(f"--warm_start_from={self.warm_start_from}: no such model_dir or checkpoint. "
                       "Give the model_dir of an earlier run (either path) or a checkpoint prefix.")
    if not self.fine_tune_from:
      raise ValueError("--fine_tune_from must be all, none, or a ResNet50 layer name (e.g. "
                       "conv5_block1_1_conv).")
    if require_model_dir and not self.model_dir:
      raise ValueError("--model_dir is required: the folder for checkpoints, TensorBoard logs and "
                       "exports.")
    return self

  # ---------------------------------------------------------------- helpers

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "Config":
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
