"""`estimator-ft bench`: training and input throughput, measured side by side in one process.

What it measures, with the same model, batch, optimizer and precision for every training path,
warm-up steps excluded, each figure repeated (min / median / max reported):

  estimator_img_per_s      the Estimator path (its model_fn, RunConfig and hooks), timed by a
                           SessionRunHook, on in-memory synthetic batches
  estimator_folder_img_per_s  the same graph on the image-folder pipeline (see below)
  keras_img_per_s          Keras `fit` on the same synthetic batches
  feed_dict_img_per_s      the original approach: a tf.compat.v1 Session fed numpy batches through
                           feed_dict by a Python generator that decodes the image folder with PIL
                           (what Keras' ImageDataGenerator did for the original question's loop)
  pipeline_img_per_s       the tf.data folder pipeline alone (data.make_dataset, train mode)
  python_loader_img_per_s  the same decode/resize/augment/batch in single-threaded Python + PIL
  matmul_gflops            this machine's float32 matmul rate (2048^2 and 4096^2, median); with
                           mixed precision also the rate in its compute dtype (bfloat16/float16)
  train_gflops             img/s x training FLOPs per image (3 x the TF profiler's forward FLOPs)
  estimator_epoch_overhead_s  per-epoch wall time of a real short train_and_evaluate that is not
                           training steps (checkpoint, evaluation with its graph rebuilt, exports)

The Estimator and Keras runs take turns, one timing window each (two threads, one running at a
time), so both see the same moments of the machine's load and estimator/keras is the median of
ratios of neighbouring windows. The synthetic and folder phases of the Estimator run share one
graph and one session: the input_fn concatenates them, so the step-rate ratio compares input
pipelines and nothing else.
"""

import contextlib
import dataclasses
import glob
import importlib.util
import logging
import os
import pathlib
import platform
import statistics
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from estimator_ft import config as config_lib
from estimator_ft import data as data_lib
from estimator_ft import estimator as estimator_lib
from estimator_ft import keras_path
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft.config import Config

logger = logging.getLogger("estimator_ft")

MATMUL_SIZES = (2048, 4096)
# Backward costs about twice the forward pass (gradients for activations and for weights).
TRAINING_FLOPS_PER_FORWARD_FLOP = 3
# ResNet50's caffe preprocessing, as data.preprocess_for_model applies it.
CAFFE_MEAN_BGR = np.array(data_lib.IMAGENET_MEAN_BGR, np.float32)
# Keeps the Estimator's checkpoint saver out of the timed steps: it saves at the start and at the
# end of the run only.
_NO_CHECKPOINT_DURING_TIMING = 10**9
_NO_PROGRESS_LOG = 10**9
_SAMPLE_DATA_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "data" / "make_sample_data.py"
# Generated when --data_dir is missing: enough images for several batches of any quick setting.
_GENERATED_TRAIN_PER_CLASS = 160
_GENERATED_VALIDATION_PER_CLASS = 40

TARGETS = {
    # name: (minimum, why it matters)
    "estimator_over_keras": (1.0, "the Estimator path costs nothing against Keras fit"),
    "synthetic_vs_folder_step_ratio": (0.95, "the input pipeline is not the bottleneck"),
    "pipeline_over_python_loader": (2.0, "tf.data feeds faster than the original Python loader"),
    "estimator_fraction_of_peak": (0.70, "training runs near this CPU's matmul peak (224 px)"),
}


@dataclasses.dataclass(frozen=True)
class BenchPlan:
  """How much of everything to run. `make_plan` fills it from the command-line settings."""
  image_size: int
  batch_size: int
  steps: int  # timed training steps per repeat
  repeats: int
  warmup_steps: int
  loader_batches: int  # timed batches per repeat for the two input loaders
  overhead_epochs: int
  overhead_steps_per_epoch: int
  matmul_repeats: int
  precision: str
  jit: bool
  accuracy_steps: int


# The short accuracy run trains from random weights with the settings under which
# tests/test_training.py sees the sample task learn. Momentum SGD did not learn in 100 steps at
# 64 px, batch 16 (0.01 diverged: training loss 0.98 -> 3.8; 1e-3 stayed at 0.97). BN momentum 0.9
# lets the moving statistics settle within the run (see config.batchnorm_momentum).
ACCURACY_SETTINGS = dict(optimizer="adam", learning_rate=1e-3, batchnorm_momentum=0.9, dropout=0.0)

# The full run's amounts beyond --steps and --repeats. Warm-up covers graph optimisation, tracing
# and the input pipeline filling its buffers.
WARMUP_STEPS = 3
MIN_LOADER_BATCHES = 10
OVERHEAD_EPOCHS = 3
MIN_OVERHEAD_STEPS_PER_EPOCH = 3
MATMUL_REPEATS = 5
QUICK_LIMITS = dict(steps=5, repeats=2, warmup_steps=3, loader_batches=8, overhead_epochs=2,
                    overhead_steps_per_epoch=3, matmul_repeats=3)


