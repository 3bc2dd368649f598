"""TFLite export (quantized or not), `predict` on a .tflite file, and TF Serving warm-up records.

One tiny Estimator run (3 steps at 32 px, --export_tflite --tflite_quantize=int8) is trained once
(module fixture); the float TFLite export of its checkpoint is made once too. The quality
targets of each quantization are measured on a properly trained model in the build notes: a
3-step model's probabilities all sit near one value, where int8's resolution decides top-1.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from estimator_ft import export
from estimator_ft import export_tflite
from estimator_ft import model as model_lib
from estimator_ft import serving
from estimator_ft import serving_tflite
from estimator_ft.config import Config
from estimator_ft.data import samples
from estimator_ft.jobs import export_checkpoint
from estimator_ft.jobs import train as train_job
from estimator_ft.run import model_dir as model_dir_lib
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
FLOAT_TOLERANCE = 1e-4
WARMUP_REQUESTS = 2

# `estimator-ft predict` in a fresh interpreter, reporting the estimator_ft modules it loaded.
PREDICT_IN_FRESH_PROCESS = """
import atexit, sys
atexit.register(lambda: print("LOADED_MODULES", *sorted(
    m for m in sys.modules if m.startswith("estimator_ft")), file=sys.stderr))
from estimator_ft import cli
cli.run_main(["estimator-ft", "predict"] + sys.argv[1:])
"""
# tests/test_layout.py's TFLITE_PREDICT_MODULES plus the CLI (and the config its flags use).
TFLITE_PREDICT_MODULES = {
    "estimator_ft", "estimator_ft.cli", "estimator_ft.config", "estimator_ft.serving_tflite",
    "estimator_ft.serving", "estimator_ft.contract", "estimator_ft.image_formats",
    "estimator_ft.messages", "estimator_ft.data", "estimator_ft.data.images",
    "estimator_ft.data.split", "estimator_ft.tf_environment", "estimator_ft.interrupts",
    "estimator_ft.cluster", "estimator_ft.recipes", "estimator_ft.files"}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tiny_dataset, module_tmp_path):
  """One epoch of the Estimator path with --export_tflite (int8); returns (config, results)."""
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"),
                  model_dir=str(module_tmp_path / "run"), image_size=SIZE, batch_size=8,
                  epochs=1, weights="none", augment=False, export_tflite=True,
                  tflite_quantize="int8", serving_warmup_requests=WARMUP_REQUESTS).validate()
  return config, train_job.run(config)


@pytest.fixture(scope="module")
def float_export(trained):
  """`estimator-ft export --format=tflite` (float32) of the run's checkpoint, measured."""
  config, _ = trained
  return export_checkpoint.export_from_checkpoint(config.model_dir, export_format="tflite",
                                                  latency_runs=3)


@pytest.fixture(scope="module")
def validation_files(tiny_dataset):
  return sorted(str(p) for p in (tiny_dataset / "validation").rglob("*") if p.is_file())


def best_version(config):
  return serving.newest_version(os.path.join(config.model_dir, "export", "best"))


def latest_version(config):
  return serving.newest_version(os.path.join(config.model_dir, "export", "latest"))


def read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def warmup_logs(saved_model_dir):
  path = os.path.join(saved_model_dir, "assets.extra", "tf_serving_warmup_requests")
  return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(path)]


def replay_like_tf_serving(saved_model_dir, logs):
  """Runs every warm-up record on the SavedModel the way TF Serving's warm-up does: each request's
  signature, fed its tensors (a Classify request: its tf.Examples, serialized). Returns outputs."""
  signatures = tf.saved_model.load(saved_model_dir).signatures
  outputs = []
  for log in logs:
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
      request = log.predict_log.request
      feeds = {name: tf.constant(tf.make_ndarray(tensor)) for name, tensor in request.inputs.items()}
      outputs.append((request.model_spec.signature_name,
                      signatures[request.model_spec.signature_name](**feeds)))
    else:
      assert kind == "classify_log", kind
      request = log.classify_log.request
      examples = [e.SerializeToString() for e in request.input.example_list.examples]
      outputs.append((request.model_spec.signature_name,
                      signatures[request.model_spec.signature_name](inputs=tf.constant(examples))))
  return outputs


# ---------------------------------------------------------------- TFLite beside the best SavedModel

