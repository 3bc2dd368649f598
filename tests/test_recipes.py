"""Issue 15's fine-tuning recipes: pure rules (no TensorFlow), the one TensorFlow definition both
paths use, and keras vs estimator with every recipe switched on at once."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from estimator_ft import recipes
from estimator_ft.config import Config

SIZE = 32
BATCH = 6
STEPS_PER_EPOCH = 4  # tiny_dataset: 24 training images


# ---------------------------------------------------------------- pure rules

def test_warmup_is_linear_from_zero_then_the_schedule():
  rate = lambda step, **kw: recipes.learning_rate_at(step, 0.1, 10, 5, warmup_epochs=1, **kw)
  assert [rate(s) for s in (0, 5, 10, 30)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
  # cosine: full rate at the end of warm-up, half way through the rest, 0 at the end
  assert rate(10, schedule="cosine") == pytest.approx(0.1)
  assert rate(30, schedule="cosine") == pytest.approx(0.05)
  assert rate(50, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
  # step: boundaries in epochs from the start of the run
  step = lambda s: rate(s, schedule="step", decay_epochs=(2, 4), decay_factor=0.1)
  assert [step(s) for s in (19, 20, 39, 40)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_head_epochs_split_the_run_into_a_head_phase_and_a_fine_tune_phase():
  head, fine_tune = recipes.phases(5, 2, 10, 0.01, 0.0, "conv5_block1_1_conv")
  assert (head.name, head.first_epoch, head.last_epoch, head.first_step, head.end_step,
          head.learning_rate, head.trainable_from) == ("head", 1, 2, 0, 20, 0.01, "none")
  # phase 2: the rest of the run, at learning_rate / 10 unless --fine_tune_learning_rate says
  assert (fine_tune.name, fine_tune.first_epoch, fine_tune.last_epoch, fine_tune.first_step,
          fine_tune.end_step, fine_tune.trainable_from) == ("fine_tune", 3, 5, 20, 50,
                                                            "conv5_block1_1_conv")
  assert fine_tune.learning_rate == pytest.approx(0.001)
  assert recipes.phases(5, 2, 10, 0.01, 0.005, "all")[1].learning_rate == 0.005
  [single] = recipes.phases(5, 0, 10, 0.01, 0.0, "all")
  assert (single.name, single.first_step, single.end_step, single.learning_rate) == (
      "train", 0, 50, 0.01)
  run = (head, fine_tune)
  assert [recipes.phase_at(s, run).name for s in (0, 19, 20, 49, 50)] == [
      "head", "head", "fine_tune", "fine_tune", "fine_tune"]
  # The boundary checkpoint is the head phase's last (it evaluates it, as Keras at the epoch end).
  assert [recipes.phase_of_checkpoint(s, run).name for s in (0, 20, 21)] == [
      "head", "head", "fine_tune"]
  # A run stopped in phase 1 resumes into phase 1 then 2; one stopped in phase 2, in phase 2.
  assert [p.name for p in recipes.phases_ahead(12, run)] == ["head", "fine_tune"]
  assert [p.name for p in recipes.phases_ahead(20, run)] == ["fine_tune"]
  assert recipes.phases_ahead(50, run) == ()
  assert "the whole base frozen" in head.describe()["trainable"]
  assert head.describe()["epochs"] == [1, 2] and fine_tune.describe()["steps"] == [20, 50]


def test_each_phase_scales_the_one_schedule_by_its_own_rate():
  run = recipes.phases(4, 1, 10, 0.1, 0.01, "all")
  rate = lambda step: recipes.phase_learning_rate_at(step, run, 10, 4, "cosine", 0.5)
  shape = lambda step: recipes.learning_rate_at(step, 1.0, 10, 4, "cosine", 0.5)
  assert rate(2) == pytest.approx(0.1 * 2 / 5)  # warm-up from step 0, in phase 1
  assert rate(9) == pytest.approx(0.1 * shape(9))
  assert rate(10) == pytest.approx(0.01 * shape(10))  # the cosine spans the whole run
  assert rate(39) == pytest.approx(0.01 * shape(39))


def test_decay_epochs_and_class_weight_specs_are_checked():
  assert recipes.parse_decay_epochs("30, 60,80") == (30, 60, 80)
  for bad in ("30,x", "60,30", "0,10"):
    with pytest.raises(ValueError, match="lr_decay_epochs"):
      recipes.parse_decay_epochs(bad)
  assert recipes.parse_class_weight("none") is None
  assert recipes.parse_class_weight("a=2,b=0.5") == {"a": 2.0, "b": 0.5}
  with pytest.raises(ValueError, match="not classes of this data set"):
    recipes.parse_class_weight("cat=2", ("a", "b"))
  for bad in ("a", "a=-1", "a=x"):
    with pytest.raises(ValueError, match="--class_weight"):
      recipes.parse_class_weight(bad)


def test_balanced_class_weights_are_n_over_k_n_c():
  weights = recipes.class_weights("balanced", ("a", "b"), (30, 10))
  assert weights == pytest.approx([40 / 60, 40 / 20])
  # every class carries the same total weight; the mean weight per example is 1
  assert 30 * weights[0] == pytest.approx(10 * weights[1])
  assert recipes.class_weights("b=3", ("a", "b"), (30, 10)) == [1.0, 3.0]
  assert recipes.class_weights("none", ("a", "b"), (30, 10)) is None


def test_early_stopping_counts_evaluations_without_improvement():
  losses = [1.0, 0.8, 0.79, 0.85, 0.9]
  assert recipes.early_stopping(losses[:4], patience=3)["stop"] is False
  decision = recipes.early_stopping(losses, patience=3, min_delta=0.05)
  # 0.79 is not 0.05 better than 0.8: the best stays at index 1, three evaluations ago
  assert decision == {"stop": True, "best_index": 1, "best": 0.8, "waited": 3}
  assert recipes.early_stopping([0.5, 0.7, 0.6], patience=1, higher_is_better=True)["stop"] is True
  assert recipes.early_stopping(losses, patience=0)["stop"] is False


def test_resume_refuses_what_would_shift_the_schedule_and_states_the_rest():
  old = Config(epochs=5, lr_schedule="cosine").to_dict()
  refused, _ = recipes.resume_changes(old, Config(epochs=10, lr_schedule="cosine").to_dict())
  assert refused and "keep --epochs=5" in refused[0]
  refused, _ = recipes.resume_changes(old, Config(epochs=5, lr_schedule="cosine", batch_size=8).to_dict())
  assert refused and "keep --batch_size=32" in refused[0]
  old = Config(epochs=5).to_dict()
  refused, accepted = recipes.resume_changes(old, Config(epochs=10).to_dict())
  assert not refused and "--epochs 5 -> 10" in accepted[0]
  # Another batch size is refused even at a constant rate: the Estimator counts the epochs done
  # as global step / steps per epoch, so a resume at batch 64 over 32 ended after half the data.
  refused, accepted = recipes.resume_changes(old, Config(epochs=5, batch_size=64).to_dict())
  assert refused and "batch_size: 32 -> 64" in refused[0] and "keep --batch_size=32" in refused[0]
  assert not accepted


def test_a_single_machine_run_applies_the_resume_rules_too(tmp_path, caplog):
  """plan_run / prepare_model_dir (the train job on one machine) once skipped resume_changes."""
  from estimator_ft.run import model_dir as model_dir_lib
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path), lr_schedule="cosine")
  model_dir_lib.write_run_config(config, ("a", "b"))
  (tmp_path / "model.ckpt-8.index").write_bytes(b"x")  # it trained: nothing to set aside
  for changes, refusal in (({"epochs": 9}, r"epochs: 5 -> 9 under --lr_schedule=cosine"),
                           ({"batch_size": 64}, r"batch_size: 32 -> 64")):
    with pytest.raises(ValueError, match=rf"holds a run with a different configuration \({refusal}"):
      model_dir_lib.plan_run(config.replace(**changes), ("a", "b"))
    with pytest.raises(ValueError, match=refusal):
      model_dir_lib.prepare_model_dir(config.replace(**changes), ("a", "b"))
  # An accepted change is said when the run resumes.
  constant = config.replace(lr_schedule="constant")
  model_dir_lib.write_run_config(constant, ("a", "b"))
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    assert model_dir_lib.prepare_model_dir(constant.replace(epochs=9), ("a", "b")) is True
  assert "Resuming with --epochs 5 -> 9" in caplog.text


def test_config_checks_the_recipe_settings():
  base = Config(train_dir="t", validation_dir="v", model_dir="m")
  for changes, message in (({"warmup_epochs": 5}, "--warmup_epochs=5"),
                           ({"lr_schedule": "step", "lr_decay_epochs": "3,1"}, "--lr_decay_epochs"),
                           ({"label_smoothing": 1.0}, "--label_smoothing"),
                           ({"weight_decay": -1.0}, "--weight_decay"),
                           ({"class_weight": "cat"}, "--class_weight"),
                           ({"early_stopping_patience": -1}, "--early_stopping_patience"),
                           ({"head_epochs": 5}, r"--head_epochs=5 must be in \[0, --epochs=5\)"),
                           ({"head_epochs": -1}, "--head_epochs=-1"),
                           ({"head_epochs": 1, "fine_tune_from": "none"}, "would unfreeze nothing"),
                           ({"fine_tune_learning_rate": 1e-5}, "set --head_epochs=N"),
                           ({"head_epochs": 1, "fine_tune_learning_rate": -1.0},
                            "--fine_tune_learning_rate=-1.0 must be >= 0")):
    with pytest.raises(ValueError, match=message):
      base.replace(**changes).validate()


def test_resuming_with_more_epochs_under_cosine_is_refused(tmp_path):
  from estimator_ft.run import model_dir as model_dir_lib
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path), lr_schedule="cosine")
  model_dir_lib.write_run_config(config, ("a", "b"))
  with pytest.raises(ValueError, match=r"epochs: 5 -> 9 under --lr_schedule=cosine.*keep --epochs=5"):
    model_dir_lib.check_resumable(config.replace(epochs=9), ("a", "b"), str(tmp_path))
  for changes in ({"label_smoothing": 0.1}, {"weight_decay": 1e-4}, {"class_weight": "balanced"},
                  {"warmup_epochs": 1.0}, {"head_epochs": 1}):
    with pytest.raises(ValueError, match=list(changes)[0]):
      model_dir_lib.check_resumable(config.replace(**changes), ("a", "b"), str(tmp_path))
  # The phase boundary is a step count: another batch size would move it.
  phased = Config(epochs=5, head_epochs=2).to_dict()
  refused, _ = recipes.resume_changes(phased, Config(epochs=5, head_epochs=2, batch_size=8).to_dict())
  assert refused and "--head_epochs" in refused[0] and "keep --batch_size=32" in refused[0]


def test_head_epochs_are_refused_in_an_estimator_cluster(monkeypatch):
  import json
  from estimator_ft import estimator as estimator_path
  monkeypatch.setenv("TF_CONFIG", json.dumps({
      "cluster": {"chief": ["localhost:1"], "worker": ["localhost:2"], "ps": ["localhost:3"]},
      "task": {"type": "chief", "index": 0}}))
  config = Config(epochs=3, head_epochs=1)
  with pytest.raises(ValueError, match="--head_epochs does not work in a TF_CONFIG cluster.*--path=keras"):
    estimator_path.check_settings(config, ("a", "b"))
  estimator_path.check_settings(config.replace(head_epochs=0), ("a", "b"))


def test_help_describes_every_recipe_flag():
  result = subprocess.run([sys.executable, "-m", "estimator_ft", "train", "--helpfull"],
                          capture_output=True, text=True, timeout=120)
  text = result.stdout + result.stderr
  for flag in ("warmup_epochs", "lr_schedule", "lr_decay_epochs", "lr_decay_factor",
               "label_smoothing", "weight_decay", "class_weight", "early_stopping_patience",
               "early_stopping_min_delta", "head_epochs", "fine_tune_learning_rate"):
    assert f"--{flag}" in text, flag
  assert "balanced (n / (k * n_c))" in text and "constant|cosine|step" in text
  assert "--learning_rate / 10" in text and "inference mode" in text


# ---------------------------------------------------------------- one TensorFlow definition

def test_the_tensorflow_schedule_is_the_pure_one():
  from estimator_ft import model_fn as model_fn_lib
  for schedule in ("constant", "cosine", "step"):
    config = Config(learning_rate=0.1, epochs=6, lr_schedule=schedule, warmup_epochs=1.5,
                    lr_decay_epochs="2,4", lr_decay_factor=0.5)
    tf_schedule = model_fn_lib.make_learning_rate(config, 10)
    for step in range(0, 61):
      expected = recipes.learning_rate_at(step, 0.1, 10, 6, schedule, 1.5, (2, 4), 0.5)
      assert float(tf_schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-8), (schedule, step)
    # --head_epochs: phase 2 at its own base rate, from the boundary step on
    phased = config.replace(head_epochs=2, fine_tune_learning_rate=0.02)
    tf_schedule = model_fn_lib.make_learning_rate(phased, 10)
    run = recipes.phases(6, 2, 10, 0.1, 0.02, "all")
    for step in range(0, 61):
      expected = recipes.phase_learning_rate_at(step, run, 10, 6, schedule, 1.5, (2, 4), 0.5)
      assert float(tf_schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-8), (schedule, step)


def _penalty(kernels, weight_decay):
  return weight_decay * sum(float(np.sum(np.square(np.asarray(k, np.float64)))) / 2 for k in kernels)


def test_weight_decay_covers_trainable_conv_and_dense_kernels_only():
  import tensorflow as tf
  from estimator_ft import model as model_lib
  config = Config(image_size=SIZE, weights="none", fine_tune_from="conv5_block1_1_conv",
                  weight_decay=1e-3)
  model = model_lib.build_model(config, 3)
  kernels = model_lib.decayed_kernels(model)
  names = [k.name for k in kernels]
  # conv5 (3 blocks x 3 convs + the projection shortcut) and the head; no BN, no bias, no conv1-4
  assert len(names) == 11 and names[-1].startswith("head_logits/kernel")
  assert all("conv5" in n for n in names[:-1])
  [loss] = model.losses
  assert float(loss) == pytest.approx(_penalty(kernels, 1e-3), rel=1e-5)
  assert not model_lib.build_model(config.replace(weight_decay=0.0), 3).losses
  del tf


@pytest.fixture(scope="module")
def batch_losses(tmp_path_factory):
  """One batch's training and evaluation losses from each path (label smoothing, weight decay and
  class weights on), from the same initial weights, and the numpy formula's, per head type."""
  import tensorflow as tf
  from estimator_ft import contract
  from estimator_ft import keras_path
  from estimator_ft import model as model_lib
  from estimator_ft import model_fn as model_fn_lib
  results = {}
  folder = tmp_path_factory.mktemp("batch_losses")
  rng = np.random.default_rng(0)
  images = rng.uniform(-100, 100, (4, SIZE, SIZE, 3)).astype(np.float32)
  for class_names in (("a", "b"), ("a", "b", "c")):
    k = len(class_names)
    labels = np.array([0, 1, 1, 0][:4]) % k
    labels[2] = k - 1
    config = Config(image_size=SIZE, weights="none", dropout=0.0, label_smoothing=0.2,
                    weight_decay=1e-3, class_weight=f"{class_names[-1]}=3", batchnorm_momentum=0.9)
    class_weights = recipes.class_weights(config.class_weight, class_names, [1] * k)
    # The Keras model's own (seeded) weights are the Estimator's initial weights: one build less.
    tf.keras.utils.set_random_seed(config.seed)
    model = keras_path.build_compiled_model(config, k, steps_total=8)
    prefix = model_lib.write_initial_weights(model.get_weights(), "the Keras model",
                                             str(folder / f"w{k}" / "weights"))
    # Evaluation first: the training call updates the BN moving statistics.
    keras_eval = float(model.compute_loss(images, tf.constant(labels), model(images, training=False)))
    probabilities = model(images, training=True)
    example_weights = np.array([class_weights[i] for i in labels], np.float32)
    keras_train = float(model.compute_loss(images, tf.constant(labels), probabilities,
                                           tf.constant(example_weights)))
    kernels = [k_.numpy() for k_ in model_lib.decayed_kernels(model)]
    p = np.asarray(probabilities, np.float64)
    if k == 2:
      target = labels * 0.8 + 0.1
      q = np.clip(p[:, 0], 1e-7, 1 - 1e-7)
      per_example = -(target * np.log(q) + (1 - target) * np.log(1 - q))
    else:
      target = np.eye(k)[labels] * 0.8 + 0.2 / k
      per_example = -np.sum(target * np.log(p), axis=1)
    manual_train = float(np.mean(example_weights * per_example)) + _penalty(kernels, 1e-3)
    estimator = {}
    # (EVAL once: each graph build of ResNet50 costs seconds.)
    modes = (tf.estimator.ModeKeys.TRAIN,) + ((tf.estimator.ModeKeys.EVAL,) if k == 2 else ())
    for mode in modes:
      graph = tf.Graph()
      with graph.as_default():
        model_fn = model_fn_lib.build_model_fn(config, class_names, 2, prefix, class_weights)
        spec = model_fn({contract.FEATURE_KEY: tf.constant(images)}, tf.constant(labels), mode)
        with tf.compat.v1.Session() as session:
          session.run(tf.compat.v1.global_variables_initializer())
          estimator[mode] = float(session.run(spec.loss))
    results[k] = {"keras_train": keras_train, "keras_eval": keras_eval, "manual_train": manual_train,
                  "estimator_train": estimator[tf.estimator.ModeKeys.TRAIN],
                  "estimator_eval": estimator.get(tf.estimator.ModeKeys.EVAL)}
  return results


