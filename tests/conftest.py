"""Shared fixtures: small generated image folders and quiet TensorFlow."""
import importlib.util
import os
import pathlib

# Must be set before TensorFlow is imported by any test module.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_sample_generator():
  spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "data" / "make_sample_data.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """A small two-class image folder pair (12 + 4 images per class, 40 px)."""
  root = tmp_path_factory.mktemp("tiny_data") / "sample"
  load_sample_generator().generate(str(root), seed=0, train_per_class=12, validation_per_class=4,
                                   image_size=40)
  return root


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
  """The sample task at a size where learning is measurable (for the slow end-to-end tests)."""
  root = tmp_path_factory.mktemp("sample_data") / "sample"
  load_sample_generator().generate(str(root), seed=0, train_per_class=64, validation_per_class=24,
                                   image_size=48)
  return root
