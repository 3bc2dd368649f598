"""The Estimator path's evaluation and exports inside the training process: graphs built once,
results identical to Estimator.evaluate and Estimator.export_saved_model."""

import collections
import dataclasses
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from estimator_ft import contract
from estimator_ft import estimator as estimator_path
from estimator_ft import export
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft.config import Config
from estimator_ft.data import loading
from estimator_ft.data import pipeline
from estimator_ft.run import events

SIZE = 32


@pytest.fixture(scope="module")
def trained(tiny_dataset, module_tmp_path):
  config = Config(train_dir=str(tiny_dataset / "train"), validation_dir=str(tiny_dataset / "validation"),
                  model_dir=str(module_tmp_path / "model"), image_size=SIZE, batch_size=6,
                  weights="none", augment=False, batchnorm_momentum=0.9).validate()
  splits = loading.load_splits(config)
  estimator = estimator_path.make_estimator(config, splits.class_names, steps_per_epoch=4)
  estimator.train(pipeline.make_input_fn(splits.train, config, "train"), max_steps=3)
  model_fn = model_fn_lib.build_model_fn(config, splits.class_names, 4)
  return config, splits, estimator, model_fn


def test_in_process_evaluation_equals_estimator_evaluate(trained):
  config, splits, estimator, model_fn = trained
  checkpoint = estimator.latest_checkpoint()
  reference = estimator.evaluate(pipeline.make_input_fn(splits.validation, config, "eval"),
                                 checkpoint_path=checkpoint, name="reference")
  evaluator = estimator_path.InProcessEvaluator(estimator, model_fn, config, splits.validation,
                                                exporters=[], max_steps=3)
  first, again = evaluator.evaluate(checkpoint), evaluator.evaluate(checkpoint)
  assert set(first) == set(reference)
  for name in reference:
    assert first[name] == pytest.approx(reference[name], rel=1e-6), name
    assert again[name] == first[name], name  # the metrics were reset between the two passes
  # The same records in model_dir/eval as Estimator.evaluate writes in eval_reference.
  written = events.scalars_by_step(os.path.join(config.model_dir, "eval"))[3]
  expected = events.scalars_by_step(os.path.join(config.model_dir, "eval_reference"))[3]
  assert written.keys() == expected.keys()
  np.testing.assert_allclose([written[k] for k in sorted(written)],
                             [expected[k] for k in sorted(expected)], rtol=1e-6)


def test_one_serving_graph_writes_the_estimators_export_again_and_again(trained, tmp_path):
  config, splits, estimator, model_fn = trained
  checkpoint = estimator.latest_checkpoint()
  writer = export.EstimatorSavedModelWriter(model_fn, config)
  try:
    versions = [export.export_estimator(estimator, config, splits.class_names,
                                        str(tmp_path / "mine"), checkpoint, writer=writer)
                for _ in range(2)]
  finally:
    writer.close()
  reference = export.export_estimator(estimator, config, splits.class_names,
                                      str(tmp_path / "estimator"), checkpoint)
  with open(splits.validation.paths[0], "rb") as f:
    image = f.read()
  outputs = []
  for path in versions + [reference]:
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {contract.SERVING_SIGNATURE, contract.IMAGES_SIGNATURE,
                                      contract.CLASSIFY_SIGNATURE}
    serve = loaded.signatures[contract.SERVING_SIGNATURE]
    outputs.append(serve(**{contract.IMAGE_BYTES_INPUT: tf.constant([image])})[
        contract.PROBABILITIES].numpy())
  np.testing.assert_array_equal(outputs[0], outputs[2])
  np.testing.assert_array_equal(outputs[1], outputs[2])


def _graph_of(saved_model_dir):
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  (meta_graph,) = saved_model.meta_graphs
  return meta_graph


