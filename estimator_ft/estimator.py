"""The Estimator training path: `train_and_evaluate`, progress and epoch-metrics hooks, history.

Evaluation runs on every checkpoint, and a checkpoint is written at every epoch end (unless
--save_checkpoints_steps says otherwise), so the whole validation set is evaluated once per epoch.
TensorBoard gets the common curves of run/summaries.py in model_dir (training from
EpochMetricsHook, validation and its confusion matrix from ValidationCurvesHook, which every
evaluation runs), through the Estimator's own cached writer of model_dir: one event file.
The training input is one infinite, reshuffled stream, so epochs are counted in steps:
`steps_per_epoch = ceil(train examples / batch size)` - the same count the Keras path gives `fit`.
"""

import logging
import math
import os
import threading
import time

import tensorflow as tf
# Estimator.evaluate's own summary writers: InProcessEvaluator's event files are the same records.
from tensorflow_estimator.python.estimator import estimator as tf_estimator_impl

from estimator_ft import cluster as cluster_lib
from estimator_ft import export as export_lib
from estimator_ft import export_tflite
from estimator_ft import interrupts
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import progress
from estimator_ft import recipes
from estimator_ft import storage
from estimator_ft.config import Config
from estimator_ft.data import pipeline
from estimator_ft.data import records
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
# How often the in-process evaluator's background build looks whether the training graph is
# finalized (an attribute read; no TensorFlow hook runs between that and the session's creation).
_BUILD_START_POLL_S = 0.01


def check_settings(config: Config, class_names) -> None:
  """Raises ValueError for what this path refuses, before the train job writes anything."""
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
  check_phases_outside_clusters(config)
  export_lib.make_exporters(config, class_names)  # e.g. --export_best_metric=auc needs 2 classes