@pytest.mark.parametrize("num_classes", [2, 3])
def test_both_paths_train_on_one_smoothed_weighted_decayed_loss(batch_losses, num_classes):
  losses = batch_losses[num_classes]
  assert losses["keras_train"] == pytest.approx(losses["manual_train"], rel=1e-5)
  assert losses["estimator_train"] == pytest.approx(losses["manual_train"], rel=1e-5)
  if losses["estimator_eval"] is not None:
    # Evaluation is unweighted (class weights are for training only) in both paths.
    assert losses["estimator_eval"] == pytest.approx(losses["keras_eval"], rel=1e-5)
    assert abs(losses["estimator_eval"] - losses["estimator_train"]) > 1e-3


# ---------------------------------------------------------------- both paths, every recipe on

# Two-phase fine-tuning on top: epochs 1-2 train the head alone (the base frozen), epoch 3 on the
# whole model at learning_rate / 10. min_delta 1e30: no evaluation after the first counts as an
# improvement, so with patience 2 both paths stop after epoch 3 of 4, in phase 2.
ALL_RECIPES = dict(warmup_epochs=1.0, lr_schedule="cosine", learning_rate=0.01, label_smoothing=0.1,
                   weight_decay=1e-4, class_weight="vertical=3", early_stopping_patience=2,
                   early_stopping_min_delta=1e30, head_epochs=2)
