"""Issue 15's fine-tuning recipes: pure rules (no TensorFlow), the one TensorFlow definition both
paths use, and keras vs estimator with every recipe switched on at once."""

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


def test_config_checks_the_recipe_settings():
  base = Config(train_dir="t", validation_dir="v", model_dir="m")
  for changes, message in (({"warmup_epochs": 5}, "--warmup_epochs=5"),
                           ({"lr_schedule": "step", "lr_decay_epochs": "3,1"}, "--lr_decay_epochs"),
                           ({"label_smoothing": 1.0}, "--label_smoothing"),
                           ({"weight_decay": -1.0}, "--weight_decay"),
                           ({"class_weight": "cat"}, "--class_weight"),
                           ({"early_stopping_patience": -1}, "--early_stopping_patience")):
    with pytest.raises(ValueError, match=message):
      base.replace(**changes).validate()


def test_resuming_with_more_epochs_under_cosine_is_refused(tmp_path):
  from estimator_ft.run import model_dir as model_dir_lib
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path), lr_schedule="cosine")
  model_dir_lib.write_run_config(config, ("a", "b"))
  with pytest.raises(ValueError, match=r"epochs: 5 -> 9 under --lr_schedule=cosine.*keep --epochs=5"):
    model_dir_lib.check_resumable(config.replace(epochs=9), ("a", "b"), str(tmp_path))
  for changes in ({"label_smoothing": 0.1}, {"weight_decay": 1e-4}, {"class_weight": "balanced"},
                  {"warmup_epochs": 1.0}):
    with pytest.raises(ValueError, match=list(changes)[0]):
      model_dir_lib.check_resumable(config.replace(**changes), ("a", "b"), str(tmp_path))


def test_help_describes_every_recipe_flag():
  result = subprocess.run([sys.executable, "-m", "estimator_ft", "train", "--helpfull"],
                          capture_output=True, text=True, timeout=120)
  text = result.stdout + result.stderr
  for flag in ("warmup_epochs", "lr_schedule", "lr_decay_epochs", "lr_decay_factor",
               "label_smoothing", "weight_decay", "class_weight", "early_stopping_patience",
               "early_stopping_min_delta"):
    assert f"--{flag}" in text, flag
  assert "balanced (n / (k * n_c))" in text and "constant|cosine|step" in text


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
    prefix = model_lib.save_initial_weights(config, k, str(folder / f"w{k}" / "weights"))
    model = keras_path.build_compiled_model(config, k, prefix, steps_total=8)
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

# min_delta 1e30: no evaluation after the first counts as an improvement, so with patience 1 both
# paths stop after epoch 2 of 3.
ALL_RECIPES = dict(warmup_epochs=1.0, lr_schedule="cosine", learning_rate=0.01, label_smoothing=0.1,
                   weight_decay=1e-4, class_weight="vertical=3", early_stopping_patience=1,
                   early_stopping_min_delta=1e30)


@pytest.fixture(scope="module")
def compared_with_all_recipes(tiny_dataset, module_tmp_path):
  from estimator_ft.jobs import compare
  config = Config(train_dir=str(tiny_dataset / "train"), validation_dir=str(tiny_dataset / "validation"),
                  image_size=SIZE, batch_size=BATCH, epochs=3, weights="none", dropout=0.0,
                  augment=False, seed=5, batchnorm_momentum=0.9, export_during_training=False,
                  save_summary_steps=1, **ALL_RECIPES).validate(require_model_dir=False)
  output_dir = module_tmp_path / "all_recipes"
  return config, output_dir, compare.run_compare(config, str(output_dir), ("keras", "estimator"))


@pytest.mark.slow
def test_keras_and_estimator_agree_with_every_recipe_on(compared_with_all_recipes):
  _, _, comparison = compared_with_all_recipes
  keras, estimator = (comparison["paths"][p]["history"] for p in ("keras", "estimator"))
  assert len(keras) == len(estimator) == 2
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
    assert results["global_step"] == 2 * STEPS_PER_EPOCH, path
    report = results["early_stopping"]
    assert report["stopped"] and report["epoch"] == 2 and report["best_epoch"] == 1, path
    assert "did not improve" in report["reason"] and "--early_stopping_patience=1" in report["reason"]
    assert [h["epoch"] for h in comparison["paths"][path]["history"]] == [1, 2]


