"""TF_CONFIG roles, the local launcher's supervision, and a real cluster on 127.0.0.1."""

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from estimator_ft import cluster
from estimator_ft import estimator as estimator_lib
from estimator_ft import model as model_lib
from estimator_ft import model_fn as model_fn_lib
from estimator_ft.config import Config
from estimator_ft.jobs import prepare
from estimator_ft.run import model_dir as model_dir_lib
from estimator_ft.run import events as events_lib

# tiny_dataset: 12 train images per class, 2 classes; batch 8 -> 3 steps in the one epoch.
BATCH = 8
MAX_STEPS = 3
# Generous bounds for a loaded 2-core machine: a test fails instead of hanging.
CLUSTER_TIMEOUT_S = 400
FAILURE_TIMEOUT_S = 120
# Python processes that only sleep or exit: well under these on any machine.
QUICK_TIMEOUT_S = 30
SLEEP_FOREVER_S = 600
CLASSES = ("a", "b")


# ---------------------------------------------------------------- TF_CONFIG


def test_tf_configs_of_a_chief_two_workers_a_ps_and_an_evaluator():
  configs = cluster.make_tf_configs(workers=2, ps=1, evaluator=True, ports=[2001, 2002, 2003, 2004])
  spec = {"chief": ["127.0.0.1:2001"], "worker": ["127.0.0.1:2002", "127.0.0.1:2003"],
          "ps": ["127.0.0.1:2004"]}
  assert configs == {
      "chief": {"cluster": spec, "task": {"type": "chief", "index": 0}},
      "worker:0": {"cluster": spec, "task": {"type": "worker", "index": 0}},
      "worker:1": {"cluster": spec, "task": {"type": "worker", "index": 1}},
      "ps:0": {"cluster": spec, "task": {"type": "ps", "index": 0}},
      # The evaluator only reads checkpoints: it has a task but no address in the cluster.
      "evaluator": {"cluster": spec, "task": {"type": "evaluator", "index": 0}},
  }


def test_keras_cluster_has_no_ps_job():
  configs = cluster.make_tf_configs(workers=1, ps=0, evaluator=False, ports=[3001, 3002])
  assert list(configs) == ["chief", "worker:0"]
  assert configs["chief"]["cluster"] == {"chief": ["127.0.0.1:3001"], "worker": ["127.0.0.1:3002"]}


def test_each_role_reads_back_its_own_task_and_only_the_chief_is_chief():
  configs = cluster.make_tf_configs(workers=2, ps=1, evaluator=True, ports=[1, 2, 3, 4])
  tasks = {name: cluster.current_task({"TF_CONFIG": json.dumps(value)}) for name, value in configs.items()}
  assert {name: task.name for name, task in tasks.items()} == {name: name for name in configs}
  assert [name for name, task in tasks.items() if task.is_chief] == ["chief"]


def test_worker_zero_is_the_chief_of_a_cluster_without_chief():
  spec = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
  first = cluster.parse_tf_config(json.dumps({"cluster": spec, "task": {"type": "worker", "index": 0}}))
  second = cluster.parse_tf_config(json.dumps({"cluster": spec, "task": {"type": "worker", "index": 1}}))
  assert (first.is_chief, second.is_chief) == (True, False)


def test_no_tf_config_or_no_cluster_means_local_training():
  assert cluster.current_task({}) is None
  assert cluster.parse_tf_config("") is None
  assert cluster.parse_tf_config(json.dumps({"task": {"type": "worker", "index": 0}})) is None


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"cluster": {"chief": ["h:1"]}, "task": {"type": "master", "index": 0}}),
     "task type 'master'"),
    (json.dumps({"cluster": {"chief": ["h:1"]}, "task": {"type": "worker", "index": 0}}),
     "no such task"),
    (json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": -1}}),
     "non-negative integer"),
])
def test_bad_tf_config_is_a_clear_error(text, message):
  with pytest.raises(ValueError, match=message):
    cluster.parse_tf_config(text)


def test_free_ports_are_distinct_and_bindable_on_loopback():
  ports = cluster.free_ports(4)
  assert len(set(ports)) == 4
  for port in ports:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
      sock.bind(("127.0.0.1", port))