@pytest.mark.slow
def test_training_writes_a_full_integer_tflite_beside_the_best_saved_model_only(trained):
  config, results = trained
  best, latest = best_version(config), latest_version(config)
  assert os.path.isfile(os.path.join(best, "model.tflite"))
  assert serving_tflite.read_labels(os.path.join(best, "labels.txt")) == tuple(results["class_names"])
  assert not os.path.exists(os.path.join(latest, "model.tflite"))
  recorded = export.read_export_info(best)["beside"]["tflite"]
  assert (recorded["quantize"], recorded["bytes"]) == (
      "int8", os.path.getsize(os.path.join(best, "model.tflite")))

  interpreter = tf.lite.Interpreter(model_path=os.path.join(best, "model.tflite"))
  interpreter.allocate_tensors()
  (model_input,), (model_output,) = interpreter.get_input_details(), interpreter.get_output_details()
  # Full integer inside, float at both ends: the input is the preprocessed float image.
  assert model_input["dtype"] == np.float32 and tuple(model_input["shape"]) == (1, SIZE, SIZE, 3)
  assert model_output["dtype"] == np.float32 and tuple(model_output["shape"]) == (1, 2)
  float_tensors = {d["index"] for d in interpreter.get_tensor_details() if d["dtype"] == np.float32}
  assert float_tensors == {model_input["index"], model_output["index"]}
  kernels = [d for d in interpreter.get_tensor_details() if len(d["shape"]) == 4 and
             "Conv2D" in d["name"] and d["name"].endswith("Conv2D")]
  assert kernels and all(d["dtype"] == np.int8 for d in kernels)


@pytest.mark.slow
def test_int8_is_under_a_third_of_the_float_file(trained, float_export):
  config, _ = trained
  int8_size = os.path.getsize(os.path.join(best_version(config), "model.tflite"))
  float_size = os.path.getsize(os.path.join(float_export, "model.tflite"))
  assert int8_size <= 0.3 * float_size, (int8_size, float_size)


# ---------------------------------------------------------------- estimator-ft export --format=tflite

@pytest.mark.slow
def test_float_tflite_export_is_its_own_complete_version_and_matches_the_saved_model(
    trained, float_export, validation_files):
  config, results = trained
  base = os.path.join(config.model_dir, "export", "tflite")
  assert sorted(os.listdir(base)) == [os.path.basename(float_export)]  # no staging left behind
  assert sorted(os.listdir(float_export)) == ["export_info.json", "labels.txt", "model.tflite"]
  info = export_tflite.read_info(float_export)
  assert (info["format"], info["quantize"], info["global_step"]) == ("tflite", "none",
                                                                     results["global_step"])
  measured = info["measurements"]
  assert measured["images"] == len(validation_files)
  assert measured["top1_agreement"] == 1.0
  assert measured["max_abs_probability_difference"] <= FLOAT_TOLERANCE
  assert measured["tflite_bytes"] == os.path.getsize(os.path.join(float_export, "model.tflite"))
  assert measured["tflite_latency_ms_median"] > 0 and measured["saved_model_latency_ms_median"] > 0
  report = export_tflite.format_measurements(info)
  assert "top-1 agreement with the SavedModel: 100.00 %" in report
  # `predict --model=` accepts the version folder and the base as well as the file itself.
  model_file = os.path.join(float_export, "model.tflite")
  assert serving.model_kind(float_export) == (serving.TFLITE, model_file)
  assert serving.model_kind(base) == (serving.TFLITE, model_file)
  assert serving.model_kind(best_version(config)) == (serving.SAVED_MODEL, best_version(config))


