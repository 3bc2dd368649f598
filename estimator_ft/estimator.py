"""The Estimator training path: `train_and_evaluate`, progress and epoch-metrics hooks, history.

Evaluation runs on every checkpoint, and a checkpoint is written at every epoch end (unless
--save_checkpoints_steps says otherwise), so the whole validation set is evaluated once per epoch.
The training input is one infinite, reshuffled stream, so epochs are counted in steps:
`steps_per_epoch = ceil(train examples / batch size)` - the same count the Keras path gives `fit`.
"""

import logging
import math
import os
import time

import tensorflow as tf

from estimator_ft import export as export_lib
from estimator_ft import export_tflite
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import progress
from estimator_ft.config import Config
from estimator_ft.data import pipeline
from estimator_ft.data import split as split_lib
from estimator_ft.run import errors
from estimator_ft.run import events
from estimator_ft.run import model_dir as model_dir_lib
from estimator_ft.run import runtime
from estimator_ft.run import summaries

logger = logging.getLogger("estimator_ft")

# What TF_XLA_FLAGS must hold for a session to XLA-compile CPU ops (see _session_config).
CPU_GLOBAL_JIT_FLAG = "--tf_xla_cpu_global_jit"
# The Estimator's evaluation events, which TensorBoard shows as the "eval" run.
EVAL_DIR = "eval"
# A cluster's evaluator polls model_dir for a new checkpoint this often (throttle_secs=0 would make
# it spin on the checkpoint file while the trainers need the CPU).
EVALUATOR_POLL_S = 2


def make_run_config(config: Config, steps_per_epoch: int) -> tf.estimator.RunConfig:
  if config.distribution == "multi_worker_mirrored":
    # Measured with TF 2.15: the Estimator's distribute coordinator fails with
    # "/job:chief/replica:0/task:0/device:CPU:0 unknown device" (and a TF_CONFIG-built strategy with
    # "Collective ops must be configured at program startup").
    raise ValueError(
        "--distribution=multi_worker_mirrored does not work on the Estimator path with "
        "TensorFlow 2.15. For several machines, run the Estimator path with the default "
        "--distribution=none and a TF_CONFIG cluster with parameter servers (estimator-ft "
        "launch-local --workers=N --ps=M); for synchronous multi-worker training use "
        "--path=keras --distribution=multi_worker_mirrored; for several devices on one machine, "
        "--distribution=mirrored.")
  strategy = runtime.distribution_strategy(config)
  return tf.estimator.RunConfig(
      model_dir=config.model_dir,
      tf_random_seed=config.seed,
      save_checkpoints_steps=config.save_checkpoints_steps or steps_per_epoch,
      keep_checkpoint_max=config.keep_checkpoint_max,
      save_summary_steps=config.save_summary_steps,
      # Our ProgressHook logs steps/s, images/s and ETA; the built-in line would repeat it.
      log_step_count_steps=10**9,
      train_distribute=strategy,
      # Not the graph.pbtxt (9 MB at 64 px) and a .meta file with every checkpoint: that costs about
      # a second per checkpoint on 2 cores (measured by `estimator-ft bench`) and nothing reads
      # them. TensorBoard's graph tab still works: the graph also goes into the event file.
      checkpoint_save_graph_def=False,
      session_config=_session_config(config))


def _session_config(config: Config):
  session_config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
  if config.jit:
    session_config.graph_options.optimizer_options.global_jit_level = tf.compat.v1.OptimizerOptions.ON_1
    if not tf.config.list_physical_devices("GPU") and (
        CPU_GLOBAL_JIT_FLAG not in os.environ.get("TF_XLA_FLAGS", "")):
      logger.warning(
          "--jit: a session's XLA auto-clustering compiles GPU ops only; on this CPU the Estimator "
          "path runs without XLA unless TF_XLA_FLAGS=%s is set before the run starts. Measured "
          "by `estimator-ft bench` on a 2-core CPU, XLA trained ResNet50 about 3x slower than the "
          "default oneDNN kernels (Keras jit_compile about 5x), so leave --jit off on CPUs.",
          CPU_GLOBAL_JIT_FLAG)
  return session_config


