"""The model_fn, once per ModeKeys, and the BatchNorm update ops it puts in the train op."""

import contextlib
import json

import numpy as np
import pytest
import tensorflow as tf

from estimator_ft import contract
from estimator_ft import estimator as estimator_path
from estimator_ft import keras_path
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft.config import Config
from estimator_ft.data import synthetic as synthetic_lib

ModeKeys = tf.estimator.ModeKeys
SIZE = 32
BATCH = 4


def make_config(**changes):
  base = Config(train_dir="unused", validation_dir="unused", model_dir="unused", image_size=SIZE,
                batch_size=BATCH, weights="none", dropout=0.0, augment=False)
  return base.replace(**changes).validate()


def call_model_fn(mode, class_names=("cat", "dog"), **config_changes):
  config = make_config(**config_changes)
  graph = tf.Graph()
  with graph.as_default():
    features = {contract.FEATURE_KEY: tf.random.uniform([BATCH, SIZE, SIZE, 3], -100, 100)}
    labels = tf.constant([0, 1, 1, 0][:BATCH], tf.int32) if mode != ModeKeys.PREDICT else None
    spec = model_fn_lib.build_model_fn(config, class_names, steps_per_epoch=5)(features, labels, mode)
  return graph, spec


def _ancestors(op):
  seen, stack = set(), [op]
  while stack:
    current = stack.pop()
    if current in seen:
      continue
    seen.add(current)
    stack.extend(t.op for t in current.inputs)
    stack.extend(current.control_inputs)
  return seen


@pytest.mark.parametrize("update_ops, expected", [("apply", 106), ("skip", 0)])
def test_train_spec_groups_exactly_the_fed_bn_updates(update_ops, expected):
  graph, spec = call_model_fn(ModeKeys.TRAIN, update_ops=update_ops)
  assert spec.loss.shape == ()
  train_op = spec.train_op if isinstance(spec.train_op, tf.Operation) else spec.train_op.op
  upstream = _ancestors(train_op)
  in_train_op = [op for op in graph.get_operations()
                 if op in upstream and op.type == "AssignSubVariableOp" and "AssignMovingAvg" in op.name]
  # 53 BN layers in ResNet50, one assignment each for mean and variance.
  assert len(in_train_op) == expected
  # The well-known recipe would find nothing here: Keras layers do not use the collection.
  assert graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS) == []


def test_batchnorm_updates_takes_the_fed_call_not_the_models_own_input():
  config = make_config()
  graph = tf.Graph()
  with graph.as_default():
    images = tf.zeros([BATCH, SIZE, SIZE, 3])
    model = model_lib.build_model(config, 2)
    model(images, training=True)
    updates = model_fn_lib.batchnorm_updates(model, images)
    assert len(updates) == 106
    placeholder = model.inputs[0].op
    assert not any(placeholder in _ancestors(u if isinstance(u, tf.Operation) else u.op)
                   for u in updates)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      session.run(updates)  # runs: depends only on the fed tensor


def test_graph_construction_builds_no_learning_phase_conds_and_restores_the_phase():
  # Keras calls each layer once on the functional model's own Input while building it; in a TF1
  # graph that call read the learning-phase placeholder: a tf.cond and a BN update per layer
  # (212 updates, 5,269 ops at 64 px) that no step runs. build_model fixes the phase while it
  # builds, so only the fed call's 106 updates exist.
  config = make_config()
  graph = tf.Graph()
  with graph.as_default():
    model = model_lib.build_model(config, 2)
    conds = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert conds == []
    assert model.updates == []
    model(tf.zeros([BATCH, SIZE, SIZE, 3]), training=True)
    assert len(model.updates) == 106
    # The phase was restored: outside build_model it is the placeholder again.
    assert isinstance(tf.compat.v1.keras.backend.learning_phase(), tf.Tensor)


def test_frozen_base_runs_batchnorm_in_inference_mode():
  config = make_config(fine_tune_from="none")
  graph = tf.Graph()
  with graph.as_default():
    images = tf.zeros([BATCH, SIZE, SIZE, 3])
    model = model_lib.build_model(config, 2)
    model(images, training=True)
    assert model_fn_lib.batchnorm_updates(model, images) == []
    assert [w.name for w in model.trainable_weights] == ["head_logits/kernel:0", "head_logits/bias:0"]