def make_run_config(config: Config, steps_per_epoch: int) -> tf.estimator.RunConfig:
  if config.distribution == "multi_worker_mirrored":
    check_settings(config, ())
  strategy = runtime.distribution_strategy(config)
  return tf.estimator.RunConfig(
      model_dir=config.model_dir,
      tf_random_seed=config.seed,
      save_checkpoints_steps=config.save_checkpoints_steps or steps_per_epoch,
      keep_checkpoint_max=config.keep_checkpoint_max,
      # Not the Estimator's SummarySaverHook: TrainingSummaryHook writes the same summaries.
      save_summary_steps=0,
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


def _without_readiness_checks(scaffold: tf.compat.v1.train.Scaffold):
  """`scaffold` whose session start skips the two `report_uninitialized_variables` checks.

  They exist for a cluster, where a worker's session waits until the chief has initialized the
  shared variables. In one process the chief initializes or restores every variable itself just
  before, and each check only builds one more executor over all ~1,000 variables: ~1 s of every
  training session's start at 64 px on 2 cores (py-spy, BUILD_NOTES "Speed").
  """
  nothing_uninitialized = tf.constant([], tf.string, name="ready_in_one_process")
  return tf.compat.v1.train.Scaffold(ready_op=nothing_uninitialized,
                                     ready_for_local_init_op=nothing_uninitialized,
                                     copy_from_scaffold=scaffold)


def estimator_model_fn(config: Config, class_names, steps_per_epoch: int,
                       initial_weights: str = "", class_weights=None, phase=None,
                       validation_examples: int = 0, build_model=model_lib.build_model,
                       one_process: bool = False):
  """model_fn.build_model_fn's model_fn (for `phase`, default the run's last), whose evaluations
  also write the validation curves - and warn when they read fewer than `validation_examples`
  (0: not known). one_process: no TF_CONFIG cluster and no distribution strategy, so training
  sessions start without the cluster's readiness checks."""
  class_names = tuple(class_names)
  model_fn = model_fn_lib.build_model_fn(config, class_names, steps_per_epoch, initial_weights,
                                         class_weights, phase, build_model)

  def model_fn_with_validation_curves(features, labels, mode):
    spec = model_fn(features, labels, mode)
    if mode == tf.estimator.ModeKeys.TRAIN and one_process:
      return spec._replace(scaffold=_without_readiness_checks(spec.scaffold))
    if mode != tf.estimator.ModeKeys.EVAL:
      return spec
    metrics = {name: value for name, (value, _) in spec.eval_metric_ops.items()}
    hook = ValidationCurvesHook(config.model_dir, class_names, metrics, validation_examples)
    return spec._replace(evaluation_hooks=tuple(spec.evaluation_hooks) + (hook,))

  return model_fn_with_validation_curves


def make_estimator(config: Config, class_names, steps_per_epoch: int, initial_weights: str = "",
                   class_weights=None, phase=None, validation_examples: int = 0):
  """The Estimator of estimator_model_fn (one per phase of --head_epochs: their graphs differ)."""
  run_config = make_run_config(config, steps_per_epoch)
  one_process = not run_config.cluster_spec and run_config.train_distribute is None
  return tf.estimator.Estimator(
      model_fn=estimator_model_fn(config, class_names, steps_per_epoch, initial_weights,
                                  class_weights, phase, validation_examples,
                                  one_process=one_process),
      config=run_config)


def _summary_writer(model_dir: str):
  """The Estimator's own cached writer of model_dir (its SummarySaverHook writes through it too):
  one event file per process in that folder, which TensorBoard's live reload needs."""
  return tf.compat.v1.summary.FileWriterCache.get(model_dir)


# ---------------------------------------------------------------- hooks

class StopOnSignalHook(tf.estimator.SessionRunHook):
  """Delivers a Ctrl-C or SIGTERM whose Interrupted Python dropped (see interrupts) at the next
  training step."""

  def before_run(self, run_context):
    interrupts.raise_if_received()


class TrainingSummaryHook(tf.estimator.SessionRunHook):
  """What the Estimator's SummarySaverHook writes (the graph's summaries at the first step and
  every `every_n_steps`, a SessionLog START first), but with the same fetches at every step.

  A tf.compat.v1 Session prunes, optimizes and instantiates an executor for each distinct set of
  fetches and feeds the first time it runs it. SummarySaverHook fetches the summaries at the first
  step and not at the second, so the second step built the training graph's executor a second
  time: 1.46 s instead of 0.44 s for ResNet50 at 64 px on 2 cores (measured; 0.58 s without the
  summary fetch), once per run. Here every step fetches the summaries and feeds model_fn's
  `write_summaries` flag, true on the steps that write: on the others the input-image summary
  holds no image and costs nothing.
  """

  def __init__(self, model_dir: str, every_n_steps: int):
    self._model_dir = model_dir
    self._every = every_n_steps

  def begin(self):
    graph = tf.compat.v1.get_default_graph()
    self._writer = _summary_writer(self._model_dir)
    self._summary = tf.compat.v1.summary.merge_all()
    self._write = graph.get_tensor_by_name(model_fn_lib.WRITE_SUMMARIES_TENSOR + ":0")
    self._global_step = tf.compat.v1.train.get_global_step()
    self._timer = tf.compat.v1.train.SecondOrStepTimer(every_steps=self._every)
    self._next_step = None
    self._writing = False

  def before_run(self, run_context):
    self._writing = self._next_step is None or self._timer.should_trigger_for_step(self._next_step)
    return tf.estimator.SessionRunArgs({"step": self._global_step, "summary": self._summary},
                                       feed_dict={self._write: self._writing})

  def after_run(self, run_context, run_values):
    step = int(run_values.results["step"]) + 1
    if self._writing:
      # As SummarySaverHook: the step after this one's update (other workers may have moved it).
      step = int(run_context.session.run(self._global_step))
      if self._next_step is None:
        self._writer.add_session_log(
            tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START), step)
      self._timer.update_last_triggered_step(step)
      self._writer.add_summary(run_values.results["summary"], step)
    self._next_step = step + 1

  def end(self, session):
    self._writer.flush()


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
    self._pauses = progress.PauseTimer()

  def before_run(self, run_context):
    if self._restart_window:
      self._last_time, self._restart_window = time.time(), False
    return tf.estimator.SessionRunArgs([self._global_step, self._loss_sum, self._size])

  def after_run(self, run_context, run_values):
    step_before, loss_sum, size = run_values.results
    step = int(step_before) + 1
    progress.record_step(step)
    now = time.time()
    previous, self._previous = self._previous, (step, now)
    if self._checkpoint_every and step % self._checkpoint_every == 0:
      # The checkpoint saver hook runs before this one, and the evaluation and exports of this
      # checkpoint inside it: time the window up to the previous step, and start the next window
      # at the next step, so the line reports training speed, not "0.2 img/s" at each epoch end.
      if previous is not None:
        rate = self._rate(*previous)
        # This step's own time beyond one training step was the checkpoint's evaluation/export.
        if rate:
          self._pauses.add(now - previous[1] - 1 / rate)
        self._log(step, loss_sum, size, *previous)
      self._restart_window, self._last_step = True, step
      return
    if self._last_time is None:
      self._last_time, self._last_step = now, step
      return
    if step % self._every and step != self._max_steps:
      return
    self._log(step, loss_sum, size, step, now)

  def _rate(self, window_end_step, window_end_time):
    if self._last_time is None:
      return None
    return progress.steps_per_second(window_end_step - self._last_step,
                                     window_end_time - self._last_time)

  def _log(self, step, loss_sum, size, window_end_step, window_end_time):
    if self._last_time is None:
      return
    rate = self._rate(window_end_step, window_end_time)
    epoch = min(math.ceil(step / self._steps_per_epoch), math.ceil(self._max_steps / self._steps_per_epoch))
    logger.info(progress.progress_line(
        epoch, step, self._max_steps, rate, self._batch_size, float(loss_sum) / max(int(size), 1),
        pause_s=self._pauses.mean,
        pauses_ahead=progress.pauses_left(step, self._max_steps, self._checkpoint_every)))
    self._last_time, self._last_step = window_end_time, window_end_step


