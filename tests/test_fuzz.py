"""Decoding fuzz: random and mutated bytes through the folder scan, the training decode and the
serving signature. Every input is decoded or rejected with a clear error; nothing crashes.

The fuzzing runs in a child process (this file run as a script), because a crash in a native
decoder - a segfault, an abort on a huge allocation - would take pytest down with it rather than
fail a test. The child runs hypothesis, derandomized (the same inputs every run, so CI time is
bounded and a failure reproduces), and reports counts as JSON; a falsified property exits 1 with
hypothesis' minimal example, a crash with a signal.

Inputs: pure random bytes; random bytes behind a real format's magic number; real JPEG, PNG, GIF
and BMP files mutated by bit flips, truncation, insertions, deletions and header words set to
boundary values (0, 2^31 - 1, 2^32 - 1...: image sizes that would ask for huge allocations); the
same files with one byte flipped past the header; and the files intact.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
# Examples per target: about 10 s each on a loaded 2-core machine.
SCAN_EXAMPLES = 300
PIPELINE_EXAMPLES = 40  # each one a folder of up to MAX_FILES_PER_EXAMPLE files through tf.data
MAX_FILES_PER_EXAMPLE = 6
SERVING_EXAMPLES = 120
HARNESS_TIMEOUT_S = 600

SEED_KINDS = ("jpeg", "jpeg_progressive", "png", "png_rgba", "png_16bit", "gif", "gif_animated", "bmp")
MAGIC_NUMBERS = (b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\x89PNG\r\n\x1a\n",
                 b"GIF87a", b"GIF89a", b"BM")
BOUNDARY_WORDS = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                  b"\x80\x00\x00\x00", b"\x00\x00\xff\xff", b"\xff\xff\x00\x00")
# Where the image size and format fields live in every supported format.
HEADER_BYTES = 64
MAX_RANDOM_BYTES = 512


# ---------------------------------------------------------------- inputs

def _strategies():
  """(hypothesis, hypothesis.strategies), imported only where the fuzzing runs."""
  import hypothesis  # pylint: disable=g-import-not-at-top
  from hypothesis import strategies  # pylint: disable=g-import-not-at-top
  return hypothesis, strategies


@functools.lru_cache(maxsize=None)
def seed_images():
  try:
    from tests import images  # pylint: disable=g-import-not-at-top
  except ImportError:
    import images  # pylint: disable=g-import-not-at-top
  return tuple(images.encoded_bytes(kind, size=16, seed=index) for index, kind in enumerate(SEED_KINDS))


def image_like_bytes():
  """A hypothesis strategy for the inputs described in the module docstring."""
  _, st = _strategies()

  @st.composite
  def mutated(draw):
    data = bytearray(draw(st.sampled_from(seed_images())))
    for _ in range(draw(st.integers(1, 4))):
      operation = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "boundary")))
      position = draw(st.integers(0, max(len(data) - 1, 0)))
      if operation == "flip" and data:
        data[position] ^= draw(st.integers(1, 255))
      elif operation == "truncate":
        del data[position:]
      elif operation == "insert":
        data[position:position] = draw(st.binary(min_size=1, max_size=16))
      elif operation == "delete":
        del data[position:position + draw(st.integers(1, 16))]
      else:
        offset = draw(st.integers(0, HEADER_BYTES - 4))
        data[offset:offset + 4] = draw(st.sampled_from(BOUNDARY_WORDS))
    return bytes(data)

  @st.composite
  def one_flip_past_the_header(draw):
    # Mostly still decodable (JPEG, BMP and GIF have no checksum over their pixels): this is
    # where "the scan accepted it" must still mean "the pipeline decodes it".
    data = bytearray(draw(st.sampled_from(seed_images())))
    position = draw(st.integers(HEADER_BYTES, len(data) - 1))
    data[position] ^= draw(st.integers(1, 255))
    return bytes(data)

  behind_magic = st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGIC_NUMBERS),
                           st.binary(max_size=MAX_RANDOM_BYTES))
  return st.one_of(st.binary(max_size=MAX_RANDOM_BYTES), behind_magic, mutated(),
                   one_flip_past_the_header(), st.sampled_from(seed_images()))


def fuzz_settings(max_examples):
  hypothesis, _ = _strategies()
  return hypothesis.settings(
      max_examples=max_examples, deadline=None, derandomize=True, database=None,
      suppress_health_check=list(hypothesis.HealthCheck), print_blob=True)


# ---------------------------------------------------------------- the harness (child process)

def _decodes(image_bytes) -> bool:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_ft.data import images as images_lib  # pylint: disable=g-import-not-at-top
  try:
    images_lib.decode_image(image_bytes, SIZE)
  except (tf.errors.OpError, ValueError):
    return False
  return True


def _assert_clear_reason(reason):
  assert isinstance(reason, str) and reason.strip() and "\n" not in reason, repr(reason)


def fuzz_folder_scan(work_dir, counts):
  """check_image_file and scan_image_folder: accepted files decode; rejected ones say why."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from estimator_ft import contract  # pylint: disable=g-import-not-at-top
  from estimator_ft.data import folders as folders_lib, images as images_lib  # pylint: disable=g-import-not-at-top
  hypothesis, st = _strategies()
  root = pathlib.Path(work_dir) / "scan"
  good = root / "only_class" / "good.png"
  good.parent.mkdir(parents=True, exist_ok=True)
  good.write_bytes(seed_images()[SEED_KINDS.index("png")])

  @fuzz_settings(SCAN_EXAMPLES)
  @hypothesis.given(content=image_like_bytes(), extension=st.sampled_from(contract.IMAGE_EXTENSIONS))
  def check(content, extension):
    path = root / "only_class" / f"fuzzed{extension}"
    path.write_bytes(content)
    try:
      reason = folders_lib.check_image_file(str(path))
      if reason is None:
        counts["accepted"] += 1
        image = images_lib.decode_image(content, SIZE).numpy()
        assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()
        assert image.min() >= 0 and image.max() <= 255
      else:
        counts["rejected"] += 1
        _assert_clear_reason(reason)
      split = folders_lib.scan_image_folder(str(root), "train", bad_images="skip")
      assert dict(split.skipped).get(str(path)) == reason
      assert split.num_examples == (2 if reason is None else 1)
    finally:
      path.unlink()

  check()


