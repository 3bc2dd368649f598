"""Training measurements: the paths in turn, the feed_dict loop, epoch overhead, short-run accuracy."""

import dataclasses
import glob
import os
import statistics
import threading
import time
from typing import Optional, Sequence, Tuple

import tensorflow as tf

from estimator_ft import estimator as estimator_path
from estimator_ft import keras_path
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft.bench.loaders import python_batches, subset
from estimator_ft.bench.plan import ACCURACY_SETTINGS, BenchPlan
from estimator_ft.bench.timing import (StepClockCallback, StepClockHook, StepDurations, StepTimer,
                                       TakeTurns, WindowClock, time_iterations, window_rates)
from estimator_ft.config import Config
from estimator_ft.data import pipeline
from estimator_ft.data import split as split_lib
from estimator_ft.data import synthetic
from estimator_ft.data.split import Split, Splits
from estimator_ft.jobs import train as train_job
from estimator_ft.run import events


def paired_training_rates(config: Config, splits: Splits, plan: BenchPlan,
                          records: Optional[Tuple[Split, Config]] = None) -> dict:
  """img/s of the Estimator path and of Keras `fit` on the same synthetic batches, their windows
  taken in turn; then the Estimator alone, continuing in the same graph and session on the
  image-folder pipeline, and then (given `records`: loaders.records_source) on prepared records.

  Returns {"estimator": [...], "keras": [...], "folder": [...]} (and "records"), one rate per
  timed window; estimator[i] and keras[i] were measured next to each other.
  """
  class_names = tuple(splits.class_names)
  num_classes = len(class_names)
  paired_steps = plan.warmup_steps + plan.steps * plan.repeats
  steps_per_epoch = split_lib.steps_per_epoch(splits.train, config.batch_size)
  turns = TakeTurns("estimator", "keras")
  clocks = {name: WindowClock(name, turns, plan.warmup_steps, plan.steps, plan.repeats)
            for name in ("estimator", "keras")}

  def input_fn():
    generated = synthetic.synthetic_dataset(config, num_classes, "train")
    folder = pipeline.make_dataset(splits.train, config, "train")
    if records:
      folder = folder.take(paired_steps).concatenate(pipeline.make_dataset(*records, "train"))
    return generated.take(paired_steps).concatenate(folder)

  estimator = estimator_path.make_estimator(config, class_names, steps_per_epoch)
  step_timer = StepTimer()
  # Synthetic (paired with Keras), then folder, then records: each as many steps.
  phases = ("synthetic", "folder") + (("records",) if records else ())
  total_estimator_steps = len(phases) * paired_steps
  # The path's own hooks ride along: their per-step fetches are part of what it costs.
  hooks = [estimator_path.ProgressHook(steps_per_epoch, total_estimator_steps, config.batch_size,
                                      config.log_every_n_steps),
           estimator_path.EpochMetricsHook(config.model_dir, steps_per_epoch),
           StepClockHook(clocks["estimator"]), step_timer]
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
    model.fit(synthetic.synthetic_dataset(config, num_classes, "train"), epochs=1,
              steps_per_epoch=paired_steps, callbacks=[StepClockCallback(clocks["keras"])],
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
  continued = {phase: window_rates(step_timer.timestamps[index * paired_steps:
                                                          (index + 1) * paired_steps],
                                   plan.warmup_steps, plan.steps, plan.repeats, config.batch_size)
               for index, phase in enumerate(phases) if index}
  return {"estimator": images_per_second(clocks["estimator"].seconds),
          "keras": images_per_second(clocks["keras"].seconds), **continued}


def feed_dict_rates(config: Config, split: Split, num_classes: int, plan: BenchPlan,
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
    _, _, loss = model_fn_lib.classification_loss(model, labels, probabilities, num_classes)
    train_op, _ = model_fn_lib.make_train_op(config, model, images, loss, total_steps)
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


def estimator_epoch_overhead(config: Config, splits: Splits, plan: BenchPlan) -> dict:
  """A real short train_and_evaluate (estimator.train); where its wall time goes besides steps.

  startup_s: from the call to the step-0 checkpoint (graph build, session, initial checkpoint).
  epoch_overhead_s: per epoch, the time after that which is not training steps: steps times
  seconds_per_step, the median of this run's own steps within epochs (the first steps' one-time
  costs stay in the overhead; a step time measured in another phase would count the machine's
  drift between the two as overhead). Of it, evaluation_s runs from an epoch's checkpoint to
  its evaluation results (evaluation graph rebuilt, checkpoint restored, one validation pass) and
  export_s from there to the last SavedModel export of that epoch; the rest is checkpoint saving.
  The timeline comes from the run's own event files and export folders.
  """
  train = subset(splits.train, plan.overhead_steps_per_epoch * config.batch_size)
  short = dataclasses.replace(splits, train=train)
  steps_per_epoch = split_lib.steps_per_epoch(train, config.batch_size)
  # The path's real defaults for checkpoints and summaries: this measures a real run.
  run_config = config.replace(epochs=plan.overhead_epochs, save_checkpoints_steps=0,
                              save_summary_steps=Config.save_summary_steps)
  durations = StepDurations()
  started = time.time()
  estimator_path.train(run_config, short, initial_weights="", hooks=[StepClockHook(durations)])
  finished = time.time()
  # A step that ends an epoch also runs the checkpoint saver's hook, and with it the evaluation
  # and the exports, before the clock's hook (which runs after the Estimator's own): not a step.
  within_epochs = [seconds for step, seconds in enumerate(durations.seconds, 1)
                   if step % steps_per_epoch]
  seconds_per_step = statistics.median(within_epochs or durations.seconds)
  checkpoints = events.checkpoint_times(config.model_dir)
  evaluations = events.summary_times(os.path.join(config.model_dir, estimator_path.EVAL_DIR))
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
      "seconds_per_step": seconds_per_step,
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


class _FirstBatchClock(tf.keras.callbacks.Callback):
  """When `fit` begins its first batch: the Keras path's end of start-up."""

  def __init__(self):
    super().__init__()
    self.first_batch = None

  def on_train_batch_begin(self, batch, logs=None):
    if self.first_batch is None:
      self.first_batch = time.time()


def keras_epoch_overhead(config: Config, splits: Splits, plan: BenchPlan) -> dict:
  """The Keras path's counterpart of estimator_epoch_overhead: the same short run (epochs, steps,
  checkpoints, validation passes, the final export) through keras_path.train.

  startup_s: from the call to the first batch of `fit` (model, compile, datasets, restore).
  epoch_overhead_s: per epoch, the time after that which is not training steps (seconds_per_step
  the median of this run's own batch durations, as on the Estimator path). It holds the first
  step's one-time costs (here the tracing of fit's train and test functions), each epoch's
  checkpoint and validation pass, and the final export (the Keras path exports once, at the end).
  """
  train = subset(splits.train, plan.overhead_steps_per_epoch * config.batch_size)
  short = dataclasses.replace(splits, train=train)
  steps_per_epoch = split_lib.steps_per_epoch(train, config.batch_size)
  run_config = config.replace(path="keras", epochs=plan.overhead_epochs, save_checkpoints_steps=0,
                              save_summary_steps=Config.save_summary_steps)
  clock, durations = _FirstBatchClock(), StepDurations()
  started = time.time()
  keras_path.train(run_config, short, initial_weights="",
                   callbacks=[clock, StepClockCallback(durations)])
  finished = time.time()
  seconds_per_step = statistics.median(durations.seconds)
  steps = plan.overhead_epochs * steps_per_epoch
  return {
      "wall_s": finished - started,
      "startup_s": clock.first_batch - started,
      "epoch_overhead_s": (finished - clock.first_batch - steps * seconds_per_step)
                          / plan.overhead_epochs,
      "seconds_per_step": seconds_per_step,
      "epochs": plan.overhead_epochs,
      "steps_per_epoch": steps_per_epoch,
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


def short_run_accuracy(config: Config, splits: Splits, steps: int, scratch: str) -> dict:
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
  estimator = estimator_path.make_estimator(
      config.replace(model_dir=os.path.join(scratch, "accuracy_estimator")), class_names,
      split_lib.steps_per_epoch(splits.train, config.batch_size), initial_weights=initial)
  estimator_losses = BatchLossRecorder()
  estimator.train(pipeline.make_input_fn(splits.train, config, "train"), max_steps=steps,
                  hooks=[estimator_losses])
  estimator_metrics = estimator.evaluate(pipeline.make_input_fn(splits.validation, config, "eval"))
  tf.keras.backend.clear_session()
  model = keras_path.build_compiled_model(config, num_classes, initial, steps_total=steps)
  # The Estimator graph gets this global seed from RunConfig; Keras needs it for the same order.
  tf.random.set_seed(config.seed)
  keras_losses = KerasBatchLossRecorder()
  model.fit(pipeline.make_dataset(splits.train, config, "train"), epochs=1, steps_per_epoch=steps,
            callbacks=[keras_losses], verbose=0)
  keras_metrics = model.evaluate(pipeline.make_dataset(splits.validation, config, "eval"),
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


def end_to_end_times(config: Config, plan: BenchPlan, scratch: str) -> dict:
  """Wall seconds of a short complete `train` job on each path (data check, initial weights,
  training, every evaluation and the exports), same data and settings, one after the other.

  What a user compares: the clock on the wall, not the step rate.
  """
  seconds = {}
  for path in ("estimator", "keras"):
    run_config = config.replace(
        path=path, model_dir=os.path.join(scratch, f"end_to_end_{path}"),
        epochs=plan.overhead_epochs, save_checkpoints_steps=0,
        save_summary_steps=Config.save_summary_steps, export_during_training=True)
    started = time.perf_counter()
    train_job.run(run_config)
    seconds[path] = time.perf_counter() - started
  return {"wall_s": seconds, "epochs": plan.overhead_epochs,
          "end_to_end_ratio": seconds["estimator"] / seconds["keras"]}
