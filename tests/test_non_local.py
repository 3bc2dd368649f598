"""A model_dir and records on a non-local TensorFlow file system: TF 2.15's in-memory ram://.

Both paths train there in this process (ram:// is per process), from records prepared there too:
checkpoints, config.json, results.json and the TF Serving export all land on ram://, nothing in
a local folder named after the scheme, and a second start resumes without training again.
"""

import itertools
import json
import os
import threading

import pytest
import tensorflow as tf

from estimator_ft import model as model_lib
from estimator_ft import storage
from estimator_ft.config import Config
from estimator_ft.jobs import prepare
from estimator_ft.jobs import train as train_job
from estimator_ft.run import model_dir as model_dir_lib

ROOT = "ram://estimator_ft_test_non_local"
RECORDS = f"{ROOT}/records"
# 24 training images, batch 8: 3 steps in the one epoch.
STEPS = 3
# Where each path's exporters publish, the final export first (export.LATEST_EXPORTER and
# BEST_EXPORTER; keras_path.EXPORT_NAME).
EXPORT_NAMES = {"estimator": ("latest", "best"), "keras": ("keras",)}
# Reads of a file rewritten all the while (the old GFile.read() cut about 1 in 80 of them).
REREADS = 5000
CHECKPOINT_NAMES = {"estimator": model_dir_lib.ESTIMATOR_CHECKPOINT_NAME,
                    "keras": model_dir_lib.KERAS_CHECKPOINT_NAME}


def _read_json(path):
  return json.loads(storage.read_bytes(path))


@pytest.fixture(scope="module")
def records_on_ram(tiny_dataset):
  prepare.run_prepare(str(tiny_dataset / "train"), str(tiny_dataset / "validation"), RECORDS,
                      num_shards=2)
  yield RECORDS
  storage.rmtree(ROOT)  # ram:// holds everything in this process's memory


def _config(path, model_dir):
  return Config(records_dir=RECORDS, model_dir=model_dir, path=path, image_size=32, batch_size=8,
                epochs=1, weights="none", keep_checkpoint_max=1, log_every_n_steps=1,
                save_summary_steps=1).validate()


@pytest.fixture(scope="module", params=["estimator", "keras"])
def ram_run(request, records_on_ram):
  """One epoch on ram://, then the same command again (a second start)."""
  path = request.param
  model_dir = f"{ROOT}/{path}_run"
  first = train_job.run(_config(path, model_dir))
  second = train_job.run(_config(path, model_dir))
  yield path, model_dir, first, second
  storage.rmtree(model_dir)
  assert not storage.exists(model_dir)


@pytest.mark.slow
def test_a_run_writes_its_whole_model_dir_on_the_non_local_file_system(ram_run):
  path, model_dir, first, _ = ram_run
  assert first["global_step"] == STEPS
  assert tf.train.latest_checkpoint(model_dir) == f"{model_dir}/{CHECKPOINT_NAMES[path]}-{STEPS}"
  recorded = _read_json(f"{model_dir}/{model_dir_lib.CONFIG_FILE}")
  assert recorded["config"]["model_dir"] == model_dir and recorded["config"]["path"] == path
  results = _read_json(f"{model_dir}/{model_dir_lib.RESULTS_FILE}")
  assert results["global_step"] == STEPS and results["train_examples"] == 24
  # The exports, in TF Serving's layout: export/<exporter>/<version>/saved_model.pb, complete
  # (variables and the export record beside it) and no staging folder left behind.
  published = []
  for name in EXPORT_NAMES[path]:
    export_base = f"{model_dir}/export/{name}"
    versions = storage.listdir(export_base)
    assert len(versions) == 1 and versions[0].isdigit(), versions
    version = f"{export_base}/{versions[0]}"
    for file_name in ("saved_model.pb", "variables/variables.index",
                      "assets.extra/export_info.json"):
      assert tf.io.gfile.exists(f"{version}/{file_name}"), file_name
    assert _read_json(f"{version}/assets.extra/export_info.json")["global_step"] == STEPS
    published.append(version)
  assert first["export_path"] == published[0]
  # Nothing went to a local folder named after the URL (what open() and os.makedirs would do).
  assert not os.path.exists("ram:")


@pytest.mark.slow
def test_a_second_start_resumes_and_trains_no_step_again(ram_run):
  path, model_dir, first, second = ram_run
  assert second["global_step"] == STEPS
  assert second["history"] == first["history"]
  assert model_dir_lib.checkpoint_steps(model_dir) == [STEPS]
  for name in EXPORT_NAMES[path]:  # nothing exported again
    assert len(storage.listdir(f"{model_dir}/export/{name}")) == 1


@pytest.mark.slow
def test_a_run_is_refused_while_another_holds_the_model_dir_lease(ram_run):
  # flock cannot work there: a run finds the live run's fresh lease and stops.
  path, model_dir, _, _ = ram_run
  with model_dir_lib.lease_lock(model_dir, settle_s=0.0):
    with pytest.raises(model_dir_lib.RunLockedError, match=r"in use by pid \d+ .* renewed 0 s ago"):
      train_job.run(_config(path, model_dir))


