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
  train/, validation/         TensorBoard events (the Keras callback's layout); config/ the config
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

import tensorflow as tf

from estimator_ft import export as export_lib
from estimator_ft import export_tflite
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import progress
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


# ---------------------------------------------------------------- model

def compile_loss(num_classes: int) -> tf.keras.losses.Loss:
  """model_fn's loss (same class, same settings), averaged over the batch for `fit`.

  The Estimator's training loss is the mean of the per-example values; SUM_OVER_BATCH_SIZE is the
  same mean. (model_fn.make_loss itself returns per-example values, which `fit` would sum.)
  """
  per_example = model_fn_lib.make_loss(num_classes)
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


def _strategy_scope(strategy):
  return strategy.scope() if strategy is not None else contextlib.nullcontext()


def build_compiled_model(config: Config, num_classes: int, initial_weights: str = "",
                         steps_total: int = 0) -> tf.keras.Model:
  """The shared model, optionally loaded from an initial-weights checkpoint, compiled for `fit`.

  Built under `config.distribution`'s strategy when there is one (fit then trains with it).
  `steps_total` (epochs x steps per epoch) is only needed by --lr_schedule=cosine.
  """
  if config.lr_schedule == "cosine" and steps_total < 1:
    raise ValueError("build_compiled_model needs steps_total (epochs x steps per epoch) for "
                     "--lr_schedule=cosine: the schedule decays over the whole run.")
  with _strategy_scope(runtime.distribution_strategy(config)):
    model = model_lib.build_model(config, num_classes)
    if initial_weights:
      model_lib.load_initial_weights(model, initial_weights)
    model.compile(optimizer=model_fn_lib.make_optimizer(config, steps_total),
                  loss=compile_loss(num_classes), metrics=compile_metrics(num_classes),
                  jit_compile=bool(config.jit))
  return model


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


def checkpoint_weights(config: Config, num_classes: int, checkpoint_path: str) -> list:
  """The weights of a Keras-path checkpoint as numpy arrays, in `model.weights` order."""
  model = model_lib.build_model(config, num_classes)
  status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
  status.expect_partial().assert_existing_objects_matched()
  return model.get_weights()


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
    entry.update({k: float(v) for k, v in logs.items() if k.startswith("val_")})
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


class _Progress(tf.keras.callbacks.Callback):
  """Steps/s, images/s, running loss and ETA every `log_every_n_steps` steps, as the Estimator's."""

  def __init__(self, config, steps_per_epoch):
    super().__init__()
    self._config = config
    self._steps_per_epoch = steps_per_epoch
    self._max_steps = config.epochs * steps_per_epoch
    self._epoch = 0
    self._last_time = self._last_step = None

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    step = self._epoch * self._steps_per_epoch + batch + 1
    now = time.time()
    if self._last_time is None:
      # The first step includes tracing the training function: not a rate worth reporting.
      self._last_time, self._last_step = now, step
      return
    if step % self._config.log_every_n_steps and step != self._max_steps:
      return
    rate = progress.steps_per_second(step - self._last_step, now - self._last_time)
    logger.info(progress.progress_line(self._epoch + 1, step, self._max_steps, rate,
                                       self._config.batch_size, (logs or {}).get("loss", math.nan),
                                       "epoch running average"))
    self._last_time, self._last_step = now, step


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
    values = {k: float(v) for k, v in measured.items()}
  # Keras' validation loss is already the per-example mean the Estimator path calls example_loss.
  values[model_fn_lib.EXAMPLE_LOSS] = values.get("loss")
  values["global_step"] = global_step
  return values


def _warn_about_estimator_only_settings(config: Config) -> None:
  if config.save_checkpoints_steps:
    logger.warning("--save_checkpoints_steps=%d applies to the Estimator path; the Keras path "
                   "checkpoints and validates at every epoch end.", config.save_checkpoints_steps)


def train(config: Config, splits, initial_weights: str,
          extras: export_lib.ExportExtras = export_lib.NO_EXTRAS) -> dict:
  """Trains with `model.fit` up to `config.epochs` epochs, resuming from model_dir's checkpoints.

  extras: what the export carries besides the SavedModel (warm-up images, chosen by the job);
  with --export_tflite it also holds the TFLite model of the final weights.
  """
  class_names = tuple(splits.class_names)
  num_classes = len(class_names)
  steps_per_epoch = split_lib.steps_per_epoch(splits.train, config.batch_size)
  _warn_about_estimator_only_settings(config)
  resuming = latest_checkpoint(config.model_dir) is not None
  model = build_compiled_model(config, num_classes, "" if resuming else initial_weights,
                               steps_total=config.epochs * steps_per_epoch)
  writes_outputs = _writes_outputs(model)
  checkpoints = _EpochCheckpoints(model, config, writes_outputs)
  try:
    epochs_done = checkpoints.restore_latest()
    history = [h for h in read_history(config.model_dir) if h["epoch"] <= epochs_done]
    _log_run_plan(config, splits, steps_per_epoch, epochs_done)
    validation = pipeline.make_dataset(splits.validation, config, "eval")
    epoch_end = _EpochEnd(config, checkpoints, history, steps_per_epoch, writes_outputs)
    if epochs_done < config.epochs:
      callbacks = [_StopOnNaN(config), epoch_end, _Progress(config, steps_per_epoch)]
      if writes_outputs:
        summaries.write_config_summary(config, class_names)
        callbacks.append(tf.keras.callbacks.TensorBoard(
            log_dir=config.model_dir, update_freq=config.save_summary_steps, profile_batch=0,
            # The ResNet50 graph adds megabytes per run and nothing to a comparison of curves.
            write_graph=False))
      start_batch = epochs_done * steps_per_epoch if config.exact_resume else 0
      model.fit(training_dataset(splits.train, config, start_batch), epochs=config.epochs,
                initial_epoch=epochs_done, steps_per_epoch=steps_per_epoch,
                validation_data=validation, callbacks=callbacks, verbose=0)
  finally:
    checkpoints.close()

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
  }


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
              "epochs, batch %d, image %dpx%s", splits.train.num_examples,
              splits.validation.num_examples, list(splits.class_names), steps_per_epoch,
              config.epochs, config.batch_size, config.image_size, resumed)