class EpochMetricsHook(tf.estimator.SessionRunHook):
  """Keras-style training metrics: per-example running averages over each epoch.

  They are what Keras' progress bar shows as `loss` / `accuracy` - averages over an epoch of a
  model that kept changing, not a measurement of the final weights (that is validation's job).
  Written to `train_history.json` at each epoch end, so a resumed run keeps earlier epochs.

  With `curves_every_n_steps`, the same running averages and the learning rate also go to
  TensorBoard as the common train/* curves (run/summaries.py), every that many steps and at
  each epoch end.

  In an asynchronous cluster the shared global step also advances with the workers' steps, so the
  chief sees it jump: an epoch ends at the chief's first step past its boundary, and the averages
  cover the chief's own batches (`train_steps_averaged` says how many).
  """

  def __init__(self, model_dir, steps_per_epoch, curves_every_n_steps=0):
    self._model_dir = model_dir
    self._steps_per_epoch = steps_per_epoch
    self._curves_every = curves_every_n_steps

  def begin(self):
    graph = tf.compat.v1.get_default_graph()
    self._fetches = [tf.compat.v1.train.get_global_step()] + [
        graph.get_tensor_by_name(name + ":0") for name in
        (model_fn_lib.BATCH_LOSS_TENSOR, model_fn_lib.BATCH_CORRECT_TENSOR,
         model_fn_lib.BATCH_SIZE_TENSOR)]
    self._writer = None
    if self._curves_every:
      self._fetches.append(graph.get_tensor_by_name(model_fn_lib.LEARNING_RATE_TENSOR + ":0"))
      self._writer = _summary_writer(self._model_dir)
    self._last_step = None
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
    step_before, loss_sum, correct, size = run_values.results[:4]
    self._loss += float(loss_sum)
    self._correct += float(correct)
    self._count += float(size)
    self._steps_seen += 1
    step = int(step_before) + 1
    if self._writer is not None and summaries.due(step, self._last_step, self._curves_every,
                                                  self._steps_per_epoch):
      scalars = summaries.training_scalars(self._loss / self._count, self._correct / self._count,
                                           run_values.results[4])
      self._writer.add_summary(summaries.curve_summary(scalars).SerializeToString(), step)
      self._writer.flush()
    self._last_step = step
    self._maybe_end_epoch(step)

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


class ValidationCurvesHook(tf.estimator.SessionRunHook):
  """Every evaluation: the validation curves and the confusion matrix into TensorBoard.

  Runs the model_fn's confusion-matrix update with each evaluation batch, and at the end writes
  validation/<metric> (run/summaries.py) and the confusion heat map at the evaluated checkpoint's
  global step, into model_dir beside the training curves; warns when the pass read fewer than
  `expected_examples` (summaries.partial_validation_warning).
  """

  def __init__(self, model_dir: str, class_names, metric_values: dict,
               expected_examples: int = 0):
    self._model_dir = model_dir
    self._class_names = tuple(class_names)
    self._metric_values = metric_values
    self._expected_examples = expected_examples

  def begin(self):
    graph = tf.compat.v1.get_default_graph()
    self._update = graph.get_operation_by_name(model_fn_lib.EVAL_CONFUSION_UPDATE_OP)
    self._matrix = graph.get_tensor_by_name(model_fn_lib.EVAL_CONFUSION_MATRIX_TENSOR + ":0")
    self._global_step = tf.compat.v1.train.get_global_step()

  def before_run(self, run_context):
    return tf.estimator.SessionRunArgs(self._update)

  def end(self, session):
    metrics, matrix, step = session.run([self._metric_values, self._matrix, self._global_step])
    summaries.partial_validation_warning(matrix, self._expected_examples)
    summary = summaries.curve_summary(
        summaries.validation_scalars(metrics),
        {summaries.CONFUSION_MATRIX_IMAGE: summaries.confusion_matrix_png(matrix, self._class_names)})
    writer = _summary_writer(self._model_dir)
    writer.add_summary(summary.SerializeToString(), int(step))
    writer.flush()


