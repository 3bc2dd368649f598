"""Faults a long run must survive: kill -9 and resume (exactly, with --exact_resume), a second run
on the same model_dir, damaged or deleted checkpoints, unwritable places and full disks.

The end-to-end tests run the real command (`python -m estimator_ft train ...`) in subprocesses
and kill them with SIGKILL, as a crash, an OOM kill or a lost machine would.
"""

import errno
import json
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from estimator_ft import contract
from estimator_ft import estimator as estimator_lib
from estimator_ft import keras_path
from estimator_ft import serving
from estimator_ft.config import Config
from estimator_ft.data import loading as loading_lib
from estimator_ft.data import pipeline as pipeline_lib
from estimator_ft.jobs import export_checkpoint
from estimator_ft.run import events as events_lib
from estimator_ft.run import faults
from estimator_ft.run import model_dir as model_dir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
EXIT_USER_ERROR = 2
SIZE = 32
# tiny_dataset: 24 train images, batch 8 -> 3 steps per epoch, 2 epochs -> 6 steps.
BATCH = 8
STEPS_PER_EPOCH = 3
EPOCHS = 2
FINAL_STEP = EPOCHS * STEPS_PER_EPOCH
# Not a multiple of the epoch: the Estimator run is killed, and resumed, in the middle of epoch 2.
CHECKPOINT_EVERY = 4
# ResNet50 at any image size: its weights take 94 MB, a training checkpoint (weights and momentum)
# 189 MB. A write limit between the two lets the initial weights through, not the first checkpoint.
WRITE_LIMIT_BYTES = 140 * 2**20
# Generous: a loaded 2-core CI machine builds the ResNet50 graph in tens of seconds.
RUN_TIMEOUT_S = 600
POLL_S = 0.2


# ---------------------------------------------------------------- helpers

def train_command(tiny_dataset, model_dir, *flags):
  return [sys.executable, "-m", "estimator_ft", "train",
          f"--train_dir={tiny_dataset / 'train'}", f"--validation_dir={tiny_dataset / 'validation'}",
          f"--model_dir={model_dir}", f"--image_size={SIZE}", f"--batch_size={BATCH}",
          f"--epochs={EPOCHS}", "--weights=none", "--seed=3", *flags]


def start(command, log_path, file_size_limit=None):
  """The command running in the background, its output going to log_path (a pipe could fill).

  file_size_limit: no file it writes may grow beyond this many bytes (RLIMIT_FSIZE): a write past
  it fails with EFBIG, as one on a full disk fails with ENOSPC. (Python ignores SIGXFSZ.)
  """
  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

  with open(log_path, "w") as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=limit_file_size if file_size_limit else None)
  process.log_path = log_path
  return process


@pytest.fixture
def background():
  """start() for a test; whatever is still running when the test ends (failed) is killed."""
  processes = []

  def start_in_background(command, log_path, file_size_limit=None):
    processes.append(start(command, log_path, file_size_limit))
    return processes[-1]

  yield start_in_background
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def log_of(process):
  return pathlib.Path(process.log_path).read_text()


def finish(process, timeout=RUN_TIMEOUT_S):
  process.wait(timeout=timeout)
  return process.returncode, log_of(process)


def run_to_end(command, log_path):
  return finish(start(command, log_path))


def assert_one_line_user_error(returncode, output, *fragments):
  """Exit 2 with one `estimator-ft: error:` line and no traceback."""
  assert returncode == EXIT_USER_ERROR, output
  assert "Traceback" not in output, output
  errors = [line for line in output.splitlines() if line.startswith("estimator-ft: error:")]
  assert len(errors) == 1, output
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def wait_for_checkpoint(process, model_dir, name, step):
  """Blocks until model_dir/checkpoint names `<name>-<step>` (so its files are complete)."""
  state = pathlib.Path(model_dir) / faults.CHECKPOINT_STATE_FILE
  # The path is relative or absolute, depending on the writer.
  wanted = re.compile(rf'^model_checkpoint_path: "(.*/)?{re.escape(name)}-{step}"$', re.MULTILINE)
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while time.monotonic() < deadline:
    if state.exists() and wanted.search(state.read_text()):
      return
    if process.poll() is not None:
      pytest.fail(f"the run ended (exit {process.returncode}) before {name}-{step}:\n"
                  f"{log_of(process)}")
    time.sleep(POLL_S)
  process.kill()
  pytest.fail(f"no {name}-{step} within {RUN_TIMEOUT_S} s")


