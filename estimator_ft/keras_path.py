"""The Keras `fit` reference path: the Estimator path's model, data and optimizer, trained by Keras.

It exists so the Estimator path can be checked against what Keras does by itself. Everything that
could make the two differ is shared: the model builder and the initial-weights checkpoint
(model.py), the tf.data pipeline (data.py), the optimizer class and the loss (model_fn.py). The two
things the original hand-written loop got wrong Keras does on its own: `fit` calls the model with
`training=True` and validation with `training=False`, and BatchNormalization layers update their
moving statistics inside the training call.

What this path leaves in model_dir, beside training.py's config.json and results.json:
  checkpoint, ckpt-<step>.*   model, optimizer and epoch counter, written at every epoch end
  keras_history.json          the per-epoch history, written as each epoch ends (survives resume)
  events.out.tfevents.*       TensorBoard: the common curves both paths write (run/summaries.py:
                              train/*, learning_rate, validation/* and the confusion matrix, at
                              the global step); config/ the config
  export/keras/<version>/     the SavedModel of the final weights (export.py's serving layout)
Checkpoints are per epoch: a resumed run restarts the interrupted epoch from the last epoch end.
"""

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from estimator_ft import export as export_lib
from estimator_ft import export_tflite
from estimator_ft import interrupts
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import progress
from estimator_ft import recipes
from estimator_ft import serving
from estimator_ft.config import Config
from estimator_ft.data import pipeline
from estimator_ft.data import split as split_lib
from estimator_ft.run import errors
from estimator_ft.run import model_dir as model_dir_lib
from estimator_ft.run import runtime
from estimator_ft.run import summaries

logger = logging.getLogger("estimator_ft")

HISTORY_FILE = model_dir_lib.KERAS_HISTORY_FILE
CHECKPOINT_NAME = model_dir_lib.KERAS_CHECKPOINT_NAME
EXPORT_NAME = "keras"
# Figures of the training side kept in the history; the rest of Keras' running averages (auc,
# precision...) say little about the model, unlike their val_ counterparts.
TRAINING_HISTORY_KEYS = ("loss", "accuracy")
# The AUC the Estimator path reports (tf.compat.v1.metrics.auc's defaults, ROC by trapezoids).
AUC_THRESHOLDS = 200
BINARY_THRESHOLD = 0.5  # model_fn.predicted_class: a sigmoid output above this is class 1
MAX_TOP_K = 5
# The compiled metric holding the confusion matrix of an epoch's validation pass (a [C, C] value in
# the logs, so it is kept out of the history and the evaluation figures).
CONFUSION_MATRIX_METRIC = "confusion_matrix"


# ---------------------------------------------------------------- model

def compile_loss(num_classes: int, label_smoothing: float = 0.0) -> tf.keras.losses.Loss:
  """model_fn's loss (same class, same settings), averaged over the batch for `fit`.

  The Estimator's training loss is the mean of the per-example values; SUM_OVER_BATCH_SIZE is the
  same mean. (model_fn.make_loss itself returns per-example values, which `fit` would sum.)
  """
  per_example = model_fn_lib.make_loss(num_classes, label_smoothing)
  settings = dict(per_example.get_config(),
                  reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE)
  return type(per_example).from_config(settings)


def compile_metrics(num_classes: int) -> list:
  """The Estimator path's eval metrics, computed the same way (see model_fn._eval_metrics)."""
  if model_lib.num_outputs(num_classes) == 1:
    return [tf.keras.metrics.BinaryAccuracy(name="accuracy", threshold=BINARY_THRESHOLD),
            tf.keras.metrics.AUC(num_thresholds=AUC_THRESHOLDS, name="auc"),
            tf.keras.metrics.Precision(thresholds=BINARY_THRESHOLD, name="precision"),
            tf.keras.metrics.Recall(thresholds=BINARY_THRESHOLD, name="recall")]
  top_k = min(MAX_TOP_K, num_classes - 1)
  return [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
          tf.keras.metrics.SparseTopKCategoricalAccuracy(k=top_k, name=f"top_{top_k}_accuracy")]


