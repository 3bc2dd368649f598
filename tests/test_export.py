"""SavedModel export: signatures, the exporters in train_and_evaluate, atomic versions, Keras parity.

One tiny Estimator model is trained once (module fixture) and every end-to-end test reuses it.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting as fingerprinting_pywrap  # pylint: disable=g-direct-tensorflow-import

from estimator_ft import estimator as estimator_lib
from estimator_ft import export
from estimator_ft import keras_path
from estimator_ft import model as model_lib
from estimator_ft import serving
from estimator_ft.config import Config
from estimator_ft.data import pipeline as pipeline_lib
from estimator_ft.data import split as split_lib
from estimator_ft.jobs import export_checkpoint
from estimator_ft.jobs import train as train_job
from estimator_ft.run import model_dir as model_dir_lib
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
SIZE = 32
TOLERANCE = 1e-5
# Image sizes around SIZE, so the in-graph resize both shrinks and enlarges.
IMAGE_SIZES = (20, 45)

PREDICT_OUTPUTS = {
    "probabilities": ("DT_FLOAT", "(-1, 2)"),
    "class_index": ("DT_INT32", "(-1)"),
    "class_name": ("DT_STRING", "(-1)"),
    "all_class_names": ("DT_STRING", "(-1, 2)"),
}
EXPECTED_SIGNATURES = {
    "serving_default": {"method": "tensorflow/serving/predict",
                        "inputs": {"image_bytes": ("DT_STRING", "(-1)")},
                        "outputs": PREDICT_OUTPUTS},
    "predict_images": {"method": "tensorflow/serving/predict",
                       "inputs": {"images": ("DT_FLOAT", "(-1, -1, -1, 3)")},
                       "outputs": PREDICT_OUTPUTS},
    "classification": {"method": "tensorflow/serving/classify",
                       "inputs": {"inputs": ("DT_STRING", "(-1)")},
                       "outputs": {"classes": ("DT_STRING", "(-1, 2)"),
                                   "scores": ("DT_FLOAT", "(-1, 2)")}},
}
# What tf.saved_model.save adds to every TF2 SavedModel (it restores variables; not a signature
# anyone calls).
TF2_INIT_SIGNATURE = "__saved_model_init_op"

# Runs `estimator-ft predict` in a fresh interpreter and reports which estimator_ft modules it
# imported, to show the export needs no training code.
PREDICT_IN_FRESH_PROCESS = """
import atexit, sys
atexit.register(lambda: print("LOADED_MODULES", *sorted(
    m for m in sys.modules if m.startswith("estimator_ft")), file=sys.stderr))
from estimator_ft import cli
cli.run_main(["estimator-ft", "predict"] + sys.argv[1:])
"""
# The CLI and the config its flags use, the serving code, and standard-library-only modules (the
# CLI's signal handling and TF_CONFIG role, config's recipes): no training code.
PREDICT_MODULES = {"estimator_ft", "estimator_ft.cli", "estimator_ft.config", "estimator_ft.serving",
                   "estimator_ft.contract", "estimator_ft.tf_environment",
                   "estimator_ft.image_formats", "estimator_ft.messages",
                   "estimator_ft.interrupts", "estimator_ft.cluster", "estimator_ft.recipes",
                   # config's path checks (files.is_local): standard library only
                   "estimator_ft.files"}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tiny_dataset, module_tmp_path):
  """One epoch of the Estimator path (3 steps at 32 px) with its exporters; returns (config, results)."""
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"),
                  model_dir=str(module_tmp_path / "export_run"), image_size=SIZE,
                  batch_size=8, epochs=1, weights="none", augment=False).validate()
  results = train_job.run(config)
  return config, results


@pytest.fixture(scope="module")
def keras_export(trained, module_tmp_path):
  """The Keras-path export of the trained Estimator's weights, via a Keras-path model_dir."""
  config, results = trained
  class_names = tuple(results["class_names"])
  keras_dir = str(module_tmp_path / "keras_run")
  os.mkdir(keras_dir)
  keras_config = config.replace(path="keras", model_dir=keras_dir)
  model_dir_lib.write_run_config(keras_config, class_names)
  model = model_lib.build_model(keras_config, len(class_names))
  model.set_weights(estimator_checkpoint_weights(config, len(class_names)))
  # The Keras path's checkpoint layout (keras_path._EpochCheckpoints), numbered by global step.
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), keras_dir, max_to_keep=1,
                                       checkpoint_name=keras_path.CHECKPOINT_NAME)
  manager.save(checkpoint_number=results["global_step"])
  return export_checkpoint.export_from_checkpoint(keras_dir)