def kill_hard(process):
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL


def listed_checkpoints(model_dir):
  state = tf.train.get_checkpoint_state(str(model_dir))
  assert state is not None, f"{model_dir}/checkpoint is unreadable"
  return list(state.all_model_checkpoint_paths)


def assert_checkpoints_and_exports_intact(model_dir):
  """Every listed checkpoint and every exported version reads back intact (CRC-checked)."""
  checkpoints = listed_checkpoints(model_dir)
  assert checkpoints
  for prefix in checkpoints:
    path = prefix if os.path.isabs(prefix) else os.path.join(model_dir, prefix)
    assert faults.checkpoint_problem(path) is None, path
  export_root = pathlib.Path(model_dir) / "export"
  versions = []
  for base in export_root.iterdir():
    versions += [path for _, path in serving.version_dirs(str(base))]
    # A version is published by one rename, so a killed export can only leave a hidden staging
    # folder, which TF Serving ignores; never a visible, half-written version.
    assert all(name.isdigit() or name.startswith(".") for name in os.listdir(base)), os.listdir(base)
  assert versions
  for version in versions:
    assert faults.checkpoint_problem(os.path.join(version, "variables", "variables")) is None, version


def read_results(model_dir):
  with open(os.path.join(model_dir, model_dir_lib.RESULTS_FILE)) as f:
    return json.load(f)


def assert_complete_results(results, path):
  assert results["path"] == path
  assert results["global_step"] == FINAL_STEP
  assert [h["epoch"] for h in results["history"]] == list(range(1, EPOCHS + 1))
  for entry in results["history"]:
    assert np.isfinite([entry["loss"], entry["accuracy"], entry["val_loss"],
                        entry["val_accuracy"]]).all(), entry
  assert os.path.isfile(os.path.join(results["export_path"], contract.SAVED_MODEL_FILE))


def checkpoint_values(prefix):
  reader = tf.train.load_checkpoint(str(prefix))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


# ---------------------------------------------------------------- kill -9 and resume, end to end

@pytest.mark.slow
def test_estimator_run_killed_mid_epoch_resumes_exactly_and_a_second_run_is_refused(
    tiny_dataset, tmp_path, background):
  """kill -9 in epoch 2, re-run: same final weights as an uninterrupted run (--exact_resume).

  While the killed run holds model_dir (stopped, not yet killed), a second run on the same
  model_dir is refused; once it is killed, the re-run gets the lock the kernel released.
  """
  flags = ["--exact_resume", "--deterministic", "--dropout=0",
           f"--save_checkpoints_steps={CHECKPOINT_EVERY}"]
  reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
  # The two independent runs overlap: graph building is mostly single-threaded.
  # The reference only provides weights: its exports would cost half its time.
  reference = background(train_command(tiny_dataset, reference_dir, *flags,
                                       "--noexport_during_training"), tmp_path / "reference.log")
  victim = background(train_command(tiny_dataset, killed_dir, *flags), tmp_path / "killed.log")
  wait_for_checkpoint(victim, killed_dir, model_dir_lib.ESTIMATOR_CHECKPOINT_NAME, CHECKPOINT_EVERY)
  victim.send_signal(signal.SIGSTOP)  # hold it right there: it still holds the model_dir lock
  returncode, output = run_to_end(train_command(tiny_dataset, killed_dir, *flags),
                                  tmp_path / "second.log")
  assert_one_line_user_error(returncode, output, f"is in use by pid {victim.pid}",
                             "another --model_dir")
  kill_hard(victim)

  returncode, resumed_output = run_to_end(train_command(tiny_dataset, killed_dir, *flags),
                                          tmp_path / "resumed.log")
  assert returncode == 0, resumed_output
  resumed_from = killed_dir / f"{model_dir_lib.ESTIMATOR_CHECKPOINT_NAME}-{CHECKPOINT_EVERY}"
  assert f"resuming from {resumed_from}" in resumed_output
  assert f"continues at batch {CHECKPOINT_EVERY}" in resumed_output
  returncode, reference_output = finish(reference)
  assert returncode == 0, reference_output

  resumed = read_results(killed_dir)
  assert_complete_results(resumed, "estimator")
  # The resumed process trained only the last steps of epoch 2: the global step continued.
  history = json.loads((killed_dir / "train_history.json").read_text())
  assert [h["train_steps_averaged"] for h in history] == [STEPS_PER_EPOCH,
                                                          FINAL_STEP - CHECKPOINT_EVERY]
  assert_checkpoints_and_exports_intact(killed_dir)

  name = f"{model_dir_lib.ESTIMATOR_CHECKPOINT_NAME}-{FINAL_STEP}"
  expected = checkpoint_values(reference_dir / name)
  actual = checkpoint_values(killed_dir / name)
  assert sorted(actual) == sorted(expected)
  initial = checkpoint_values(reference_dir / f"{model_dir_lib.ESTIMATOR_CHECKPOINT_NAME}-0")
  trained = [key for key in expected if not np.array_equal(expected[key], initial[key])]
  assert len(trained) > 100, "the comparison must cover weights that training changed"
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_keras_run_killed_after_an_epoch_resumes_to_the_requested_epochs(tiny_dataset, tmp_path,
                                                                        background):
  model_dir = tmp_path / "model"
  command = train_command(tiny_dataset, model_dir, "--path=keras")
  victim = background(command, tmp_path / "killed.log")
  wait_for_checkpoint(victim, model_dir, keras_path.CHECKPOINT_NAME, STEPS_PER_EPOCH)
  kill_hard(victim)

  returncode, output = run_to_end(command, tmp_path / "resumed.log")
  assert returncode == 0, output
  assert f"resuming from {model_dir / keras_path.CHECKPOINT_NAME}-{STEPS_PER_EPOCH}" in output
  results = read_results(model_dir)
  assert_complete_results(results, "keras")
  assert_checkpoints_and_exports_intact(model_dir)


