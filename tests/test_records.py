"""Sharded TFRecords: `estimator-ft prepare`, the records stream, each trainer its own shards."""

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from estimator_ft import cluster
from estimator_ft import files
from estimator_ft import image_formats
from estimator_ft import storage
from estimator_ft.config import Config
from estimator_ft.data import loading
from estimator_ft.data import pipeline
from estimator_ft.data import records
from estimator_ft.data.split import DataError
from estimator_ft.jobs import prepare
from estimator_ft.run import model_dir as model_dir_lib
from tests import images as test_images

SHARDS = 4
SIZE = 32
# Ample for reading 24 records of 32 px in the background.
READ_AHEAD_WAIT_S = 2.0


def _prepare(dataset, output_dir, **settings):
  settings.setdefault("num_shards", SHARDS)
  return prepare.run_prepare(str(dataset / "train"), str(dataset / "validation"), str(output_dir),
                             **settings)


@pytest.fixture(scope="module")
def prepared(tiny_dataset, module_tmp_path):
  output_dir = module_tmp_path / "records"
  return output_dir, _prepare(tiny_dataset, output_dir, max_side=SIZE, seed=1)


def _read_all(files):
  spec = {key: tf.io.FixedLenFeature([], tf.int64 if key == records.KEY_LABEL else tf.string)
          for key in records.RECORD_KEYS}
  return [{k: v.numpy() for k, v in tf.io.parse_single_example(r, spec).items()}
          for r in tf.data.TFRecordDataset(files)]


def _name(serialized) -> str:
  spec = {records.KEY_FILENAME: tf.io.FixedLenFeature([], tf.string)}
  return tf.io.parse_single_example(serialized, spec)[records.KEY_FILENAME].numpy().decode()


def _names(dataset, count):
  return [_name(r) for r in dataset.take(count)]


# ---------------------------------------------------------------- each trainer its own shards

def _task(task_type, index, workers=2, chief=True):
  spec = {"worker": [f"h:{i}" for i in range(workers)], "ps": ["h:9"]}
  if chief:
    spec["chief"] = ["h:8"]
  return cluster.Task(type=task_type, index=index, cluster=spec)


@pytest.mark.parametrize("chief", [True, False])
def test_trainers_read_disjoint_shards_that_together_are_the_whole_set(chief):
  files = [f"train-{i:05d}-of-00007" for i in range(7)]
  trainers = ([_task("chief", 0, chief=chief)] if chief else []) + [
      _task("worker", i, chief=chief) for i in range(2)]
  assigned = [cluster.trainer_shards(files, task) for task in trainers]
  assert sorted(sum(assigned, [])) == files
  assert all(set(a).isdisjoint(b) for i, a in enumerate(assigned) for b in assigned[i + 1:])
  assert all(assigned)
  if chief:  # tensorflow#23294: the chief and worker 0 must not read the same shards
    assert assigned[0] == files[0::3] and assigned[1] == files[1::3]
  for reader in (None, _task("ps", 0, chief=chief), _task("evaluator", 0, chief=chief)):
    assert cluster.trainer_shards(files, reader) == files


def test_fewer_shards_than_trainers_is_refused():
  with pytest.raises(ValueError, match="--num_shards=3 or more"):
    cluster.trainer_shards(["a", "b"], _task("worker", 1))
  cluster.check_enough_shards(3, _task("worker", 1).cluster)


# ---------------------------------------------------------------- prepare