EPOCHS = 4
STOPPED_AFTER_EPOCH = 3
HEAD_STEPS = 2 * STEPS_PER_EPOCH
FINAL_STEP = STOPPED_AFTER_EPOCH * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def compared_with_all_recipes(tiny_dataset, module_tmp_path):
  from estimator_ft.jobs import compare
  config = Config(train_dir=str(tiny_dataset / "train"), validation_dir=str(tiny_dataset / "validation"),
                  image_size=SIZE, batch_size=BATCH, epochs=EPOCHS, weights="none", dropout=0.0,
                  augment=False, seed=5, batchnorm_momentum=0.9, export_during_training=False,
                  save_summary_steps=1, **ALL_RECIPES).validate(require_model_dir=False)
  output_dir = module_tmp_path / "all_recipes"
  return config, output_dir, compare.run_compare(config, str(output_dir), ("keras", "estimator"))


@pytest.fixture(scope="module")
def checkpoints_of_both_paths(compared_with_all_recipes):
  """{path: {step: [weights in model.weights order]}} of the compared runs' checkpoints at the
  phase boundary and the end, and the weight layout."""
  from estimator_ft import keras_path
  from estimator_ft.jobs import compare
  from estimator_ft.run import model_dir as model_dir_lib
  import tensorflow as tf
  config, output_dir, _ = compared_with_all_recipes
  layout = compare.weight_layout(config, 2)
  weights = {}
  for path in ("keras", "estimator"):
    run = compare.path_config(config, str(output_dir), path)
    weights[path] = {}
    for step in (HEAD_STEPS, FINAL_STEP):
      prefix = os.path.join(run.model_dir, f"{model_dir_lib.checkpoint_name(run)}-{step}")
      if path == "keras":
        weights[path][step] = keras_path.checkpoint_weights(run, 2, prefix)
      else:
        reader = tf.train.load_checkpoint(prefix)
        weights[path][step] = [reader.get_tensor(name) for name, _ in layout]
  return layout, weights