def make_plan(image_size: int = 64, batch_size: int = 32, steps: int = 20, repeats: int = 3,
              quick: bool = False, precision: str = "float32", jit: bool = False,
              accuracy_steps: int = 0) -> BenchPlan:
  if image_size < config_lib.RESNET50_MIN_IMAGE_SIZE:
    raise ValueError(f"--image_size={image_size} is too small: ResNet50 needs at least "
                     f"{config_lib.RESNET50_MIN_IMAGE_SIZE} pixels.")
  for name, value in (("batch_size", batch_size), ("steps", steps), ("repeats", repeats)):
    if value < 1:
      raise ValueError(f"--{name}={value} must be at least 1.")
  if accuracy_steps < 0:
    raise ValueError(f"--accuracy_steps={accuracy_steps} must be >= 0 (0 skips the accuracy run).")
  if precision not in config_lib.PRECISIONS:
    raise ValueError(f"--precision={precision!r} is not valid: use one of "
                     f"{', '.join(config_lib.PRECISIONS)}.")
  plan = BenchPlan(image_size=image_size, batch_size=batch_size, steps=steps, repeats=repeats,
                   warmup_steps=WARMUP_STEPS, loader_batches=max(steps, MIN_LOADER_BATCHES),
                   overhead_epochs=OVERHEAD_EPOCHS,
                   overhead_steps_per_epoch=max(steps // 2, MIN_OVERHEAD_STEPS_PER_EPOCH),
                   matmul_repeats=MATMUL_REPEATS, precision=precision, jit=jit,
                   accuracy_steps=accuracy_steps)
  if quick:
    plan = dataclasses.replace(plan, **{name: min(getattr(plan, name), limit)
                                        for name, limit in QUICK_LIMITS.items()})
  return plan


# ---------------------------------------------------------------- statistics and timing

def spread(values: Sequence[float]) -> dict:
  values = [float(v) for v in values]
  return {"min": min(values), "median": statistics.median(values), "max": max(values),
          "runs": values}


def window_rates(timestamps: Sequence[float], warmup: int, steps: int, repeats: int,
                 items_per_step: int) -> list:
  """Items/s of `repeats` consecutive windows of `steps` steps after `warmup` steps.

  timestamps[i] is when step i finished; a window's time runs from the end of the step before it.
  """
  if warmup < 1:
    raise ValueError("window_rates needs at least one warm-up step: it starts the first window's "
                     "clock when the step before it finished.")
  needed = warmup + steps * repeats
  if len(timestamps) < needed:
    raise RuntimeError(f"only {len(timestamps)} steps were timed, {needed} needed")
  rates = []
  for repeat in range(repeats):
    first = warmup + repeat * steps
    elapsed = timestamps[first + steps - 1] - timestamps[first - 1]
    rates.append(steps * items_per_step / elapsed)
  return rates


class TakeTurns:
  """Two training loops in two threads, running one timing window at a time, in turn.

  Timing the Estimator's windows and then Keras' puts any change in the machine's load between
  the two phases straight into their ratio (on a shared 2-core machine, window rates drift by
  10%). Alternating windows gives each Keras window an Estimator window measured next to it.
  """

  def __init__(self, first: str, second: str):
    self._condition = threading.Condition()
    self._names = (first, second)
    self._turn = first
    self._done = set()
    self._failed = ""

  def wait_for_turn(self, name: str) -> None:
    with self._condition:
      self._condition.wait_for(lambda: self._turn == name or self._failed)
      if self._failed and self._failed != name:
        raise RuntimeError(f"bench: the {self._failed} run failed; stopping the {name} run.")

  def pass_turn(self, name: str, done: bool = False) -> None:
    """After a window of `name`: the other loop runs next, unless it has finished already.

    done: that was `name`'s last window. It then waits until the other loop has finished its
    windows too, so whatever `name` runs next never overlaps the other's last window.
    """
    with self._condition:
      if done:
        self._done.add(name)
      other = self._names[1 - self._names.index(name)]
      self._turn = name if other in self._done else other
      self._condition.notify_all()
      if done:
        self._condition.wait_for(lambda: other in self._done or self._failed)

  def fail(self, name: str) -> None:
    with self._condition:
      self._failed = name
      self._condition.notify_all()


class WindowClock:
  """Times a warm-up window then `repeats` windows of `steps` steps, each taken in turn.

  A window's clock starts when its turn begins and stops when its last step finished, so waiting
  for the other loop is never counted.
  """

  def __init__(self, name: str, turns: TakeTurns, warmup: int, steps: int, repeats: int):
    self._name, self._turns = name, turns
    self._lengths = [warmup] + [steps] * repeats
    self._window, self._step_in_window = 0, 0
    self._started = 0.0
    self.seconds = []  # per timed window (the warm-up window excluded)

  def before_step(self) -> None:
    if self._window < len(self._lengths) and self._step_in_window == 0:
      self._turns.wait_for_turn(self._name)
      self._started = time.perf_counter()

  def after_step(self) -> None:
    if self._window >= len(self._lengths):
      return
    self._step_in_window += 1
    if self._step_in_window == self._lengths[self._window]:
      if self._window > 0:
        self.seconds.append(time.perf_counter() - self._started)
      self._window, self._step_in_window = self._window + 1, 0
      self._turns.pass_turn(self._name, done=self._window == len(self._lengths))


class WindowClockHook(tf.estimator.SessionRunHook):
  def __init__(self, clock: WindowClock):
    self._clock = clock

  def before_run(self, run_context):
    self._clock.before_step()

  def after_run(self, run_context, run_values):
    self._clock.after_step()


class WindowClockCallback(tf.keras.callbacks.Callback):
  def __init__(self, clock: WindowClock):
    super().__init__()
    self._clock = clock

  def on_train_batch_begin(self, batch, logs=None):
    self._clock.before_step()

  def on_train_batch_end(self, batch, logs=None):
    self._clock.after_step()


class StepTimer(tf.estimator.SessionRunHook):
  """Records when each Estimator training step finished."""

  def __init__(self):
    self.timestamps = []

  def after_run(self, run_context, run_values):
    self.timestamps.append(time.perf_counter())


def time_iterations(next_item: Callable[[], object], count: int) -> list:
  """Calls next_item `count` times; returns the finish time of each call."""
  timestamps = []
  for _ in range(count):
    next_item()
    timestamps.append(time.perf_counter())
  return timestamps


# ---------------------------------------------------------------- machine

def _cpuinfo_field(name: str) -> str:
  """The first `name` line of /proc/cpuinfo (Linux), or "" elsewhere."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.split(":", 1)[0].strip() == name:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def onednn_enabled() -> bool:
  """Whether TensorFlow's oneDNN kernels are on in this process (TF_ENABLE_ONEDNN_OPTS aware)."""
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  return bool(_pywrap_util_port.IsMklEnabled())


def environment(session_config) -> dict:
  """The machine and the TensorFlow settings the figures depend on."""
  flags = set(_cpuinfo_field("flags").split())
  gpus = tf.config.list_physical_devices("GPU")
  cpu = _cpuinfo_field("model name") or platform.processor() or platform.machine()
  return {
      "device": ", ".join(d.name for d in gpus) if gpus else f"CPU: {cpu}",
      "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}),
      "tensorflow": tf.__version__,
      "onednn": onednn_enabled(),
      "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (on by default)"),
      "threads": {
          "estimator_intra_op": session_config.intra_op_parallelism_threads,
          "estimator_inter_op": session_config.inter_op_parallelism_threads,
          "eager_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
          "eager_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
          "note": "0 = TensorFlow picks (one per core)",
      },
      "xla_cpu_global_jit": estimator_lib.CPU_GLOBAL_JIT_FLAG in os.environ.get("TF_XLA_FLAGS", ""),
      "load_average_1min": os.getloadavg()[0],
      "python": platform.python_version(),
  }