def make_estimator(config: Config, class_names, steps_per_epoch: int, initial_weights: str = ""):
  model_fn = model_fn_lib.build_model_fn(config, class_names, steps_per_epoch, initial_weights)
  return tf.estimator.Estimator(model_fn=model_fn, config=make_run_config(config, steps_per_epoch))


# ---------------------------------------------------------------- hooks

class ProgressHook(tf.estimator.SessionRunHook):
  """Logs epoch, step, steps/s, images/s, loss and ETA every `every_n_steps` steps."""

  def __init__(self, steps_per_epoch, max_steps, batch_size, every_n_steps, checkpoint_every_n_steps=0):
    self._steps_per_epoch = steps_per_epoch
    self._max_steps = max_steps
    self._batch_size = batch_size
    self._every = every_n_steps
    self._checkpoint_every = checkpoint_every_n_steps

  def begin(self):
    self._global_step = tf.compat.v1.train.get_global_step()
    self._loss_sum = tf.compat.v1.get_default_graph().get_tensor_by_name(
        model_fn_lib.BATCH_LOSS_TENSOR + ":0")
    self._size = tf.compat.v1.get_default_graph().get_tensor_by_name(
        model_fn_lib.BATCH_SIZE_TENSOR + ":0")
    self._last_time = None
    self._last_step = None
    self._restart_window = False
    self._previous = None  # (step, time) of the previous after_run

  def before_run(self, run_context):
    if self._restart_window:
      self._last_time, self._restart_window = time.time(), False
    return tf.estimator.SessionRunArgs([self._global_step, self._loss_sum, self._size])

  def after_run(self, run_context, run_values):
    step_before, loss_sum, size = run_values.results
    step = int(step_before) + 1
    now = time.time()
    previous, self._previous = self._previous, (step, now)
    if self._checkpoint_every and step % self._checkpoint_every == 0:
      # The checkpoint saver hook runs before this one, and the evaluation and exports of this
      # checkpoint inside it: time the window up to the previous step, and start the next window
      # at the next step, so the line reports training speed, not "0.2 img/s" at each epoch end.
      if previous is not None:
        self._log(step, loss_sum, size, *previous)
      self._restart_window, self._last_step = True, step
      return
    if self._last_time is None:
      self._last_time, self._last_step = now, step
      return
    if step % self._every and step != self._max_steps:
      return
    self._log(step, loss_sum, size, step, now)

  def _log(self, step, loss_sum, size, window_end_step, window_end_time):
    if self._last_time is None:
      return
    rate = progress.steps_per_second(window_end_step - self._last_step,
                                     window_end_time - self._last_time)
    epoch = min(math.ceil(step / self._steps_per_epoch), math.ceil(self._max_steps / self._steps_per_epoch))
    logger.info(progress.progress_line(epoch, step, self._max_steps, rate, self._batch_size,
                                       float(loss_sum) / max(int(size), 1)))
    self._last_time, self._last_step = window_end_time, window_end_step