class InProcessEvaluator(tf.estimator.CheckpointSaverListener):
  """Evaluates each checkpoint right after the training process saves it, then runs the exporters.

  What `train_and_evaluate` does on one machine, without its per-evaluation costs: it calls
  `Estimator.evaluate`, which builds the evaluation graph again (ResNet50 and the input
  pipeline: about 4 s on 2 cores) and opens a new session for every checkpoint. Here the graph
  is built once and kept with its session; each evaluation restores
  the checkpoint into it, resets the metrics and makes one full pass over the validation set.
  The metrics (the model_fn's eval_metric_ops plus the mean `loss`, as Estimator.evaluate adds)
  and their event file in model_dir/eval are what Estimator.evaluate writes (tested), so the
  history, the exporters and TensorBoard see no difference. A TF_CONFIG cluster keeps
  train_and_evaluate: its evaluator task evaluates checkpoints as they appear.

  serving_writer: the exporters' export.EstimatorSavedModelWriter, whose serving graph is then
  built into this graph on the model the evaluation built (model_fn's build_model must be
  model.OneModelPerGraph).

  As the saver hook's listener, it starts a thread of its own when training begins (`begin`),
  which builds once the training graph is finalized: while the training session is created and
  initialized and its step-0 checkpoint written - C++ work that mostly keeps one core busy and
  releases the GIL - the other core builds the evaluation graph, which the first evaluation then
  finds ready. (Started at `begin` itself, its Python slowed the Scaffold's saver build, still
  ahead then, from 0.2 to 1.1 s.) Measured at 64 px on 2 cores: the first evaluation ends
  2.0-2.2 s after its checkpoint instead of 3.9-4.2 s, the steps unchanged; a 2-epoch job
  1.3 s shorter on average when the build began at `begin`, 1.6 s shorter again when it waits
  for the finalized graph (BUILD_NOTES "Where the time goes outside training steps"). Every graph,
  name scope and variable creator of that build is the thread's own (TensorFlow keeps the
  default graph per thread), so the graph is the one a build on the main thread makes.
  """

  def __init__(self, estimator, model_fn, config: Config, validation_split, exporters,
               max_steps: int, start_step: int = 0, serving_writer=None):
    self._estimator = estimator
    self._serving_writer = serving_writer
    self._model_fn = model_fn
    self._config = config
    self._split = validation_split
    self._exporters = exporters
    self._max_steps = max_steps
    # The checkpoint the training starts from, which the saver hook saves again at its start:
    # already evaluated (by finish_interrupted_evaluation, or the previous phase's evaluator).
    self._start_step = start_step
    self._eval_dir = os.path.join(config.model_dir, EVAL_DIR)
    self._graph = None
    # (thread, its start, done and cancelled Events, [its error]) from begin() until waited for
    self._background_build = None

  @property
  def built(self) -> bool:
    return self._graph is not None

  def begin(self):
    if self._graph is not None or self._background_build is not None:
      return
    training_graph = tf.compat.v1.get_default_graph()
    start, done, cancelled, error = (threading.Event(), threading.Event(), threading.Event(), [])

    def build():
      try:
        # Not before the training graph is finalized: until then the main thread builds the
        # training saver (Scaffold.finalize), Python that this build's Python would slow down
        # (measured: 1.1 s instead of 0.2 s). wait_for_build starts it at once.
        while not (training_graph.finalized or start.wait(_BUILD_START_POLL_S)):
          pass
        if not cancelled.is_set():
          self._build()
      except Exception as e:  # pylint: disable=broad-except
        error.append(e)  # wait_for_build builds again on the main thread
      finally:
        done.set()

    thread = threading.Thread(target=build, name="evaluation-graph-build", daemon=True)
    self._background_build = (thread, start, done, cancelled, error)
    thread.start()

  def wait_for_build(self, cancel: bool = False):
    """Waits for begin()'s background build, if one runs; returns its error (None if none).

    cancel: a build that has not started yet is not made (what close() wants)."""
    if self._background_build is None:
      return None
    thread, start, done, cancelled, error = self._background_build
    if cancel:
      cancelled.set()
    start.set()
    # Forgotten only once finished: a signal's Interrupted raised inside this wait leaves the
    # build for close() to wait for, so no builder is inside TensorFlow when the process exits
    # (that aborts it: "terminate called ..."). An Event, because Thread.join interrupted by an
    # exception marks a thread that still runs as finished, and the next join would not wait.
    done.wait()
    thread.join()
    self._background_build = None
    return error[0] if error else None

  def _build(self):
    graph = tf.Graph()
    with graph.as_default():
      global_step = tf.compat.v1.train.create_global_step()
      tf.compat.v1.random.set_random_seed(self._config.seed)
      iterator = tf.compat.v1.data.make_initializable_iterator(
          pipeline.make_dataset(self._split, self._config, "eval"))
      features, labels = iterator.get_next()
      with model_lib.restored_variables_scope():  # each evaluation restores them all first
        spec = self._model_fn(features, labels, tf.estimator.ModeKeys.EVAL)
      metrics = dict(spec.eval_metric_ops)
      # The per-batch mean loss that Estimator.evaluate adds as "loss" (model_fn reports the
      # per-example one as example_loss).
      metrics["loss"] = tf.compat.v1.metrics.mean(spec.loss)
      self._values = {name: value for name, (value, _) in metrics.items()}
      self._values[tf.compat.v1.GraphKeys.GLOBAL_STEP] = global_step
      self._update = tf.group([update for _, update in metrics.values()])
      self._reset = tf.group(tf.compat.v1.local_variables_initializer(), iterator.initializer)
      session = tf.compat.v1.Session(graph=graph, config=self._estimator.config.session_config)
      if self._serving_writer is not None and not self._serving_writer.built:
        # The exporters' serving graph joins this one and applies the same model (the model_fn's
        # build_model is model.OneModelPerGraph): one ResNet50 built per process, not two.
        self._saver = self._serving_writer.build_in(graph, session)
      else:
        self._saver = tf.compat.v1.train.Saver(sharded=True)
      # The spec's evaluation hooks (the validation curves) run as in Estimator.evaluate: their
      # fetches with every batch, their end() after each pass.
      self._hooks = list(spec.evaluation_hooks)
      for hook in self._hooks:
        hook.begin()
    self._session = session
    self._graph = graph  # last: a build that failed half-way is retried, never used

  def evaluate(self, checkpoint_path: str) -> dict:
    """The eval metrics of `checkpoint_path`, also written to model_dir/eval for its step."""
    background_error = self.wait_for_build()
    if background_error is not None:
      # Built again here, where an error of the build itself is raised as it always was.
      logger.warning("Building the evaluation graph in the background failed (%s: %s); building "
                     "it now instead.", type(background_error).__name__, background_error)
    if self._graph is None:
      self._build()
    # Its own graph as the default: a saver built in graph mode would otherwise restore eagerly.
    with self._graph.as_default():
      self._session.run(self._reset)
      self._saver.restore(self._session, checkpoint_path)
      context = tf.estimator.SessionRunContext(
          original_args=tf.estimator.SessionRunArgs(self._update), session=self._session)
      while True:
        interrupts.raise_if_received()
        hook_args = [hook.before_run(context) for hook in self._hooks]
        try:
          self._session.run([self._update] + [args.fetches for args in hook_args if args])
        except tf.errors.OutOfRangeError:
          break
      results = self._session.run(self._values)
      for hook in self._hooks:
        hook.end(self._session)
      step = int(results[tf.compat.v1.GraphKeys.GLOBAL_STEP])
      tf_estimator_impl._write_dict_to_summary(self._eval_dir, results, step)  # pylint: disable=protected-access
      tf_estimator_impl._write_checkpoint_path_to_summary(self._eval_dir, checkpoint_path, step)  # pylint: disable=protected-access
    return results

  def after_save(self, session, global_step_value):
    # Step 0 is the starting point, which train_and_evaluate does not evaluate either; a later
    # starting checkpoint was evaluated before this training began.
    if global_step_value in (0, self._start_step):
      return
    checkpoint = tf.train.latest_checkpoint(self._config.model_dir)
    metrics = self.evaluate(checkpoint)
    logger.info("Evaluation at step %d: %s", global_step_value, ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k != "global_step"))
    export_root = os.path.join(self._config.model_dir, export_lib.EXPORT_DIR)
    for exporter in self._exporters:
      exporter.export(self._estimator, os.path.join(export_root, exporter.name), checkpoint,
                      metrics, is_the_final_export=global_step_value >= self._max_steps)

  def end(self, session, global_step_value):
    self.close()

  def close(self) -> None:
    """Closes the evaluation session, once a background build that has started has finished (one
    not started yet is cancelled). A training that failed or was interrupted calls no listener's
    end: _train_and_evaluate_in_process closes."""
    self.wait_for_build(cancel=True)
    if self._graph is not None:
      self._session.close()
      self._graph = None


