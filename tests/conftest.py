"""Shared fixtures: small generated image folders and quiet TensorFlow."""
import os
import pathlib
import shutil
import tempfile

from estimator_ft import tf_environment

# Must be set before TensorFlow is imported by any test module.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# What `estimator-ft` does for its own processes: oneDNN kernels also on AVX2-only CPUs (CI's
# kind, where the suite then runs faster); the CLI subprocesses inherit it.
tf_environment.enable_onednn_unless_set()

import pytest

from estimator_ft import sample_data

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def temporary_files_inside_basetemp(tmp_path_factory):
  """Points `tempfile` here, and the CLI subprocesses through TMPDIR, at a folder inside pytest's
  basetemp, so what TensorFlow and tfds leave behind (autograph's generated sources, the folders of
  `tfds.testing.mock_data`: ~30 per run) goes with it instead of piling up in /tmp."""
  folder = str(tmp_path_factory.mktemp("tmp"))
  # The scan manifests too ($XDG_CACHE_HOME/estimator_ft/manifests): none in the user's ~/.cache.
  cache = str(tmp_path_factory.mktemp("cache"))
  previous = {name: os.environ.get(name) for name in ("TMPDIR", "XDG_CACHE_HOME")}
  previous_tempdir = tempfile.tempdir
  os.environ["TMPDIR"], os.environ["XDG_CACHE_HOME"], tempfile.tempdir = folder, cache, folder
  yield folder
  tempfile.tempdir = previous_tempdir
  for name, value in previous.items():
    if value is None:
      del os.environ[name]
    else:
      os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """A small two-class image folder pair (12 + 4 images per class, 40 px)."""
  root = tmp_path_factory.mktemp("tiny_data") / "sample"
  sample_data.generate(str(root), seed=0, train_per_class=12, validation_per_class=4,
                                   image_size=40)
  return root


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
  """The sample task at a size where learning is measurable (for the slow end-to-end tests)."""
  root = tmp_path_factory.mktemp("sample_data") / "sample"
  sample_data.generate(str(root), seed=0, train_per_class=64, validation_per_class=24,
                                   image_size=48)
  return root


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
  """A folder for one test module's shared fixtures, removed once the module is done unless one
  of its tests failed (then it stays for the post-mortem).

  A ResNet50 model_dir holds ~180 MB per checkpoint; left to pytest's default retention the suite
  kept ~13 GB in /tmp to the end of the session and filled CI's disk. pytest.ini's
  `tmp_path_retention_policy = failed` does the same for each test's own tmp_path.
  """
  path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
  failures_before = request.session.testsfailed
  yield path
  if request.session.testsfailed == failures_before:
    shutil.rmtree(path, ignore_errors=True)