def fuzz_training_decode(work_dir, counts):
  """The training pipeline's read+decode map with ignore_errors: bad files dropped, no crash."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from estimator_ft import contract  # pylint: disable=g-import-not-at-top
  from estimator_ft.data import pipeline as pipeline_lib, split as split_lib  # pylint: disable=g-import-not-at-top
  from estimator_ft.config import Config  # pylint: disable=g-import-not-at-top
  hypothesis, st = _strategies()
  config = Config(image_size=SIZE, batch_size=4)
  folder = pathlib.Path(work_dir) / "pipeline"
  folder.mkdir(parents=True, exist_ok=True)

  @fuzz_settings(PIPELINE_EXAMPLES)
  @hypothesis.given(contents=st.lists(image_like_bytes(), min_size=1, max_size=MAX_FILES_PER_EXAMPLE))
  def check(contents):
    paths = []
    for index, content in enumerate(contents):
      path = folder / f"{index}.jpg"
      path.write_bytes(content)
      paths.append(str(path))
    split = split_lib.Split(name="train", class_names=("a", "b"), num_examples=len(paths),
                       paths=tuple(paths), labels=tuple(i % 2 for i in range(len(paths))))
    decodable = sum(_decodes(content) for content in contents)
    counts["files"] += len(contents)
    counts["decoded"] += decodable
    yielded = 0
    for features, labels in pipeline_lib.make_dataset(split, config, "eval"):
      images = features[contract.FEATURE_KEY].numpy()
      assert np.isfinite(images).all() and images.shape[1:] == (SIZE, SIZE, 3)
      yielded += len(labels)
    assert yielded == decodable

  check()


def fuzz_serving_signature(work_dir, counts):
  """The bytes signature of an exported SavedModel: a prediction, or a clear per-input error."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from estimator_ft import contract  # pylint: disable=g-import-not-at-top
  from estimator_ft import export  # pylint: disable=g-import-not-at-top
  from estimator_ft import model as model_lib  # pylint: disable=g-import-not-at-top
  from estimator_ft import serving  # pylint: disable=g-import-not-at-top
  from estimator_ft.config import Config  # pylint: disable=g-import-not-at-top
  hypothesis, _ = _strategies()
  config = Config(image_size=SIZE, weights="none", dropout=0.0)
  class_names = ("cat", "dog")
  model = model_lib.build_model(config, len(class_names))
  export_base = os.path.join(work_dir, "export")
  export.export_keras_model(model, config, class_names, export_base)
  predictor = serving.Predictor(export_base)
  files = pathlib.Path(work_dir) / "serving"
  files.mkdir(parents=True, exist_ok=True)

  @fuzz_settings(SERVING_EXAMPLES)
  @hypothesis.given(content=image_like_bytes())
  def check(content):
    decodable = _decodes(content)
    # The raw signature: outputs for what the training pipeline decodes, an op error otherwise.
    try:
      outputs = predictor.predict_bytes([content])
    except tf.errors.OpError as e:
      assert not decodable, f"the signature refused bytes the pipeline decodes: {e}"
    else:
      assert decodable, "the signature accepted bytes the pipeline cannot decode"
      probabilities = outputs[contract.PROBABILITIES]
      assert probabilities.shape == (1, len(class_names))
      np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-5)
      assert outputs[contract.CLASS_NAME][0].decode() in class_names
    # The same bytes as a file for `estimator-ft predict`: a class, or an error saying why.
    path = files / f"{sum(counts.values()):04d}.jpg"
    path.write_bytes(content)
    [record] = predictor.predict_files([str(path)])
    if decodable:
      counts["predicted"] += 1
      assert record["class"] in class_names, record
    else:
      counts["rejected"] += 1
      _assert_clear_reason(record["error"])

  check()
  # All of them in one batch: one record per file, in order, whatever fails beside it.
  paths = sorted(str(p) for p in files.iterdir())
  records = predictor.predict_files(paths)
  assert [r["path"] for r in records] == paths
  errors = [r for r in records if "error" in r]
  assert all("class" in r for r in records if "error" not in r)
  for record in errors:
    _assert_clear_reason(record["error"])
  counts["batch_files"] = len(paths)
  counts["batch_errors"] = len(errors)