@pytest.mark.slow
def test_keras_and_estimator_agree_with_every_recipe_on(compared_with_all_recipes):
  _, _, comparison = compared_with_all_recipes
  keras, estimator = (comparison["paths"][p]["history"] for p in ("keras", "estimator"))
  assert len(keras) == len(estimator) == STOPPED_AFTER_EPOCH
  for a, b in zip(keras, estimator):
    assert abs(a["val_loss"] - b["val_loss"]) / abs(b["val_loss"]) < 1e-4
    assert abs(a["loss"] - b["loss"]) / abs(b["loss"]) < 1e-4
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
  assert comparison["max_rel_diff"]["keras_vs_estimator"]["trainable_weights"] < 1e-3


@pytest.mark.slow
def test_both_paths_stop_early_at_the_same_epoch_and_say_why(compared_with_all_recipes):
  _, output_dir, comparison = compared_with_all_recipes
  for path in ("keras", "estimator"):
    results = _results(output_dir / path)
    assert results["global_step"] == FINAL_STEP, path
    report = results["early_stopping"]
    assert report["stopped"] and report["epoch"] == STOPPED_AFTER_EPOCH, path
    assert report["best_epoch"] == 1, path
    assert "did not improve" in report["reason"] and "--early_stopping_patience=2" in report["reason"]
    assert [h["epoch"] for h in comparison["paths"][path]["history"]] == [1, 2, 3]


