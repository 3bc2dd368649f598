"""The Keras reference path: results.json contract, resume, NaN stop, the Estimator's batches."""

import json
import logging
import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf

from estimator_ft import contract
from estimator_ft import estimator as estimator_lib
from estimator_ft import keras_path
from estimator_ft.config import Config
from estimator_ft.data import loading as loading_lib
from estimator_ft.data import pipeline as pipeline_lib
from estimator_ft.jobs import train as train_job
from estimator_ft.run import events as events_lib
from estimator_ft.run import errors as errors_lib
from estimator_ft.run import model_dir as model_dir_lib
from estimator_ft.run import summaries

SIZE = 32
# tiny_dataset: 24 train images -> 4 steps per epoch; 8 validation images -> batches of 6 and 2.
BATCH = 6
STEPS_PER_EPOCH = 4
VALIDATION_EXAMPLES = 8
CONTRACT_KEYS = {"path", "class_names", "global_step", "steps_per_epoch", "history",
                 "final_evaluation", "export_path", "skipped_images", "wall_time_s", "model_dir"}
# Overflows the weights in the first step, so the second step's loss is NaN (measured).
EXPLODING_LEARNING_RATE = 1e30


def make_config(tiny_dataset, model_dir, **changes) -> Config:
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"), model_dir=str(model_dir),
                  path="keras", image_size=SIZE, batch_size=BATCH, epochs=1, weights="none",
                  dropout=0.0, augment=False, keep_checkpoint_max=2, seed=11)
  return config.replace(**changes).validate()