TARGETS = {"scan": fuzz_folder_scan, "pipeline": fuzz_training_decode, "serving": fuzz_serving_signature}


def harness_main(argv):
  target, work_dir = argv[1], argv[2]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import collections  # pylint: disable=g-import-not-at-top
  counts = collections.Counter()
  TARGETS[target](work_dir, counts)
  print(json.dumps(dict(counts)))


# ---------------------------------------------------------------- the tests (parent process)

def run_harness(target, work_dir):
  """Runs one fuzz target in a child process; returns its counts."""
  environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, __file__, target, str(work_dir)], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S)
  output = result.stdout + result.stderr
  assert result.returncode >= 0, f"the {target} fuzzer crashed (signal {-result.returncode}):\n{output}"
  assert result.returncode == 0, f"the {target} fuzzer found a failing input:\n{output}"
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_folder_scan_accepts_only_decodable_files_and_says_why_for_the_rest(tmp_path):
  counts = run_harness("scan", tmp_path)
  assert counts["accepted"] + counts["rejected"] >= SCAN_EXAMPLES
  # The fuzzer reached both outcomes, so both properties were exercised.
  assert counts["accepted"] > 0 and counts["rejected"] > 0, counts


def test_training_decode_drops_undecodable_files_without_crashing(tmp_path):
  counts = run_harness("pipeline", tmp_path)
  assert counts["files"] >= PIPELINE_EXAMPLES
  assert 0 < counts["decoded"] < counts["files"], counts


@pytest.mark.slow
def test_serving_signature_predicts_or_rejects_each_input(tmp_path):
  counts = run_harness("serving", tmp_path)
  assert counts["predicted"] + counts["rejected"] >= SERVING_EXAMPLES
  assert counts["predicted"] > 0 and counts["rejected"] > 0, counts
  assert counts["batch_errors"] > 0 and counts["batch_files"] > counts["batch_errors"], counts


if __name__ == "__main__":
  harness_main(sys.argv)