@pytest.mark.slow
def test_the_head_phase_trains_the_head_alone_then_the_base_trains(
    compared_with_all_recipes, checkpoints_of_both_paths):
  import tensorflow as tf
  from estimator_ft import model as model_lib
  config, output_dir, _ = compared_with_all_recipes
  layout, weights = checkpoints_of_both_paths
  reader = tf.train.load_checkpoint(str(output_dir / "initial_weights" / "weights"))
  initial = [reader.get_tensor(model_lib._INITIAL_WEIGHT_KEY.format(i))  # pylint: disable=protected-access
             for i in range(len(layout))]
  for path in ("keras", "estimator"):
    at_boundary, final = weights[path][HEAD_STEPS], weights[path][FINAL_STEP]
    for index, (name, _) in enumerate(layout):
      if name.startswith("head_"):
        assert not np.array_equal(at_boundary[index], initial[index]), (path, name)
      else:
        # Frozen base: kernels, BN gamma/beta *and* moving statistics (inference mode) untouched.
        np.testing.assert_array_equal(at_boundary[index], initial[index], err_msg=f"{path} {name}")
    moved = [name for index, (name, _) in enumerate(layout) if not name.startswith("head_")
             and not np.array_equal(final[index], at_boundary[index])]
    assert len(moved) == len(layout) - 2, path  # phase 2: the whole base, statistics included
    results = _results(output_dir / path)
    assert [p["phase"] for p in results["phases"]] == ["head", "fine_tune"]
    assert results["phases"][0]["epochs"] == [1, 2] and results["phases"][1]["epochs"] == [3, 4]
    assert results["phases"][1]["learning_rate"] == pytest.approx(config.learning_rate / 10)
    assert "whole base frozen" in results["phases"][0]["trainable"]