@pytest.fixture(scope="module")
def format_images(tmp_path_factory):
  """One file per accepted format at each of IMAGE_SIZES, sorted paths."""
  directory = tmp_path_factory.mktemp("formats")
  paths = []
  for size in IMAGE_SIZES:
    written = images.all_format_files(directory / str(size), size=size, seed=size)
    paths.extend(written.values())
  return sorted(paths)


@pytest.fixture(scope="module")
def estimator_outputs(trained, format_images):
  _, results = trained
  return call_all_signatures(results["export_path"], format_images)


def estimator_checkpoint_weights(config, num_classes):
  """The latest Estimator checkpoint's values in `model.weights` order (names from a graph build)."""
  with tf.Graph().as_default():
    names = [w.name.split(":")[0] for w in model_lib.build_model(config, num_classes).weights]
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(config.model_dir))
  return [reader.get_tensor(name) for name in names]


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def serialized_example(image_bytes):
  feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))
  example = tf.train.Example(features=tf.train.Features(feature={"image_bytes": feature}))
  return example.SerializeToString()


def call_all_signatures(saved_model_dir, paths):
  """{signature: {output: numpy}} over `paths`, one image per call for predict_images."""
  signatures = tf.saved_model.load(saved_model_dir).signatures
  encoded = [read_bytes(p) for p in paths]
  by_bytes = signatures["serving_default"](image_bytes=tf.constant(encoded))
  classified = signatures["classification"](
      inputs=tf.constant([serialized_example(e) for e in encoded]))
  per_image = [signatures["predict_images"](images=tf.cast(
      tf.io.decode_image(e, channels=3, expand_animations=False), tf.float32)[tf.newaxis])
               for e in encoded]
  by_tensor = {key: np.concatenate([out[key].numpy() for out in per_image]) for key in per_image[0]}
  return {"serving_default": {k: v.numpy() for k, v in by_bytes.items()},
          "predict_images": by_tensor,
          "classification": {k: v.numpy() for k, v in classified.items()}}


def parse_saved_model_cli(text):
  """{signature: {"method", "inputs": {key: (dtype, shape)}, "outputs": {...}}} of `show --all`."""
  signatures = {}
  for block in re.split(r"\n(?=signature_def\[')", text):
    name = re.match(r"signature_def\['([^']+)'\]", block)
    if not name:
      continue
    entry = {"method": re.search(r"Method name is: (\S*)", block).group(1), "inputs": {},
             "outputs": {}}
    for kind, key, dtype, shape in re.findall(
        r"(inputs|outputs)\['([^']+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([^)]*\)|unknown_rank)",
        block):
      entry[kind][key] = (dtype, shape)
    signatures[name.group(1)] = entry
  return signatures


def signature_table(saved_model_dir):
  """The same table as parse_saved_model_cli, read from saved_model.pb itself."""
  saved_model = saved_model_pb2.SavedModel()
  saved_model.ParseFromString(read_bytes(os.path.join(saved_model_dir, "saved_model.pb")))

  def describe(tensors):
    return {key: (types_pb2.DataType.Name(info.dtype),
                  "(" + ", ".join(str(dim.size) for dim in info.tensor_shape.dim) + ")")
            for key, info in tensors.items()}

  return {name: {"method": signature.method_name, "inputs": describe(signature.inputs),
                 "outputs": describe(signature.outputs)}
          for name, signature in saved_model.meta_graphs[0].signature_def.items()
          if name != TF2_INIT_SIGNATURE}