def _task(task_type, cluster_spec):
  return cluster.Task(type=task_type, index=0, cluster=cluster_spec)


def test_cluster_settings_that_tensorflow_cannot_run_are_refused():
  ps_cluster = {"chief": ["h:1"], "worker": ["h:2"], "ps": ["h:3"]}
  keras_cluster = {"chief": ["h:1"], "worker": ["h:2"]}
  cluster.check_cluster_settings("estimator", "none", _task("worker", ps_cluster))
  cluster.check_cluster_settings("keras", "multi_worker_mirrored", _task("worker", keras_cluster))
  with pytest.raises(ValueError, match="--distribution=none"):
    cluster.check_cluster_settings("estimator", "mirrored", _task("chief", ps_cluster))
  with pytest.raises(ValueError, match="needs --distribution=multi_worker_mirrored"):
    cluster.check_cluster_settings("keras", "none", _task("chief", keras_cluster))
  with pytest.raises(ValueError, match="no parameter servers and no evaluator"):
    cluster.check_cluster_settings("keras", "multi_worker_mirrored", _task("chief", ps_cluster))
  with pytest.raises(ValueError, match="no parameter servers and no evaluator"):
    cluster.check_cluster_settings("keras", "multi_worker_mirrored", _task("evaluator", keras_cluster))


def test_estimator_path_refuses_multi_worker_mirrored_with_what_to_use_instead():
  config = Config(train_dir="t", validation_dir="v", model_dir="m", distribution="multi_worker_mirrored")
  with pytest.raises(ValueError, match="--path=keras --distribution=multi_worker_mirrored"):
    estimator_lib.make_run_config(config, steps_per_epoch=1)


def test_supervise_needs_a_role_that_finishes():
  ps = cluster.RoleProcess("ps:0", [sys.executable, "-c", "pass"], {}, service=True)
  with pytest.raises(ValueError, match="At least one role"):
    cluster.supervise([ps], timeout_s=1)


def test_launch_local_needs_train_flags_and_known_roles():
  with pytest.raises(ValueError, match="after `--`"):
    cluster.launch_local(workers=1, ps=1, evaluator=False, train_args=[], timeout_s=1)
  with pytest.raises(ValueError, match="worker:3"):
    cluster.launch_local(workers=1, ps=1, evaluator=False, train_args=["--model_dir=m"],
                         timeout_s=1, role_args={"worker:3": ["--seed=1"]})


# ---------------------------------------------------------------- waiting for the chief


def test_a_worker_waits_for_the_chiefs_files_and_fails_clearly_when_they_never_come(tmp_path):
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path), image_size=32)
  prefix = str(tmp_path / "initial_weights" / "weights")
  started = time.monotonic()
  with pytest.raises(ValueError, match=r"worker:0 waited 0.3 s for the chief to prepare .* \(no "
                                       r"config.json yet\), in vain\. .* same --model_dir and the "
                                       r"same flags"):
    model_dir_lib.wait_for_chief(config, CLASSES, prefix, "worker:0", timeout_s=0.3, poll_s=0.05)
  assert time.monotonic() - started < QUICK_TIMEOUT_S

  model_dir_lib.write_run_config(config, CLASSES)
  (tmp_path / "initial_weights").mkdir()
  (tmp_path / "initial_weights" / "weights.index").write_bytes(b"")
  # The index alone is a checkpoint half renamed into place: still not ready.
  with pytest.raises(ValueError, match="initial weights .* are not complete yet"):
    model_dir_lib.wait_for_chief(config, CLASSES, prefix, "worker:0", timeout_s=0.2, poll_s=0.05)
  (tmp_path / "initial_weights" / "weights.data-00000-of-00001").write_bytes(b"")
  model_dir_lib.wait_for_chief(config, CLASSES, prefix, "worker:0", timeout_s=0.2, poll_s=0.05)