class ConfusionMatrix(tf.keras.metrics.Metric):
  """The confusion matrix (rows: true class, columns: predicted class) of the batches seen.

  A compiled metric, so Keras accumulates and resets it like the others - over the whole
  validation pass at each epoch end, summed over replicas and workers - and hands its value to the
  callbacks as `val_confusion_matrix`. Counts are float32: exact up to 2^24 per cell.
  """

  def __init__(self, num_classes: int, name: str = CONFUSION_MATRIX_METRIC, **kwargs):
    super().__init__(name=name, **kwargs)
    self.num_classes = num_classes
    self.matrix = self.add_weight("matrix", shape=(num_classes, num_classes), initializer="zeros",
                                  dtype=tf.float32)

  def update_state(self, y_true, y_pred, sample_weight=None):
    del sample_weight
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    classes = model_fn_lib.predicted_class(y_pred, self.num_classes)
    self.matrix.assign_add(tf.math.confusion_matrix(labels, classes, num_classes=self.num_classes,
                                                    dtype=tf.float32))

  def result(self):
    return tf.identity(self.matrix)

  def reset_state(self):
    self.matrix.assign(tf.zeros_like(self.matrix))

  def get_config(self):
    return {**super().get_config(), "num_classes": self.num_classes}


def _scalar_logs(logs) -> dict:
  """The logs without the confusion matrix (the only non-scalar metric)."""
  return {k: v for k, v in (logs or {}).items()
          if k not in (CONFUSION_MATRIX_METRIC, "val_" + CONFUSION_MATRIX_METRIC)}


def _strategy_scope(strategy):
  return strategy.scope() if strategy is not None else contextlib.nullcontext()


def build_compiled_model(config: Config, num_classes: int, initial_weights: str = "",
                         steps_total: int = 0, confusion_matrix: bool = False) -> tf.keras.Model:
  """The shared model, optionally loaded from an initial-weights checkpoint, compiled for `fit`.

  Built under `config.distribution`'s strategy when there is one (fit then trains with it).
  `steps_total` (epochs x steps per epoch) is needed by a schedule or warm-up.
  `confusion_matrix` adds the ConfusionMatrix metric (training draws it for TensorBoard).
  """
  if (config.lr_schedule != "constant" or config.warmup_epochs) and steps_total < 1:
    raise ValueError("build_compiled_model needs steps_total (epochs x steps per epoch) for "
                     f"--lr_schedule={config.lr_schedule} / --warmup_epochs: the schedule counts "
                     "steps per epoch.")
  with _strategy_scope(runtime.distribution_strategy(config)):
    model = model_lib.build_model(config, num_classes)
    if initial_weights:
      model_lib.load_initial_weights(model, initial_weights)
    compile_model(model, config, num_classes, model_fn_lib.make_optimizer(config, steps_total),
                  confusion_matrix)
  return model


def compile_model(model: tf.keras.Model, config: Config, num_classes: int, optimizer,
                  confusion_matrix: bool = False) -> None:
  """Compiles `model` for `fit` with `optimizer`: again at a --head_epochs phase change with the
  same optimizer, so the head's slots and the iteration count carry over (Keras needs a new
  compile to train another set of weights)."""
  metrics = compile_metrics(num_classes)
  if confusion_matrix:
    metrics.append(ConfusionMatrix(num_classes))
  with model.distribute_strategy.scope():
    model.compile(optimizer=optimizer, loss=compile_loss(num_classes, config.label_smoothing),
                  metrics=metrics, jit_compile=bool(config.jit))


class _Phases:
  """--head_epochs on one compiled model: the whole base frozen (head phase) or back to
  --fine_tune_from's trainable set (fine-tune phase), recompiled with the same optimizer."""

  def __init__(self, model, config: Config, num_classes: int):
    self._model, self._config, self._num_classes = model, config, num_classes
    self._frozen = []  # the layers the head phase froze

  def enter(self, phase) -> None:
    if phase.name == recipes.HEAD_PHASE:
      self._frozen = model_lib.freeze_whole_base(self._model)
    elif self._frozen:
      model_lib.unfreeze_layers(self._frozen)
      self._frozen = []
    else:
      return  # the model as built: nothing to recompile
    compile_model(self._model, self._config, self._num_classes, self._model.optimizer,
                  confusion_matrix=True)


def training_dataset(split, config: Config, start_batch: int = 0) -> tf.data.Dataset:
  """The shared infinite training stream, in the order the Estimator path reads it.

  Sets TensorFlow's global seed first, as RunConfig(tf_random_seed=seed) sets the Estimator graph's:
  tf.data derives the shuffle seeds from (global seed, op seed), so without it Keras would get a
  different (default) global seed and a different order of batches.
  `start_batch` (--exact_resume) continues the seeded stream where a resumed run left it.
  """
  tf.random.set_seed(config.seed)
  return pipeline.make_dataset(split, config, "train", start_batch=start_batch)