class EarlyStoppingSaverHook(tf.compat.v1.train.CheckpointSaverHook):
  """The run's checkpoint saver, which also stops training for --early_stopping_patience.

  train_and_evaluate evaluates (and exports) each checkpoint in a listener of the saver hook, so
  the decision must come after that listener and before the next step: this hook is that saver
  (the Estimator uses a CheckpointSaverHook it is given instead of making its own, and adds its
  evaluation listener to it). After each save it reads the evaluations from the eval events, so a
  resumed run keeps the count, and asks to stop exactly where the Keras path's callback does.
  """

  def __init__(self, config: Config, steps_per_epoch: int):
    super().__init__(config.model_dir,
                     save_steps=config.save_checkpoints_steps or steps_per_epoch,
                     save_graph_def=False)
    self._config = config
    self._steps_per_epoch = steps_per_epoch

  def _save(self, session, step):
    stop = super()._save(session, step)
    report = early_stopping_report(self._config, self._steps_per_epoch)
    if report and report["stopped"]:
      logger.info("Early stopping after epoch %d: %s.", report["epoch"], report["reason"])
      return True
    return stop


def early_stopping_report(config: Config, steps_per_epoch: int):
  """recipes.early_stopping_report over the evaluations recorded so far (None when off)."""
  if not config.early_stopping_patience:
    return None
  return recipes.early_stopping_report(
      _evaluated_history(config.model_dir, steps_per_epoch), config.export_best_metric,
      config.early_stopping_patience, config.early_stopping_min_delta)