def matmul_gflops(sizes: Sequence[int] = MATMUL_SIZES, repeats: int = MATMUL_REPEATS,
                  dtype: str = "float32") -> dict:
  """Matmul rate per size (2 n^3 FLOPs each) and the best median, first call excluded (warm-up)."""
  results = {}
  for n in sizes:
    a = tf.cast(tf.random.uniform([n, n]), dtype)
    b = tf.cast(tf.random.uniform([n, n]), dtype)
    tf.matmul(a, b).numpy()
    rates = []
    for _ in range(repeats):
      started = time.perf_counter()
      tf.matmul(a, b).numpy()
      rates.append(2 * n**3 / (time.perf_counter() - started) / 1e9)
    results[str(n)] = spread(rates)
  results["peak_median"] = max(results[str(n)]["median"] for n in sizes)
  return results


def compute_dtype(precision: str) -> str:
  """The dtype the convolutions and matmuls run in under a Keras precision policy."""
  return tf.keras.mixed_precision.Policy(precision).compute_dtype


def forward_flops_per_image(config: Config, num_classes: int) -> int:
  """FLOPs of one inference-mode forward pass at batch 1, counted by the TF profiler.

  Counted on the float32 model: mixed precision changes the speed of a FLOP, not their number.
  The model is built eagerly and traced at batch 1, so the graph holds only fully shaped ops.
  """
  model = model_lib.build_model(config.replace(precision="float32"), num_classes)
  forward = tf.function(lambda images: model(images, training=False))
  concrete = forward.get_concrete_function(
      tf.TensorSpec([1, config.image_size, config.image_size, 3], tf.float32))
  options = tf.compat.v1.profiler.ProfileOptionBuilder(
      tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
  profile = tf.compat.v1.profiler.profile(graph=concrete.graph, cmd="op", options=options)
  tf.keras.backend.clear_session()
  return int(profile.total_float_ops)


# ---------------------------------------------------------------- data

def _load_generator_module():
  spec = importlib.util.spec_from_file_location("make_sample_data", _SAMPLE_DATA_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resolve_data_dir(data_dir: str, scratch_dir: str) -> str:
  """`data_dir` if it holds train/ and validation/; if it does not exist, generated sample data."""
  if data_dir and os.path.isdir(data_dir):
    for split in ("train", "validation"):
      if not os.path.isdir(os.path.join(data_dir, split)):
        raise ValueError(f"--data_dir={data_dir} has no {split}/ folder: give a folder with "
                         "train/<class>/ and validation/<class>/ image folders.")
    return data_dir
  generated = os.path.join(scratch_dir, "sample")
  logger.info("--data_dir=%s does not exist: generating sample images in %s", data_dir, generated)
  _load_generator_module().generate(generated, seed=0, train_per_class=_GENERATED_TRAIN_PER_CLASS,
                                    validation_per_class=_GENERATED_VALIDATION_PER_CLASS)
  return generated


def _pil_load(path: str, image_size: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
  """What data.make_dataset does with TF, with PIL: decode, then resize the whole image, or
  (augment) resize a random crop of the decoded image in one step and maybe flip it."""
  with Image.open(path) as image:
    image = image.convert("RGB")
    if not augment:
      return np.asarray(image.resize((image_size, image_size), Image.BILINEAR), np.float32)
    full_width, full_height = image.size
    area = rng.uniform(*data_lib.CROP_AREA_RANGE) * full_width * full_height
    aspect = rng.uniform(*data_lib.CROP_ASPECT_RATIO_RANGE)
    width = min(full_width, max(1, int(round((area * aspect) ** 0.5))))
    height = min(full_height, max(1, int(round((area / aspect) ** 0.5))))
    left = int(rng.integers(0, full_width - width + 1))
    top = int(rng.integers(0, full_height - height + 1))
    image = image.resize((image_size, image_size), Image.BILINEAR,
                         box=(left, top, left + width, top + height))
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(image, np.float32)


def python_batches(split: data_lib.Split, image_size: int, batch_size: int, augment: bool = True,
                   seed: int = 0) -> Iterator:
  """Endless (float32 images [b, s, s, 3] preprocessed for ResNet50, int32 labels [b]) batches.

  One thread, one image at a time: the ImageDataGenerator-style loader of the original question.
  """
  if batch_size > split.num_examples:
    raise ValueError(f"--batch_size={batch_size} is larger than the {split.num_examples} images of "
                     f"the {split.name} split; lower --batch_size or use a larger --data_dir.")
  rng = np.random.default_rng(seed)
  labels = np.asarray(split.labels, np.int32)
  while True:
    order = rng.permutation(split.num_examples)
    for start in range(0, len(order) - batch_size + 1, batch_size):
      chosen = order[start:start + batch_size]
      images = np.stack([_pil_load(split.paths[i], image_size, rng, augment) for i in chosen])
      yield images[..., ::-1] - CAFFE_MEAN_BGR, labels[chosen]


def _subset(split: data_lib.Split, count: int) -> data_lib.Split:
  """The first `count` examples of a folder split, classes interleaved so every class stays in."""
  by_class = {}
  for path, label in zip(split.paths, split.labels):
    by_class.setdefault(label, []).append(path)
  interleaved = [(path, label) for group in zip(*by_class.values())
                 for path, label in zip(group, by_class.keys())]
  chosen = interleaved[:count]
  return dataclasses.replace(split, paths=tuple(p for p, _ in chosen),
                             labels=tuple(l for _, l in chosen), num_examples=len(chosen))


def input_loader_rates(split: data_lib.Split, config: Config, plan: BenchPlan) -> dict:
  """img/s of the tf.data pipeline and of the Python/PIL loader, same work, same batch size."""
  count = plan.warmup_steps + plan.loader_batches * plan.repeats
  dataset_iterator = iter(data_lib.make_dataset(split, config, "train"))
  pipeline = time_iterations(lambda: next(dataset_iterator), count)
  python_iterator = python_batches(split, config.image_size, config.batch_size, config.augment,
                                   config.seed)
  python_loader = time_iterations(lambda: next(python_iterator), count)
  rate = lambda timestamps: window_rates(timestamps, plan.warmup_steps, plan.loader_batches,
                                         plan.repeats, config.batch_size)
  return {"pipeline": rate(pipeline), "python_loader": rate(python_loader)}


# ---------------------------------------------------------------- training paths

def paired_training_rates(config: Config, splits: data_lib.Splits, plan: BenchPlan) -> dict:
  """img/s of the Estimator path and of Keras `fit` on the same synthetic batches, their windows
  taken in turn; then the Estimator alone, continuing in the same graph and session on the
  image-folder pipeline.

  Returns {"estimator": [...], "keras": [...], "folder": [...]}, one rate per timed window;
  estimator[i] and keras[i] were measured next to each other.
  """
  class_names = tuple(splits.class_names)
  num_classes = len(class_names)
  paired_steps = plan.warmup_steps + plan.steps * plan.repeats
  steps_per_epoch = data_lib.steps_per_epoch(splits.train, config.batch_size)
  turns = TakeTurns("estimator", "keras")
  clocks = {name: WindowClock(name, turns, plan.warmup_steps, plan.steps, plan.repeats)
            for name in ("estimator", "keras")}

  def input_fn():
    synthetic = data_lib.synthetic_dataset(config, num_classes, "train")
    folder = data_lib.make_dataset(splits.train, config, "train")
    return synthetic.take(paired_steps).concatenate(folder)

  estimator = estimator_lib.make_estimator(config, class_names, steps_per_epoch)
  folder_timer = StepTimer()
  total_estimator_steps = 2 * paired_steps
  # The path's own hooks ride along: their per-step fetches are part of what it costs.
  hooks = [estimator_lib.ProgressHook(steps_per_epoch, total_estimator_steps, config.batch_size,
                                      config.log_every_n_steps),
           estimator_lib.EpochMetricsHook(config.model_dir, steps_per_epoch),
           WindowClockHook(clocks["estimator"]), folder_timer]
  failure = []

  def train_estimator():
    try:
      estimator.train(input_fn, max_steps=total_estimator_steps, hooks=hooks)
    except BaseException as e:  # pylint: disable=broad-except
      failure.append(e)
      turns.fail("estimator")

  tf.keras.backend.clear_session()
  tf.keras.utils.set_random_seed(config.seed)
  thread = threading.Thread(target=train_estimator, name="bench-estimator", daemon=True)
  thread.start()
  try:
    # The Estimator goes first: it builds its graph and runs its warm-up window. The Keras model
    # is built only then, because building Keras layers inside a graph invalidates Keras models
    # made before it ("Your Layer or Model is in an invalid state").
    turns.wait_for_turn("keras")
    model = keras_path.build_compiled_model(config, num_classes, steps_total=paired_steps)
    model.fit(data_lib.synthetic_dataset(config, num_classes, "train"), epochs=1,
              steps_per_epoch=paired_steps, callbacks=[WindowClockCallback(clocks["keras"])],
              verbose=0)
  except BaseException:
    turns.fail("keras")
    thread.join()
    if failure:  # the Keras run only stopped because the Estimator run failed first
      raise failure[0]
    raise
  thread.join()
  # Only with the other thread gone: clear_session resets Keras state both threads share.
  tf.keras.backend.clear_session()
  if failure:
    raise failure[0]
  images_per_second = lambda seconds: [plan.steps * config.batch_size / s for s in seconds]
  folder = window_rates(folder_timer.timestamps[paired_steps:], plan.warmup_steps, plan.steps,
                        plan.repeats, config.batch_size)
  return {"estimator": images_per_second(clocks["estimator"].seconds),
          "keras": images_per_second(clocks["keras"].seconds), "folder": folder}


def feed_dict_rates(config: Config, split: data_lib.Split, num_classes: int, plan: BenchPlan,
                    session_config) -> list:
  """The original loop: numpy batches from the Python/PIL loader fed through feed_dict.

  Same model, loss, optimizer, BN update ops and session config as the Estimator path; only the
  feeding differs.
  Each timed step includes loading its batch, because the original loop did exactly that.
  """
  total_steps = plan.warmup_steps + plan.steps * plan.repeats
  size = config.image_size
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.set_random_seed(config.seed)
    images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name="images")
    labels = tf.compat.v1.placeholder(tf.int32, [None], name="labels")
    model = model_lib.build_model(config, num_classes)
    probabilities = model(images, training=True)
    loss = tf.reduce_mean(model_fn_lib.per_example_loss(labels, probabilities, num_classes))
    if model.losses:
      loss += tf.add_n(model.losses)
    optimizer = model_fn_lib.make_optimizer(config, total_steps)
    with tf.control_dependencies(model_fn_lib.batchnorm_updates(model, images)):
      train_op = optimizer.get_updates(loss, model.trainable_weights)[0]
    initialize = tf.compat.v1.global_variables_initializer()
  graph.finalize()
  batches = python_batches(split, size, config.batch_size, config.augment, config.seed)
  with tf.compat.v1.Session(graph=graph, config=session_config) as session:
    session.run(initialize)

    def step():
      batch_images, batch_labels = next(batches)
      session.run(train_op, feed_dict={images: batch_images, labels: batch_labels})

    timestamps = time_iterations(step, total_steps)
  return window_rates(timestamps, plan.warmup_steps, plan.steps, plan.repeats, config.batch_size)


def _checkpoint_times(model_dir: str) -> dict:
  """{global step: wall time} of every checkpoint the training session logged in its events."""
  times = {}
  for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      if (event.HasField("session_log")
          and event.session_log.status == tf.compat.v1.SessionLog.CHECKPOINT):
        times[int(event.step)] = event.wall_time
  return times


def _evaluation_times(eval_dir: str) -> dict:
  """{global step: wall time} at which each evaluation's results were written."""
  times = {}
  for path in glob.glob(os.path.join(eval_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      if event.HasField("summary"):
        times[int(event.step)] = max(times.get(int(event.step), 0.0), event.wall_time)
  return times


def _export_times(export_root: str) -> list:
  """When each exported version was complete (its newest file), sorted.

  Not the version folder's own mtime: renaming it into place does not change that.
  """
  times = []
  for version in glob.glob(os.path.join(export_root, "*", "*")):
    if os.path.basename(version).isdigit():
      times.append(max(os.path.getmtime(os.path.join(folder, name))
                       for folder, _, names in os.walk(version) for name in names))
  return sorted(times)


def estimator_epoch_overhead(config: Config, splits: data_lib.Splits, plan: BenchPlan,
                             seconds_per_step: float) -> dict:
  """A real short train_and_evaluate (estimator.train); where its wall time goes besides steps.

  startup_s: from the call to the step-0 checkpoint (graph build, session, initial checkpoint).
  epoch_overhead_s: per epoch, the time after that which is not training steps (seconds_per_step
  from the folder-pipeline measurement). Of it, evaluation_s runs from an epoch's checkpoint to
  its evaluation results (evaluation graph rebuilt, checkpoint restored, one validation pass) and
  export_s from there to the last SavedModel export of that epoch; the rest is checkpoint saving.
  The timeline comes from the run's own event files and export folders.
  """
  train = _subset(splits.train, plan.overhead_steps_per_epoch * config.batch_size)
  short = dataclasses.replace(splits, train=train)
  steps_per_epoch = data_lib.steps_per_epoch(train, config.batch_size)
  # The path's real defaults for checkpoints and summaries: this measures a real run.
  run_config = config.replace(epochs=plan.overhead_epochs, save_checkpoints_steps=0,
                              save_summary_steps=Config.save_summary_steps)
  started = time.time()
  estimator_lib.train(run_config, short, initial_weights="")
  finished = time.time()
  checkpoints = _checkpoint_times(config.model_dir)
  evaluations = _evaluation_times(os.path.join(config.model_dir, "eval"))
  exports = _export_times(os.path.join(config.model_dir, "export"))
  first_checkpoint = checkpoints[0]
  evaluation_s, export_s = [], []
  for epoch in range(1, plan.overhead_epochs + 1):
    step = epoch * steps_per_epoch
    if step not in checkpoints or step not in evaluations:
      continue
    evaluation_s.append(evaluations[step] - checkpoints[step])
    next_checkpoint = checkpoints.get(step + steps_per_epoch, finished)
    this_epoch = [t for t in exports if evaluations[step] <= t <= next_checkpoint]
    export_s.append(max(this_epoch) - evaluations[step] if this_epoch else 0.0)
  steps = plan.overhead_epochs * steps_per_epoch
  return {
      "wall_s": finished - started,
      "startup_s": first_checkpoint - started,
      "epoch_overhead_s": (finished - first_checkpoint - steps * seconds_per_step)
                          / plan.overhead_epochs,
      "evaluation_s": statistics.mean(evaluation_s) if evaluation_s else None,
      "export_s": statistics.mean(export_s) if export_s else None,
      "timeline_s": {
          "checkpoints": {step: t - started for step, t in sorted(checkpoints.items())},
          "evaluations": {step: t - started for step, t in sorted(evaluations.items())},
          "exports": [t - started for t in exports],
          "finished": finished - started},
      "exports": len(exports),
      "epochs": plan.overhead_epochs,
      "steps_per_epoch": steps_per_epoch,
      "validation_examples": splits.validation.num_examples,
  }


class BatchLossRecorder(tf.estimator.SessionRunHook):
  """Per-example mean training loss of every Estimator step (model_fn's train_batch tensors)."""

  def __init__(self):
    self.losses = []

  def begin(self):
    graph = tf.compat.v1.get_default_graph()
    self._fetches = [graph.get_tensor_by_name(name + ":0")
                     for name in (model_fn_lib.BATCH_LOSS_TENSOR, model_fn_lib.BATCH_SIZE_TENSOR)]

  def before_run(self, run_context):
    return tf.estimator.SessionRunArgs(self._fetches)

  def after_run(self, run_context, run_values):
    loss_sum, size = run_values.results
    self.losses.append(float(loss_sum) / max(int(size), 1))


class KerasBatchLossRecorder(tf.keras.callbacks.Callback):
  """Per-batch training loss, recovered from the running mean that `fit` reports.

  Batches have one size (the training stream drops the remainder), so batch k's loss is
  k * mean_k - (k - 1) * mean_(k-1).
  """

  def __init__(self):
    super().__init__()
    self.losses = []
    self._previous_mean = 0.0

  def on_train_batch_end(self, batch, logs=None):
    mean = float(logs["loss"])
    self.losses.append((batch + 1) * mean - batch * self._previous_mean)
    self._previous_mean = mean


def _loss_summary(losses: Sequence[float]) -> dict:
  """Training losses at the start and, averaged, over the last quarter of the run."""
  last_quarter = losses[-max(1, len(losses) // 4):]
  return {"first_step_loss": losses[0], "last_quarter_train_loss": statistics.mean(last_quarter)}


def short_run_accuracy(config: Config, splits: data_lib.Splits, steps: int, scratch: str) -> dict:
  """Losses and validation accuracy of both paths after `steps` steps from the same weights.

  Trains from scratch with ACCURACY_SETTINGS; compare a float32 run's figures with a
  mixed-precision one's. Both paths read the same batches in the same order, so their figures
  should agree to rounding.
  """
  config = config.replace(**ACCURACY_SETTINGS)
  class_names = tuple(splits.class_names)
  num_classes = len(class_names)
  initial = model_lib.save_initial_weights(config, num_classes,
                                           os.path.join(scratch, "initial_weights", "weights"))
  estimator = estimator_lib.make_estimator(
      config.replace(model_dir=os.path.join(scratch, "accuracy_estimator")), class_names,
      data_lib.steps_per_epoch(splits.train, config.batch_size), initial_weights=initial)
  estimator_losses = BatchLossRecorder()
  estimator.train(data_lib.make_input_fn(splits.train, config, "train"), max_steps=steps,
                  hooks=[estimator_losses])
  estimator_metrics = estimator.evaluate(data_lib.make_input_fn(splits.validation, config, "eval"))
  tf.keras.backend.clear_session()
  model = keras_path.build_compiled_model(config, num_classes, initial, steps_total=steps)
  # The Estimator graph gets this global seed from RunConfig; Keras needs it for the same order.
  tf.random.set_seed(config.seed)
  keras_losses = KerasBatchLossRecorder()
  model.fit(data_lib.make_dataset(splits.train, config, "train"), epochs=1, steps_per_epoch=steps,
            callbacks=[keras_losses], verbose=0)
  keras_metrics = model.evaluate(data_lib.make_dataset(splits.validation, config, "eval"),
                                 return_dict=True, verbose=0)
  tf.keras.backend.clear_session()
  return {
      "steps": steps,
      "estimator": {**_loss_summary(estimator_losses.losses),
                    "val_loss": float(estimator_metrics[model_fn_lib.EXAMPLE_LOSS]),
                    "val_accuracy": float(estimator_metrics["accuracy"])},
      "keras": {**_loss_summary(keras_losses.losses),
                "val_loss": float(keras_metrics["loss"]),
                "val_accuracy": float(keras_metrics["accuracy"])},
  }


# ---------------------------------------------------------------- the benchmark

def bench_config(plan: BenchPlan, data_dir: str, model_dir: str) -> Config:
  return Config(
      train_dir=os.path.join(data_dir, "train"), validation_dir=os.path.join(data_dir, "validation"),
      model_dir=model_dir, image_size=plan.image_size, batch_size=plan.batch_size, weights="none",
      precision=plan.precision, jit=plan.jit, epochs=1,
      save_checkpoints_steps=_NO_CHECKPOINT_DURING_TIMING,
      save_summary_steps=summary_steps_within_warmup(plan.warmup_steps),
      log_every_n_steps=_NO_PROGRESS_LOG).validate()


def summary_steps_within_warmup(warmup_steps: int) -> int:
  """A summary period whose first periodic summary step falls inside the warm-up steps.

  A tf.compat.v1 Session builds (prunes and optimizes) one executor per distinct set of fetches,
  the first time it sees it: about 0.9 s for ResNet50 at 64 px on 2 cores. The Estimator's
  summary hook adds its fetches every save_summary_steps steps, so its first periodic summary
  step costs that once per run (measured with save_summary_steps=10: step 10 took 1.29 s, steps
  20, 30 and 40 0.41 s like any other). Paid during the warm-up, it stays out of the
  steady-state figures; a cached summary step then costs no measurable time. (With a single
  warm-up step no period can do that: summaries then run every step.)
  """
  return max(1, warmup_steps - 1)


def _ratio(numerator: float, denominator: float) -> Optional[float]:
  return numerator / denominator if denominator else None


class PhaseClock:
  """Wall time and this process's share of the CPUs, per phase of the benchmark.

  A share well below 1 while training means other processes took the cores: the figures of that
  phase then measure the machine's load as much as the code.
  """

  def __init__(self, cores: int):
    self._cores = cores
    self.phases = {}

  @contextlib.contextmanager
  def phase(self, name: str):
    logger.info("bench: %s", name)
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    self.phases[name] = {"wall_s": wall, "cpu_share": cpu / (wall * self._cores) if wall else None}


def run_bench(image_size: int = 64, batch_size: int = 32, steps: int = 20, repeats: int = 3,
              quick: bool = False, precision: str = "float32", jit: bool = False,
              data_dir: str = "data/sample", output: str = "", accuracy_steps: int = 0) -> dict:
  """`estimator-ft bench`: every measurement; prints a table, writes `output` (JSON) if given."""
  plan = make_plan(image_size, batch_size, steps, repeats, quick, precision, jit, accuracy_steps)
  return run_plan(plan, data_dir, output, quick=quick)


def run_plan(plan: BenchPlan, data_dir: str, output: str = "", quick: bool = False) -> dict:
  """Runs `plan`; returns the results dict that run_bench prints and writes."""
  started = time.time()
  with tempfile.TemporaryDirectory(prefix="estimator_ft_bench_") as scratch:
    data_dir = resolve_data_dir(data_dir, scratch)
    config = bench_config(plan, data_dir, os.path.join(scratch, "estimator"))
    splits = data_lib.load_splits(config)
    num_classes = len(splits.class_names)
    # The Estimator path's own session settings, used by the feed_dict loop too.
    session_config = estimator_lib.make_run_config(config, 1).session_config
    env = environment(session_config)
    clock = PhaseClock(env["cpu_cores"])
    with clock.phase("matmul peak"):
      matmul = {"float32": matmul_gflops(repeats=plan.matmul_repeats)}
      dtype = compute_dtype(plan.precision)
      if dtype != "float32":
        matmul[dtype] = matmul_gflops(repeats=plan.matmul_repeats, dtype=dtype)
    with clock.phase("forward FLOPs"):
      forward_flops = forward_flops_per_image(config, num_classes)
    with clock.phase("tf.data pipeline vs Python loader"):
      loaders = input_loader_rates(splits.train, config, plan)
    with clock.phase("Estimator and Keras fit in turn, then Estimator on folder input"):
      training = paired_training_rates(config, splits, plan)
    with clock.phase("feed_dict loop"):
      feed_dict = feed_dict_rates(config, splits.train, num_classes, plan, session_config)
    with clock.phase("Estimator train_and_evaluate epoch overhead"):
      folder_step_s = config.batch_size / statistics.median(training["folder"])
      overhead = estimator_epoch_overhead(
          config.replace(model_dir=os.path.join(scratch, "overhead")), splits, plan, folder_step_s)
    accuracy = None
    if plan.accuracy_steps:
      with clock.phase("short-run accuracy"):
        accuracy = short_run_accuracy(config, splits, plan.accuracy_steps, scratch)
  results = {"settings": {**dataclasses.asdict(plan), "quick": quick, "data_dir": data_dir,
                          "train_images": splits.train.num_examples,
                          "validation_images": splits.validation.num_examples},
             "environment": env}
  results.update(summarize(plan, matmul, forward_flops, loaders, training, feed_dict, overhead))
  if accuracy:
    results["accuracy"] = accuracy
  env["load_average_1min_after"] = os.getloadavg()[0]
  results["phases"] = clock.phases
  results["wall_time_s"] = time.time() - started
  print(format_table(results))
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    config_lib.write_json_atomic(output, results)
    print(f"\nResults written to {output}")
  return results


def summarize(plan, matmul, forward_flops, loaders, training, feed_dict, overhead) -> dict:
  """The result figures (medians at the top level, spreads under `spread`), ratios and targets."""
  runs = {
      "estimator_img_per_s": spread(training["estimator"]),
      "estimator_folder_img_per_s": spread(training["folder"]),
      "keras_img_per_s": spread(training["keras"]),
      "feed_dict_img_per_s": spread(feed_dict),
      "pipeline_img_per_s": spread(loaders["pipeline"]),
      "python_loader_img_per_s": spread(loaders["python_loader"]),
  }
  figures = {name: values["median"] for name, values in runs.items()}
  # The hardware limit of the dtype the model computes in: float32, or the mixed policy's.
  peak_dtype = compute_dtype(plan.precision)
  peak = matmul[peak_dtype]["peak_median"]
  train_flops = TRAINING_FLOPS_PER_FORWARD_FLOP * forward_flops
  gflops = {path: figures[f"{path}_img_per_s"] * train_flops / 1e9
            for path in ("estimator", "keras", "feed_dict")}
  ratios = {
      # Median of the ratios of windows measured next to each other (see TakeTurns).
      "estimator_over_keras": statistics.median(
          e / k for e, k in zip(training["estimator"], training["keras"])),
      "synthetic_vs_folder_step_ratio": _ratio(figures["estimator_folder_img_per_s"],
                                               figures["estimator_img_per_s"]),
      "pipeline_over_python_loader": _ratio(figures["pipeline_img_per_s"],
                                            figures["python_loader_img_per_s"]),
      "estimator_over_feed_dict": _ratio(figures["estimator_img_per_s"],
                                         figures["feed_dict_img_per_s"]),
      "estimator_fraction_of_peak": _ratio(gflops["estimator"], peak),
      "keras_fraction_of_peak": _ratio(gflops["keras"], peak),
  }
  targets = {}
  for name, (minimum, meaning) in TARGETS.items():
    value = ratios[name]
    targets[name] = {"value": value, "minimum": minimum, "met": value is not None and value >= minimum,
                     "meaning": meaning}
  if plan.image_size != config_lib.RESNET50_NATIVE_IMAGE_SIZE:
    targets["estimator_fraction_of_peak"]["note"] = (
        f"the target is set at {config_lib.RESNET50_NATIVE_IMAGE_SIZE} px; at {plan.image_size} px "
        "the small feature maps use the cores less well")
  notes = []
  if peak_dtype != "float32":
    notes.append(f"{plan.precision}: fraction_of_peak is against the {peak_dtype} matmul peak "
                 f"({peak:.0f} GFLOP/s; float32: {matmul['float32']['peak_median']:.0f})")
  if plan.precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
    notes.append("mixed_float16 on a CPU: float16 convolutions have no fast CPU kernels; it is "
                 "meant for GPUs")
  if plan.jit and not tf.config.list_physical_devices("GPU") and (
      estimator_lib.CPU_GLOBAL_JIT_FLAG not in os.environ.get("TF_XLA_FLAGS", "")):
    notes.append(f"--jit on a CPU: Keras compiles with XLA, but the Estimator's session compiles "
                 f"only with TF_XLA_FLAGS={estimator_lib.CPU_GLOBAL_JIT_FLAG}")
  return {
      **figures,
      "synthetic_vs_folder_step_ratio": ratios["synthetic_vs_folder_step_ratio"],
      "matmul_gflops": matmul["float32"],
      **{f"matmul_gflops_{dtype}": values for dtype, values in matmul.items() if dtype != "float32"},
      "peak_dtype": peak_dtype,
      "peak_gflops": peak,
      "forward_gflops_per_image": forward_flops / 1e9,
      "train_gflops_per_image": train_flops / 1e9,
      "train_gflops": gflops,
      "fraction_of_peak": ratios["estimator_fraction_of_peak"],
      "estimator_epoch_overhead_s": overhead["epoch_overhead_s"],
      "estimator_startup_s": overhead["startup_s"],
      "epoch_overhead_run": overhead,
      "ratios": ratios,
      "targets": targets,
      "spread": runs,
      "notes": notes,
  }


def _fmt(value, digits=1) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
  settings, env = results["settings"], results["environment"]
  lines = [
      f"estimator-ft bench: {settings['image_size']} px, batch {settings['batch_size']}, "
      f"{settings['precision']}{', XLA' if settings['jit'] else ''}, {settings['steps']} steps x "
      f"{settings['repeats']} repeats after {settings['warmup_steps']} warm-up steps",
      f"{env['device']}, {env['cpu_cores']} cores, TF {env['tensorflow']}, oneDNN "
      f"{'on' if env['onednn'] else 'off'}, load average {env['load_average_1min']:.2f} before, "
      f"{env['load_average_1min_after']:.2f} after",
      "",
      f"{'images/s':34s} {'median':>9s} {'min':>9s} {'max':>9s}",
  ]
  for name, values in results["spread"].items():
    lines.append(f"{name:34s} {values['median']:9.1f} {values['min']:9.1f} {values['max']:9.1f}")
  lines.append("")
  for dtype in ("float32", "bfloat16", "float16"):
    key = "matmul_gflops" if dtype == "float32" else f"matmul_gflops_{dtype}"
    for size in MATMUL_SIZES if key in results else ():
      values = results[key][str(size)]
      lines.append(f"{f'matmul GFLOP/s {dtype} {size}^2':34s} {values['median']:9.1f} "
                   f"{values['min']:9.1f} {values['max']:9.1f}")
  overhead = results["epoch_overhead_run"]
  lines += [
      "",
      f"training GFLOP per image {results['train_gflops_per_image']:.3f} (3 x forward "
      f"{results['forward_gflops_per_image']:.3f}); train GFLOP/s: "
      + ", ".join(f"{path} {value:.1f}" for path, value in results["train_gflops"].items()),
      f"Estimator train_and_evaluate: startup {overhead['startup_s']:.1f} s, overhead "
      f"{overhead['epoch_overhead_s']:.1f} s per epoch (evaluation {_fmt(overhead['evaluation_s'])} s, "
      f"export {_fmt(overhead['export_s'])} s, {overhead['exports']} exports in "
      f"{overhead['epochs']} epochs)",
      "",
      f"{'ratio':34s} {'value':>9s}",
  ]
  for name, value in results["ratios"].items():
    target = results["targets"].get(name)
    verdict = ""
    if target:
      verdict = f"   target >= {target['minimum']}: {'met' if target['met'] else 'NOT met'}"
    lines.append(f"{name:34s} {_fmt(value, 2):>9s}{verdict}")
  if "accuracy" in results:
    accuracy = results["accuracy"]
    lines.append(f"\nafter {accuracy['steps']} steps from the same weights:")
    lines += [f"  {path}: train loss {accuracy[path]['first_step_loss']:.4f} at step 1, "
              f"{accuracy[path]['last_quarter_train_loss']:.4f} over the last quarter; val_loss "
              f"{accuracy[path]['val_loss']:.4f}, val_accuracy {accuracy[path]['val_accuracy']:.4f}"
              for path in ("estimator", "keras")]
  lines += [f"note: {note}" for note in results["notes"]]
  lines.append("\nphase (wall s, share of the CPUs this process got):")
  lines.append("  " + "; ".join(f"{name} {phase['wall_s']:.0f} s {_fmt(phase['cpu_share'], 2)}"
                                for name, phase in results["phases"].items()))
  lines.append(f"wall time {results['wall_time_s']:.0f} s")
  return "\n".join(lines)