def test_prepare_writes_shards_of_random_samples_and_a_description(prepared, tiny_dataset):
  output_dir, description = prepared
  names = sorted(os.listdir(output_dir))
  assert names == ["dataset.json"] + [records.shard_name("train", i, SHARDS) for i in range(SHARDS)] + [
      records.shard_name("validation", 0, 1)]
  on_disk = json.loads((output_dir / "dataset.json").read_text())
  assert on_disk == description and on_disk["class_names"] == ["horizontal", "vertical"]
  train = on_disk["splits"]["train"]
  assert train["num_examples"] == 24 and train["counts_per_class"] == {"horizontal": 12, "vertical": 12}
  assert train["source_dir"] == str(tiny_dataset / "train") and train["skipped"] == []
  assert [s["num_examples"] for s in train["shards"]] == [6] * SHARDS
  examples = _read_all([str(output_dir / s["file"]) for s in train["shards"]])
  assert sorted(e[records.KEY_FILENAME].decode() for e in examples) == sorted(
      f for c in ("horizontal", "vertical") for f in os.listdir(tiny_dataset / "train" / c))
  for example in examples:
    label, text = example[records.KEY_LABEL], example[records.KEY_TEXT].decode()
    assert on_disk["class_names"][label] == text and example[records.KEY_FILENAME].decode().startswith(text)
    # 40-px sources, --max_side=32: re-encoded as a 32-px JPEG.
    assert example[records.KEY_FORMAT] == b"jpeg"
    assert tf.io.decode_image(example[records.KEY_ENCODED]).shape[:2] == (SIZE, SIZE)
  # A seeded random order, not the folder's class-sorted one.
  labels = [e[records.KEY_LABEL] for e in examples]
  assert labels != sorted(labels) and sum(labels[:12]) not in (0, 12)


def test_a_prepare_that_shrank_images_says_how_to_serve_them_alike(tiny_dataset, tmp_path,
                                                                    caplog):
  """Records shrunk by --max_side are smoothed (PIL antialiases); the export's resize is not."""
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    _prepare(tiny_dataset, tmp_path / "kept", num_shards=1)
    assert "were shrunk" not in caplog.text
    _prepare(tiny_dataset, tmp_path / "shrunk", num_shards=1, max_side=SIZE)
  assert re.search(rf"\d+ images were shrunk to a longer side of {SIZE} px .* send it images "
                   rf"shrunk the same way \(longer side {SIZE} px\)", caplog.text)


def test_without_max_side_the_original_bytes_are_kept(tiny_dataset, tmp_path):
  _prepare(tiny_dataset, tmp_path / "r", num_shards=1)
  for example in _read_all([str(tmp_path / "r" / records.shard_name("validation", 0, 1))]):
    name = example[records.KEY_FILENAME].decode()
    text = example[records.KEY_TEXT].decode()
    assert example[records.KEY_ENCODED] == (tiny_dataset / "validation" / text / name).read_bytes()


def test_prepare_again_is_a_no_op_and_a_different_data_set_is_refused(prepared, tiny_dataset):
  output_dir, description = prepared
  before = {n: os.path.getmtime(output_dir / n) for n in os.listdir(output_dir)}
  assert _prepare(tiny_dataset, output_dir, max_side=SIZE, seed=1) == description
  assert {n: os.path.getmtime(output_dir / n) for n in os.listdir(output_dir)} == before
  with pytest.raises(DataError, match="already holds a different data set"):
    _prepare(tiny_dataset, output_dir, max_side=SIZE, seed=2)


def test_an_interrupted_prepare_leaves_no_description_and_the_same_command_completes_it(
    tiny_dataset, tmp_path, monkeypatch, prepared):
  output_dir = tmp_path / "records"
  real_rename, renamed = tf.io.gfile.rename, []

  def rename_then_die(source, target, overwrite=False):
    if len(renamed) == 2:
      raise KeyboardInterrupt("killed")
    real_rename(source, target, overwrite)
    renamed.append(target)

  monkeypatch.setattr(tf.io.gfile, "rename", rename_then_die)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tiny_dataset, output_dir, max_side=SIZE, seed=1)
  monkeypatch.setattr(tf.io.gfile, "rename", real_rename)
  assert not (output_dir / "dataset.json").exists()
  with pytest.raises(DataError, match="interrupted `estimator-ft prepare`"):
    records.records_split(str(output_dir), "train")
  with pytest.raises(DataError, match="interrupted prepare of a different data set"):
    _prepare(tiny_dataset, output_dir, max_side=SIZE, seed=3)
  description = _prepare(tiny_dataset, output_dir, max_side=SIZE, seed=1)
  assert description == prepared[1]
  assert sorted(os.listdir(output_dir)) == sorted(os.listdir(prepared[0]))
  for name in os.listdir(output_dir):  # the same bytes as an uninterrupted prepare
    assert (output_dir / name).read_bytes() == (prepared[0] / name).read_bytes()