@pytest.mark.slow
def test_the_heads_optimizer_state_carries_over_into_phase_2(compared_with_all_recipes):
  """The head's momentum at the start of phase 2 is its momentum at the end of phase 1.

  Keras: one optimizer object, recompiled; its boundary checkpoint (epoch 2) holds slots for the
  head only - phase 1 never touched the base. Estimator: the phase-2 graph restored that
  checkpoint and saved it again at its first step, so its boundary checkpoint is phase 2's
  starting state: the same head momentum (to float32 round-off between the paths), and zeros
  for the base's slots, which phase 1's graph created so that phase 2 could restore them.
  """
  import tensorflow as tf
  from estimator_ft.jobs import compare
  from estimator_ft.run import model_dir as model_dir_lib
  config, output_dir, _ = compared_with_all_recipes
  keras_run = output_dir / "keras"
  estimator_reader = tf.train.load_checkpoint(
      str(output_dir / "estimator" / f"{model_dir_lib.ESTIMATOR_CHECKPOINT_NAME}-{HEAD_STEPS}"))
  keras_reader = tf.train.load_checkpoint(
      str(keras_run / f"{model_dir_lib.KERAS_CHECKPOINT_NAME}-{HEAD_STEPS}"))
  keras_slots = {k: keras_reader.get_tensor(k) for k in keras_reader.get_variable_to_shape_map()
                 if "OPTIMIZER_SLOT" in k}
  assert len(keras_slots) == 2  # the head's kernel and bias
  by_shape = {v.shape: v for v in keras_slots.values()}
  keys = list(estimator_reader.get_variable_to_shape_map())
  # (the Estimator's slot of variable V is <optimizer name>/V/momentum)
  slot_key = lambda variable: next(k for k in keys if k.endswith(f"/{variable}/momentum"))
  for name in (slot_key("head_logits/kernel"), slot_key("head_logits/bias")):
    value = estimator_reader.get_tensor(name)
    assert np.abs(value).max() > 0, name
    np.testing.assert_allclose(value, by_shape[value.shape], rtol=1e-3,
                               atol=1e-3 * np.abs(value).max(), err_msg=name)
  layout = compare.weight_layout(config, 2)
  base_slots = [slot_key(name) for name, trainable in layout
                if trainable and not name.startswith("head_")]
  assert len(base_slots) > 100
  assert all(not np.any(estimator_reader.get_tensor(k)) for k in base_slots)
  # Phase 2 then moved them: the final checkpoints hold the base's momentum in both paths.
  final = tf.train.load_checkpoint(str(keras_run / f"{model_dir_lib.KERAS_CHECKPOINT_NAME}-{FINAL_STEP}"))
  assert sum("OPTIMIZER_SLOT" in k for k in final.get_variable_to_shape_map()) == len(base_slots) + 2


def _results(model_dir):
  import json
  with open(os.path.join(model_dir, "results.json")) as f:
    return json.load(f)