def test_eval_spec_metrics_binary_and_multiclass():
  _, spec = call_model_fn(ModeKeys.EVAL)
  assert spec.loss.shape == ()
  assert set(spec.eval_metric_ops) == {"accuracy", "example_loss", "auc", "precision", "recall"}
  _, spec = call_model_fn(ModeKeys.EVAL, class_names=("a", "b", "c", "d"))
  assert set(spec.eval_metric_ops) == {"accuracy", "example_loss", "top_3_accuracy"}


@pytest.mark.parametrize("class_names", [("cat", "dog"), ("a", "b", "c")])
def test_predict_spec_shapes_and_export_outputs(class_names):
  graph, spec = call_model_fn(ModeKeys.PREDICT, class_names=class_names)
  predictions = spec.predictions
  assert predictions["probabilities"].shape.as_list() == [BATCH, len(class_names)]
  assert predictions["class_index"].shape.as_list() == [BATCH]
  assert predictions["class_name"].dtype == tf.string
  assert set(spec.export_outputs) == {"serving_default", "classification"}
  with tf.compat.v1.Session(graph=graph) as session:
    session.run(tf.compat.v1.global_variables_initializer())
    values = session.run(predictions)
  np.testing.assert_allclose(values["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
  names = [n.decode() for n in values["class_name"]]
  assert names == [class_names[i] for i in values["class_index"]]


def _model_fn_loss(mode, config, images, labels, initial_weights):
  """The loss of the spec the model_fn returns for `mode`, evaluated before any training step."""
  graph = tf.Graph()
  with graph.as_default():
    features = {contract.FEATURE_KEY: tf.constant(images)}
    spec = model_fn_lib.build_model_fn(config, ("cat", "dog"), steps_per_epoch=5,
                                       initial_weights=initial_weights)(
                                           features, tf.constant(labels), mode)
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      return float(session.run(spec.loss))


def test_training_flag_follows_the_mode(tmp_path):
  """The model_fn's own specs, from the same weights on the same batch: the TRAIN loss is the
  loss of the model called with training=True (batch statistics), the EVAL loss that of
  training=False (moving statistics). A model_fn that ignored the mode fails one of the two."""
  config = make_config()
  images = np.random.RandomState(0).uniform(-100, 100, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.array([0, 1, 1, 0], np.int32)
  prefix = model_lib.save_initial_weights(config, 2, str(tmp_path / "initial" / "weights"))
  model = model_lib.build_model(config, 2)
  model_lib.load_initial_weights(model, prefix)

  def reference_loss(training):
    probabilities = model(images, training=training)
    return float(tf.reduce_mean(model_fn_lib.per_example_loss(labels, probabilities, 2)))

  # Inference first: a training=True call would move the moving statistics.
  inference, batch_statistics = reference_loss(False), reference_loss(True)
  # Fresh BN moving stats (mean 0, var 1) differ from the batch statistics of these inputs.
  assert abs(inference - batch_statistics) > 1e-3
  train = _model_fn_loss(ModeKeys.TRAIN, config, images, labels, prefix)
  evaluation = _model_fn_loss(ModeKeys.EVAL, config, images, labels, prefix)
  assert train == pytest.approx(batch_statistics, rel=1e-5)
  assert evaluation == pytest.approx(inference, rel=1e-5)


def test_the_initial_weights_are_read_by_one_restore_op_into_every_variable(tmp_path):
  config = make_config()
  prefix = model_lib.save_initial_weights(config, 2, str(tmp_path / "initial" / "weights"))
  reader = tf.train.load_checkpoint(prefix)
  models = []

  def recorded_build(*args, **kwargs):
    models.append(model_lib.build_model(*args, **kwargs))
    return models[-1]

  graph = tf.Graph()
  with graph.as_default():
    features = {contract.FEATURE_KEY: tf.zeros([BATCH, SIZE, SIZE, 3])}
    model_fn_lib.build_model_fn(config, ("cat", "dog"), steps_per_epoch=5, initial_weights=prefix,
                                build_model=recorded_build)(
                                    features, tf.constant([0, 1, 1, 0]), ModeKeys.TRAIN)
    # One op for all 320 tensors, where init_from_checkpoint builds one per variable.
    assert [op.type for op in graph.get_operations()].count("RestoreV2") == 1
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      values = session.run(models[0].weights)
  assert len(values) == 320
  for index, value in enumerate(values):  # each variable its own tensor, in order
    np.testing.assert_array_equal(value, reader.get_tensor(f"initial_weights/w{index:04d}"))


def test_initial_weights_written_for_another_model_are_refused_with_what_to_do(tmp_path):
  config = make_config()
  three_classes = model_lib.save_initial_weights(config, 3, str(tmp_path / "three" / "weights"))
  with tf.Graph().as_default():
    model = model_lib.build_model(config, 2)
    with pytest.raises(model_lib.WeightsError,
                       match=r"holds initial_weights/w\d{4} with shape \[2048, 3\] where the "
                             r"model's head_\S+ is \(2048, 1\).*Delete it, or use a new "
                             r"--model_dir"):
      model_lib.init_from_initial_weights(model, three_classes)
  with pytest.raises(model_lib.WeightsError, match=r"with shape \[2048, 3\] where"):
    model_lib.load_initial_weights(model_lib.build_model(config, 2), three_classes)
  fewer = model_lib.write_initial_weights([np.zeros(3, np.float32)], "test",
                                          str(tmp_path / "fewer" / "weights"))
  with pytest.raises(model_lib.WeightsError, match="holds 1 tensors but the model has 320"):
    model_lib.load_initial_weights(model_lib.build_model(config, 2), fewer)


TRAIN_STEPS = 3


def _train_steps(tmp_path, update_ops):
  config = make_config(update_ops=update_ops, model_dir=str(tmp_path / update_ops))
  prefix = model_lib.save_initial_weights(config, 2, str(tmp_path / "init" / update_ops))
  estimator = tf.estimator.Estimator(
      model_fn_lib.build_model_fn(config, ("a", "b"), steps_per_epoch=TRAIN_STEPS, initial_weights=prefix),
      model_dir=config.model_dir, config=tf.estimator.RunConfig(tf_random_seed=0))
  input_fn = synthetic_lib.make_synthetic_input_fn(config, 2, "train", num_examples=16)
  estimator.train(input_fn, steps=TRAIN_STEPS)
  return config, estimator, prefix


def _moving_stat_changes(estimator, prefix, config):
  trained = tf.train.load_checkpoint(estimator.latest_checkpoint())
  initial = tf.train.load_checkpoint(prefix)
  graph = tf.Graph()
  with graph.as_default():
    names = [w.name.split(":")[0] for w in model_lib.build_model(config, 2).weights]
  moving, kernels = [], []
  for i, name in enumerate(names):
    delta = np.abs(trained.get_tensor(name) - initial.get_tensor(f"initial_weights/w{i:04d}")).max()
    if "moving_" in name:
      moving.append(delta)
    elif name.endswith("kernel"):
      kernels.append(delta)
  return np.array(moving), np.array(kernels)


@pytest.fixture(scope="module")
def trained_with_updates(module_tmp_path):
  """TRAIN_STEPS training steps with the BN updates applied: for the BN test and the evaluation test."""
  return _train_steps(module_tmp_path, "apply")


def test_bn_moving_statistics_change_with_apply_and_not_with_skip(trained_with_updates, tmp_path):
  config, estimator, prefix = trained_with_updates
  moving, kernels = _moving_stat_changes(estimator, prefix, config)
  assert len(moving) == 106
  assert (moving > 0).mean() > 0.9, f"most BN moving statistics must move after {TRAIN_STEPS} training steps"
  assert kernels.max() > 0
  assert estimator.get_variable_value("global_step") == TRAIN_STEPS

  config, estimator, prefix = _train_steps(tmp_path, "skip")
  moving, kernels = _moving_stat_changes(estimator, prefix, config)
  assert moving.max() == 0.0, "update_ops=skip must leave moving statistics at their initial values"
  assert kernels.max() > 0, "the weights still train under skip: that is what made the bug subtle"


def test_evaluation_is_deterministic(trained_with_updates):
  config, estimator, _ = trained_with_updates
  input_fn = synthetic_lib.make_synthetic_input_fn(config, 2, "eval", num_examples=12)
  first = estimator.evaluate(input_fn)
  second = estimator.evaluate(input_fn)
  assert first == second
  assert 0.0 <= first["accuracy"] <= 1.0 and np.isfinite(first["example_loss"])


def test_training_summary_hook_fetches_the_same_at_every_step(tmp_path):
  """One set of fetches and feeds for every training step (a Session builds an executor per set:
  ~1 s at 64 px), the input images only on the summary steps, and the summary events where
  SummarySaverHook would write them."""
  graph, spec = call_model_fn(ModeKeys.TRAIN)
  hook = estimator_path.TrainingSummaryHook(str(tmp_path), every_n_steps=2)
  requests, images_per_step = [], []
  with graph.as_default():
    hook.begin()
    with tf.compat.v1.Session() as session:
      session.run(tf.compat.v1.global_variables_initializer())
      for _ in range(3):
        context = tf.estimator.SessionRunContext(tf.estimator.SessionRunArgs(spec.train_op), session)
        args = hook.before_run(context)
        requests.append((sorted(args.fetches), sorted(t.name for t in args.feed_dict)))
        _, results = session.run([spec.train_op, args.fetches], feed_dict=args.feed_dict)
        hook.after_run(context, tf.estimator.SessionRunValues(results, None, None))
        summary = tf.compat.v1.Summary.FromString(results["summary"])
        images_per_step.append(sum(v.tag.startswith("input_images") for v in summary.value))
      hook.end(session)
  assert requests == [requests[0]] * 3
  assert images_per_step == [3, 0, 3]
  written = {}
  for path in tf.io.gfile.glob(str(tmp_path / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      if event.HasField("summary"):
        written.setdefault(event.step, set()).update(v.tag for v in event.summary.value)
      elif event.HasField("session_log"):
        written.setdefault(event.step, set()).add("session_log")
  assert sorted(written) == [1, 3]
  assert "session_log" in written[1] and "session_log" not in written[3]
  assert all(any(tag.startswith("input_images") for tag in tags) for tags in written.values())


def test_restored_variables_scope_starts_global_variables_at_zero_and_keeps_local_initializers():
  config = make_config()
  op_counts, weights, local_values = [], None, None
  for restored in (False, True):
    graph = tf.Graph()
    with graph.as_default():
      with model_lib.restored_variables_scope() if restored else contextlib.nullcontext():
        model = model_lib.build_model(config, 2)
        accumulator = tf.compat.v1.get_variable(
            "accumulator", initializer=tf.ones([3]),
            collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES])
      op_counts.append(len(graph.get_operations()))
      with tf.compat.v1.Session() as session:
        session.run([tf.compat.v1.global_variables_initializer(),
                     tf.compat.v1.local_variables_initializer()])
        weights, local_values = session.run(model.weights), session.run(accumulator)
  assert len(weights) == 320 and not any(w.any() for w in weights)
  assert local_values.tolist() == [1.0, 1.0, 1.0]
  assert op_counts[1] < 0.8 * op_counts[0], op_counts  # the initializers' ops are gone


@pytest.mark.parametrize("tf_config", [None, {
    "cluster": {"chief": ["localhost:2222"], "worker": ["localhost:2223"], "ps": ["localhost:2224"]},
    "task": {"type": "chief", "index": 0}}])
def test_training_sessions_skip_the_readiness_checks_only_outside_a_cluster(
    tf_config, monkeypatch, tmp_path):
  if tf_config:
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
  else:
    monkeypatch.delenv("TF_CONFIG", raising=False)
  estimator = estimator_path.make_estimator(make_config(model_dir=str(tmp_path)), ("cat", "dog"), 5)
  graph = tf.Graph()
  with graph.as_default():
    features = {contract.FEATURE_KEY: tf.zeros([BATCH, SIZE, SIZE, 3])}
    spec = estimator.model_fn(features, tf.constant([0, 1, 1, 0], tf.int32), ModeKeys.TRAIN,
                              estimator.config)
  scaffold = spec.scaffold
  if tf_config:
    # A worker's session waits on these until the chief has initialized the shared variables:
    # left unset, Scaffold.finalize gives them report_uninitialized_variables.
    assert scaffold.ready_op is None and scaffold.ready_for_local_init_op is None
    return
  # In one process nothing is left to wait for: both checks report nothing, without building
  # an executor over every variable.
  assert scaffold.ready_op is not None and scaffold.ready_op is scaffold.ready_for_local_init_op
  assert scaffold.ready_op.op.type == "Const" and scaffold.ready_op.shape == (0,)
  with tf.compat.v1.Session(graph=graph) as session:
    assert session.run(scaffold.ready_op).size == 0


@pytest.mark.parametrize("precision, compute_dtype", [("mixed_bfloat16", tf.bfloat16),
                                                      ("mixed_float16", tf.float16)])
def test_mixed_precision_computes_in_its_dtype_with_float32_weights_and_loss(precision,
                                                                          compute_dtype):
  graph, spec = call_model_fn(ModeKeys.TRAIN, precision=precision)
  # ResNet50's 53, twice: the Functional model's own graph (on its Input placeholder) and the call.
  convolutions = [op for op in graph.get_operations() if op.type == "Conv2D"]
  assert len(convolutions) == 2 * 53
  assert {op.get_attr("T") for op in convolutions} == {compute_dtype}
  with graph.as_default():
    assert {v.dtype.base_dtype for v in tf.compat.v1.trainable_variables()} == {tf.float32}
    loss_scales = [v for v in tf.compat.v1.global_variables() if "loss_scale" in v.name]
  assert spec.loss.dtype == tf.float32
  assert bool(loss_scales) == (precision == "mixed_float16")  # float16 scales its loss


MIXED_FLOAT16_STEPS = 2
INITIAL_LOSS_SCALE = 2.0**15  # Keras' dynamic loss scale starts there


def test_mixed_float16_trains_through_its_loss_scale_and_checkpoints_it(tmp_path):
  # Trained on float16 only: on a CPU its kernels are TensorFlow's own on every x86 kind, where
  # bfloat16's take minutes a step without AVX512_BF16 (oneDNN held to AVX2: over 10 min).
  config = make_config(precision="mixed_float16", model_dir=str(tmp_path))
  prefix = model_lib.save_initial_weights(config, 2, str(tmp_path / "init"))
  estimator = tf.estimator.Estimator(
      model_fn_lib.build_model_fn(config, ("a", "b"), steps_per_epoch=MIXED_FLOAT16_STEPS,
                                  initial_weights=prefix),
      model_dir=config.model_dir, config=tf.estimator.RunConfig(tf_random_seed=0))
  estimator.train(synthetic_lib.make_synthetic_input_fn(config, 2, "train", num_examples=8),
                  steps=MIXED_FLOAT16_STEPS)
  trained = tf.train.load_checkpoint(estimator.latest_checkpoint())
  assert trained.get_tensor("global_step") == MIXED_FLOAT16_STEPS
  head = trained.get_tensor("head_logits/kernel")
  initial = tf.train.load_checkpoint(prefix)
  (initial_head,) = [initial.get_tensor(name) for name, shape
                     in initial.get_variable_to_shape_map().items() if shape == list(head.shape)]
  assert head.dtype == np.float32 and np.isfinite(head).all()
  # A step whose scaled gradients overflow float16 is skipped and halves the scale, as
  # random-init ResNet50's do at this size (their unscaled gradients are finite: checked). The
  # scale is checkpointed, so a resumed run goes on with the scale it had reached.
  scale = trained.get_tensor("current_loss_scale")
  moved = np.abs(head - initial_head).max() > 0
  assert (moved and scale > INITIAL_LOSS_SCALE / 2**MIXED_FLOAT16_STEPS) or (
      not moved and scale == INITIAL_LOSS_SCALE / 2**MIXED_FLOAT16_STEPS), scale


@pytest.mark.parametrize("jit", [False, True])
def test_jit_reaches_both_paths(jit):
  config = make_config(jit=jit)
  options = estimator_path.make_run_config(config, 1).session_config.graph_options.optimizer_options
  assert options.global_jit_level == (tf.compat.v1.OptimizerOptions.ON_1 if jit
                                      else tf.compat.v1.OptimizerOptions.DEFAULT)
  assert keras_path.build_compiled_model(config, 2).jit_compile is jit