def read_results(model_dir):
  with open(os.path.join(model_dir, model_dir_lib.RESULTS_FILE)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def resumed_run(tiny_dataset, module_tmp_path):
  """One keras model_dir trained to 1 epoch, then the same command re-run with --epochs=2."""
  model_dir = module_tmp_path / "model"
  config = make_config(tiny_dataset, model_dir)
  train_job.run(config)
  first = read_results(model_dir)
  train_job.run(config.replace(epochs=2))
  second = read_results(model_dir)
  return config, first, second


@pytest.mark.slow
def test_results_json_follows_the_training_contract(resumed_run):
  config, first, _ = resumed_run
  assert CONTRACT_KEYS <= set(first)
  assert first["path"] == "keras"
  assert first["class_names"] == sorted(os.listdir(config.train_dir))
  assert first["steps_per_epoch"] == STEPS_PER_EPOCH
  assert first["global_step"] == STEPS_PER_EPOCH
  [epoch] = first["history"]
  assert epoch["epoch"] == 1
  assert np.isfinite([epoch["loss"], epoch["accuracy"], epoch["val_loss"]]).all()
  # Per-example accuracy over 8 validation images: a multiple of 1/8, whatever the batch split.
  assert epoch["val_accuracy"] * VALIDATION_EXAMPLES == pytest.approx(
      round(epoch["val_accuracy"] * VALIDATION_EXAMPLES), abs=1e-5)
  assert {"val_auc", "val_precision", "val_recall"} <= set(epoch)
  final = first["final_evaluation"]
  assert final["loss"] == final["example_loss"] == epoch["val_loss"]
  assert final["global_step"] == STEPS_PER_EPOCH
  assert os.path.isfile(os.path.join(first["export_path"], "saved_model.pb"))
  # TensorBoard: the common curves in model_dir at the global step, as the history has them.
  curves = events_lib.scalars_by_step(config.model_dir)[STEPS_PER_EPOCH]
  assert curves[summaries.VALIDATION_LOSS] == pytest.approx(epoch["val_loss"], rel=1e-6)
  assert curves[summaries.VALIDATION_ACCURACY] == pytest.approx(epoch["val_accuracy"], rel=1e-6)
  assert curves[summaries.TRAIN_LOSS] == pytest.approx(epoch["loss"], rel=1e-6)
  assert curves[summaries.LEARNING_RATE] == pytest.approx(config.learning_rate)
  # Keras' own TensorBoard layout (train/, validation/ runs, epoch_* tags) is gone.
  assert not os.path.exists(os.path.join(config.model_dir, "validation"))


@pytest.mark.slow
def test_rerun_with_more_epochs_resumes_and_keeps_the_earlier_history(resumed_run):
  config, first, second = resumed_run
  # The optimizer's step counter came back from the checkpoint: a restart would end at 4 steps.
  assert second["global_step"] == 2 * STEPS_PER_EPOCH
  assert [h["epoch"] for h in second["history"]] == [1, 2]
  assert second["history"][0] == first["history"][0]
  assert second["history"][1]["val_loss"] != first["history"][0]["val_loss"]
  checkpoint = keras_path.latest_checkpoint(config.model_dir)
  assert checkpoint.endswith(f"ckpt-{2 * STEPS_PER_EPOCH}")
  assert second["export_path"] != first["export_path"]


@pytest.mark.slow
def test_finished_run_restores_the_weights_that_gave_the_last_validation(resumed_run):
  config, _, second = resumed_run
  again = train_job.run(config.replace(epochs=2))
  assert again["global_step"] == second["global_step"]
  assert again["history"] == second["history"]
  # A fresh evaluation of the restored checkpoint reproduces the recorded last epoch: the
  # checkpoint holds the trained weights *and* the BN moving statistics.
  assert again["final_evaluation"]["loss"] == pytest.approx(second["history"][-1]["val_loss"],
                                                            rel=1e-6)
  assert again["export_path"] == second["export_path"], "nothing trained: the export is reused"


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_before_anything_is_saved(tiny_dataset, tmp_path):
  # A fresh run: resuming would restore the optimizer's learning rate from the checkpoint
  # (the Estimator path does the same), so a new --learning_rate would not apply.
  config = make_config(tiny_dataset, tmp_path / "model", learning_rate=EXPLODING_LEARNING_RATE)
  with pytest.raises(errors_lib.NaNLossError, match=r"loss became nan at step 2\b") as error:
    train_job.run(config)
  assert "--learning_rate" in str(error.value) and "resume" in str(error.value)
  assert keras_path.latest_checkpoint(config.model_dir) is None
  assert keras_path.read_history(config.model_dir) == []
  assert not os.path.exists(os.path.join(config.model_dir, model_dir_lib.RESULTS_FILE))


def _estimator_batches(config, splits, steps, model_dir):
  """(labels, images) of the first `steps` batches a real Estimator feeds its model_fn."""
  seen = []

  def model_fn(features, labels, mode):
    del mode
    tf.identity(labels, name="seen_labels")
    tf.identity(features[contract.FEATURE_KEY], name="seen_images")
    step = tf.compat.v1.train.get_or_create_global_step()
    return tf.estimator.EstimatorSpec("train", loss=tf.constant(0.0), train_op=step.assign_add(1))

  class Record(tf.estimator.SessionRunHook):
    def before_run(self, run_context):
      return tf.estimator.SessionRunArgs(["seen_labels:0", "seen_images:0"])

    def after_run(self, run_context, run_values):
      seen.append(run_values.results)

  run_config = estimator_lib.make_run_config(config.replace(model_dir=str(model_dir)),
                                             STEPS_PER_EPOCH)
  estimator = tf.estimator.Estimator(model_fn, config=run_config)
  estimator.train(pipeline_lib.make_input_fn(splits.train, config, "train"), max_steps=steps,
                  hooks=[Record()])
  return seen


def _keras_batches(config, splits, steps):
  return [(labels.numpy(), features[contract.FEATURE_KEY].numpy()) for features, labels in
          keras_path.training_dataset(splits.train, config).take(steps)]


def test_keras_reads_the_batches_the_estimator_reads(tiny_dataset, tmp_path):
  config = make_config(tiny_dataset, tmp_path / "unused")
  splits = loading_lib.load_splits(config)
  steps = 2 * STEPS_PER_EPOCH  # two epochs: the reshuffle between them must match too
  estimator_batches = _estimator_batches(config, splits, steps, tmp_path / "estimator")
  # Forget any global seed an earlier test left behind: training_dataset must set it itself.
  tf.random.set_seed(None)
  keras_batches = _keras_batches(config, splits, steps)
  assert len(estimator_batches) == len(keras_batches) == steps
  for (estimator_labels, estimator_images), (keras_labels, keras_images) in zip(
      estimator_batches, keras_batches):
    np.testing.assert_array_equal(keras_labels, estimator_labels)
    np.testing.assert_array_equal(keras_images, estimator_images)
  # The comparison can fail: another seed gives another order.
  other_order = _keras_batches(config.replace(seed=config.seed + 1), splits, steps)
  assert any(not np.array_equal(a[1], b[1]) for a, b in zip(keras_batches, other_order))


@pytest.mark.slow
def test_exact_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_dataset, tmp_path, caplog):
  """Stopped after epoch 1 and resumed: with --exact_resume the stream continues at batch 3."""
  settings = dict(epochs=2, exact_resume=True, deterministic=True, augment=True,
                  export_during_training=False)
  whole = make_config(tiny_dataset, tmp_path / "whole", **settings)
  train_job.run(whole)
  resumed = make_config(tiny_dataset, tmp_path / "resumed", **settings)
  train_job.run(resumed.replace(epochs=1))
  # The same epoch 1 for the run resumed without exact resume below (exact_resume does not
  # change epoch 1, and a model_dir may be moved: its checkpoint state names files relatively).
  shutil.copytree(tmp_path / "resumed", tmp_path / "replayed")
  train_job.run(resumed)
  num_classes = 2
  expected = keras_path.checkpoint_weights(whole, num_classes, keras_path.latest_checkpoint(whole.model_dir))
  actual = keras_path.checkpoint_weights(resumed, num_classes,
                                         keras_path.latest_checkpoint(resumed.model_dir))
  assert len(actual) == len(expected) == 320
  worst = max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected))
  assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
  # Without exact resume the resumed run re-reads epoch 1's batches, which changes the weights.
  replayed = make_config(tiny_dataset, tmp_path / "replayed", **{**settings, "exact_resume": False})
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    train_job.run(replayed)
  assert f"resuming from {tmp_path / 'replayed' / keras_path.CHECKPOINT_NAME}-{STEPS_PER_EPOCH}" in (
      caplog.text)
  different = keras_path.checkpoint_weights(replayed, num_classes,
                                            keras_path.latest_checkpoint(replayed.model_dir))
  assert max(float(np.max(np.abs(a - e))) for a, e in zip(different, expected)) > 1e-4


def test_the_keras_validation_curves_say_when_a_pass_read_part_of_the_split(tmp_path, caplog):
  config = Config(model_dir=str(tmp_path), image_size=32)
  curves = keras_path._Curves(  # pylint: disable=protected-access
      config, ("a", "b"), steps_per_epoch=4, writes_outputs=True, validation_examples=8)
  curves.set_model(types.SimpleNamespace(optimizer=types.SimpleNamespace(
      iterations=tf.Variable(4, dtype=tf.int64))))
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    for epoch, read in enumerate(([[3., 1.], [0., 3.]], [[4., 1.], [0., 3.]])):  # 7, then 8
      curves.on_epoch_end(epoch, {"val_loss": 0.5, "val_confusion_matrix": np.array(read)})
  curves.close()
  assert caplog.text.count("The validation pass read 7 of 8 examples") == 1
  assert summaries.partial_validation_warning([[2, 0], [0, 2]], 0) is None  # count unknown