@pytest.mark.slow
def test_predict_on_tflite_prints_what_predict_on_the_saved_model_prints(
    trained, float_export, validation_files, tmp_path, capsys):
  config, _ = trained
  bad = [images.write_not_an_image(tmp_path / "notes.jpg"), images.write_truncated(tmp_path / "cut.png"),
         images.write_empty(tmp_path / "empty.gif"), str(tmp_path / "missing.png")]
  inputs = validation_files + bad
  model_file = os.path.join(float_export, "model.tflite")

  def run(make_predictor, model):
    code = serving.predict_cli(model, inputs, 3, make_predictor)
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]

  lite_code, lite = run(serving_tflite.TFLitePredictor, model_file)
  saved_code, saved = run(serving.Predictor, best_version(config))

  assert lite_code == saved_code == serving.EXIT_SOME_FILES_FAILED
  assert [r["path"] for r in lite] == [r["path"] for r in saved] == inputs
  for got, expected in zip(lite, saved):
    assert set(got) == set(expected), got["path"]
    if "error" in expected:
      assert got["error"] == expected["error"]
    else:
      assert got["class"] == expected["class"]
      assert list(got["probabilities"]) == list(expected["probabilities"])
      assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=FLOAT_TOLERANCE)

  # The same from the command line, in a fresh process: exit status 1, and only the modules a
  # TFLite predict may load (tests/test_layout.py says why data/images is among them).
  run_cli = subprocess.run(
      [sys.executable, "-c", PREDICT_IN_FRESH_PROCESS, f"--model={model_file}", *inputs],
      capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
  assert run_cli.returncode == 1, run_cli.stderr[-3000:]
  from_cli = [json.loads(line) for line in run_cli.stdout.splitlines()]
  assert [(r["path"], r.get("class"), r.get("error")) for r in from_cli] == [
      (r["path"], r.get("class"), r.get("error")) for r in lite]
  for got, expected in zip(from_cli, lite):
    if "probabilities" in expected:
      assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
  loaded = set(re.search(r"LOADED_MODULES(.*)", run_cli.stderr).group(1).split())
  assert loaded <= TFLITE_PREDICT_MODULES, loaded - TFLITE_PREDICT_MODULES


@pytest.mark.slow
def test_a_failure_after_the_files_are_staged_publishes_nothing(trained, float_export, tmp_path,
                                                                 monkeypatch):
  config, _ = trained
  converted = read_bytes(os.path.join(float_export, "model.tflite"))
  monkeypatch.setattr(export_tflite, "convert", lambda *args, **kwargs: converted)
  write_files = export_tflite.write_files

  def killed_after_writing(*args, **kwargs):
    write_files(*args, **kwargs)
    raise RuntimeError("killed after staging the files")

  monkeypatch.setattr(export_tflite, "write_files", killed_after_writing)
  base = tmp_path / "tflite"
  with pytest.raises(RuntimeError, match="killed after staging"):
    export_checkpoint.export_from_checkpoint(config.model_dir, str(base), export_format="tflite")
  assert os.listdir(base) == []  # neither a version nor the staging folder


# ---------------------------------------------------------------- TF Serving warm-up records

@pytest.mark.slow
def test_every_saved_model_of_the_run_carries_warmup_requests_that_tf_serving_can_replay(
    trained, tiny_dataset):
  config, results = trained
  train_files = {read_bytes(p) for p in (tiny_dataset / "train").rglob("*") if p.is_file()}
  for version in (latest_version(config), best_version(config)):
    logs = warmup_logs(version)
    kinds = [(log.WhichOneof("log_type"),
              getattr(log, log.WhichOneof("log_type")).request.model_spec.signature_name)
             for log in logs]
    assert kinds == [("predict_log", "serving_default")] * WARMUP_REQUESTS + [
        ("predict_log", "predict_images"), ("classify_log", "classification")]
    for log in logs[:WARMUP_REQUESTS]:
      tensor = log.predict_log.request.inputs["image_bytes"]
      assert tensor.dtype == tf.string.as_datatype_enum
      assert [d.size for d in tensor.tensor_shape.dim] == [1]
      assert tensor.string_val[0] in train_files  # a real training image, as it is on disk
    # Distinct images, spread over the split (the first one of each class here).
    assert len({log.predict_log.request.inputs["image_bytes"].string_val[0]
                for log in logs[:WARMUP_REQUESTS]}) == WARMUP_REQUESTS
    for signature, outputs in replay_like_tf_serving(version, logs):
      scores = outputs["scores" if signature == "classification" else "probabilities"].numpy()
      assert scores.shape == (1, len(results["class_names"])), signature
      np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_keras_export_warmup_requests_replay_and_zero_writes_none(tmp_path):
  # A tiny model through the Keras path's exporter: no ResNet50 needed for the file format.
  inputs = tf.keras.Input((SIZE, SIZE, 3))
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="softmax")(
      tf.keras.layers.GlobalAveragePooling2D()(inputs)))
  config = Config(image_size=SIZE, path="keras")
  encoded = (images.encoded_bytes("png", size=20, seed=1), images.encoded_bytes("jpeg", size=50))
  with_warmup = export.export_keras_model(model, config, ("a", "b", "c"), str(tmp_path / "on"),
                                          extras=export.ExportExtras(warmup_images=encoded))
  logs = warmup_logs(with_warmup)
  assert len(logs) == len(encoded) + 2
  replayed = replay_like_tf_serving(with_warmup, logs)
  assert [signature for signature, _ in replayed] == [
      "serving_default", "serving_default", "predict_images", "classification"]
  without = export.export_keras_model(model, config, ("a", "b", "c"), str(tmp_path / "off"))
  assert not os.path.exists(os.path.join(without, export.WARMUP_FILE))


# ---------------------------------------------------------------- bad input: one-line errors