class RecordingExporter(tf.estimator.Exporter):
  """Records the exports train_and_evaluate's evaluation would have triggered."""

  def __init__(self):
    self.calls = []

  @property
  def name(self):
    return "recording"

  def export(self, estimator, export_path, checkpoint_path, eval_result, is_the_final_export):
    self.calls.append((os.path.basename(export_path), os.path.basename(checkpoint_path),
                       int(eval_result["global_step"])))


def test_checkpoint_left_unevaluated_by_a_killed_run_is_evaluated_on_resume(tmp_path):
  """A run killed between a checkpoint and its evaluation: the resumed run evaluates it first."""
  def input_fn():
    examples = tf.data.Dataset.from_tensor_slices(({"x": np.arange(8, dtype=np.float32)},
                                                   np.ones(8, np.float32)))
    return examples.batch(4)

  def model_fn(features, labels, mode):
    weight = tf.compat.v1.get_variable("weight", [], initializer=tf.zeros_initializer())
    loss = tf.reduce_mean(tf.square(features["x"] * weight - labels))
    step = tf.compat.v1.train.get_or_create_global_step()
    train_op = tf.compat.v1.train.GradientDescentOptimizer(0.01).minimize(loss, global_step=step)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)

  estimator = tf.estimator.Estimator(model_fn, str(tmp_path))
  # What the killed run left: a checkpoint at step 2, no evaluation of it.
  estimator.train(input_fn, max_steps=2)
  exporter = RecordingExporter()
  eval_spec = tf.estimator.EvalSpec(input_fn, steps=None, exporters=[exporter])
  eval_dir = os.path.join(str(tmp_path), "eval")
  assert events_lib.scalars_by_step(eval_dir) == {}

  estimator_lib.finish_interrupted_evaluation(estimator, eval_spec)
  assert list(events_lib.scalars_by_step(eval_dir)) == [2]
  assert exporter.calls == [("recording", "model.ckpt-2", 2)]
  # Evaluated checkpoints are left alone: a plain re-run repeats nothing.
  estimator_lib.finish_interrupted_evaluation(estimator, eval_spec)
  assert len(exporter.calls) == 1


# ---------------------------------------------------------------- exact resume: the replayed stream

@pytest.mark.parametrize("cache", [False, True])
def test_stream_started_at_batch_n_is_the_uninterrupted_stream_from_batch_n(tiny_dataset, cache):
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"),
                  image_size=SIZE, batch_size=BATCH, seed=3, cache=cache)
  splits = loading_lib.load_splits(config)
  resume_at = CHECKPOINT_EVERY
  tf.random.set_seed(config.seed)
  uninterrupted = list(pipeline_lib.make_dataset(splits.train, config, "train").take(FINAL_STEP))
  tf.random.set_seed(config.seed)
  resumed = list(pipeline_lib.make_dataset(splits.train, config, "train", start_batch=resume_at)
                 .take(FINAL_STEP - resume_at))
  for (features, labels), (expected, expected_labels) in zip(resumed, uninterrupted[resume_at:]):
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(features["image"], expected["image"])
  # What a resume without replay would feed instead: other batches (another epoch's order).
  restarted = uninterrupted[:FINAL_STEP - resume_at]
  assert any(not np.array_equal(a[0]["image"], b[0]["image"]) for a, b in zip(restarted, resumed))