class EpochMetricsHook(tf.estimator.SessionRunHook):
  """Keras-style training metrics: per-example running averages over each epoch.

  They are what Keras' progress bar shows as `loss` / `accuracy` - averages over an epoch of a
  model that kept changing, not a measurement of the final weights (that is validation's job).
  Written to `train_history.json` at each epoch end, so a resumed run keeps earlier epochs.

  In an asynchronous cluster the shared global step also advances with the workers' steps, so the
  chief sees it jump: an epoch ends at the chief's first step past its boundary, and the averages
  cover the chief's own batches (`train_steps_averaged` says how many).
  """

  def __init__(self, model_dir, steps_per_epoch):
    self._model_dir = model_dir
    self._steps_per_epoch = steps_per_epoch

  def begin(self):
    graph = tf.compat.v1.get_default_graph()
    self._fetches = [tf.compat.v1.train.get_global_step()] + [
        graph.get_tensor_by_name(name + ":0") for name in
        (model_fn_lib.BATCH_LOSS_TENSOR, model_fn_lib.BATCH_CORRECT_TENSOR,
         model_fn_lib.BATCH_SIZE_TENSOR)]
    self._history = model_dir_lib.read_history(self._model_dir, model_dir_lib.TRAIN_HISTORY_FILE)
    # The epoch the run starts in, from the checkpoint it resumes (not from the first step seen:
    # in a cluster the other workers may already have ended that epoch).
    self._epoch_before = model_dir_lib.latest_checkpoint_step(self._model_dir) // self._steps_per_epoch
    self._reset()

  def _reset(self):
    self._loss = self._correct = self._count = 0.0
    self._steps_seen = 0

  def before_run(self, run_context):
    return tf.estimator.SessionRunArgs(self._fetches)

  def after_run(self, run_context, run_values):
    step_before, loss_sum, correct, size = run_values.results
    self._loss += float(loss_sum)
    self._correct += float(correct)
    self._count += float(size)
    self._steps_seen += 1
    self._maybe_end_epoch(int(step_before) + 1)

  def _maybe_end_epoch(self, step):
    epoch = step // self._steps_per_epoch
    if epoch <= self._epoch_before:
      return
    self._history = [h for h in self._history if h["epoch"] != epoch]
    self._history.append({
        "epoch": epoch, "step": int(step),
        "loss": self._loss / self._count, "accuracy": self._correct / self._count,
        # A resumed run sees only part of the interrupted epoch; say so rather than hide it.
        "train_steps_averaged": self._steps_seen})
    self._history.sort(key=lambda h: h["epoch"])
    model_dir_lib.write_history(self._model_dir, model_dir_lib.TRAIN_HISTORY_FILE, self._history)
    self._epoch_before = epoch
    self._reset()


def build_history(model_dir, steps_per_epoch, epochs):
  """Per-epoch dicts: training running averages + validation (one full pass, per example)."""
  train = {h["epoch"]: h for h in model_dir_lib.read_history(model_dir, model_dir_lib.TRAIN_HISTORY_FILE)}
  evals = events.scalars_by_step(os.path.join(model_dir, EVAL_DIR))
  history = []
  for epoch in range(1, epochs + 1):
    entry = {"epoch": epoch}
    if epoch in train:
      entry.update(loss=train[epoch]["loss"], accuracy=train[epoch]["accuracy"])
    eval_step = _eval_step_of_epoch(evals, epoch, steps_per_epoch, last=epoch == epochs)
    metrics = evals.get(eval_step)
    if eval_step is not None and eval_step != epoch * steps_per_epoch:
      entry["val_global_step"] = eval_step
    if metrics:
      entry.update(val_loss=metrics.get(model_fn_lib.EXAMPLE_LOSS), val_accuracy=metrics.get("accuracy"))
      entry.update({f"val_{k}": v for k, v in metrics.items()
                    if k not in ("accuracy", "loss", model_fn_lib.EXAMPLE_LOSS)})
    history.append(entry)
  return history


def _eval_step_of_epoch(evals, epoch, steps_per_epoch, last):
  """The step of the evaluation that closes `epoch`: at its end, else the first one after it.

  Asynchronous cluster workers share the global step, so checkpoints (and evaluations) land a
  few steps past the epoch boundary rather than on it.
  """
  end = epoch * steps_per_epoch
  if end in evals:
    return end
  after = [s for s in evals if s > end and (last or s < end + steps_per_epoch)]
  return min(after) if after else None


# ---------------------------------------------------------------- train