def _evaluated_history(model_dir, steps_per_epoch):
  """[{"epoch", "val_<metric>"...}] of every evaluation after step 0, in step order."""
  evals = events.scalars_by_step(os.path.join(model_dir, EVAL_DIR))
  history = []
  for step in sorted(s for s in evals if s > 0):
    metrics = evals[step]
    entry = {"epoch": math.ceil(step / steps_per_epoch),
             "val_loss": metrics.get(model_fn_lib.EXAMPLE_LOSS)}
    entry.update({f"val_{k}": v for k, v in metrics.items()
                  if k not in ("loss", model_fn_lib.EXAMPLE_LOSS)})
    history.append(entry)
  return history


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
  reader = storage.checkpoint_reader(checkpoint_path)
  return [reader.get_tensor(name) for name in names]


def tflite_writer(config: Config, class_names, representative_images=()):
  """--export_tflite: the best exporter's ExportExtras.write_beside, from the exported checkpoint."""
  num_classes = len(class_names)
  return export_tflite.beside_writer(
      config, class_names, lambda checkpoint_path: checkpoint_weights(config, num_classes,
                                                                      checkpoint_path),
      representative_images)


def check_phases_outside_clusters(config: Config) -> None:
  """--head_epochs trains one graph per phase, one after the other, in this process: a TF_CONFIG
  cluster's tasks would cross the boundary each on their own (async workers past it in the old
  graph), which is not built."""
  if config.head_epochs and cluster_lib.current_task() is not None:
    raise ValueError("--head_epochs does not work in a TF_CONFIG cluster on the Estimator path: "
                     "its tasks would change phase each on their own. Train on one machine "
                     "(--distribution=none or mirrored), or use --path=keras.")