def test_the_serving_graph_built_into_the_evaluation_graph_exports_only_serving(trained, tmp_path):
  config, splits, estimator, _ = trained
  checkpoint = estimator.latest_checkpoint()
  reference_metrics = estimator.evaluate(pipeline.make_input_fn(splits.validation, config, "eval"),
                                         checkpoint_path=checkpoint, name="reference_shared")
  model_fn = estimator_path.estimator_model_fn(config, splits.class_names, 4,
                                               build_model=model_lib.OneModelPerGraph())
  writer = export.EstimatorSavedModelWriter(model_fn, config)
  evaluator = estimator_path.InProcessEvaluator(estimator, model_fn, config, splits.validation,
                                                exporters=[], max_steps=3, serving_writer=writer)
  metrics = evaluator.evaluate(checkpoint)
  shared = export.export_estimator(estimator, config, splits.class_names, str(tmp_path / "shared"),
                                   checkpoint, writer=writer)
  evaluator.end(None, 3)
  assert writer.built
  for name in reference_metrics:
    assert metrics[name] == pytest.approx(reference_metrics[name], rel=1e-6), name
  own_writer = export.EstimatorSavedModelWriter(model_fn_lib.build_model_fn(
      config, splits.class_names, 4), config)
  try:
    own = export.export_estimator(estimator, config, splits.class_names, str(tmp_path / "own"),
                                  checkpoint, writer=own_writer)
  finally:
    own_writer.close()
  reference = export.export_estimator(estimator, config, splits.class_names,
                                      str(tmp_path / "estimator"), checkpoint)
  # Nothing of the evaluation in it: the same ops as a serving graph of its own, the same
  # collections and variables as the Estimator's export (whose graph also keeps the Keras
  # model's own dead copy on its Input placeholder).
  shared_graph, own_graph, reference_graph = (_graph_of(path) for path in (shared, own, reference))
  op_types = [collections.Counter(node.op for node in graph.graph_def.node)
              for graph in (shared_graph, own_graph)]
  assert op_types[0] == op_types[1]
  assert not {"IteratorGetNext", "IteratorV2", "MakeIterator"} & set(op_types[0])
  assert sorted(shared_graph.collection_def) == sorted(reference_graph.collection_def)
  variables = [sorted(name for name, _ in tf.train.list_variables(os.path.join(path, "variables",
                                                                             "variables")))
               for path in (shared, reference)]
  assert variables[0] == variables[1]
  with open(splits.validation.paths[0], "rb") as f:
    image = f.read()
  decoded = tf.image.decode_image(image, channels=3, expand_animations=False)[tf.newaxis]
  outputs = []
  for path in (shared, reference):
    signatures = tf.saved_model.load(path).signatures
    outputs.append([
        signatures[contract.SERVING_SIGNATURE](**{contract.IMAGE_BYTES_INPUT: tf.constant([image])})[
            contract.PROBABILITIES].numpy(),
        signatures[contract.IMAGES_SIGNATURE](**{contract.IMAGES_INPUT: tf.cast(decoded, tf.float32)})[
            contract.PROBABILITIES].numpy()])
  np.testing.assert_array_equal(outputs[0], outputs[1])


def _recording_threads(model_fn, threads: list):
  """model_fn, which appends the name of the thread that calls it to `threads`."""

  def recorded(features, labels, mode):
    threads.append(threading.current_thread().name)
    return model_fn(features, labels, mode)

  return recorded


def test_the_graph_built_in_the_background_evaluates_and_exports_as_one_built_in_the_foreground(
    trained, tmp_path):
  config, splits, estimator, _ = trained
  checkpoint = estimator.latest_checkpoint()
  with open(splits.validation.paths[0], "rb") as f:
    image = tf.constant([f.read()])
  results = {}
  for background in (False, True):
    threads = []
    model_fn = _recording_threads(estimator_path.estimator_model_fn(
        config, splits.class_names, 4, build_model=model_lib.OneModelPerGraph()), threads)
    writer = export.EstimatorSavedModelWriter(model_fn, config)
    evaluator = estimator_path.InProcessEvaluator(estimator, model_fn, config, splits.validation,
                                                  exporters=[], max_steps=3, serving_writer=writer)
    if background:
      evaluator.begin()  # what the training's saver hook calls before the session starts
      assert evaluator.wait_for_build() is None
      assert evaluator.built and writer.built  # before any evaluation asked for it
    metrics = evaluator.evaluate(checkpoint)
    path = export.export_estimator(estimator, config, splits.class_names,
                                   str(tmp_path / f"background_{background}"), checkpoint,
                                   writer=writer)
    evaluator.close()
    writer.close()
    serve = tf.saved_model.load(path).signatures[contract.SERVING_SIGNATURE]
    results[background] = (metrics, serve(**{contract.IMAGE_BYTES_INPUT: image})[
        contract.PROBABILITIES].numpy(), threads)
  # The model_fn ran for EVAL, then for the serving graph's PREDICT: on the build's own thread.
  assert results[True][2] == ["evaluation-graph-build"] * 2
  assert results[False][2] == [threading.main_thread().name] * 2
  assert results[True][0] == results[False][0]
  np.testing.assert_array_equal(results[True][1], results[False][1])


def test_a_failed_background_build_is_built_again_on_the_main_thread(trained, caplog):
  config, splits, estimator, model_fn = trained
  checkpoint = estimator.latest_checkpoint()

  def main_thread_only(features, labels, mode):
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("not on this thread")
    return model_fn(features, labels, mode)

  evaluator = estimator_path.InProcessEvaluator(estimator, main_thread_only, config,
                                                splits.validation, exporters=[], max_steps=3)
  evaluator.begin()
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    metrics = evaluator.evaluate(checkpoint)
  assert ("Building the evaluation graph in the background failed (RuntimeError: not on this "
          "thread); building it now instead.") in caplog.text
  reference = estimator_path.InProcessEvaluator(estimator, model_fn, config, splits.validation,
                                                exporters=[], max_steps=3).evaluate(checkpoint)
  assert metrics == reference
  evaluator.close()
  assert not evaluator.built