@pytest.mark.parametrize("where", ["ram", "local"])
def test_storage_behaves_on_a_url_as_on_a_local_folder(where, tmp_path):
  root = "ram://estimator_ft_test_storage" if where == "ram" else str(tmp_path)
  storage.makedirs(f"{root}/a/b")
  storage.write_json_atomic(f"{root}/a/x.json", {"v": 1, "long": "x" * 100})
  # Shorter than before: replaced, not appended to (TF 2.15's ram:// GFile "w" appends).
  storage.write_json_atomic(f"{root}/a/x.json", {"v": 2})
  assert storage.read_json(f"{root}/a/x.json", None) == {"v": 2}
  assert storage.read_json(f"{root}/a/missing.json", "default") == "default"
  with pytest.raises(RuntimeError):
    with storage.atomic_write(f"{root}/a/x.json") as f:
      f.write("half")
      raise RuntimeError("the writer failed")
  assert storage.read_json(f"{root}/a/x.json", None) == {"v": 2}  # untouched, no temporary left
  storage.write_bytes(f"{root}/a/b/saved_model.pb", b"pb")
  storage.write_bytes(f"{root}/a/b/variables.index", b"index")
  storage.makedirs(f"{root}/a/b/assets")
  # A sibling whose name starts with the folder's (as assets.extra beside assets): ram:// lists
  # ".extra" inside "assets" too.
  storage.makedirs(f"{root}/a/b/assets.extra")  # ram:// lists no folder that was not made
  storage.write_bytes(f"{root}/a/b/assets.extra/info.json", b"{}")
  assert sorted(storage.listdir(f"{root}/a")) == ["b", "x.json"]
  assert storage.listdir(f"{root}/a/b/assets") == []
  assert storage.isdir(f"{root}/a/b") and storage.isfile(f"{root}/a/x.json")
  assert not storage.isfile(f"{root}/a/b")
  assert storage.glob_in(f"{root}/a", "*.json") == [f"{root}/a/x.json"]
  storage.replace_tree(f"{root}/a/b", f"{root}/c", last="saved_model.pb")
  assert sorted(storage.listdir(f"{root}/c")) == ["assets", "assets.extra", "saved_model.pb",
                                                  "variables.index"]
  assert storage.read_bytes(f"{root}/c/assets.extra/info.json") == b"{}"
  assert storage.read_bytes(f"{root}/c/saved_model.pb") == b"pb"
  assert not storage.exists(f"{root}/a/b")
  with pytest.raises(OSError):
    storage.replace_tree(f"{root}/a", f"{root}/c")  # never mixed into an existing version
  unique = storage.make_unique_dir(root, ".tmp-")
  assert storage.isdir(unique) and os.path.basename(unique).startswith(".tmp-")
  for folder in ("a", "c", os.path.basename(unique)):
    storage.rmtree(f"{root}/{folder}")
  assert storage.listdir(root) == []
  storage.rmtree(f"{root}/gone")  # nothing to delete is fine


def test_a_file_renamed_over_while_it_is_read_is_read_whole():
  """A reader sees one whole version of a file that a writer keeps replacing (a renewed lease).

  GFile.read() takes the size by name after opening: a version renamed over in between was read
  cut to the new version's length (CI, stop 33: a lease JSON without its closing brace)."""
  path = "ram://estimator_ft_test_reread/lease.json"
  storage.makedirs(os.path.dirname(path))
  storage.write_json_atomic(path, {"v": ""})
  stop = threading.Event()

  def rewrite():
    for length in itertools.cycle(range(7)):  # versions of different lengths
      if stop.is_set():
        return
      storage.write_json_atomic(path, {"v": "x" * length})

  writer = threading.Thread(target=rewrite)
  writer.start()
  try:
    values = {json.loads(storage.read_bytes(path))["v"] for _ in range(REREADS)}
  finally:
    stop.set()
    writer.join()
  assert len(values) > 1, "the writer never replaced the file during the reads"
  storage.rmtree(os.path.dirname(path))


@pytest.mark.slow
def test_a_run_on_the_non_local_file_system_is_a_warm_start_source(ram_run):
  # Its model_dir or one of its checkpoint prefixes (which ram:// also takes for a folder).
  path, model_dir, _, _ = ram_run
  checkpoint = f"{model_dir}/{CHECKPOINT_NAMES[path]}-{STEPS}"
  for source in (model_dir, checkpoint):
    Config(records_dir=RECORDS, model_dir=f"{ROOT}/warm", warm_start_from=source).validate()
    found, config, class_names = model_lib.resolve_warm_start(source)
    assert found == checkpoint and config["path"] == path
    assert class_names == ("horizontal", "vertical")