# ---------------------------------------------------------------- checkpoints and history

def latest_checkpoint(model_dir: str):
  return tf.train.latest_checkpoint(model_dir)


def restored_model(config: Config, num_classes: int, checkpoint_path: str) -> tf.keras.Model:
  """The shared model with the weights of a Keras-path checkpoint (optimizer state left out)."""
  model = model_lib.build_model(config, num_classes)
  status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
  status.expect_partial().assert_existing_objects_matched()
  return model


def checkpoint_weights(config: Config, num_classes: int, checkpoint_path: str) -> list:
  """The weights of a Keras-path checkpoint as numpy arrays, in `model.weights` order."""
  return restored_model(config, num_classes, checkpoint_path).get_weights()


def read_history(model_dir: str) -> list:
  return model_dir_lib.read_history(model_dir, HISTORY_FILE)


def _writes_outputs(model) -> bool:
  """Only the chief of a multi-worker run writes model_dir (the others' saves go to temp dirs)."""
  return model.distribute_strategy.extended.should_checkpoint


class _EpochCheckpoints:
  """Model + optimizer + epoch counter, saved at every epoch end and restored on resume."""

  def __init__(self, model, config: Config, writes_outputs: bool):
    self._model = model
    self._model_dir = config.model_dir
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                           epoch=self.epoch)
    # Non-chief workers must take part in saving but their files are throw-away.
    self._scratch = None if writes_outputs else tempfile.mkdtemp(prefix="estimator_ft_worker_")
    self._manager = tf.train.CheckpointManager(
        self._checkpoint, self._scratch or config.model_dir,
        max_to_keep=config.keep_checkpoint_max, checkpoint_name=CHECKPOINT_NAME)

  def restore_latest(self) -> int:
    """Restores model_dir's latest checkpoint if there is one; returns the epochs it completed."""
    latest = latest_checkpoint(self._model_dir)
    if latest is None:
      return 0
    status = self._checkpoint.restore(latest).assert_existing_objects_matched()
    # The optimizer's slots and hyperparameters are restored when its first step creates them;
    # a finished run that trains no further never creates them, which is fine.
    status.expect_partial()
    return int(self.epoch.numpy())

  def save(self, epochs_done: int) -> str:
    self.epoch.assign(epochs_done)
    return self._manager.save(checkpoint_number=self._model.optimizer.iterations)

  def close(self):
    if self._scratch:
      shutil.rmtree(self._scratch, ignore_errors=True)


class _EpochEnd(tf.keras.callbacks.Callback):
  """Records the epoch in the history file, then checkpoints, then logs one line.

  History first: if the process dies between the two, the resumed run redoes the epoch and
  replaces its entry, whereas a checkpoint without its history entry would lose it for good.
  """

  def __init__(self, config, checkpoints, history, steps_per_epoch, writes_outputs):
    super().__init__()
    self._config = config
    self._checkpoints = checkpoints
    self.history = history
    self._steps_per_epoch = steps_per_epoch
    self._writes_outputs = writes_outputs
    self.epochs_trained = 0
    self._epoch_started = time.time()

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch_started = time.time()

  def on_epoch_end(self, epoch, logs=None):
    epochs_done = epoch + 1
    entry = {"epoch": epochs_done, "step": int(self.model.optimizer.iterations.numpy())}
    entry.update({k: float(logs[k]) for k in TRAINING_HISTORY_KEYS if k in logs})
    entry.update({k: float(v) for k, v in _scalar_logs(logs).items() if k.startswith("val_")})
    self.history = [h for h in self.history if h["epoch"] != epochs_done] + [entry]
    if self._writes_outputs:
      model_dir_lib.write_history(self._config.model_dir, HISTORY_FILE, self.history)
    self._checkpoints.save(epochs_done)
    self.epochs_trained += 1
    took = time.time() - self._epoch_started
    logger.info("epoch %d/%d done in %.0f s: loss %.4f accuracy %.4f (running averages over the "
                "epoch) | val_loss %.4f val_accuracy %.4f (one full validation pass, inference "
                "mode)", epochs_done, self._config.epochs, took,
                entry.get("loss", math.nan), entry.get("accuracy", math.nan),
                entry.get("val_loss", math.nan), entry.get("val_accuracy", math.nan))


class _StopOnSignal(tf.keras.callbacks.Callback):
  """Delivers a Ctrl-C or SIGTERM whose Interrupted Python dropped (see interrupts) at the next
  training or validation step."""

  def on_train_batch_begin(self, batch, logs=None):
    interrupts.raise_if_received()

  def on_test_batch_begin(self, batch, logs=None):
    interrupts.raise_if_received()


