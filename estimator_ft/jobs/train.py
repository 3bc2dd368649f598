"""`estimator-ft train`: resolve data, prepare model_dir, hand over to the chosen path, write results.

`run(config)` refuses a foreign or concurrent run before anything is written, writes the initial
weights once, trains with the Estimator or the Keras path and writes results.json. In a TF_CONFIG
cluster only the chief does this; the other roles run `run_cluster_member`.
"""

import logging
import os
import time

import tensorflow as tf

from estimator_ft import cluster as cluster_lib
from estimator_ft import estimator as estimator_path
from estimator_ft import interrupts
from estimator_ft import export as export_lib
from estimator_ft import keras_path
from estimator_ft import memory as memory_lib
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft import progress
from estimator_ft import tf_environment
from estimator_ft.config import Config
from estimator_ft.data import loading
from estimator_ft.data import samples
from estimator_ft.run import faults
from estimator_ft.run import model_dir as model_dir_lib
from estimator_ft.run import runtime
from estimator_ft.run import summaries

logger = logging.getLogger("estimator_ft")

PATH_MODULES = {"estimator": estimator_path, "keras": keras_path}


def _warn_about_inexact_resume(config: Config) -> None:
  if config.exact_resume and config.dropout > 0:
    logger.warning("--exact_resume replays the input stream exactly, but dropout masks come from a "
                   "random stream that restarts with each process: a resumed run matches an "
                   "uninterrupted one exactly only with --dropout=0.")


def _warn_about_slow_precision(config: Config) -> None:
  note = tf_environment.precision_note(config.precision,
                                       bool(tf.config.list_physical_devices("GPU")),
                                       tf_environment.cpuinfo_field("flags").split())
  if note:
    logger.warning(note)


def _check_cluster_shards(config: Config, splits, task) -> None:
  """Records on the Estimator path's cluster: every trainer needs shards of its own (refused in
  every role, before anything starts, when there are fewer shards than trainers). The Keras
  path's synchronous cluster splits each global batch between the workers instead
  (tf.distribute's DATA sharding), so there every worker reads every shard."""
  if task is not None and splits.train.is_records and config.path == "estimator":
    cluster_lib.check_enough_shards(len(splits.train.record_files), task.cluster)


def export_extras(config: Config, splits) -> export_lib.ExportExtras:
  """The training images the run's exports carry: --serving_warmup_requests of them for the TF
  Serving warm-up file, and with --export_tflite --tflite_quantize=int8 the calibration images."""
  if not config.export_during_training:
    return export_lib.NO_EXTRAS
  representative = ()
  if config.export_tflite and config.tflite_quantize == "int8":
    representative = samples.encoded_images(splits.train, config.representative_images)
  return export_lib.ExportExtras(
      warmup_images=samples.encoded_images(splits.train, config.serving_warmup_requests),
      representative_images=representative)


def run(config: Config, initial_weights: str = "") -> dict:
  """The train job for either path; returns the results dict also written to results.json.

  In a TF_CONFIG cluster only the chief does this; the other roles run `run_cluster_member`.
  Every setting is validated - the model built, the memory estimated - before the first file
  is written into model_dir. An interrupts.Interrupted (SIGINT, SIGTERM) leaves with `detail`
  saying where the run stopped and how to resume it.
  """
  progress.record_step(None)
  with runtime.op_determinism(config.deterministic):
    try:
      return _run(config, initial_weights)
    except interrupts.Interrupted as interrupted:
      if not interrupted.detail:
        interrupted.detail = (f"interrupted ({interrupted.signal_name}) before training started; "
                              f"nothing was written to {config.model_dir}")
      raise



def check_memory(config: Config, cached_images: int = 0) -> None:
  """Refuses an image and batch size whose training would not fit in this machine's memory.

  Host memory only: on a GPU the activations live in the device's memory, which this estimate
  does not model.
  """
  if not config.check_memory or tf.config.list_physical_devices("GPU"):
    return
  problem = memory_lib.memory_problem(config.image_size, config.batch_size,
                                      memory_lib.available_bytes(), cached_images)
  if problem:
    raise ValueError(problem)



def validate_run(config: Config, class_names, initial_weights: str = ""):
  """Everything that could refuse this run, before anything is written into model_dir.

  model_dir's own refusals (a different run that trained), the path's (distribution, exporters)
  and the model's: building it is what proves --fine_tune_from, --weights and --precision work,
  so for a run that needs initial weights they are built here, and returned to be written once
  model_dir is prepared (None when the run resumes or was given its initial weights).
  """
  plan, _ = model_dir_lib.plan_run(config, tuple(class_names))
  PATH_MODULES[config.path].check_settings(config, tuple(class_names))
  prefix = os.path.join(config.model_dir, model_dir_lib.INITIAL_WEIGHTS_PREFIX)
  if initial_weights or (plan == "resume" and model_lib.initial_weights_exist(prefix)):
    model_lib.check_fine_tune_from(config.fine_tune_from)
    return None
  return model_lib.initial_weight_values(config, len(class_names), class_names)