def test_a_worker_waits_while_the_chief_replaces_a_run_that_never_trained(tmp_path, caplog):
  """The old run's config.json and initial weights are there before the chief sets them aside."""
  config = Config(train_dir="t", validation_dir="v", model_dir=str(tmp_path), image_size=32)
  old = config.replace(learning_rate=config.learning_rate * 10)
  prefix = str(tmp_path / "initial_weights" / "weights")
  model_dir_lib.write_run_config(old, CLASSES)
  (tmp_path / "initial_weights").mkdir()
  for name in ("weights.index", "weights.data-00000-of-00001"):
    (tmp_path / "initial_weights" / name).write_bytes(b"old")
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    with pytest.raises(ValueError, match=r"waited 0.2 s .* \(its config.json is a run that never "
                                         r"trained, with other settings \(learning_rate: "):
      model_dir_lib.wait_for_chief(config, CLASSES, prefix, "worker:0", timeout_s=0.2, poll_s=0.05)
  assert caplog.text.count("worker:0 waits for the chief") == 1  # once per reason
  # The chief sets the old run aside and writes this run's files: the worker goes on.
  assert model_dir_lib.prepare_model_dir(config, CLASSES) is False
  (tmp_path / "initial_weights").mkdir()
  for name in ("weights.index", "weights.data-00000-of-00001"):
    (tmp_path / "initial_weights" / name).write_bytes(b"new")
  model_dir_lib.wait_for_chief(config, CLASSES, prefix, "worker:0", timeout_s=0.2, poll_s=0.05)
  # A different run that trained is refused at once: nobody will replace it.
  (tmp_path / "model.ckpt-5.index").write_bytes(b"x")
  started = time.monotonic()
  with pytest.raises(ValueError, match="holds a run with a different configuration"):
    model_dir_lib.wait_for_chief(old, CLASSES, prefix, "worker:0", timeout_s=QUICK_TIMEOUT_S)
  assert time.monotonic() - started < QUICK_TIMEOUT_S / 2


# ---------------------------------------------------------------- history of an async run


def _write_eval_events(eval_dir, values_by_step):
  writer = tf.compat.v1.summary.FileWriter(str(eval_dir))
  for step, values in values_by_step.items():
    writer.add_summary(tf.compat.v1.Summary(value=[
        tf.compat.v1.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]), step)
  writer.close()


def test_history_takes_the_first_evaluation_after_an_epoch_boundary(tmp_path):
  """Async workers share the global step: the epoch-end checkpoint lands past the boundary."""
  with tf.Graph().as_default():
    _write_eval_events(tmp_path / "eval", {4: {"accuracy": 0.75, "example_loss": 0.5},
                                           7: {"accuracy": 1.0, "example_loss": 0.25}})
  history = estimator_lib.build_history(str(tmp_path), steps_per_epoch=3, epochs=2)
  assert history[0]["val_accuracy"] == 0.75 and history[0]["val_global_step"] == 4
  # The last epoch takes the final checkpoint however far the shared step overshot.
  assert history[1]["val_loss"] == 0.25 and history[1]["val_global_step"] == 7


def test_history_prefers_the_evaluation_at_the_epoch_end(tmp_path):
  with tf.Graph().as_default():
    _write_eval_events(tmp_path / "eval", {3: {"accuracy": 0.5, "example_loss": 0.75},
                                           4: {"accuracy": 1.0, "example_loss": 0.25}})
  [entry] = estimator_lib.build_history(str(tmp_path), steps_per_epoch=3, epochs=1)
  assert entry["val_accuracy"] == 0.5 and "val_global_step" not in entry


def test_epoch_metrics_follow_a_global_step_that_other_workers_advance(tmp_path):
  """The chief of an async cluster sees the shared step jump: every epoch is still recorded."""
  steps_per_epoch = 3
  with tf.Graph().as_default():
    global_step = tf.compat.v1.train.get_or_create_global_step()
    tf.identity(tf.constant(4.0), name=model_fn_lib.BATCH_LOSS_TENSOR)
    tf.identity(tf.constant(6.0), name=model_fn_lib.BATCH_CORRECT_TENSOR)
    tf.identity(tf.constant(8), name=model_fn_lib.BATCH_SIZE_TENSOR)
    new_step = tf.compat.v1.placeholder(tf.int64, [])
    set_step = global_step.assign(new_step)
    own_step = tf.no_op()
    hook = estimator_lib.EpochMetricsHook(str(tmp_path), steps_per_epoch)
    with tf.compat.v1.train.MonitoredSession(hooks=[hook]) as session:

      def other_workers_set_step(value):  # a raw session run: no hook sees it
        session.run_step_fn(
            lambda step_context: step_context.session.run(set_step, {new_step: value}))

      # The shared step before each of this process's steps: 3 (the other workers ended epoch 1
      # before this process's first step), then 5 (its own step and one of another worker's).
      for value in (3, 5):
        other_workers_set_step(value)
        session.run(own_step)
  history = model_dir_lib.read_history(str(tmp_path), model_dir_lib.TRAIN_HISTORY_FILE)
  assert [(h["epoch"], h["step"], h["train_steps_averaged"]) for h in history] == [(1, 4, 1), (2, 6, 1)]
  assert all(h["loss"] == 0.5 and h["accuracy"] == 0.75 for h in history)