class _Progress(tf.keras.callbacks.Callback):
  """Steps/s, images/s, running loss and ETA every `log_every_n_steps` steps, as the Estimator's."""

  def __init__(self, config, steps_per_epoch):
    super().__init__()
    self._config = config
    self._steps_per_epoch = steps_per_epoch
    self._max_steps = config.epochs * steps_per_epoch
    self._epoch = 0
    self._last_time = self._last_step = None
    self._previous_batch_end = None
    self._rate = None
    self._pauses = progress.PauseTimer()

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    step = self._epoch * self._steps_per_epoch + batch + 1
    progress.record_step(step)
    now = time.time()
    previous_batch_end, self._previous_batch_end = self._previous_batch_end, now
    if batch == 0 and previous_batch_end is not None:
      # Between the previous epoch's last step and this one: validation and the epoch-end
      # checkpoint. Counted for the ETA, and kept out of the steps/s window.
      if self._rate:
        self._pauses.add(now - previous_batch_end - 1 / self._rate)
      self._last_time, self._last_step = now, step
      return
    if self._last_time is None:
      # The first step includes tracing the training function: not a rate worth reporting.
      self._last_time, self._last_step = now, step
      return
    if step % self._config.log_every_n_steps and step != self._max_steps:
      return
    self._rate = progress.steps_per_second(step - self._last_step, now - self._last_time)
    logger.info(progress.progress_line(
        self._epoch + 1, step, self._max_steps, self._rate, self._config.batch_size,
        (logs or {}).get("loss", math.nan), "epoch running average", pause_s=self._pauses.mean,
        pauses_ahead=progress.pauses_left(step, self._max_steps, self._steps_per_epoch)))
    self._last_time, self._last_step = now, step


def learning_rate_of_step(optimizer, step: int) -> float:
  """The learning rate the optimizer applied in step `step` (1-based): the schedule's value at
  `step - 1` iterations, as the Estimator's train op reads it before the step (model_fn)."""
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  rate = inner._get_hyper("learning_rate")  # pylint: disable=protected-access
  if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
    rate = rate(max(step - 1, 0))
  return float(tf.keras.backend.get_value(rate))


class _Curves(tf.keras.callbacks.Callback):
  """The common TensorBoard curves (run/summaries.py) at the global step, as the Estimator writes.

  Every process takes part (reading the step and the logs is cheap and collective-free); only the
  one that writes outputs (the chief) writes. Logs hold Keras' running averages over the epoch
  (training) and the whole validation pass, confusion matrix included (epoch end).
  """

  def __init__(self, config: Config, class_names, steps_per_epoch: int, writes_outputs: bool,
               validation_examples: int = 0):
    super().__init__()
    self._config = config
    self._class_names = tuple(class_names)
    self._steps_per_epoch = steps_per_epoch
    self._validation_examples = validation_examples
    self._writer = summaries.CurveWriter(config.model_dir) if writes_outputs else None
    self._last_step = None

  def _step(self) -> int:
    return int(self.model.optimizer.iterations.numpy())

  def on_train_batch_end(self, batch, logs=None):
    step = self._step()
    due = summaries.due(step, self._last_step, self._config.save_summary_steps,
                        self._steps_per_epoch)
    self._last_step = step
    logs = logs or {}
    if self._writer is None or not due or "loss" not in logs:
      return
    scalars = summaries.training_scalars(
        logs["loss"], logs.get("accuracy", math.nan),
        learning_rate_of_step(self.model.optimizer, step))
    self._writer.write(step, summaries.curve_summary(scalars))

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    if self._writer is None:
      return
    images = {}
    matrix = logs.get("val_" + CONFUSION_MATRIX_METRIC)
    if matrix is not None:
      summaries.partial_validation_warning(matrix, self._validation_examples)
      images[summaries.CONFUSION_MATRIX_IMAGE] = summaries.confusion_matrix_png(
          np.rint(np.asarray(matrix)).astype(np.int64), self._class_names)
    validation = {k: v for k, v in _scalar_logs(logs).items() if k.startswith("val_")}
    self._writer.write(self._step(), summaries.curve_summary(
        summaries.validation_scalars(validation), images))

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class _EarlyStopping(tf.keras.callbacks.Callback):
  """--early_stopping_patience: stops `fit` after the epoch whose evaluation makes
  recipes.early_stopping say so. It reads the history _EpochEnd keeps (restored from
  keras_history.json on resume), so a resumed run keeps the count; runs after _EpochEnd, so the
  stopping epoch is checkpointed and recorded."""

  def __init__(self, config: Config, epoch_end: "_EpochEnd"):
    super().__init__()
    self._config, self._epoch_end = config, epoch_end

  def on_epoch_end(self, epoch, logs=None):
    report = _early_stopping_report(self._config, self._epoch_end.history)
    if report and report["stopped"]:
      logger.info("Early stopping after epoch %d: %s.", report["epoch"], report["reason"])
      self.model.stop_training = True


