"""The one configuration object of a run.

Every default lives here; the CLI takes its flag defaults from these fields, builds one
`Config`, validates it before any TensorFlow work starts, and writes it into `model_dir` as JSON.
Library code receives a `Config` (never absl flags).
"""

import dataclasses
import json
import math
import os
from typing import Optional, Tuple

# ResNet50's native resolution; the smallest it accepts with include_top=False is 32.
RESNET50_NATIVE_IMAGE_SIZE = 224
RESNET50_MIN_IMAGE_SIZE = 32

OPTIMIZERS = ("momentum", "adam")
LR_SCHEDULES = ("constant", "cosine")
BAD_IMAGE_POLICIES = ("fail", "skip")
UPDATE_OPS_MODES = ("apply", "skip")
PATHS = ("estimator", "keras")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker_mirrored")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
EXPORT_METRICS = ("loss", "accuracy", "auc")

# Fields that change what a checkpoint in model_dir means. Resuming with any of them changed
# would silently mix two different runs, so it is refused (see `check_resumable`). The optimizer's
# hyperparameters are among them because both paths checkpoint them as variables: a resumed run
# would silently keep the old learning rate and momentum.
CHECKPOINT_DEFINING_FIELDS = (
    "path", "image_size", "fine_tune_from", "optimizer", "precision", "dropout", "lr_schedule",
    "learning_rate", "momentum",
)


@dataclasses.dataclass(frozen=True)
class Config:
  """A fine-tuning run, fully resolved. Construct, then call `validate()`."""

  # Data: either an image folder pair or a TFDS dataset.
  train_dir: str = ""
  validation_dir: str = ""
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tfds_train_split: str = "train[:80%]"
  tfds_validation_split: str = "train[80%:]"
  tfds_image_key: str = "image"
  tfds_label_key: str = "label"
  image_size: int = RESNET50_NATIVE_IMAGE_SIZE
  batch_size: int = 32
  augment: bool = True
  shuffle_buffer: int = 1024
  cache: bool = False
  bad_images: str = "fail"
  seed: int = 42

  # Model.
  weights: str = "imagenet"  # imagenet | none | path to a .h5 weights file
  fine_tune_from: str = "all"  # all | none | name of the first base layer to train
  dropout: float = 0.2
  # Keras ResNet50's own BN momentum. Moving statistics need ~1/(1-momentum) steps to settle: a short
  # from-scratch run (e.g. the demo) evaluates far better with 0.9.
  batchnorm_momentum: float = 0.99

  # Optimisation. Momentum SGD at 1e-4 / 0.9 is the setting of the original problem.
  optimizer: str = "momentum"
  learning_rate: float = 1e-4
  momentum: float = 0.9
  lr_schedule: str = "constant"
  epochs: int = 5
  update_ops: str = "apply"  # "skip" reproduces the broken loop; diagnostic only
  precision: str = "float32"
  jit: bool = False

  # Run.
  path: str = "estimator"
  model_dir: str = ""
  save_checkpoints_steps: int = 0  # 0: once per epoch
  keep_checkpoint_max: int = 5
  save_summary_steps: int = 20
  log_every_n_steps: int = 10
  distribution: str = "none"
  exact_resume: bool = False
  deterministic: bool = False  # tf.config.experimental.enable_op_determinism for the whole run
  export_during_training: bool = True  # latest/best SavedModels after each evaluation
  export_best_metric: str = "loss"
  exports_to_keep: int = 3

  # ---------------------------------------------------------------- validation

  def validate(self, require_model_dir: bool = True) -> "Config":
    """Raises ValueError naming the bad setting and what to do; returns self."""
    def fail(msg):
      raise ValueError(msg)

    def one_of(name, allowed):
      value = getattr(self, name)
      if value not in allowed:
        fail(f"--{name}={value!r} is not valid: use one of {', '.join(allowed)}.")

    has_folders = bool(self.train_dir or self.validation_dir)
    if has_folders and self.tfds_name:
      fail("Give either --train_dir/--validation_dir or --tfds_name, not both.")
    if not has_folders and not self.tfds_name:
      fail("No data given: pass --train_dir=DIR and --validation_dir=DIR (one sub-folder per "
           "class), or --tfds_name=NAME for a TFDS dataset. `make demo` shows an example.")
    if has_folders and not (self.train_dir and self.validation_dir):
      fail("Give both --train_dir and --validation_dir (each with one sub-folder per class).")
    if self.image_size < RESNET50_MIN_IMAGE_SIZE:
      fail(f"--image_size={self.image_size} is too small: ResNet50 needs at least "
           f"{RESNET50_MIN_IMAGE_SIZE} pixels (it downsamples 32x). Use --image_size=64 for quick "
           f"CPU runs or {RESNET50_NATIVE_IMAGE_SIZE} for ImageNet-like accuracy.")
    if self.batch_size < 1:
      fail(f"--batch_size={self.batch_size} must be at least 1.")
    if self.epochs < 1:
      fail(f"--epochs={self.epochs} must be at least 1.")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      fail(f"--learning_rate={self.learning_rate} must be a positive number (try 1e-4).")
    if not 0 <= self.momentum < 1:
      fail(f"--momentum={self.momentum} must be in [0, 1) (0.9 is usual).")
    if not 0 <= self.dropout < 1:
      fail(f"--dropout={self.dropout} must be in [0, 1).")
    if not 0 < self.batchnorm_momentum < 1:
      fail(f"--batchnorm_momentum={self.batchnorm_momentum} must be in (0, 1) (0.99 is ResNet50's own).")
    if self.shuffle_buffer < 1:
      fail(f"--shuffle_buffer={self.shuffle_buffer} must be at least 1.")
    if self.save_checkpoints_steps < 0:
      fail("--save_checkpoints_steps must be >= 0 (0 means once per epoch).")
    if self.keep_checkpoint_max < 1:
      fail("--keep_checkpoint_max must be at least 1.")
    if self.save_summary_steps < 1 or self.log_every_n_steps < 1:
      fail("--save_summary_steps and --log_every_n_steps must be at least 1.")
    if self.exports_to_keep < 1:
      fail("--exports_to_keep must be at least 1.")
    for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                          ("bad_images", BAD_IMAGE_POLICIES), ("update_ops", UPDATE_OPS_MODES),
                          ("path", PATHS), ("distribution", DISTRIBUTIONS),
                          ("precision", PRECISIONS), ("export_best_metric", EXPORT_METRICS)):
      one_of(name, allowed)
    if self.weights not in ("imagenet", "none") and not self.weights.endswith((".h5", ".keras")):
      fail(f"--weights={self.weights!r}: use imagenet, none, or the path of a Keras .h5 "
           "weights file for ResNet50 without its top.")
    if self.weights not in ("imagenet", "none") and not os.path.isfile(self.weights):
      fail(f"--weights={self.weights}: no such file. Give the path of a Keras .h5 weights file for "
           "ResNet50 without its top, or use --weights=imagenet or none.")
    if not self.fine_tune_from:
      fail("--fine_tune_from must be all, none, or a ResNet50 layer name (e.g. conv5_block1_1_conv).")
    if require_model_dir and not self.model_dir:
      fail("--model_dir is required: the folder for checkpoints, TensorBoard logs and exports.")
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