def train(config: Config, splits, initial_weights: str,
          extras: export_lib.ExportExtras = export_lib.NO_EXTRAS, hooks=()) -> dict:
  """Runs train_and_evaluate to `epochs` epochs (resuming if model_dir has checkpoints).

  With --head_epochs, one training segment per phase still ahead (recipes.phases_ahead of the
  checkpoint it resumes), each with the Estimator of its phase's graph: phase 2 restores phase
  1's last checkpoint, optimizer slots included (build_model_fn creates them in both phases).

  extras: what the exports carry besides the SavedModel (warm-up images, chosen by the job);
  with --export_tflite the best exporter also writes the TFLite model.
  hooks: more training hooks (the benchmark's step clocks), run after the run's own.
  """
  check_phases_outside_clusters(config)
  class_names = tuple(splits.class_names)
  if config.export_tflite:
    extras = extras.replace(
        write_beside=tflite_writer(config, class_names, extras.representative_images))
  steps_per_epoch = split_lib.steps_per_epoch(splits.train, config.batch_size)
  max_steps = config.epochs * steps_per_epoch
  class_weights = model_fn_lib.training_class_weights(config, splits.train)
  phases = model_fn_lib.run_phases(config, steps_per_epoch)
  start_step = model_dir_lib.latest_checkpoint_step(config.model_dir)
  estimators = {}

  def phase_estimator(phase):
    if phase.name not in estimators:
      estimators[phase.name] = make_estimator(config, class_names, steps_per_epoch,
                                              initial_weights, class_weights, phase,
                                              splits.validation.num_examples)
    return estimators[phase.name]

  # The latest checkpoint's phase evaluates it if the run that wrote it could not.
  estimator = phase_estimator(recipes.phase_of_checkpoint(start_step, phases))
  is_chief = estimator.config.is_chief
  # The evaluator's RunConfig has no cluster spec (it is not part of the cluster): TF_CONFIG
  # decides, so every role of a cluster runs train_and_evaluate.
  in_cluster = bool(estimator.config.cluster_spec.as_dict()) or cluster_lib.current_task() is not None
  if config.early_stopping_patience and in_cluster:
    logger.warning("--early_stopping_patience is ignored in a TF_CONFIG cluster on the Estimator "
                   "path: the evaluator runs apart from the trainers.")
  # Each trainer of a cluster (chief 0, workers 1..) shuffles and augments with its own seed:
  # with the same one, every worker would train on the very batches the chief trains on. (The
  # evaluator has no id and does not train.)
  trainer_id = estimator.config.global_id_in_cluster or 0
  train_config = config.replace(seed=config.seed + trainer_id)

  def train_spec(phase, start_batch):
    own_hooks = [StopOnSignalHook(),
                 ProgressHook(steps_per_epoch, max_steps, config.batch_size,
                              config.log_every_n_steps,
                              config.save_checkpoints_steps or steps_per_epoch)]
    if config.early_stopping_patience and not in_cluster:
      own_hooks.append(EarlyStoppingSaverHook(config, steps_per_epoch))
    if is_chief:
      # The chief writes the training summaries, as the Estimator's own hook would.
      own_hooks.append(TrainingSummaryHook(config.model_dir, config.save_summary_steps))
      # One writer of train_history.json: in a cluster, the workers' averages would overwrite it.
      own_hooks.append(EpochMetricsHook(config.model_dir, steps_per_epoch,
                                        curves_every_n_steps=config.save_summary_steps))
    return tf.estimator.TrainSpec(
        input_fn=pipeline.make_input_fn(trainer_train_split(splits.train), train_config, "train",
                                        start_batch=start_batch),
        max_steps=phase.end_step, hooks=own_hooks + list(hooks))

  eval_spec = tf.estimator.EvalSpec(
      input_fn=pipeline.make_input_fn(splits.validation, config, "eval"),
      steps=None,  # None: the whole validation set, every time
      exporters=export_lib.make_exporters(config, class_names, extras),
      start_delay_secs=0,
      throttle_secs=EVALUATOR_POLL_S if estimator.config.task_type == "evaluator" else 0)
  _log_run_plan(config, splits, steps_per_epoch, phases)
  if is_chief:
    summaries.write_config_summary(config, class_names)
    if not in_cluster:  # a cluster's evaluator catches up by itself
      finish_interrupted_evaluation(estimator, eval_spec)
  try:
    if in_cluster:
      tf.estimator.train_and_evaluate(
          estimator, train_spec(phases[-1], exact_resume_batch(config, estimator)), eval_spec)
    else:
      # The first segment resumes the stream as any resume does; a later one continues it at
      # the boundary, as one uninterrupted stream (the Keras path does the same).
      start_batch = exact_resume_batch(config, estimator)
      for phase in recipes.phases_ahead(start_step, phases):
        stopped = early_stopping_report(config, steps_per_epoch)
        if stopped and stopped["stopped"]:
          logger.info("Not training further: the run stopped early after epoch %d (%s).",
                      stopped["epoch"], stopped["reason"])
          break
        segment_start = max(start_step, phase.first_step)
        if len(phases) > 1:
          logger.info("Phase %s from step %d: %s", phase.name, segment_start,
                      recipes.phase_line(phase))
        _train_and_evaluate_in_process(
            phase_estimator(phase), config, class_names, splits.validation,
            train_spec(phase, start_batch), steps_per_epoch, class_weights,
            extras, phase, segment_start, max_steps)
        start_batch = phase.end_step
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

  global_step = model_dir_lib.latest_checkpoint_step(config.model_dir)
  evals = events.scalars_by_step(os.path.join(config.model_dir, EVAL_DIR))
  if global_step not in evals:
    # Training was already complete (re-run of a finished command), or this is a cluster's chief:
    # its evaluator may not have reached the final checkpoint, which async workers can push past
    # max_steps. Evaluate the final weights here.
    final = phase_estimator(recipes.phase_of_checkpoint(global_step, phases)).evaluate(
        pipeline.make_input_fn(splits.validation, config, "eval"))
    final_evaluation = {k: float(v) for k, v in final.items()}
  else:
    final_evaluation = evals[global_step]
  # After the final evaluation, which the last epoch's validation figures may come from.
  history = build_history(config.model_dir, steps_per_epoch, config.epochs)
  stopping = early_stopping_report(config, steps_per_epoch) if not in_cluster else None
  if stopping and stopping["stopped"]:
    history = [h for h in history if h["epoch"] <= stopping["epoch"]]
  return {
      "global_step": global_step,
      "steps_per_epoch": steps_per_epoch,
      "history": history,
      "final_evaluation": final_evaluation,
      "export_path": export_lib.latest_export_path(config.model_dir),
      **({"early_stopping": stopping} if stopping else {}),
  }