def _early_stopping_report(config: Config, history):
  return recipes.early_stopping_report(history, config.export_best_metric,
                                       config.early_stopping_patience,
                                       config.early_stopping_min_delta)


class _StopOnNaN(tf.keras.callbacks.Callback):
  """Raises NaNLossError at the first non-finite loss, before anything is checkpointed."""

  def __init__(self, config):
    super().__init__()
    self._config = config

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
      step = int(self.model.optimizer.iterations.numpy())
      raise errors.nan_loss_error(self._config, f"the loss became {float(loss)} at step {step}")


# ---------------------------------------------------------------- train

def _final_evaluation(model, history, epochs_trained, validation, global_step) -> dict:
  """Validation figures of the final weights: the last epoch's, or a fresh pass if none ran now."""
  if epochs_trained and history:
    values = {k[len("val_"):]: v for k, v in history[-1].items() if k.startswith("val_")}
  else:
    measured = model.evaluate(validation, verbose=0, return_dict=True)
    values = {k: float(v) for k, v in _scalar_logs(measured).items()}
  # Keras' validation loss is already the per-example mean the Estimator path calls example_loss.
  values[model_fn_lib.EXAMPLE_LOSS] = values.get("loss")
  values["global_step"] = global_step
  return values


def check_settings(config: Config, class_names) -> None:
  """What this path refuses, before the train job writes anything: nothing beyond Config's."""
  del config, class_names


def _warn_about_estimator_only_settings(config: Config) -> None:
  if config.save_checkpoints_steps:
    logger.warning("--save_checkpoints_steps=%d applies to the Estimator path; the Keras path "
                   "checkpoints and validates at every epoch end.", config.save_checkpoints_steps)