def _copy_stopped_at(source, target, step):
  """What a run killed after its checkpoint at `step` left in model_dir: the checkpoints up to it,
  the history and evaluations up to it, config.json; what came later is not copied."""
  import json
  import shutil
  import tensorflow as tf
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
  from estimator_ft.run import events as events_lib
  from estimator_ft.run import model_dir as model_dir_lib
  target.mkdir()
  shutil.copy(source / model_dir_lib.CONFIG_FILE, target)
  # (compare's initial weights, which a resume does not read: copied only to save rebuilding them)
  shutil.copytree(source.parent / "initial_weights", target / "initial_weights")
  with open(source / model_dir_lib.CONFIG_FILE) as f:
    path = json.load(f)["config"]["path"]
  name = model_dir_lib.KERAS_CHECKPOINT_NAME if path == "keras" else model_dir_lib.ESTIMATOR_CHECKPOINT_NAME
  prefixes = []
  for kept in sorted(s for s in model_dir_lib.checkpoint_steps(str(source)) if s <= step):
    for file in source.glob(f"{name}-{kept}.*"):
      shutil.copy(file, target)
    prefixes.append(str(target / f"{name}-{kept}"))
  tf.compat.v1.train.update_checkpoint_state(str(target), prefixes[-1],
                                            all_model_checkpoint_paths=prefixes)
  history_file = (model_dir_lib.KERAS_HISTORY_FILE if path == "keras"
                  else model_dir_lib.TRAIN_HISTORY_FILE)
  history = model_dir_lib.read_history(str(source), history_file)
  model_dir_lib.write_history(str(target), history_file,
                              [h for h in history if h["epoch"] * STEPS_PER_EPOCH <= step])
  if (source / "eval").is_dir():
    writer = EventFileWriter(str(target / "eval"))
    for event in events_lib.iter_events(str(source / "eval")):
      if event.HasField("summary") and event.step <= step:
        writer.add_event(event_pb2.Event.FromString(event.SerializeToString()))
    writer.close()


@pytest.mark.slow
@pytest.mark.parametrize("path, stopped_at", [
    # In phase 1: resumes into phase 1, then phase 2. (Not the Estimator too, to keep the file's
    # time: it would restore a phase-1 checkpoint into the phase-1 graph, then cross the boundary
    # as the compare's run did - 38 s for little new.)
    ("keras", STEPS_PER_EPOCH),
    # Killed in phase 2 before its first checkpoint: resumes in phase 2 (the graph of the phase
    # of the step, not of the checkpoint's writer).
    ("keras", HEAD_STEPS),
    ("estimator", HEAD_STEPS),
])
def test_a_run_stopped_in_either_phase_resumes_in_its_phase(
    compared_with_all_recipes, checkpoints_of_both_paths, tmp_path, caplog, path, stopped_at):
  """The resumed run (--exact_resume, so on the same batches) trains the rest of phase 1 with the
  base frozen, or goes straight to phase 2, and ends where the uninterrupted run ended - early
  stopping included (the count of evaluations before the stop is kept)."""
  import logging
  from estimator_ft.jobs import compare
  from estimator_ft.jobs import train as train_job
  config, output_dir, _ = compared_with_all_recipes
  layout, weights = checkpoints_of_both_paths
  stopped = tmp_path / "stopped"
  _copy_stopped_at(output_dir / path, stopped, stopped_at)
  run = compare.path_config(config, str(output_dir), path).replace(model_dir=str(stopped),
                                                                   exact_resume=True)
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    results = train_job.run(run)
  phases_started = [r.getMessage().split(" from ")[0] for r in caplog.records
                    if r.getMessage().startswith("Phase ")]
  assert phases_started == (["Phase head", "Phase fine_tune"] if stopped_at < HEAD_STEPS
                            else ["Phase fine_tune"])
  assert results["global_step"] == FINAL_STEP
  assert results["early_stopping"]["stopped"] and results["early_stopping"]["epoch"] == 3
  resumed = compare.final_weights(run, 2, layout)
  _, relative = compare.weight_differences(resumed, weights[path][FINAL_STEP], layout)
  assert relative["trainable_weights"] < 1e-4 and relative["bn_moving_statistics"] < 1e-4
  if path == "estimator" and stopped_at == HEAD_STEPS:  # (once: a run costs a startup)
    # The same command again trains nothing more: the run stopped early.
    assert train_job.run(run)["global_step"] == FINAL_STEP