def assert_fingerprint_is_current(saved_model_dir):
  """fingerprint.pb hashes saved_model.pb: it must describe the file after the signature edit."""
  with open(os.path.join(saved_model_dir, "fingerprint.pb"), "rb") as f:
    assert f.read() == fingerprinting_pywrap.CreateFingerprintDef(saved_model_dir)


def export_base_entries(export_base):
  return sorted(os.listdir(export_base))


# ---------------------------------------------------------------- exporters in train_and_evaluate

@pytest.mark.slow
def test_training_publishes_complete_latest_and_best_versions(trained):
  config, results = trained
  for name in ("latest", "best"):
    base = os.path.join(config.model_dir, "export", name)
    versions = serving.version_dirs(base)
    assert len(versions) == 1, export_base_entries(base)
    # Only the published version: no staging folder, no Estimator temp-<ts> folder left behind.
    assert export_base_entries(base) == [str(versions[0][0])]
    version_dir = versions[0][1]
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isfile(os.path.join(version_dir, "variables", "variables.index"))
    assert_fingerprint_is_current(version_dir)
    info = export.read_export_info(version_dir)
    assert info["global_step"] == results["global_step"] == 3
    assert info["class_names"] == results["class_names"]
    assert info["metrics"]["example_loss"] == pytest.approx(
        results["final_evaluation"]["example_loss"], rel=1e-6)
  latest = serving.newest_version(os.path.join(config.model_dir, "export", "latest"))
  assert results["export_path"] == latest
  with open(os.path.join(config.model_dir, model_dir_lib.RESULTS_FILE)) as f:
    assert json.load(f)["export_path"] == latest


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures_of_both_paths(trained, keras_export):
  _, results = trained
  shown = subprocess.run([SAVED_MODEL_CLI, "show", "--all", "--dir", results["export_path"]],
                         capture_output=True, text=True, check=True, timeout=300)
  listed = parse_saved_model_cli(shown.stdout)
  assert listed == EXPECTED_SIGNATURES
  assert signature_table(results["export_path"]) == listed
  # Read from the proto rather than a second saved_model_cli process (which the line above shows
  # is the same table): the Keras export has the same signatures, inputs and outputs.
  assert signature_table(keras_export) == EXPECTED_SIGNATURES


# ---------------------------------------------------------------- what the export computes