def checkpoint_weights(config: Config, num_classes: int, checkpoint_path: str) -> list:
  """The weights of an Estimator checkpoint as numpy arrays, in `model.weights` order.

  The model_fn builds the model in a fresh graph, so its variables carry the builder's own layer
  names; a build in another fresh graph gives the same names (Keras numbers names per graph).
  """
  with tf.Graph().as_default():
    names = [w.name.split(":")[0] for w in model_lib.build_model(config, num_classes).weights]
  reader = tf.train.load_checkpoint(checkpoint_path)
  return [reader.get_tensor(name) for name in names]


def tflite_writer(config: Config, class_names, representative_images=()):
  """--export_tflite: the best exporter's ExportExtras.write_beside, from the exported checkpoint."""
  num_classes = len(class_names)
  return export_tflite.beside_writer(
      config, class_names, lambda checkpoint_path: checkpoint_weights(config, num_classes,
                                                                      checkpoint_path),
      representative_images)


def train(config: Config, splits, initial_weights: str,
          extras: export_lib.ExportExtras = export_lib.NO_EXTRAS) -> dict:
  """Runs train_and_evaluate to `epochs` epochs (resuming if model_dir has checkpoints).

  extras: what the exports carry besides the SavedModel (warm-up images, chosen by the job);
  with --export_tflite the best exporter also writes the TFLite model.
  """
  class_names = tuple(splits.class_names)
  if config.export_tflite:
    extras = extras.replace(
        write_beside=tflite_writer(config, class_names, extras.representative_images))
  steps_per_epoch = split_lib.steps_per_epoch(splits.train, config.batch_size)
  max_steps = config.epochs * steps_per_epoch
  estimator = make_estimator(config, class_names, steps_per_epoch, initial_weights)
  is_chief = estimator.config.is_chief
  hooks = [ProgressHook(steps_per_epoch, max_steps, config.batch_size, config.log_every_n_steps,
                        config.save_checkpoints_steps or steps_per_epoch)]
  if is_chief:
    # One writer of train_history.json: in a cluster, the workers' averages would overwrite it.
    hooks.append(EpochMetricsHook(config.model_dir, steps_per_epoch))
  # Each trainer of a cluster (chief 0, workers 1..) shuffles and augments with its own seed:
  # with the same one, every worker would train on the very batches the chief trains on. (The
  # evaluator has no id and does not train.)
  trainer_id = estimator.config.global_id_in_cluster or 0
  train_config = config.replace(seed=config.seed + trainer_id)
  train_spec = tf.estimator.TrainSpec(
      input_fn=pipeline.make_input_fn(splits.train, train_config, "train",
                                      start_batch=exact_resume_batch(config, estimator)),
      max_steps=max_steps, hooks=hooks)
  eval_spec = tf.estimator.EvalSpec(
      input_fn=pipeline.make_input_fn(splits.validation, config, "eval"),
      steps=None,  # None: the whole validation set, every time
      exporters=export_lib.make_exporters(config, class_names, extras),
      start_delay_secs=0,
      throttle_secs=EVALUATOR_POLL_S if estimator.config.task_type == "evaluator" else 0)
  _log_run_plan(config, splits, steps_per_epoch)
  if is_chief:
    summaries.write_config_summary(config, class_names)
    if not estimator.config.cluster_spec.as_dict():  # a cluster's evaluator catches up by itself
      finish_interrupted_evaluation(estimator, eval_spec)
  try:
    tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
  except tf.compat.v1.train.NanLossDuringTrainingError as e:
    raise errors.nan_loss_error(config, "the training loss became NaN") from e
  except tf.errors.InvalidArgumentError as e:
    if model_fn_lib.NON_FINITE_OUTPUTS not in str(e):
      raise
    raise errors.nan_loss_error(
        config, "the model's outputs became NaN while evaluating (loss became NaN)") from e
  if not is_chief:
    # A cluster's worker or evaluator: model_dir and results belong to the chief.
    return {"steps_per_epoch": steps_per_epoch}

  global_step = int(estimator.get_variable_value("global_step"))
  evals = events.scalars_by_step(os.path.join(config.model_dir, EVAL_DIR))
  if global_step not in evals:
    # Training was already complete (re-run of a finished command), or this is a cluster's chief:
    # its evaluator may not have reached the final checkpoint, which async workers can push past
    # max_steps. Evaluate the final weights here.
    final = estimator.evaluate(pipeline.make_input_fn(splits.validation, config, "eval"))
    final_evaluation = {k: float(v) for k, v in final.items()}
  else:
    final_evaluation = evals[global_step]
  # After the final evaluation, which the last epoch's validation figures may come from.
  history = build_history(config.model_dir, steps_per_epoch, config.epochs)
  return {
      "global_step": global_step,
      "steps_per_epoch": steps_per_epoch,
      "history": history,
      "final_evaluation": final_evaluation,
      "export_path": export_lib.latest_export_path(config.model_dir),
  }