def test_bad_files_follow_bad_images_as_in_training(tiny_dataset, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(tiny_dataset, data)
  bad = test_images.write_truncated(data / "train" / "vertical" / "broken.jpg", "jpeg")
  with pytest.raises(DataError, match="broken.jpg"):
    _prepare(data, tmp_path / "fail")
  assert not (tmp_path / "fail").exists()
  description = _prepare(data, tmp_path / "skip", bad_images="skip")
  [skipped] = description["splits"]["train"]["skipped"]
  assert skipped["path"] == bad and "cannot be decoded" in skipped["reason"]
  assert description["splits"]["train"]["num_examples"] == 24


def test_prepare_refuses_a_folder_that_is_not_a_data_set(tiny_dataset, tmp_path):
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(DataError, match="not empty"):
    _prepare(tiny_dataset, tmp_path / "busy")


def test_max_side_shrinks_only_larger_images_keeping_the_aspect():
  big = Image.fromarray(test_images.pattern(100)).resize((100, 60))
  buffer = io.BytesIO()
  big.save(buffer, format="PNG")
  encoded, new_format = records.reencode_if_larger(buffer.getvalue(), 50)
  assert new_format == "jpeg" and Image.open(io.BytesIO(encoded)).size == (50, 30)
  assert records.reencode_if_larger(buffer.getvalue(), 100) == (buffer.getvalue(), None)


# ---------------------------------------------------------------- the training stream

def test_each_epoch_reads_every_record_once_in_an_order_of_seed_and_epoch(prepared):
  split = records.records_split(str(prepared[0]), "train")
  assert split.num_examples == 24 and len(split.record_files) == SHARDS
  stream = _names(records.training_stream(split, seed=5, shuffle_buffer=8), 72)
  epochs = [stream[i:i + 24] for i in (0, 24, 48)]
  assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 24 for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  # Resume: the stream from example 30 is the uninterrupted stream's tail, and TensorFlow's
  # global seed plays no part in it (only (seed, epoch) does).
  tf.random.set_seed(123)
  assert _names(records.training_stream(split, 5, 8, start_example=30), 42) == stream[30:]
  assert _names(records.training_stream(split, 6, 8), 24) != epochs[0]


def test_the_next_block_is_read_while_this_one_is_consumed_even_across_epochs(prepared, tmp_path):
  # A buffer larger than the split: every epoch is one block, the case where reading the next
  # block inside the epoch's own dataset would not help.
  records_dir = tmp_path / "records"
  shutil.copytree(prepared[0], records_dir)
  split = records.records_split(str(records_dir), "train")
  expected = _names(records.training_stream(split, seed=5, shuffle_buffer=64), 48)
  epochs = (_names(records.epoch_records(split, 5, 0, 64), 24) +
            _names(records.epoch_records(split, 5, 1, 64), 24))
  stream = iter(records.training_stream(split, seed=5, shuffle_buffer=64))
  names = [_name(next(stream))]
  time.sleep(READ_AHEAD_WAIT_S)  # epoch 1's block is read meanwhile (24 records of 32 px)
  for shard in split.record_files:
    os.remove(shard)
  # Epoch 1 is read already, so the rest of epochs 0 and 1 come without the files.
  names += [_name(next(stream)) for _ in range(47)]
  assert names == expected
  # The read-ahead leaves the order alone: it is epoch_records' epochs, back to back.
  assert names == epochs
  assert sorted(names[:24]) == sorted(names[24:]) and names[:24] != names[24:]


def test_make_dataset_on_records_resumes_at_a_batch_and_evaluates_every_example(prepared):
  config = Config(records_dir=str(prepared[0]), image_size=SIZE, batch_size=6, seed=3)
  splits = loading.load_splits(config)
  assert splits.class_names == ("horizontal", "vertical")
  full = [(x["image"].numpy(), y.numpy()) for x, y in
          pipeline.make_dataset(splits.train, config, "train").take(7)]
  resumed = [(x["image"].numpy(), y.numpy()) for x, y in
             pipeline.make_dataset(splits.train, config, "train", start_batch=5).take(2)]
  for (a, la), (b, lb) in zip(full[5:], resumed):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  labels = np.concatenate([y.numpy() for _, y in pipeline.make_dataset(splits.validation, config, "eval")])
  assert sorted(labels) == [0] * 4 + [1] * 4
  cached = config.replace(cache=True)
  batch = next(iter(pipeline.make_dataset(splits.train, cached, "train")))
  assert batch[0]["image"].shape == (6, SIZE, SIZE, 3)


def _dataset_ops(dataset) -> set:
  serialized = dataset._as_serialized_graph().numpy()  # pylint: disable=protected-access
  graph = tf.compat.v1.GraphDef.FromString(serialized)
  return ({node.op for node in graph.node}
          | {node.op for function in graph.library.function for node in function.node_def})


def test_records_are_checked_for_pixels_by_prepare_and_again_only_under_a_lower_limit(prepared):
  output_dir, description = prepared
  assert description[records.VERIFIED_MAX_PIXELS_KEY] == image_formats.DEFAULT_MAX_IMAGE_PIXELS
  config = Config(records_dir=str(output_dir), image_size=SIZE, batch_size=8)
  validation = loading.load_splits(config).validation
  assert validation.verified_max_pixels == image_formats.DEFAULT_MAX_IMAGE_PIXELS
  verified = pipeline.make_dataset(validation, config, "eval")
  assert "ExtractJpegShape" not in _dataset_ops(verified)
  assert sorted(np.concatenate([y.numpy() for _, y in verified])) == [0] * 4 + [1] * 4
  # Under a limit below the 32 x 32 images, every one is checked again, and refused.
  strict = config.replace(max_image_pixels=SIZE * SIZE - 1)
  checked = pipeline.make_dataset(validation, strict, "eval")
  assert "ExtractJpegShape" in _dataset_ops(checked)
  assert list(checked) == []
  # Records from before the limit was recorded are checked too.
  unverified = dataclasses.replace(validation, verified_max_pixels=0)
  assert "ExtractJpegShape" in _dataset_ops(pipeline.make_dataset(unverified, config, "eval"))


def test_records_dir_is_one_source_among_the_others(prepared):
  with pytest.raises(ValueError, match="not both --train_dir/--validation_dir and --records_dir"):
    Config(records_dir="r", train_dir="t", validation_dir="v").validate_data_settings()
  with pytest.raises(DataError, match="has no dataset.json"):
    loading.load_splits(Config(records_dir=str(prepared[0] / "nothing")))


# ---------------------------------------------------------------- other file systems

def test_records_written_and_read_back_on_ram_filesystem(tiny_dataset):
  output_dir = "ram://estimator_ft_test/records"
  description = _prepare(tiny_dataset, output_dir, num_shards=2)
  assert tf.io.gfile.exists(f"{output_dir}/dataset.json")
  assert not tf.io.gfile.exists(f"{output_dir}/{prepare.PARTIAL_DIR}")
  config = Config(records_dir=output_dir, image_size=SIZE, batch_size=6)
  splits = loading.load_splits(config)
  assert splits.train.record_files[0].startswith("ram://")
  assert splits.train.num_examples == description["splits"]["train"]["num_examples"] == 24
  batch = next(iter(pipeline.make_dataset(splits.train, config, "train")))
  assert batch[0]["image"].shape == (6, SIZE, SIZE, 3)


def test_a_non_local_model_dir_is_created_and_an_unknown_scheme_refused_with_what_to_do():
  model_dir_lib.ensure_writable_dir("ram://estimator_ft_test/training")
  assert tf.io.gfile.isdir("ram://estimator_ft_test/training")
  assert tf.io.gfile.listdir("ram://estimator_ft_test/training") == []  # the probe is gone
  with pytest.raises(ValueError, match=r"--model_dir=nofs://b/x is not writable through "
                                       r"TensorFlow's file system \(.*nofs.*\)\. Check the URL"):
    model_dir_lib.ensure_writable_dir("nofs://b/x")
  # A job whose reports are written with local calls says so.
  with pytest.raises(ValueError, match=r"--output_dir=ram://r/c: this must be a local folder "
                                       r"\(the reports\)"):
    model_dir_lib.ensure_writable_dir("ram://r/c", "--output_dir", local_only="the reports")


def test_a_non_local_model_dir_is_guarded_by_a_lease():
  model_dir = "ram://estimator_ft_test/model"
  tf.io.gfile.makedirs(model_dir)
  lease_file = f"{model_dir}/{model_dir_lib.LOCK_FILE}"
  with model_dir_lib.lease_lock(model_dir, renew_s=0.05, settle_s=0.01):
    assert tf.io.gfile.exists(lease_file)
    with pytest.raises(model_dir_lib.RunLockedError,
                       match=r"in use by pid \d+ on .* renewed 0 s ago\).* If that run is gone .*"
                             r"its lease expires in 120 s: then the same command takes model_dir "
                             r"over and resumes"):
      with model_dir_lib.lease_lock(model_dir, settle_s=0.01):
        pass
    first = storage.read_json(lease_file, None)["time"]
    deadline = time.monotonic() + 10
    while storage.read_json(lease_file, None)["time"] == first:  # renewed
      assert time.monotonic() < deadline, "the lease was never renewed"
      time.sleep(0.05)
  assert not tf.io.gfile.exists(lease_file)  # released
  # A dead run's lease (not renewed for longer than the timeout) is taken over.
  storage.write_json_atomic(lease_file, {"holder": "pid 1 on gone", "time": 0.0})
  with model_dir_lib.lease_lock(model_dir, settle_s=0.01):
    holder = storage.read_json(lease_file, None)["holder"]
    assert holder.startswith(f"pid {os.getpid()} on "), holder
  # run_lock takes a lease, not flock, on a non-local file system.
  assert not storage.is_local(model_dir) and storage.is_local("/tmp/model")


def _fake_mounts(tmp_path, *mounts):
  """A mounts file (as /proc/self/mounts) that mounts (file system type, folder) over a root ext4."""
  lines = ["/dev/root / ext4 rw,relatime 0 0"]
  for fs_type, folder in mounts:
    escaped = os.path.realpath(folder).replace(" ", "\\040")
    lines.append(f"source {escaped} {fs_type} rw,nosuid,nodev 0 0")
  path = tmp_path / "mounts"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_the_file_system_type_is_the_deepest_mount_holding_the_path(tmp_path):
  mounts = _fake_mounts(tmp_path, ("fuse.gcsfuse", tmp_path / "gcs"),
                        ("tmpfs", tmp_path / "gcs" / "inner dir"))
  assert files.mount_fs_type(str(tmp_path / "gcs" / "bucket" / "run"), mounts) == "fuse.gcsfuse"
  assert files.mount_fs_type(str(tmp_path / "gcs"), mounts) == "fuse.gcsfuse"
  assert files.mount_fs_type(str(tmp_path / "gcs" / "inner dir" / "run"), mounts) == "tmpfs"
  assert files.mount_fs_type(str(tmp_path / "gcsx" / "run"), mounts) == "ext4"  # not inside /gcs
  assert files.mount_fs_type(str(tmp_path), str(tmp_path / "no_mounts_file")) == ""


def test_a_model_dir_on_a_fuse_mount_is_locked_by_a_lease(tmp_path, caplog):
  """flock on gcsfuse (Vertex AI's /gcs/), s3fs... holds on one machine only."""
  mounted, plain = tmp_path / "gcs" / "run", tmp_path / "disk" / "run"
  mounted.mkdir(parents=True)
  plain.mkdir(parents=True)
  mounts = _fake_mounts(tmp_path, ("fuse.gcsfuse", tmp_path / "gcs"))
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    with model_dir_lib.run_lock(str(mounted), mounts_file=mounts):
      lease = storage.read_json(str(mounted / model_dir_lib.LOCK_FILE), None)
      assert lease["holder"].startswith(f"pid {os.getpid()} on ")
      with pytest.raises(model_dir_lib.RunLockedError, match=r"its lease was renewed \d+ s ago"):
        with model_dir_lib.run_lock(str(mounted), mounts_file=mounts):
          pass
  assert "is on a fuse.gcsfuse mount, where flock holds on one machine only" in caplog.text
  assert not (mounted / model_dir_lib.LOCK_FILE).exists()  # the lease is released
  with model_dir_lib.run_lock(str(plain), mounts_file=mounts):  # a disk: flock, as before
    assert (plain / model_dir_lib.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(model_dir_lib.RunLockedError, match=r"in use by pid \d+ on .*\. Wait"):
      with model_dir_lib.run_lock(str(plain), mounts_file=mounts):
        pass


def _wait_for(condition, what, timeout_s=10):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, what
    time.sleep(0.02)


def test_a_lease_whose_renewal_fails_keeps_renewing(tmp_path, caplog):
  """A failed renewal (an object store's transient error) is retried, not the end of renewals."""
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  lease_file = model_dir / model_dir_lib.LOCK_FILE
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    with model_dir_lib.lease_lock(str(model_dir), renew_s=0.02, settle_s=0.01):
      shutil.rmtree(model_dir)  # every write of the lease now fails
      _wait_for(lambda: caplog.text.count("Could not renew the run lease") >= 2,
                "a failed renewal was not reported twice")
      model_dir.mkdir()
      _wait_for(lease_file.exists, "the renewals stopped after a failure")
      _wait_for(lambda: "is renewed again" in caplog.text, "the recovery was not reported")
  assert re.search(r"Could not renew the run lease .*; retrying in 0.02 s\. Unrenewed for \d+ s "
                   r"of the 120 s after which another run may take --model_dir over", caplog.text)
  assert not lease_file.exists()  # released


def test_a_lease_that_cannot_be_released_does_not_hide_what_ended_the_run(tmp_path, caplog):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  lease_file = model_dir / model_dir_lib.LOCK_FILE

  class RunEnded(Exception):
    pass

  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    with pytest.raises(RunEnded):
      with model_dir_lib.lease_lock(str(model_dir), settle_s=0.01):
        lease_file.unlink()
        lease_file.mkdir()  # reading the lease back now fails (IsADirectoryError)
        raise RunEnded("interrupted at step 12: run the same command to resume")
  assert re.search(r"Could not release the run lease .* It expires 120 s after its last renewal; "
                   r"until then a new run in --model_dir=.* is refused", caplog.text)


def test_a_lease_taken_over_is_left_to_its_new_holder(tmp_path, caplog):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  lease_file = str(model_dir / model_dir_lib.LOCK_FILE)
  other = {"holder": "pid 2 on elsewhere", "time": time.time()}
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    with model_dir_lib.lease_lock(str(model_dir), renew_s=0.02, settle_s=0.01):
      storage.write_json_atomic(lease_file, other)  # as a run that found this lease expired
      _wait_for(lambda: "taken over" in caplog.text, "the takeover was not reported")
      time.sleep(0.1)  # several renewal periods
      assert storage.read_json(lease_file, None) == other  # not overwritten
  assert re.search(r"--model_dir=.* was taken over by pid 2 on elsewhere: .* Both runs now write "
                   r"there: stop one of them", caplog.text)
  assert storage.read_json(lease_file, None) == other  # nor deleted on exit


def test_bench_measures_the_records_pipeline(prepared, tiny_dataset):
  from estimator_ft.bench import loaders
  from estimator_ft.bench import plan as bench_plan
  plan = bench_plan.make_plan(image_size=SIZE, batch_size=4, steps=2, repeats=1, quick=True)
  config = bench_plan.bench_config(plan, str(tiny_dataset), "/tmp/unused")
  rates = loaders.records_pipeline_rates(*loaders.records_source(str(prepared[0]), config, 2), plan)
  assert rates and all(r > 0 for r in rates)
  with pytest.raises(ValueError, match="has 2 classes where --data_dir has 3: the bench trains one model"):
    loaders.records_source(str(prepared[0]), config, 3)