def fake_run(model_dir, **config_values):
  """A model_dir with config.json and a (fake) checkpoint: enough to get past those checks."""
  os.makedirs(model_dir, exist_ok=True)
  config = Config(model_dir=str(model_dir), image_size=SIZE, weights="none", **config_values)
  model_dir_lib.write_run_config(config, ("a", "b"))
  with open(os.path.join(model_dir, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "model.ckpt-1"\n')
  for suffix in (".index", ".data-00000-of-00001"):
    open(os.path.join(model_dir, "model.ckpt-1" + suffix), "wb").close()
  return str(model_dir)


def test_int8_without_training_images_says_what_to_do_and_writes_nothing(tmp_path):
  model_dir = fake_run(tmp_path / "run", train_dir=str(tmp_path / "moved" / "train"),
                       validation_dir=str(tmp_path / "moved" / "validation"))
  with pytest.raises(ValueError, match=r"need the run's images.*--train_dir and --validation_dir "
                                       r"where the data is now, or --quantize=dynamic") as error:
    export_checkpoint.export_from_checkpoint(model_dir, export_format="tflite", quantize="int8")
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="--representative_images to at least 1"):
    export_checkpoint.export_from_checkpoint(model_dir, export_format="tflite", quantize="int8",
                                             representative_images=0)
  with pytest.raises(ValueError, match="--serving_warmup_requests=0 to export without them"):
    export_checkpoint.export_from_checkpoint(model_dir)
  with pytest.raises(ValueError, match="applies to --format=tflite only"):
    export_checkpoint.export_from_checkpoint(model_dir, quantize="dynamic")
  with pytest.raises(ValueError, match="--quantize='int4' is not valid"):
    export_checkpoint.export_from_checkpoint(model_dir, export_format="tflite", quantize="int4")
  export_root = os.path.join(model_dir, "export")
  assert all(not os.listdir(os.path.join(export_root, d)) for d in os.listdir(export_root))
  with pytest.raises(ValueError, match="yielded no decodable image"):
    samples.encoded_images(
        samples.Split(name="train", class_names=("a",), num_examples=1,
                      paths=(str(tmp_path / "gone.png"),), labels=(0,)), 1)


def test_no_checkpoint_and_unwritable_destination_are_refused_before_any_model(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  model_dir_lib.write_run_config(Config(train_dir="t", validation_dir="v", model_dir=str(model_dir)),
                                 ("a", "b"))
  with pytest.raises(ValueError, match="holds no checkpoint yet"):
    export_checkpoint.export_from_checkpoint(str(model_dir), export_format="tflite")
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(ValueError, match=r"--export_dir=.*a_file/out is not writable"):
    export_checkpoint.export_from_checkpoint(str(model_dir), str(blocker / "out"),
                                             export_format="tflite", quantize="int8")


def test_a_bad_tflite_file_or_missing_labels_are_one_line_errors(tmp_path):
  not_a_model = tmp_path / "model.tflite"
  not_a_model.write_bytes(b"this is not a flatbuffer")
  with pytest.raises(ValueError, match="has no labels.txt beside it"):
    serving_tflite.TFLitePredictor(str(not_a_model))
  (tmp_path / "labels.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="is not a usable TFLite model") as error:
    serving_tflite.TFLitePredictor(str(not_a_model))
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="no such file"):
    serving_tflite.TFLitePredictor(str(tmp_path / "elsewhere.tflite"))


def test_the_cli_reports_a_bad_export_in_one_line_with_exit_status_2(tmp_path):
  model_dir = fake_run(tmp_path / "run", train_dir=str(tmp_path / "gone"),
                       validation_dir=str(tmp_path / "gone_too"))
  run = subprocess.run(
      [sys.executable, "-m", "estimator_ft", "export", f"--model_dir={model_dir}", "--format=tflite",
       "--quantize=int8"], capture_output=True, text=True, cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
  assert run.returncode == 2
  errors = [line for line in run.stderr.splitlines() if line.startswith("estimator-ft: error:")]
  assert len(errors) == 1 and "--quantize=dynamic" in errors[0], run.stderr[-2000:]


@pytest.mark.slow
def test_keras_path_export_writes_the_tflite_of_the_in_memory_weights_beside(tiny_dataset, tmp_path):
  # What keras_path.train passes with --export_tflite: the fitted model's weights, no checkpoint.
  config = Config(image_size=SIZE, path="keras", weights="none", export_tflite=True,
                  tflite_quantize="dynamic")
  class_names = ("horizontal", "vertical")
  model = model_lib.build_model(config, len(class_names))
  writer = export_tflite.beside_writer(config, class_names, lambda _: model.get_weights())
  version = export.export_keras_model(model, config, class_names, str(tmp_path / "keras"),
                                      extras=export.ExportExtras(write_beside=writer))
  assert export.read_export_info(version)["beside"]["tflite"]["quantize"] == "dynamic"
  files = sorted(str(p) for p in (tiny_dataset / "validation").rglob("*.png"))[:4]
  lite = serving_tflite.TFLitePredictor(os.path.join(version, "model.tflite"))
  saved = serving.Predictor(version)
  encoded = [read_bytes(p) for p in files]
  np.testing.assert_allclose(lite.predict_bytes(encoded)["probabilities"],
                             saved.predict_bytes(encoded)["probabilities"], atol=0.05)