def _interrupted_detail(config: Config, interrupted: "interrupts.Interrupted") -> str:
  step = progress.recorded_step()
  where = f"at step {step}" if step is not None else "before the first training step"
  latest = tf.train.latest_checkpoint(config.model_dir)
  if latest is None:
    resume = "no checkpoint was written yet; re-run the same command to start again"
  else:
    resume = (f"the latest checkpoint is {latest}; re-run the same command to resume from it")
  return f"interrupted ({interrupted.signal_name}) {where}; {resume}."


def _run(config: Config, initial_weights: str) -> dict:
  task = cluster_lib.current_task()
  if task is not None:
    cluster_lib.check_cluster_settings(config.path, config.distribution, task)
    if config.distribution == "multi_worker_mirrored":
      # First, in every task: TensorFlow sets up collective ops only before a process runs its
      # first op, and the chief and workers wait here until all of them have joined.
      runtime.distribution_strategy(config)
    if not task.is_chief:
      return run_cluster_member(config, task, initial_weights)
  check_memory(config)  # after the strategy: nothing may run an op before collectives are set up
  _warn_about_slow_precision(config)
  started = time.time()
  splits = loading.load_splits(config)
  _check_cluster_shards(config, splits, task)
  class_names = tuple(splits.class_names)
  if config.cache:
    check_memory(config, splits.train.num_examples + splits.validation.num_examples)
  starting_weights = validate_run(config, class_names, initial_weights)
  model_dir_lib.ensure_writable_dir(config.model_dir)
  with model_dir_lib.run_lock(config.model_dir), faults.explained_write_failures(config.model_dir):
    try:
      return _train_in_model_dir(config, splits, initial_weights, starting_weights, started)
    except interrupts.Interrupted as interrupted:
      # Still holding the lock: list a checkpoint whose save the signal cut short, so the
      # message names the real latest one (and nothing is left that no run would list).
      faults.list_unlisted_checkpoints(config.model_dir, model_dir_lib.checkpoint_name(config))
      interrupted.detail = _interrupted_detail(config, interrupted)
      raise



def _train_in_model_dir(config: Config, splits, initial_weights: str, starting_weights,
                        started: float) -> dict:
  class_names = tuple(splits.class_names)
  resuming = model_dir_lib.prepare_model_dir(config, class_names)
  resume_from = (faults.recover_checkpoint_state(config.model_dir, model_dir_lib.checkpoint_name(config))
                 if resuming else None)
  logger.info("%s run in %s (%s)", config.path, config.model_dir,
              f"resuming from {resume_from}" if resume_from else "starting from the initial weights")
  _warn_about_inexact_resume(config)
  prefix = initial_weights or model_dir_lib.initial_weights_prefix(config, class_names,
                                                                  starting_weights)
  outcome = PATH_MODULES[config.path].train(config, splits, prefix, export_extras(config, splits))
  results = {
      "path": config.path,
      "class_names": list(class_names),
      "image_size": config.image_size,
      "train_examples": splits.train.num_examples,
      "validation_examples": splits.validation.num_examples,
      "skipped_images": [{"path": p, "reason": r} for p, r in
                         list(splits.train.skipped) + list(splits.validation.skipped)],
      "update_ops": config.update_ops,
      "wall_time_s": round(time.time() - started, 2),
      "model_dir": config.model_dir,
      # Which epochs trained what at which base rate (two with --head_epochs).
      "phases": [phase.describe() for phase in
                 model_fn_lib.run_phases(config, outcome["steps_per_epoch"])],
      **outcome,
  }
  model_dir_lib.write_results(config, results)
  if results.get("final_evaluation"):
    summaries.write_hparams_summary(config, results["final_evaluation"], results["global_step"])
  return results


def run_cluster_member(config: Config, task: "cluster_lib.Task", initial_weights: str = "") -> dict:
  """A worker, parameter server or evaluator of a TF_CONFIG cluster; returns what it did.

  The chief alone owns model_dir (run lock, config.json, initial weights, results.json): the other
  roles would be refused by its lock or race on those files. They wait for the chief's files
  instead and refuse to start with settings that differ from the chief's. A parameter server only
  holds variables, so it starts at once (the chief's session waits for it).
  """
  if task.type != cluster_lib.PS:
    check_memory(config)
  splits = loading.load_splits(config)
  _check_cluster_shards(config, splits, task)
  prefix = initial_weights or os.path.join(config.model_dir, model_dir_lib.INITIAL_WEIGHTS_PREFIX)
  if task.type != cluster_lib.PS:
    model_dir_lib.wait_for_chief(config, tuple(splits.class_names), prefix, task.name)
    model_dir_lib.check_resumable(config, tuple(splits.class_names), config.model_dir)
  logger.info("%s of a TF_CONFIG cluster, %s path, model_dir %s", task.name, config.path,
              config.model_dir)
  # The evaluator of an Estimator cluster runs the exporters.
  extras = export_extras(config, splits) if task.type != cluster_lib.PS else export_lib.NO_EXTRAS
  outcome = PATH_MODULES[config.path].train(config, splits, prefix, extras)
  return {"path": config.path, "role": task.name, "model_dir": config.model_dir, **outcome}