def test_only_a_train_stream_can_start_later(tiny_dataset):
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"),
                  image_size=SIZE, batch_size=BATCH)
  splits = loading_lib.load_splits(config)
  with pytest.raises(ValueError, match="only a train stream"):
    pipeline_lib.make_dataset(splits.validation, config, "eval", start_batch=1)
  with pytest.raises(ValueError, match="start_batch=-1"):
    pipeline_lib.make_dataset(splits.train, config, "train", start_batch=-1)


# ---------------------------------------------------------------- the run lock

LOCK_HOLDER = """
import sys, time
from estimator_ft.run import model_dir as model_dir_lib
with model_dir_lib.run_lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_lock_of_a_killed_run_is_released_by_the_kernel(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(model_dir_lib.RunLockedError, match=rf"in use by pid {holder.pid} on "):
      with model_dir_lib.run_lock(str(tmp_path)):
        pass
  finally:
    kill_hard(holder)
  # The lock file is still there, naming the dead process: only the flock counted.
  assert f"pid {holder.pid}" in (tmp_path / model_dir_lib.LOCK_FILE).read_text()
  with model_dir_lib.run_lock(str(tmp_path)):
    assert f"pid {os.getpid()}" in (tmp_path / model_dir_lib.LOCK_FILE).read_text()


# ---------------------------------------------------------------- unwritable places, full disks

def test_model_dir_below_a_file_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  # chmod cannot make a folder unwritable for root (the tests may run as root); a path through
  # a regular file is unwritable for everyone.
  with pytest.raises(ValueError, match=r"is not writable \(a part of that path is a file"):
    model_dir_lib.ensure_writable_dir(str(blocker / "model"))
  with pytest.raises(ValueError, match=r"--export_dir=.*is not writable"):
    model_dir_lib.ensure_writable_dir(str(blocker), flag="--export_dir")


def test_unwritable_export_dir_is_refused_before_the_model_is_built(tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  model_dir_lib.write_run_config(Config(train_dir="t", validation_dir="v", model_dir=str(model_dir)),
                              ("a", "b"))
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(ValueError, match=r"--export_dir=.*/a_file/exports is not writable \(a part"):
    export_checkpoint.export_from_checkpoint(str(model_dir), str(blocker / "exports"))


def test_full_disk_is_named_as_such(tmp_path, monkeypatch):
  real_open = open

  def open_on_a_full_disk(path, mode="r", *args, **kwargs):
    if "w" in mode:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", open_on_a_full_disk)
  with pytest.raises(ValueError, match=r"is not writable \(the disk is full\).*free disk space"):
    model_dir_lib.ensure_writable_dir(str(tmp_path / "model"))


@pytest.mark.slow
def test_disk_filling_up_mid_run_stops_with_a_clear_error_and_leaves_nothing_corrupt(
    tiny_dataset, tmp_path):
  model_dir = tmp_path / "model"
  returncode, output = finish(start(train_command(tiny_dataset, model_dir), tmp_path / "full.log",
                                    file_size_limit=WRITE_LIMIT_BYTES))
  assert_one_line_user_error(returncode, output, f"a write under --model_dir={model_dir} failed",
                             f"(File too large, writing {model_dir}/", "free disk space",
                             "re-run the same command to resume")
  # The failed save left its partial shards in model.ckpt-0_temp, and named no checkpoint: the
  # next run cleans up and starts from the intact initial weights.
  assert (model_dir / f"{model_dir_lib.ESTIMATOR_CHECKPOINT_NAME}-0_temp").is_dir()
  assert tf.train.latest_checkpoint(str(model_dir)) is None
  assert faults.recover_checkpoint_state(str(model_dir), model_dir_lib.ESTIMATOR_CHECKPOINT_NAME) is None
  assert not list(model_dir.glob("*_temp"))
  assert faults.checkpoint_problem(str(model_dir / model_dir_lib.INITIAL_WEIGHTS_PREFIX)) is None


def test_write_failures_mid_run_are_explained(tmp_path):
  """Real failed writes (/dev/full answers every write with ENOSPC), from Python and TensorFlow."""
  full_file = tmp_path / "events.out"
  full_file.symlink_to("/dev/full")
  with pytest.raises(tf.errors.ResourceExhaustedError) as tf_error:
    tf.io.write_file(str(full_file), "checkpoint bytes")
  with pytest.raises(OSError) as os_error:
    with open(full_file, "w") as f:
      f.write("history")
  # TensorFlow names the file; Python does not, for a write that fails when the file is flushed.
  for error, failure in ((tf_error.value, f"(No space left on device, writing {full_file})"),
                         (os_error.value, "(No space left on device)")):
    explained = faults.explain_write_failure(error, str(tmp_path))
    assert explained is not None, error
    message = str(explained)
    assert failure in message and "free disk space" in message
    assert "re-run the same command to resume" in message
  # Errors that are not failed writes under model_dir pass through untouched.
  assert faults.explain_write_failure(tf_error.value, str(tmp_path / "another_model_dir")) is None
  with pytest.raises(tf.errors.InvalidArgumentError) as decode_error:
    tf.io.decode_image(b"not an image")
  assert faults.explain_write_failure(decode_error.value, str(tmp_path)) is None
  with pytest.raises(tf.errors.InvalidArgumentError):
    with faults.explained_write_failures(str(tmp_path)):
      raise decode_error.value
  with pytest.raises(ValueError, match="No space left on device"):
    with faults.explained_write_failures(str(tmp_path)):
      raise tf_error.value
  # The same failure while `estimator-ft export` writes its version.
  with pytest.raises(ValueError, match=r"Export failed: .*No space left on device.*No partial version"
                                       r".*re-run `estimator-ft export`"):
    with faults.explained_write_failures(str(tmp_path), job="export"):
      raise tf_error.value


# ---------------------------------------------------------------- damaged or deleted checkpoints

NAME = model_dir_lib.ESTIMATOR_CHECKPOINT_NAME
STEPS = (2, 4, 6)


@pytest.fixture
def checkpointed_dir(tmp_path):
  """A model_dir holding checkpoints model.ckpt-2, -4, -6 and its `checkpoint` state file."""
  model_dir = tmp_path / "model"
  weights = tf.Variable(np.arange(1000, dtype=np.float32))
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(weights=weights), str(model_dir),
                                       max_to_keep=len(STEPS), checkpoint_name=NAME)
  for step in STEPS:
    weights.assign_add(tf.ones_like(weights))
    manager.save(checkpoint_number=step)
  return model_dir


def prefix(model_dir, step):
  return str(model_dir / f"{NAME}-{step}")


def data_file(model_dir, step):
  return pathlib.Path(prefix(model_dir, step) + ".data-00000-of-00001")


def truncate(path):
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])


def flip_a_byte(path):
  content = bytearray(path.read_bytes())
  content[len(content) // 2] ^= 0xFF
  path.write_bytes(bytes(content))


def test_intact_latest_checkpoint_is_used_as_it_is(checkpointed_dir, caplog):
  state_before = (checkpointed_dir / "checkpoint").read_text()
  assert faults.recover_checkpoint_state(str(checkpointed_dir), NAME) == prefix(checkpointed_dir, 6)
  assert (checkpointed_dir / "checkpoint").read_text() == state_before
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_relative_model_dir_resumes_its_latest_checkpoint_without_a_word(
    checkpointed_dir, monkeypatch, caplog):
  # `make demo` passes --model_dir=runs/demo: TensorFlow already joins the state file's relative
  # names to that folder, and joining them again named every checkpoint missing.
  monkeypatch.chdir(checkpointed_dir.parent)
  model_dir = checkpointed_dir.name
  state_before = (checkpointed_dir / "checkpoint").read_text()
  assert faults.list_unlisted_checkpoints(model_dir, NAME) == []
  assert faults.recover_checkpoint_state(model_dir, NAME) == os.path.join(model_dir, f"{NAME}-6")
  assert (checkpointed_dir / "checkpoint").read_text() == state_before
  assert not [r for r in caplog.records if r.levelname in ("WARNING", "INFO")]


@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "bit_flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(checkpointed_dir, damage, caplog):
  damage(data_file(checkpointed_dir, 6))
  assert faults.checkpoint_problem(prefix(checkpointed_dir, 6)) is not None
  assert faults.recover_checkpoint_state(str(checkpointed_dir), NAME) == prefix(checkpointed_dir, 4)
  # What TensorFlow (both paths) now restores:
  assert tf.train.latest_checkpoint(str(checkpointed_dir)) == prefix(checkpointed_dir, 4)
  listed = [os.path.basename(p) for p in listed_checkpoints(checkpointed_dir)]
  assert listed == [f"{NAME}-2", f"{NAME}-4"]
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert f"{NAME}-6 is unusable" in warning
  assert f"Resuming from {prefix(checkpointed_dir, 4)}" in warning
  assert f"Delete the damaged files {prefix(checkpointed_dir, 6)}.*" in warning
  restored = checkpoint_values(prefix(checkpointed_dir, 4))["weights/.ATTRIBUTES/VARIABLE_VALUE"]
  np.testing.assert_array_equal(restored, np.arange(1000) + 2)


def test_deleted_latest_checkpoint_is_not_a_silent_restart(checkpointed_dir, caplog):
  for path in checkpointed_dir.glob(f"{NAME}-6.*"):
    path.unlink()
  # Plain TensorFlow would start from scratch here: the state names files that are gone.
  assert tf.train.latest_checkpoint(str(checkpointed_dir)) is None
  assert faults.recover_checkpoint_state(str(checkpointed_dir), NAME) == prefix(checkpointed_dir, 4)
  assert "its files are missing" in caplog.text


@pytest.mark.parametrize("state_damage", ["deleted", "garbage"])
def test_lost_checkpoint_state_file_is_rebuilt_from_the_files(checkpointed_dir, state_damage,
                                                               caplog):
  state = checkpointed_dir / "checkpoint"
  if state_damage == "deleted":
    state.unlink()
  else:
    state.write_text("model_checkpoint_path: \x00\x01 not a text proto {{{")
  assert tf.train.latest_checkpoint(str(checkpointed_dir)) is None
  assert faults.recover_checkpoint_state(str(checkpointed_dir), NAME) == prefix(checkpointed_dir, 6)
  assert tf.train.latest_checkpoint(str(checkpointed_dir)) == prefix(checkpointed_dir, 6)
  assert "checkpoint is " in caplog.text


def test_no_intact_checkpoint_left_is_a_clear_error(checkpointed_dir):
  for step in STEPS:
    truncate(data_file(checkpointed_dir, step))
  with pytest.raises(ValueError) as error:
    faults.recover_checkpoint_state(str(checkpointed_dir), NAME)
  message = str(error.value)
  assert f"{NAME}-6 is unusable" in message and "no intact earlier checkpoint" in message
  assert f"{NAME}-2" in message and f"{NAME}-4" in message
  assert "use a new --model_dir" in message


def test_unfinished_saves_are_cleaned_and_a_fresh_dir_has_nothing_to_resume(tmp_path):
  leftover = tmp_path / f"{NAME}-8_temp"
  leftover.mkdir()
  (leftover / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half a checkpoint")
  (tmp_path / "unrelated_temp").mkdir()
  assert faults.recover_checkpoint_state(str(tmp_path), NAME) is None
  assert not leftover.exists()
  assert (tmp_path / "unrelated_temp").exists()


# ---------------------------------------------------------------- the same faults through the CLI

@pytest.mark.slow
def test_cli_user_errors_for_faults_are_one_line(tiny_dataset, tmp_path, checkpointed_dir):
  """Through the real command: exit 2, one line that says what to do, no traceback."""
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  returncode, output = run_to_end(train_command(tiny_dataset, blocker / "model"),
                                  tmp_path / "unwritable.log")
  assert_one_line_user_error(returncode, output, "is not writable", "a part of that path is a file")

  # A model_dir of this very configuration whose every checkpoint is damaged.
  config = Config(train_dir=str(tiny_dataset / "train"),
                  validation_dir=str(tiny_dataset / "validation"),
                  model_dir=str(checkpointed_dir), image_size=SIZE, batch_size=BATCH, epochs=EPOCHS,
                  weights="none", seed=3)
  model_dir_lib.write_run_config(config, tuple(sorted(os.listdir(tiny_dataset / "train"))))
  for step in STEPS:
    truncate(data_file(checkpointed_dir, step))
  returncode, output = run_to_end(train_command(tiny_dataset, checkpointed_dir),
                                  tmp_path / "damaged.log")
  assert_one_line_user_error(returncode, output, "cannot be resumed", "no intact earlier checkpoint",
                             "use a new --model_dir")

  returncode, output = run_to_end(
      [sys.executable, "-m", "estimator_ft", "export", f"--model_dir={checkpointed_dir}",
       f"--export_dir={blocker / 'exports'}"], tmp_path / "export.log")
  assert_one_line_user_error(returncode, output, "--export_dir=", "is not writable")