def _wait_until_built(evaluator, timeout_s=120):
  deadline = time.monotonic() + timeout_s
  while not evaluator.built and time.monotonic() < deadline:
    time.sleep(0.05)
  return evaluator.built


def _evaluator_recording_threads(trained, threads: list):
  config, splits, estimator, model_fn = trained
  return estimator_path.InProcessEvaluator(
      estimator, _recording_threads(model_fn, threads), config, splits.validation, exporters=[],
      max_steps=3)


def test_the_background_build_starts_once_the_training_graph_is_finalized(trained):
  threads = []
  evaluator = _evaluator_recording_threads(trained, threads)
  training_graph = tf.Graph()
  with training_graph.as_default():
    evaluator.begin()  # as the saver hook does, before the Scaffold builds the training saver
  time.sleep(1.5)  # a build that did not wait calls the model_fn within about 0.5 s
  assert threads == [] and not evaluator.built
  training_graph.finalize()  # the Scaffold's last step before the session is created
  assert _wait_until_built(evaluator)  # without anything asking for it
  assert threads == ["evaluation-graph-build"]
  assert evaluator.wait_for_build() is None
  evaluator.close()


def test_an_evaluator_closed_before_its_build_started_builds_nothing(trained):
  threads = []
  # A training that fails or is interrupted before its graph is finalized closes the evaluator.
  unused = _evaluator_recording_threads(trained, threads)
  with tf.Graph().as_default():
    unused.begin()
  unused.close()
  assert threads == [] and not unused.built
  assert "evaluation-graph-build" not in [thread.name for thread in threading.enumerate()]
  assert unused.wait_for_build() is None


class _Signalled(Exception):
  pass


def test_a_signal_in_the_wait_for_the_build_leaves_it_for_close_to_wait_for(trained):
  config, splits, estimator, model_fn = trained

  def signalling(features, labels, mode):
    # The main thread waits in wait_for_build's join by now: its handler raises there.
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.5)  # the build goes on after the main thread has left the join
    return model_fn(features, labels, mode)

  def raise_signalled(signum, frame):
    raise _Signalled()

  previous = signal.signal(signal.SIGUSR1, raise_signalled)
  try:
    evaluator = estimator_path.InProcessEvaluator(estimator, signalling, config,
                                                  splits.validation, exporters=[], max_steps=3)
    evaluator.begin()
    with pytest.raises(_Signalled):
      evaluator.wait_for_build()  # as the Interrupted of a Ctrl-C during the first evaluation
    evaluator.close()  # what the training's `finally` does
  finally:
    signal.signal(signal.SIGUSR1, previous)
  # close() waited for the build (and closed its session): no builder outlives the run.
  assert "evaluation-graph-build" not in [thread.name for thread in threading.enumerate()]
  assert not evaluator.built


def test_a_serving_graph_cannot_join_a_graph_with_a_model_it_would_not_share(trained):
  config, splits, estimator, model_fn = trained  # builds a new model at every call
  writer = export.EstimatorSavedModelWriter(model_fn, config)
  evaluator = estimator_path.InProcessEvaluator(estimator, model_fn, config, splits.validation,
                                                exporters=[], max_steps=3, serving_writer=writer)
  with pytest.raises(ValueError, match="build_model=model.OneModelPerGraph"):
    evaluator.evaluate(estimator.latest_checkpoint())
  assert not writer.built


def test_a_validation_pass_that_could_not_read_every_example_says_so(trained, tmp_path, caplog):
  config, splits, estimator, _ = trained
  validation = splits.validation
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not an image")  # a file damaged after the scan
  damaged = dataclasses.replace(validation, paths=(str(broken),) + validation.paths[1:])
  expected = validation.num_examples
  model_fn = estimator_path.estimator_model_fn(config, splits.class_names, 4,
                                               validation_examples=expected)
  evaluator = estimator_path.InProcessEvaluator(estimator, model_fn, config, damaged,
                                                exporters=[], max_steps=3)
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    evaluator.evaluate(estimator.latest_checkpoint())
  assert (f"The validation pass read {expected - 1} of {expected} examples: the other 1 could "
          "not be read") in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    evaluator_whole = estimator_path.InProcessEvaluator(estimator, model_fn, config, validation,
                                                        exporters=[], max_steps=3)
    evaluator_whole.evaluate(estimator.latest_checkpoint())
  assert "The validation pass read" not in caplog.text