@pytest.mark.slow
def test_both_paths_log_the_scheduled_learning_rate(compared_with_all_recipes):
  from estimator_ft.run import events as events_lib
  config, output_dir, _ = compared_with_all_recipes
  run_phases = recipes.phases(config.epochs, config.head_epochs, STEPS_PER_EPOCH,
                              config.learning_rate, config.fine_tune_learning_rate,
                              config.fine_tune_from)
  # Both paths write the common learning_rate curve into their model_dir at the global step:
  # the rate of the step just taken, schedule(step - 1).
  for folder in (output_dir / "keras", output_dir / "estimator"):
    by_step = events_lib.scalars_by_step(str(folder))
    logged = {s: v["learning_rate"] for s, v in by_step.items() if "learning_rate" in v}
    assert sorted(logged) == list(range(1, FINAL_STEP + 1)), folder
    for step, rate in logged.items():
      step = step - 1
      expected = recipes.phase_learning_rate_at(step, run_phases, STEPS_PER_EPOCH, config.epochs,
                                                config.lr_schedule, config.warmup_epochs)
      assert rate == pytest.approx(expected, rel=1e-4, abs=1e-7), (folder, step)
    assert min(logged.values()) < config.learning_rate / 2  # warm-up and decay both show
    # Phase 2's rate: learning_rate / 10 times the cosine, from the boundary on.
    assert max(v for s, v in logged.items() if s > HEAD_STEPS) < config.learning_rate / 10


@pytest.mark.slow
def test_both_paths_write_settings_and_final_metrics_for_the_hparams_tab(compared_with_all_recipes):
  from tensorboard.plugins.hparams import plugin_data_pb2
  from estimator_ft.run import events as events_lib
  _, output_dir, _ = compared_with_all_recipes
  for path in ("keras", "estimator"):
    folder = output_dir / path / "hparams"
    sessions = []
    for event in events_lib.iter_events(str(folder)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "hparams":
          data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
          sessions.append(data.session_start_info)
    [session] = sessions
    assert session.hparams["label_smoothing"].number_value == pytest.approx(0.1)
    assert session.hparams["class_weight"].string_value == "vertical=3"
    assert session.hparams["head_epochs"].number_value == 2
    assert session.hparams["path"].string_value == path
    results = _results(output_dir / path)
    metrics = events_lib.scalars_by_step(str(folder))[results["global_step"]]
    assert metrics["val_loss"] == pytest.approx(results["final_evaluation"]["example_loss"], rel=1e-6)


@pytest.mark.slow
def test_warm_start_brings_other_classes_the_base_and_batchnorm_statistics_and_a_fresh_head(
    compared_with_all_recipes, checkpoints_of_both_paths, tmp_path):
  import tensorflow as tf
  from estimator_ft import model as model_lib
  config, output_dir, _ = compared_with_all_recipes
  layout, weights = checkpoints_of_both_paths
  source = weights["estimator"][FINAL_STEP]
  class_names = ("a", "b", "c")
  target = config.replace(warm_start_from=str(output_dir / "estimator"), seed=99)
  prefix = model_lib.save_initial_weights(target, len(class_names), str(tmp_path / "w"), class_names)
  reader = tf.train.load_checkpoint(prefix)
  for index, (name, _) in enumerate(layout):
    value = reader.get_tensor(model_lib._INITIAL_WEIGHT_KEY.format(index))  # pylint: disable=protected-access
    if name.startswith("head_"):
      assert value.shape[-1] == 3  # a fresh head for other classes
    else:
      np.testing.assert_array_equal(value, source[index], err_msg=name)


@pytest.mark.slow
def test_a_warm_started_training_run_starts_from_the_other_runs_statistics(
    compared_with_all_recipes, checkpoints_of_both_paths, tiny_dataset, tmp_path):
  """End to end: an Estimator run warm-started from the Keras run (the same classes) has every
  weight of it - head, base and BatchNorm moving statistics - in its own step-0 checkpoint."""
  import tensorflow as tf
  from estimator_ft.jobs import train as train_job
  from estimator_ft.run import model_dir as model_dir_lib
  config, output_dir, _ = compared_with_all_recipes
  layout, weights = checkpoints_of_both_paths
  source = weights["keras"][FINAL_STEP]
  moving = [i for i, (name, _) in enumerate(layout) if "moving_mean" in name or "moving_var" in name]
  # The source's statistics moved away from their initial 0 / 1, so arriving is not a coincidence.
  assert max(float(np.abs(source[i] - round(float(source[i].mean()))).max()) for i in moving) > 1e-3
  run = Config(train_dir=str(tiny_dataset / "train"), validation_dir=str(tiny_dataset / "validation"),
               model_dir=str(tmp_path / "warm"), path="estimator", image_size=SIZE,
               batch_size=BATCH, epochs=1, weights="none", dropout=0.0, augment=False,
               export_during_training=False,
               warm_start_from=str(output_dir / "keras")).validate()
  train_job.run(run)
  reader = tf.train.load_checkpoint(str(tmp_path / "warm" / f"{model_dir_lib.ESTIMATOR_CHECKPOINT_NAME}-0"))
  for index, (name, _) in enumerate(layout):
    np.testing.assert_array_equal(reader.get_tensor(name), source[index], err_msg=name)