def _train_and_evaluate_in_process(estimator, config: Config, class_names, validation_split,
                                   train_spec, steps_per_epoch: int, class_weights=None,
                                   extras: export_lib.ExportExtras = export_lib.NO_EXTRAS,
                                   phase=None, start_step: int = 0, max_steps: int = 0) -> None:
  """train_and_evaluate on one machine, for one phase (up to train_spec.max_steps): each
  checkpoint evaluated and exported in this process, from one graph built once for both (the
  InProcessEvaluator's, holding the writer's serving graph); the export of the run's `max_steps`
  is the final one."""
  # Without the initial weights: the evaluation and serving graphs restore every variable from a
  # checkpoint before they run, so reading the initial-weights file into initializers that never
  # run would only cost their builds time (about 0.5 s each at 64 px, measured).
  model_fn = estimator_model_fn(config, class_names, steps_per_epoch, "",
                                class_weights, phase, validation_split.num_examples,
                                build_model=model_lib.OneModelPerGraph())
  writer = export_lib.EstimatorSavedModelWriter(model_fn, config,
                                                estimator.config.session_config)
  exporters = export_lib.make_exporters(config, class_names, extras, writer)
  evaluator = InProcessEvaluator(estimator, model_fn, config, validation_split, exporters,
                                 max_steps or train_spec.max_steps, start_step, writer)
  # Opened here under an empty graph: the cache writes the default graph when it creates a
  # writer, and the first to ask would be the saver hook's `begin`, with the training graph
  # not finished yet (0.3 s at 64 px on 2 cores). Its `after_create_session` writes the finished
  # graph, which TensorBoard shows (the newest graph of a run replaces the earlier).
  with tf.Graph().as_default():
    _summary_writer(estimator.model_dir)
  try:
    estimator.train(train_spec.input_fn, max_steps=train_spec.max_steps,
                    hooks=list(train_spec.hooks), saving_listeners=[evaluator])
  finally:
    evaluator.close()
    writer.close()


def trainer_train_split(split):
  """The training data this process reads: with records in a TF_CONFIG cluster, this trainer's
  own shards (cluster.trainer_shards: disjoint, together every shard), logged by name; else all.

  Folder and TFDS sources cannot be split by file, so there every trainer reads the whole split
  with its own seed. The evaluator reads the validation split whole either way.
  """
  task = cluster_lib.current_task()
  if not split.is_records or task is None or cluster_lib.trainer_index(task) is None:
    return split
  own = records.trainer_split(split, task)
  logger.info("%s reads %d of the %d training shards (%d of %d examples): %s", task.name,
              len(own.record_files), len(split.record_files), own.num_examples,
              split.num_examples, ", ".join(records.describe_shards(own.record_files)))
  return own


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


def _log_run_plan(config, splits, steps_per_epoch, phases=()):
  logger.info("Estimator path: %d train / %d validation images, classes %s, %d steps per epoch "
              "x %d epochs, batch %d, image %dpx, BN updates: %s%s%s",
              splits.train.num_examples, splits.validation.num_examples, list(splits.class_names),
              steps_per_epoch, config.epochs, config.batch_size, config.image_size, config.update_ops,
              recipes.phases_note(phases),
              "  [DIAGNOSTIC: update_ops=skip reproduces the broken loop - BN moving statistics "
              "are never updated]" if config.update_ops == "skip" else "")