def field_default(name: str):
  """The default of one Config field (used by the CLI for flag defaults)."""
  return {f.name: f.default for f in dataclasses.fields(Config)}[name]


# ------------------------------------------------------------------ config.json in model_dir

CONFIG_FILE = "config.json"


def write_run_config(config: Config, class_names: Tuple[str, ...], model_dir: Optional[str] = None):
  """Writes `config.json` (the resolved config plus class names) atomically into model_dir."""
  model_dir = model_dir or config.model_dir
  record = {"config": config.to_dict(), "class_names": list(class_names)}
  write_json_atomic(os.path.join(model_dir, CONFIG_FILE), record)


def read_run_config(model_dir: str) -> Optional[dict]:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({e}). It records the configuration of the run in "
                     "this model_dir; restore it, or use a new --model_dir.") from e


def check_resumable(config: Config, class_names: Tuple[str, ...], model_dir: str) -> bool:
  """True if model_dir holds an earlier run of the same configuration, False if it is new.

  Raises ValueError when model_dir holds a different run: mixing the two would silently corrupt
  both (other classes, other image size, other training path...).
  """
  previous = read_run_config(model_dir)
  if previous is None:
    return False
  differences = []
  if list(previous.get("class_names", [])) != list(class_names):
    differences.append(f"class_names: {previous.get('class_names')} -> {list(class_names)}")
  old = previous.get("config", {})
  for name in CHECKPOINT_DEFINING_FIELDS:
    if name in old and old[name] != getattr(config, name):
      differences.append(f"{name}: {old[name]!r} -> {getattr(config, name)!r}")
  if differences:
    raise ValueError(
        f"--model_dir={model_dir} holds a run with a different configuration "
        f"({'; '.join(differences)}). Resuming would mix the two. Use a new --model_dir, or "
        "repeat the original settings to resume it.")
  return True


def read_json(path: str, default):
  """The JSON value in `path`, or `default` when the file does not exist (yet)."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json_atomic(path: str, value) -> None:
  """Writes JSON so that a reader (or a crash) never sees a half-written file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