# ---------------------------------------------------------------- supervision (no TensorFlow)


def _python(*code_blocks):
  return [sys.executable, "-c", "\n".join(textwrap.dedent(block) for block in code_blocks)]


def _wait_for_file(path):
  return f"""
      import os, time
      while not os.path.exists({str(path)!r}):
        time.sleep(0.05)
  """


def _is_running(pid):
  """Alive and not a zombie (an orphan's zombie lasts until init reaps it)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state != "Z"


def _write_pid(path):
  # Written under a temporary name and renamed, so a reader never sees an empty file.
  return f"""
      import os
      with open({str(path)!r} + ".tmp", "w") as f:
        f.write(str(os.getpid()))
      os.replace({str(path)!r} + ".tmp", {str(path)!r})
  """


def test_parameter_servers_are_stopped_once_the_others_finish(tmp_path):
  ps_pid = tmp_path / "ps_pid"
  roles = [
      cluster.RoleProcess("chief", _python(_wait_for_file(ps_pid), "print('trained')"), {}),
      cluster.RoleProcess("ps:0", _python(_write_pid(ps_pid), f"""
          import time
          print("serving", flush=True)
          time.sleep({SLEEP_FOREVER_S})
      """), {}, service=True),
  ]
  out = io.StringIO()
  started = time.monotonic()
  assert cluster.supervise(roles, timeout_s=QUICK_TIMEOUT_S, out=out) == cluster.EXIT_OK
  assert time.monotonic() - started < QUICK_TIMEOUT_S
  assert not _is_running(int(ps_pid.read_text()))
  log = out.getvalue()
  assert "[chief] trained" in log and "[ps:0] serving" in log
  assert "chief finished; stopping the parameter servers." in log


def test_a_failing_role_stops_the_others_and_is_named_with_its_exit_code(tmp_path):
  chief_pid = tmp_path / "chief_pid"
  roles = [
      cluster.RoleProcess("chief", _python(_write_pid(chief_pid),
                                           f"import time; time.sleep({SLEEP_FOREVER_S})"), {}),
      cluster.RoleProcess("worker:0", _python(_wait_for_file(chief_pid),
                                              "import sys; print('bad flag'); sys.exit(3)"), {}),
  ]
  out = io.StringIO()
  started = time.monotonic()
  assert cluster.supervise(roles, timeout_s=SLEEP_FOREVER_S, out=out) == cluster.EXIT_ROLE_FAILED
  assert time.monotonic() - started < QUICK_TIMEOUT_S
  assert not _is_running(int(chief_pid.read_text())), "the launcher must stop the other roles"
  assert "[worker:0] bad flag" in out.getvalue()
  assert "worker:0 failed with exit code 3" in out.getvalue()


def test_a_role_killed_by_a_signal_is_reported_as_such():
  roles = [cluster.RoleProcess("worker:0", _python(
      "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), {})]
  out = io.StringIO()
  assert cluster.supervise(roles, timeout_s=QUICK_TIMEOUT_S, out=out) == cluster.EXIT_ROLE_FAILED
  kill = int(signal.SIGKILL)
  assert f"worker:0 failed with exit code -{kill} (killed by signal {kill})" in out.getvalue()


def test_a_parameter_server_that_exits_early_is_a_failure():
  roles = [cluster.RoleProcess("chief", _python(f"import time; time.sleep({SLEEP_FOREVER_S})"), {}),
           cluster.RoleProcess("ps:0", _python("pass"), {}, service=True)]
  out = io.StringIO()
  assert cluster.supervise(roles, timeout_s=QUICK_TIMEOUT_S, out=out) == cluster.EXIT_ROLE_FAILED
  assert "ps:0 exited with code 0 before training finished" in out.getvalue()


def test_the_global_timeout_stops_everything_with_a_message():
  roles = [cluster.RoleProcess("chief", _python(f"import time; time.sleep({SLEEP_FOREVER_S})"), {})]
  out = io.StringIO()
  started = time.monotonic()
  assert cluster.supervise(roles, timeout_s=0.5, out=out) == cluster.EXIT_TIMEOUT
  assert time.monotonic() - started < QUICK_TIMEOUT_S
  assert "timed out after 0.5 s with chief still running" in out.getvalue()


def test_a_role_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
  ready = tmp_path / "ignoring"
  roles = [
      cluster.RoleProcess("chief", _python(f"""
          import signal, time
          signal.signal(signal.SIGTERM, signal.SIG_IGN)
          open({str(ready)!r}, "w").close()
          time.sleep({SLEEP_FOREVER_S})
      """), {}),
      cluster.RoleProcess("worker:0", _python(_wait_for_file(ready), "raise SystemExit(1)"), {}),
  ]
  out = io.StringIO()
  started = time.monotonic()
  code = cluster.supervise(roles, timeout_s=QUICK_TIMEOUT_S, out=out, grace_s=0.5)
  assert code == cluster.EXIT_ROLE_FAILED
  assert time.monotonic() - started < QUICK_TIMEOUT_S
  assert "chief ignored SIGTERM for 0.5 s; killing it." in out.getvalue()


def test_roles_end_when_the_launcher_is_killed(tmp_path):
  pid_files = [tmp_path / "chief_pid", tmp_path / "ps_pid"]
  sleep = f"import time; time.sleep({SLEEP_FOREVER_S})"
  launcher = f"""
      from estimator_ft import cluster
      cluster.supervise([
          cluster.RoleProcess("chief", {_python(_write_pid(pid_files[0]), sleep)!r}, {{}}),
          cluster.RoleProcess("ps:0", {_python(_write_pid(pid_files[1]), sleep)!r}, {{}}, service=True),
      ], timeout_s={SLEEP_FOREVER_S})
  """
  process = subprocess.Popen(_python(launcher), stdout=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + QUICK_TIMEOUT_S
    while not all(f.exists() for f in pid_files) and time.monotonic() < deadline:
      time.sleep(0.05)
  finally:
    process.kill()
    process.wait()
  pids = [int(f.read_text()) for f in pid_files]
  deadline = time.monotonic() + QUICK_TIMEOUT_S
  while any(_is_running(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  survivors = [pid for pid in pids if _is_running(pid)]
  for pid in survivors:
    os.kill(pid, signal.SIGKILL)
  assert not survivors, "no role may outlive a launcher killed by SIGKILL"


def test_each_role_gets_its_own_environment():
  roles = [cluster.RoleProcess(name, _python("import os; print(os.environ['TF_CONFIG'])"),
                               {"TF_CONFIG": name}) for name in ("chief", "worker:0")]
  out = io.StringIO()
  assert cluster.supervise(roles, timeout_s=QUICK_TIMEOUT_S, out=out) == cluster.EXIT_OK
  assert "[chief] chief" in out.getvalue() and "[worker:0] worker:0" in out.getvalue()


# ---------------------------------------------------------------- a real cluster


def _train_flags(dataset, model_dir):
  return [f"--train_dir={dataset / 'train'}", f"--validation_dir={dataset / 'validation'}",
          f"--model_dir={model_dir}", "--image_size=32", f"--batch_size={BATCH}", "--epochs=1",
          "--weights=none"]


def _moving_statistics_changed(model_dir):
  """Fraction of BN moving means/variances in the latest checkpoint that left their start."""
  record = model_dir_lib.read_run_config(str(model_dir))
  config = Config.from_dict(record["config"])
  trained = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
  initial = tf.train.load_checkpoint(os.path.join(str(model_dir), model_dir_lib.INITIAL_WEIGHTS_PREFIX))
  with tf.Graph().as_default():
    names = [w.name.split(":")[0] for w in
             model_lib.build_model(config, len(record["class_names"])).weights]
  moved = [np.abs(trained.get_tensor(name) - initial.get_tensor(f"initial_weights/w{i:04d}")).max() > 0
           for i, name in enumerate(names) if "moving_" in name]
  return len(moved), float(np.mean(moved))


@pytest.mark.slow
def test_local_cluster_trains_checkpoints_and_evaluates(tiny_dataset, tmp_path):
  # From sharded records (what a real cluster reads), so the same run shows each trainer reading
  # shards of its own; the failure test below reads folders.
  records_dir = tmp_path / "records"
  prepare.run_prepare(str(tiny_dataset / "train"), str(tiny_dataset / "validation"),
                      str(records_dir), num_shards=4)
  model_dir = tmp_path / "model"
  train_args = [f"--records_dir={records_dir}"] + _train_flags(tiny_dataset, model_dir)[2:]
  out = io.StringIO()
  code = cluster.launch_local(
      workers=1, ps=1, evaluator=True, train_args=train_args,
      timeout_s=CLUSTER_TIMEOUT_S,
      # TensorFlow's own INFO lines include the evaluator's "Saving dict for global step N".
      role_args={"evaluator": ["--verbosity=1"]}, out=out)
  log = out.getvalue()
  assert code == cluster.EXIT_OK, log[-6000:]
  for role in ("chief", "worker:0", "evaluator"):
    assert f"[{role}] Done:" in log
  assert "stopping the parameter servers" in log
  # Each trainer names the shards it reads: disjoint, together all four, chief != worker 0.
  read = {role: set(re.search(rf"\[{role}\] .* reads 2 of the 4 training shards \(12 of 24 "
                              r"examples\): (.*)", log).group(1).strip().split(", "))
          for role in ("chief", "worker:0")}
  assert read["chief"] == {"train-00000-of-00004.tfrecord", "train-00002-of-00004.tfrecord"}
  assert read["worker:0"] == {"train-00001-of-00004.tfrecord", "train-00003-of-00004.tfrecord"}
  assert "[evaluator]" not in "".join(l for l in log.splitlines() if "training shards" in l)

  # Chief and worker update one shared global step asynchronously. Each stops once it sees
  # max_steps, so steps already in flight (and a step started on a stale read of the global step)
  # land too: a step or two past max_steps, never another epoch.
  step = int(tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir))).get_tensor("global_step"))
  assert MAX_STEPS <= step < 2 * MAX_STEPS
  count, moved = _moving_statistics_changed(model_dir)
  assert count == 106 and moved > 0.9, "BN moving statistics must be trained through the ps"

  # The evaluator exits after evaluating the first checkpoint at or past max_steps (the chief
  # may write one more, at the step the worker's last update reached).
  evaluated = [int(s) for s in re.findall(r"\[evaluator\] .*Saving dict for global step (\d+)", log)]
  assert evaluated and MAX_STEPS <= max(evaluated) <= step
  metrics = events_lib.scalars_by_step(str(model_dir / "eval"))[max(evaluated)]
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["example_loss"])

  results = json.loads((model_dir / model_dir_lib.RESULTS_FILE).read_text())
  assert results["global_step"] == step
  [epoch] = results["history"]
  assert np.isfinite(epoch["loss"]) and np.isfinite(epoch["val_loss"])


@pytest.mark.slow
def test_a_dying_worker_fails_the_launch_with_a_clear_message(tiny_dataset, tmp_path):
  model_dir = tmp_path / "model"
  out = io.StringIO()
  started = time.monotonic()
  code = cluster.launch_local(
      workers=1, ps=1, evaluator=False, train_args=_train_flags(tiny_dataset, model_dir),
      timeout_s=FAILURE_TIMEOUT_S,
      role_args={"worker:0": [f"--train_dir={tmp_path / 'missing'}"]}, out=out)
  log = out.getvalue()
  assert code == cluster.EXIT_ROLE_FAILED, log[-6000:]
  assert "worker:0 failed with exit code 2" in log
  assert "timed out" not in log and time.monotonic() - started < FAILURE_TIMEOUT_S