def exact_resume_batch(config: Config, estimator) -> int:
  """--exact_resume: the batch the training stream resumes at, the global step of the checkpoint.

  The stream is replayed from the seed up to that batch (data.make_dataset's start_batch) rather
  than restored from a checkpointed tf.data iterator: CheckpointInputPipelineHook writes its own
  checkpoints *after* the model checkpoint and the evaluation and exports it triggers, so a run
  killed in between resumed the model at step N with the input of an earlier step; its iterator
  state also adds ~30 MB per checkpoint at 224 px (prefetch and map buffers), and the whole cache
  with --cache. Replaying costs nothing in the checkpoint and stays consistent with it.
  """
  if not config.exact_resume:
    return 0
  if estimator.config.num_worker_replicas > 1:
    raise ValueError("--exact_resume does not work in a TF_CONFIG cluster: the workers read their "
                     "own streams but share one global step. Drop --exact_resume for cluster runs.")
  step = model_dir_lib.latest_checkpoint_step(estimator.model_dir)
  if step:
    logger.info("Exact resume: the training stream continues at batch %d.", step)
  return step


def finish_interrupted_evaluation(estimator, eval_spec) -> None:
  """Evaluates and exports the latest checkpoint if the run that wrote it was killed first.

  train_and_evaluate evaluates each checkpoint right after saving it, and a resumed run never
  goes back: a run killed in between (evaluation and exports take most of an epoch's end) would
  leave that epoch without validation figures in results.json, and maybe its best export missing.
  """
  step = model_dir_lib.latest_checkpoint_step(estimator.model_dir)
  # Step 0 is the checkpoint of the starting point, which train_and_evaluate never evaluates.
  if step == 0 or step in events.scalars_by_step(os.path.join(estimator.model_dir, EVAL_DIR)):
    return
  latest = estimator.latest_checkpoint()
  logger.info("Evaluating %s, which the run that wrote it did not get to evaluate.", latest)
  metrics = estimator.evaluate(eval_spec.input_fn, steps=eval_spec.steps, checkpoint_path=latest)
  export_root = os.path.join(estimator.model_dir, export_lib.EXPORT_DIR)
  for exporter in eval_spec.exporters:
    exporter.export(estimator, os.path.join(export_root, exporter.name), latest, metrics,
                    is_the_final_export=False)


def _log_run_plan(config, splits, steps_per_epoch):
  logger.info("Estimator path: %d train / %d validation images, classes %s, %d steps per epoch "
              "x %d epochs, batch %d, image %dpx, BN updates: %s%s",
              splits.train.num_examples, splits.validation.num_examples, list(splits.class_names),
              steps_per_epoch, config.epochs, config.batch_size, config.image_size, config.update_ops,
              "  [DIAGNOSTIC: update_ops=skip reproduces the broken loop - BN moving statistics "
              "are never updated]" if config.update_ops == "skip" else "")