@pytest.mark.slow
def test_fresh_process_predict_matches_in_memory_estimator_predict(trained, format_images, tmp_path):
  config, results = trained
  class_names = tuple(results["class_names"])
  bad = [images.write_not_an_image(tmp_path / "notes.jpg"), images.write_truncated(tmp_path / "cut.png")]
  env = dict(os.environ, PYTHONPATH=REPO)
  run = subprocess.run(
      [sys.executable, "-c", PREDICT_IN_FRESH_PROCESS, f"--saved_model={results['export_path']}",
       "--predict_batch_size=4", os.path.dirname(os.path.dirname(format_images[0])), str(tmp_path)],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  records = {r["path"]: r for r in map(json.loads, run.stdout.splitlines())}
  assert set(records) == set(format_images) | set(bad)
  assert all("error" in records[p] and "class" not in records[p] for p in bad)
  loaded = set(re.search(r"LOADED_MODULES(.*)", run.stderr).group(1).split())
  assert loaded <= PREDICT_MODULES, loaded - PREDICT_MODULES

  split = split_lib.Split(name="predict", class_names=class_names, num_examples=len(format_images),
                         paths=tuple(format_images), labels=(0,) * len(format_images))
  estimator = estimator_lib.make_estimator(config, class_names, steps_per_epoch=1)
  in_memory = list(estimator.predict(pipeline_lib.make_input_fn(split, config, "predict")))
  expected = np.stack([p["probabilities"] for p in in_memory])
  served = np.array([[records[p]["probabilities"][name] for name in class_names]
                     for p in format_images])
  np.testing.assert_allclose(served, expected, atol=TOLERANCE, rtol=0)
  assert [records[p]["class"] for p in format_images] == [p["class_name"].decode() for p in in_memory]
  # The trained model is not constant, or this comparison would prove little.
  assert np.ptp(expected[:, 0]) > 1e-3


@pytest.mark.slow
def test_bytes_tensor_and_classify_signatures_agree_for_every_format(trained, format_images,
                                                                     estimator_outputs):
  _, results = trained
  names = np.array([name.encode() for name in results["class_names"]], dtype=object)
  by_bytes, by_tensor = estimator_outputs["serving_default"], estimator_outputs["predict_images"]
  np.testing.assert_allclose(by_tensor["probabilities"], by_bytes["probabilities"],
                             atol=TOLERANCE, rtol=0)
  np.testing.assert_array_equal(by_tensor["class_name"], by_bytes["class_name"])
  classified = estimator_outputs["classification"]
  np.testing.assert_allclose(classified["scores"], by_bytes["probabilities"], atol=TOLERANCE, rtol=0)
  assert classified["classes"].tolist() == [names.tolist()] * len(format_images)
  np.testing.assert_array_equal(by_bytes["all_class_names"], classified["classes"])
  np.testing.assert_array_equal(by_bytes["class_name"], names[by_bytes["class_index"]])
  np.testing.assert_array_equal(by_bytes["class_index"],
                                (by_bytes["probabilities"][:, 1] > 0.5).astype(np.int32))


@pytest.mark.slow
def test_keras_and_estimator_exports_of_the_same_weights_agree(trained, keras_export, format_images,
                                                               estimator_outputs):
  _, results = trained
  assert os.path.basename(os.path.dirname(keras_export)) == "manual"  # export's default base
  info = export.read_export_info(keras_export)
  assert (info["path"], info["global_step"]) == ("keras", results["global_step"])
  assert_fingerprint_is_current(keras_export)
  from_keras = call_all_signatures(keras_export, format_images)
  for signature, outputs in estimator_outputs.items():
    for key, expected in outputs.items():
      if expected.dtype.kind == "f":
        np.testing.assert_allclose(from_keras[signature][key], expected, atol=TOLERANCE, rtol=0,
                                   err_msg=f"{signature}/{key}")
      else:
        np.testing.assert_array_equal(from_keras[signature][key], expected,
                                      err_msg=f"{signature}/{key}")


# ---------------------------------------------------------------- atomic versions

@pytest.mark.slow
def test_export_skips_and_cleans_a_killed_exports_staging_folder(trained, tmp_path):
  config, _ = trained
  base = tmp_path / "served"
  # What a kill -9 mid-export leaves: a staging folder with a partial SavedModel inside.
  finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
  dead_pid = int(finished.stdout)
  host = socket.gethostname()
  stale = base / f".tmp-{host}-{dead_pid}-abc123"
  (stale / "saved_model").mkdir(parents=True)
  (stale / "saved_model" / "saved_model.pb").write_bytes(b"partial")
  # Staging of a live export (this process), and of another machine: not ours to delete.
  live = base / f".tmp-{host}-{os.getpid()}-def456"
  other_host = base / f".tmp-another-host-{dead_pid}-ghi789"
  live.mkdir()
  other_host.mkdir()
  assert serving.version_dirs(str(base)) == []
  with pytest.raises(ValueError, match="not a SavedModel"):
    serving.resolve_saved_model(str(base))

  path = export_checkpoint.export_from_checkpoint(config.model_dir, str(base))

  assert not stale.exists()
  assert live.exists() and other_host.exists()
  assert serving.version_dirs(str(base)) == [(int(os.path.basename(path)), path)]
  assert serving.resolve_saved_model(str(base)) == path
  assert os.path.isfile(os.path.join(path, "saved_model.pb"))
  assert os.path.isfile(os.path.join(path, "variables", "variables.index"))
  assert export.read_export_info(path)["checkpoint"] == tf.train.latest_checkpoint(config.model_dir)


# ---------------------------------------------------------------- fast unit tests

def make_version(base, version, metrics=None):
  """A fake published version: saved_model.pb and, if given, recorded metrics."""
  path = os.path.join(base, str(version))
  os.makedirs(os.path.join(path, "assets.extra"))
  with open(os.path.join(path, "saved_model.pb"), "wb") as f:
    f.write(b"")
  if metrics is not None:
    with open(os.path.join(path, export.EXPORT_INFO_FILE), "w") as f:
      json.dump({"metrics": metrics}, f)
  return path


def test_best_export_compares_with_the_metrics_recorded_in_earlier_versions(tmp_path):
  base = str(tmp_path)
  assert export.improves_on_best(base, "example_loss", True, 0.9)  # nothing exported yet
  make_version(base, 100, {"example_loss": 0.5, "accuracy": 0.7})
  make_version(base, 101, {"example_loss": 0.4, "accuracy": 0.6})
  assert export.improves_on_best(base, "example_loss", True, 0.39)
  assert not export.improves_on_best(base, "example_loss", True, 0.4)
  assert not export.improves_on_best(base, "example_loss", True, 0.45)
  assert export.improves_on_best(base, "accuracy", False, 0.71)
  assert not export.improves_on_best(base, "accuracy", False, 0.7)
  assert not export.improves_on_best(base, "example_loss", True, float("nan"))
  assert not export.improves_on_best(base, "example_loss", True, None)


def test_best_exporter_follows_export_best_metric(tmp_path):
  base = str(tmp_path)
  make_version(base, 100, {"example_loss": 0.5, "accuracy": 0.7, "loss": 0.1})
  better_loss_worse_accuracy = {"example_loss": 0.3, "accuracy": 0.6, "loss": 0.9}
  for metric, wanted in (("loss", True), ("accuracy", False)):
    config = Config(export_best_metric=metric)
    latest, best = export.make_exporters(config, ("a", "b"))
    assert (latest.name, best.name) == ("latest", "best")
    # latest: the final checkpoint only, unless every evaluated one is asked for.
    assert latest.wanted(base, better_loss_worse_accuracy, is_the_final_export=True)
    assert not latest.wanted(base, better_loss_worse_accuracy, is_the_final_export=False)
    every_epoch, _ = export.make_exporters(config.replace(export_latest_every_epoch=True), ("a", "b"))
    assert every_epoch.wanted(base, better_loss_worse_accuracy, is_the_final_export=False)
    # "loss" means the per-example validation loss, not Estimator's mean of batch means.
    assert best.wanted(base, better_loss_worse_accuracy, is_the_final_export=False) is wanted


def test_auc_is_refused_as_best_metric_for_more_than_two_classes():
  with pytest.raises(ValueError, match="auc needs two classes"):
    export.make_exporters(Config(export_best_metric="auc"), ("a", "b", "c"))


def test_old_versions_are_removed_and_other_entries_kept(tmp_path):
  base = str(tmp_path)
  for version in (5, 30, 200, 1000):
    make_version(base, version)
  os.makedirs(os.path.join(base, ".tmp-host-1-x"))
  os.makedirs(os.path.join(base, "notes"))
  removed = export.remove_old_versions(base, keep=2)
  assert removed == [os.path.join(base, "5"), os.path.join(base, "30")]
  assert export_base_entries(base) == [".tmp-host-1-x", "1000", "200", "notes"]


def test_versions_keep_increasing_even_against_the_clock(tmp_path):
  base = str(tmp_path)
  assert export.next_version(base) >= 1_700_000_000  # the Unix time
  far_future = 99_999_999_999
  make_version(base, far_future)
  assert export.next_version(base) == far_future + 1


def test_latest_export_path_is_the_newest_latest_version_else_best(tmp_path):
  model_dir = str(tmp_path)
  assert export.latest_export_path(model_dir) is None
  best = make_version(os.path.join(model_dir, "export", "best"), 20)
  assert export.latest_export_path(model_dir) == best
  make_version(os.path.join(model_dir, "export", "latest"), 10)
  newest = make_version(os.path.join(model_dir, "export", "latest"), 11)
  assert export.latest_export_path(model_dir) == newest


def test_export_from_checkpoint_explains_what_is_missing(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    export_checkpoint.export_from_checkpoint(str(tmp_path))
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path))
  model_dir_lib.write_run_config(config, ("a", "b"))
  with pytest.raises(ValueError, match="no checkpoint yet"):
    export_checkpoint.export_from_checkpoint(str(tmp_path))
