"""The Estimator train job end to end: results/config contract, resume, refusals, NaN, CLI errors."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from estimator_ft import model as model_lib
from estimator_ft.config import Config
from estimator_ft.jobs import train as train_job
from estimator_ft.run import errors as errors_lib
from estimator_ft.run import events as events_lib
from estimator_ft.run import model_dir as model_dir_lib
from estimator_ft.run import summaries

HISTORY_KEYS = {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}


def tiny_config(dataset, model_dir, **changes):
  return Config(train_dir=str(dataset / "train"), validation_dir=str(dataset / "validation"),
                model_dir=str(model_dir), image_size=32, batch_size=8, epochs=1, weights="none",
                log_every_n_steps=1, save_summary_steps=1).replace(**changes).validate()


def event_tags(directory):
  tags = set()
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


@pytest.fixture(scope="module")
def resumed_run(tiny_dataset, module_tmp_path):
  """One epoch, then the same command asking for two: the second run resumes."""
  model_dir = module_tmp_path / "estimator_run"
  first = train_job.run(tiny_config(tiny_dataset, model_dir, epochs=1))
  second = train_job.run(tiny_config(tiny_dataset, model_dir, epochs=2))
  return model_dir, first, second


@pytest.mark.slow
def test_results_json_contract(resumed_run):
  model_dir, first, _ = resumed_run
  results = json.loads((model_dir / "results.json").read_text())
  assert results["path"] == "estimator"
  assert results["class_names"] == ["horizontal", "vertical"]
  assert results["train_examples"] == 24 and results["validation_examples"] == 8
  assert results["steps_per_epoch"] == 3  # ceil(24 / 8)
  assert results["skipped_images"] == []
  assert results["wall_time_s"] > 0
  for entry in results["history"]:
    assert HISTORY_KEYS <= set(entry)
    assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["val_accuracy"] <= 1.0
    assert np.isfinite(entry["loss"]) and np.isfinite(entry["val_loss"])
  assert set(results["final_evaluation"]) >= {"accuracy", "example_loss", "auc", "precision", "recall"}
  # Validation accuracy is per example over the 8 images: a multiple of 1/8.
  assert (results["final_evaluation"]["accuracy"] * 8) == pytest.approx(
      round(results["final_evaluation"]["accuracy"] * 8), abs=1e-5)
  recorded = json.loads((model_dir / "config.json").read_text())
  assert recorded["class_names"] == ["horizontal", "vertical"]
  assert recorded["config"]["image_size"] == 32
  assert first["global_step"] == 3


@pytest.mark.slow
def test_resume_continues_the_global_step_and_keeps_history(resumed_run):
  model_dir, first, second = resumed_run
  assert second["global_step"] == 6
  assert [h["epoch"] for h in second["history"]] == [1, 2]
  # Epoch 1 was not retrained: its record is the one the first run wrote.
  assert second["history"][0]["loss"] == pytest.approx(first["history"][0]["loss"], rel=1e-9)
  assert tf.train.latest_checkpoint(str(model_dir)).endswith("model.ckpt-6")


@pytest.mark.slow
def test_tensorboard_layout(resumed_run):
  model_dir, _, second = resumed_run
  train_tags = event_tags(str(model_dir))
  # The common curves (run/summaries.py) beside the Estimator's own per-batch loss.
  assert {"loss", summaries.TRAIN_LOSS, summaries.TRAIN_ACCURACY, summaries.LEARNING_RATE,
          summaries.VALIDATION_LOSS, summaries.VALIDATION_ACCURACY, "validation/auc",
          summaries.CONFUSION_MATRIX_IMAGE} <= train_tags
  assert any(tag.startswith("input_images") for tag in train_tags)
  eval_tags = event_tags(str(model_dir / "eval"))
  assert {"accuracy", "example_loss", "loss", "auc"} <= eval_tags
  assert "run_config" in event_tags(str(model_dir / "config"))
  # The values, not only the tags: every epoch's validation figures as results.json has them,
  # in the Estimator's eval run and in the common curves, and the training running averages at
  # each epoch end as the history has them.
  evaluations = events_lib.scalars_by_step(str(model_dir / "eval"))
  curves = events_lib.scalars_by_step(str(model_dir))
  for epoch in second["history"]:
    end = epoch["epoch"] * second["steps_per_epoch"]
    assert evaluations[end]["example_loss"] == pytest.approx(epoch["val_loss"], rel=1e-6)
    assert evaluations[end]["accuracy"] == pytest.approx(epoch["val_accuracy"], rel=1e-6)
    assert curves[end][summaries.VALIDATION_LOSS] == pytest.approx(epoch["val_loss"], rel=1e-6)
    assert curves[end][summaries.VALIDATION_ACCURACY] == pytest.approx(epoch["val_accuracy"], rel=1e-6)
    assert curves[end][summaries.TRAIN_LOSS] == pytest.approx(epoch["loss"], rel=1e-6)
    assert curves[end][summaries.TRAIN_ACCURACY] == pytest.approx(epoch["accuracy"], rel=1e-6)
  # save_summary_steps=1: the training curves at every step, with the constant learning rate.
  rates = {step: values[summaries.LEARNING_RATE] for step, values in curves.items()
           if summaries.LEARNING_RATE in values}
  assert sorted(rates) == list(range(1, second["global_step"] + 1))
  assert list(rates.values()) == pytest.approx([Config().learning_rate] * len(rates))


@pytest.mark.slow
def test_tensorboard_gets_the_finished_training_graph_once_per_session(resumed_run):
  model_dir, _, _ = resumed_run
  graphs = []
  for path in sorted(glob.glob(str(model_dir / "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      if event.HasField("graph_def"):
        graphs.append(tf.compat.v1.GraphDef.FromString(event.graph_def))
  written = [graph for graph in graphs if graph.node]
  # Each of the two runs' sessions wrote its graph once, after the Scaffold had finished it (the
  # saver's ops are in it); not also while its hooks began, before the saver existed.
  assert len(written) == 2
  for graph in written:
    assert any(node.name.startswith("save/") for node in graph.node)


@pytest.mark.slow
def test_the_estimator_path_under_a_mirrored_strategy_starts_from_the_initial_weights(
    tiny_dataset, tmp_path):
  # The initial weights' initializers are set in the cross-replica context, where a strategy's
  # mirrored variables take them (model.init_from_initial_weights). Half-scale kernels: weights
  # that no initializer of the graph would draw.
  config = tiny_config(tiny_dataset, tmp_path / "mirrored", distribution="mirrored")
  values = [w * 0.5 if w.ndim > 1 else w for w in model_lib.build_model(config, 2).get_weights()]
  prefix = model_lib.write_initial_weights(values, "half-scale kernels",
                                           str(tmp_path / "initial" / "weights"))
  assert train_job.run(config, initial_weights=prefix)["global_step"] == 3
  step_0 = tf.train.load_checkpoint(str(tmp_path / "mirrored" / "model.ckpt-0"))
  with tf.Graph().as_default():
    names = [w.name.split(":")[0] for w in model_lib.build_model(config, 2).weights]
  assert len(names) == len(values) == 320
  for name, value in zip(names, values):
    np.testing.assert_array_equal(step_0.get_tensor(name), value, name)


def test_a_model_dir_of_another_configuration_is_refused(tmp_path):
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path), image_size=64).validate()
  model_dir_lib.write_run_config(config, ("a", "b"))
  assert model_dir_lib.check_resumable(config, ("a", "b"), str(tmp_path)) is True
  with pytest.raises(ValueError, match=r"image_size: 64 -> 96.*new --model_dir"):
    model_dir_lib.check_resumable(config.replace(image_size=96), ("a", "b"), str(tmp_path))
  with pytest.raises(ValueError, match=r"class_names"):
    model_dir_lib.check_resumable(config, ("a", "b", "c"), str(tmp_path))
  with pytest.raises(ValueError, match=r"path: 'estimator' -> 'keras'"):
    model_dir_lib.check_resumable(config.replace(path="keras"), ("a", "b"), str(tmp_path))
  # Settings that do not change what a checkpoint means may differ on resume; the batch size
  # may not (the steps taken were counted in it).
  assert model_dir_lib.check_resumable(config.replace(epochs=9, log_every_n_steps=7), ("a", "b"),
                                       str(tmp_path))
  with pytest.raises(ValueError, match=r"batch_size: 32 -> 8 .*keep --batch_size=32"):
    model_dir_lib.check_resumable(config.replace(batch_size=8), ("a", "b"), str(tmp_path))
  with pytest.raises(ValueError, match=r"learning_rate: 0.0001 -> 0.001"):
    model_dir_lib.check_resumable(config.replace(learning_rate=1e-3), ("a", "b"), str(tmp_path))


def test_checkpoints_without_config_json_are_refused(tmp_path):
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path)).validate()
  with pytest.raises(ValueError, match="not written by estimator_ft"):
    model_dir_lib.prepare_model_dir(config, ("a", "b"))


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tiny_dataset, tmp_path):
  config = tiny_config(tiny_dataset, tmp_path, learning_rate=1e30, epochs=3, save_checkpoints_steps=1)
  with pytest.raises(errors_lib.NaNLossError, match="loss became NaN.*Lower --learning_rate") as error:
    train_job.run(config)
  # The run stopped before finishing; the step-0 checkpoint of the initial weights is finite and
  # the message names it as the one to resume from.
  latest = tf.train.latest_checkpoint(str(tmp_path))
  assert latest is not None and int(latest.rsplit("-", 1)[1]) < 9
  good = errors_lib.last_finite_checkpoint(str(tmp_path))
  assert good is not None and os.path.basename(good) in str(error.value)
  reader = tf.train.load_checkpoint(good)
  assert np.isfinite(reader.get_tensor("head_logits/kernel")).all()


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "estimator_ft", *args], capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("flags, message", [
    (["--image_size=16"], "too small: ResNet50 needs at least 32"),
    (["--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--learning_rate=-1"], "must be a positive number"),
    (["--dropout=1.5"], "--dropout=1.5 must be in [0, 1)"),
    (["--weights=/no/such/file.h5"], "no such file"),
])
def test_bad_flags_fail_with_a_message(tiny_dataset, tmp_path, flags, message):
  result = run_cli("train", f"--train_dir={tiny_dataset}/train",
                   f"--validation_dir={tiny_dataset}/validation", f"--model_dir={tmp_path}/m",
                   "--batch_size=8", *flags)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "m").exists(), "a rejected setting must not leave a model_dir behind"


@pytest.mark.parametrize("subcommand", ["train", "compare"])
def test_a_bad_setting_is_answered_before_tensorflow_starts(tiny_dataset, tmp_path, subcommand):
  """Flag errors in the seconds of TensorFlow's start-up would be the wait a user notices most."""
  where = f"--model_dir={tmp_path}/m" if subcommand == "train" else f"--output_dir={tmp_path}/out"
  argv = ["estimator-ft", subcommand, f"--train_dir={tiny_dataset}/train",
          f"--validation_dir={tiny_dataset}/validation", where, "--image_size=16"]
  script = ("import sys\n"
            "from estimator_ft import cli\n"
            "try:\n"
            f"  cli.run_main({argv!r})\n"
            "except SystemExit as e:\n"
            "  print('exit', e.code, 'tensorflow' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert "too small: ResNet50 needs at least 32" in result.stderr, result.stderr
  assert result.stdout.split() == ["exit", "2", "False"], result.stdout


def test_cli_usage_errors(tmp_path):
  result = run_cli("train", f"--model_dir={tmp_path}")
  assert result.returncode == 2 and "No data given" in result.stderr
  result = run_cli("train", "--optimizer=rmsprop")
  assert result.returncode != 0 and "rmsprop" in result.stderr and "momentum" in result.stderr
  result = run_cli("frobnicate")
  assert result.returncode == 2 and "unknown subcommand" in result.stderr
  result = run_cli("train", f"--train_dir={tmp_path}/missing", f"--validation_dir={tmp_path}/missing",
                   f"--model_dir={tmp_path}/m")
  assert result.returncode == 2 and str(tmp_path / "missing") in result.stderr
  assert not (tmp_path / "m").exists(), "a failed data check must not create the model_dir"


@pytest.mark.slow
def test_training_on_the_sample_data_lowers_the_loss(sample_dataset, tmp_path):
  """From random init, a few epochs of the demo's optimizer settings on the sample task."""
  config = Config(train_dir=str(sample_dataset / "train"), validation_dir=str(sample_dataset / "validation"),
                  model_dir=str(tmp_path), image_size=32, batch_size=16, epochs=4, weights="none",
                  optimizer="adam", learning_rate=1e-3, dropout=0.0, batchnorm_momentum=0.9,
                  export_during_training=False).validate()
  history = train_job.run(config)["history"]
  assert len(history) == 4
  first, last = history[0], history[-1]
  # Measured 3.60 -> 1.38. Validation is not asserted: 32 steps from random init is too few for it
  # to be stable (the demo's 160 steps at 64 px reach 0.66-0.70 validation accuracy).
  assert last["loss"] < 0.8 * first["loss"], history