def _results(model_dir):
  import json
  with open(os.path.join(model_dir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["keras", "estimator"])
def test_a_resumed_run_keeps_the_early_stopping_count(tiny_dataset, tmp_path, path):
  from estimator_ft.jobs import train as train_job
  config = Config(train_dir=str(tiny_dataset / "train"), validation_dir=str(tiny_dataset / "validation"),
                  model_dir=str(tmp_path / path), path=path, image_size=SIZE, batch_size=BATCH,
                  epochs=1, weights="none", dropout=0.0, augment=False, export_during_training=False,
                  early_stopping_patience=1, early_stopping_min_delta=1e30).validate()
  first = train_job.run(config)
  assert first["early_stopping"]["stopped"] is False
  # Resumed with more epochs: epoch 2 is the first without improvement, so it stops there (a
  # count restarted at the resume would train epoch 3 too).
  second = train_job.run(config.replace(epochs=3))
  assert second["global_step"] == 2 * STEPS_PER_EPOCH
  assert second["early_stopping"]["epoch"] == 2 and second["early_stopping"]["stopped"]
  if path == "estimator":  # (once: each run costs a startup and an evaluation)
    # The same command again trains nothing more.
    assert train_job.run(config.replace(epochs=3))["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_both_paths_log_the_scheduled_learning_rate(compared_with_all_recipes):
  from estimator_ft.run import events as events_lib
  config, output_dir, _ = compared_with_all_recipes
  # Both paths write the common learning_rate curve into their model_dir at the global step:
  # the rate of the step just taken, schedule(step - 1).
  for folder in (output_dir / "keras", output_dir / "estimator"):
    by_step = events_lib.scalars_by_step(str(folder))
    logged = {s: v["learning_rate"] for s, v in by_step.items() if "learning_rate" in v}
    assert logged, folder
    for step, rate in logged.items():
      step = step - 1
      expected = recipes.learning_rate_at(step, config.learning_rate, STEPS_PER_EPOCH, config.epochs,
                                          config.lr_schedule, config.warmup_epochs)
      assert rate == pytest.approx(expected, rel=1e-4, abs=1e-7), (folder, step)
    assert min(logged.values()) < config.learning_rate / 2  # warm-up and decay both show


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
    assert session.hparams["path"].string_value == path
    results = _results(output_dir / path)
    metrics = events_lib.scalars_by_step(str(folder))[results["global_step"]]
    assert metrics["val_loss"] == pytest.approx(results["final_evaluation"]["example_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("source_path, class_names", [
    ("keras", ("horizontal", "vertical")),  # the same classes: the head too
    ("estimator", ("a", "b", "c")),         # other classes: a fresh head
])
def test_warm_start_brings_base_weights_and_batchnorm_moving_statistics(
    compared_with_all_recipes, tmp_path, source_path, class_names):
  import tensorflow as tf
  from estimator_ft import model as model_lib
  from estimator_ft.jobs import compare
  config, output_dir, _ = compared_with_all_recipes
  layout = compare.weight_layout(config, 2)
  source = compare.final_weights(compare.path_config(config, str(output_dir), source_path), 2, layout)
  moving = [i for i, (name, _) in enumerate(layout) if "moving_mean" in name or "moving_var" in name]
  # The source's statistics moved away from their initial 0 / 1, so arriving is not a coincidence.
  assert max(float(np.abs(source[i] - round(float(source[i].mean()))).max()) for i in moving) > 1e-3
  target = config.replace(warm_start_from=str(output_dir / source_path), seed=99)
  prefix = model_lib.save_initial_weights(target, len(class_names), str(tmp_path / "w"), class_names)
  reader = tf.train.load_checkpoint(prefix)
  for index, (name, _) in enumerate(layout):
    value = reader.get_tensor(model_lib._INITIAL_WEIGHT_KEY.format(index))  # pylint: disable=protected-access
    if name.startswith("head_") and len(class_names) == 3:
      assert value.shape[-1] == 3  # a fresh head for other classes
    else:
      np.testing.assert_array_equal(value, source[index], err_msg=name)