def train(config: Config, splits, initial_weights: str,
          extras: export_lib.ExportExtras = export_lib.NO_EXTRAS, callbacks=()) -> dict:
  """Trains with `model.fit` up to `config.epochs` epochs, resuming from model_dir's checkpoints.

  extras: what the export carries besides the SavedModel (warm-up images, chosen by the job);
  with --export_tflite it also holds the TFLite model of the final weights.
  callbacks: more Keras callbacks for `fit`, after the path's own (the bench's timers).
  """
  class_names = tuple(splits.class_names)
  num_classes = len(class_names)
  steps_per_epoch = split_lib.steps_per_epoch(splits.train, config.batch_size)
  _warn_about_estimator_only_settings(config)
  resuming = latest_checkpoint(config.model_dir) is not None
  model = build_compiled_model(config, num_classes, "" if resuming else initial_weights,
                               steps_total=config.epochs * steps_per_epoch, confusion_matrix=True)
  writes_outputs = _writes_outputs(model)
  checkpoints = _EpochCheckpoints(model, config, writes_outputs)
  curves = None
  try:
    epochs_done = checkpoints.restore_latest()
    history = [h for h in read_history(config.model_dir) if h["epoch"] <= epochs_done]
    _log_run_plan(config, splits, steps_per_epoch, epochs_done)
    validation = pipeline.make_dataset(splits.validation, config, "eval")
    epoch_end = _EpochEnd(config, checkpoints, history, steps_per_epoch, writes_outputs)
    phases = model_fn_lib.run_phases(config, steps_per_epoch)
    ahead = recipes.phases_ahead(epochs_done * steps_per_epoch, phases)
    stopped = _early_stopping_report(config, history)
    if stopped and stopped["stopped"]:
      logger.info("Not training further: the run stopped early after epoch %d (%s).",
                  stopped["epoch"], stopped["reason"])
      ahead = ()
    if ahead:
      # No Keras TensorBoard callback: its tags (epoch_loss at the epoch index...) would not
      # overlay the Estimator's; _Curves writes the common ones at the global step.
      curves = _Curves(config, class_names, steps_per_epoch, writes_outputs,
                       splits.validation.num_examples)
      fit_callbacks = [_StopOnSignal(), _StopOnNaN(config), epoch_end,
                       _EarlyStopping(config, epoch_end), curves,
                       _Progress(config, steps_per_epoch), *callbacks]
      if writes_outputs:
        summaries.write_config_summary(config, class_names)
    phase_switch = _Phases(model, config, num_classes)
    # The first fit resumes the stream as any resume does; a later phase's fit continues it at
    # the boundary, as one uninterrupted stream (the Estimator path does the same).
    start_batch = epochs_done * steps_per_epoch if config.exact_resume else 0
    for phase in ahead:
      if phase is not ahead[0]:
        stopped = _early_stopping_report(config, epoch_end.history)
        if stopped and stopped["stopped"]:
          break  # (_EarlyStopping logged why)
      initial_epoch = max(epochs_done, phase.first_epoch - 1)
      if len(phases) > 1:
        logger.info("Phase %s from epoch %d: %s", phase.name, initial_epoch + 1,
                    recipes.phase_line(phase))
      phase_switch.enter(phase)
      model.fit(training_dataset(splits.train, config, start_batch), epochs=phase.last_epoch,
                initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                validation_data=validation, callbacks=fit_callbacks, verbose=0,
                class_weight=_fit_class_weight(config, splits.train))
      start_batch = phase.end_step
    if not epoch_end.epochs_trained:
      # Nothing trained now: the final checkpoint is evaluated in the phase that wrote it.
      phase_switch.enter(recipes.phase_of_checkpoint(epochs_done * steps_per_epoch, phases))
  finally:
    checkpoints.close()
    if curves is not None:
      curves.close()

  global_step = int(model.optimizer.iterations.numpy())
  history = epoch_end.history
  final_evaluation = _final_evaluation(model, history, epoch_end.epochs_trained, validation,
                                       global_step)
  export_path = None
  if writes_outputs:
    if config.export_tflite:
      extras = extras.replace(write_beside=export_tflite.beside_writer(
          config, class_names, lambda _: model.get_weights(), extras.representative_images))
    export_path = _export(model, config, class_names, global_step, final_evaluation,
                          trained_now=epoch_end.epochs_trained > 0, extras=extras)
  elif epoch_end.epochs_trained > 0 and config.export_during_training:
    # Saving a MultiWorkerMirroredStrategy model runs collective ops, so every worker must save
    # along with the chief; a non-chief's copy goes to a scratch folder and is thrown away.
    scratch = tempfile.mkdtemp(prefix="estimator_ft_worker_export_")
    try:
      export_lib.export_keras_model(model, config, class_names, scratch, global_step=global_step,
                                    metrics=final_evaluation)
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
  return {
      "global_step": global_step,
      "steps_per_epoch": steps_per_epoch,
      "history": history,
      "final_evaluation": final_evaluation,
      "export_path": export_path,
      **({"early_stopping": _early_stopping_report(config, history)}
         if config.early_stopping_patience else {}),
  }


def _fit_class_weight(config: Config, train_split):
  """model_fn.training_class_weights as `fit`'s class_weight: per-example weights of the training
  loss (and of Keras' running training metrics); validation stays unweighted."""
  weights = model_fn_lib.training_class_weights(config, train_split)
  return None if weights is None else dict(enumerate(weights))


def _export(model, config, class_names, global_step, final_evaluation, trained_now,
            extras=export_lib.NO_EXTRAS) -> str:
  """The SavedModel of the final weights; a re-run that trained nothing reuses its export."""
  if not config.export_during_training:
    return None
  export_base = os.path.join(config.model_dir, export_lib.EXPORT_DIR, EXPORT_NAME)
  existing = serving.newest_version(export_base)
  if existing and not trained_now:
    return existing
  return export_lib.export_keras_model(model, config, class_names, export_base,
                                       global_step=global_step, metrics=final_evaluation,
                                       extras=extras)


def _log_run_plan(config, splits, steps_per_epoch, epochs_done):
  resumed = f", resuming after epoch {epochs_done}" if epochs_done else ""
  logger.info("Keras path: %d train / %d validation images, classes %s, %d steps per epoch x %d "
              "epochs, batch %d, image %dpx%s%s", splits.train.num_examples,
              splits.validation.num_examples, list(splits.class_names), steps_per_epoch,
              config.epochs, config.batch_size, config.image_size, resumed,
              recipes.phases_note(model_fn_lib.run_phases(config, steps_per_epoch)))
