"""Multi-worker training on TensorFlow's own distributed runtime, driven by `TF_CONFIG`.

Every process of a cluster runs the same `estimator-ft train ...` command; only its `TF_CONFIG`
environment variable differs. That is the contract Kubeflow TFJob, Vertex AI custom training and
similar schedulers implement, so this module does not run training itself. It does two things:

* reads this process's role from `TF_CONFIG` (`current_task`), so the training job knows whether
  it is the chief (owns model_dir: config.json, initial weights, results.json), a worker, a
  parameter server or the evaluator;
* `launch_local` starts such a cluster on one machine: one subprocess per role on 127.0.0.1 with
  free ports, their output streamed line by line with a role prefix, and every role stopped as
  soon as one fails or a global timeout passes.

`TF_CONFIG` of worker 0 in a cluster of a chief, two workers and one parameter server:

  {"cluster": {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"],
               "ps": ["host3:2222"]},
   "task": {"type": "worker", "index": 0}}

The evaluator is not part of the cluster spec (it only reads checkpoints); its task is
{"type": "evaluator", "index": 0} with the same "cluster".

TensorFlow is not imported here: the launcher only starts processes.
"""

import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence, TextIO

TF_CONFIG_ENV = "TF_CONFIG"
LOOPBACK_HOST = "127.0.0.1"

CHIEF = "chief"
WORKER = "worker"
PS = "ps"
EVALUATOR = "evaluator"
TASK_TYPES = (CHIEF, WORKER, PS, EVALUATOR)

# Exit codes of `launch_local` (a role's own code is named in the log, not passed through, so
# that a role killed by a signal - negative returncode - still gives a valid exit status).
EXIT_OK = 0
EXIT_ROLE_FAILED = 1
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_INTERRUPTED = 130  # as a shell reports Ctrl-C

# Seconds a role gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0
# How often the launcher looks at its processes; short, since it only polls return codes.
POLL_INTERVAL_S = 0.2
LAUNCHER_PREFIX = "[launch-local]"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# ---------------------------------------------------------------- TF_CONFIG


@dataclasses.dataclass(frozen=True)
class Task:
  """This process's place in a cluster, as `TF_CONFIG` gives it."""

  type: str
  index: int
  cluster: Mapping[str, Sequence[str]]

  @property
  def name(self) -> str:
    """`chief`, `evaluator`, or `worker:0`, `ps:1`... (the launcher's log prefix)."""
    return role_name(self.type, self.index)

  @property
  def is_chief(self) -> bool:
    """TensorFlow's rule: the chief task, or worker 0 of a cluster that has no chief."""
    if self.type == CHIEF:
      return True
    return self.type == WORKER and self.index == 0 and CHIEF not in self.cluster


def role_name(task_type: str, index: int) -> str:
  return task_type if task_type in (CHIEF, EVALUATOR) else f"{task_type}:{index}"


def parse_tf_config(text: str) -> Optional[Task]:
  """The task described by a `TF_CONFIG` value; None when it describes no cluster.

  As in `tf.estimator.RunConfig`, a TF_CONFIG without a "cluster" means local training.
  """
  if not text.strip():
    return None
  try:
    value = json.loads(text)
  except ValueError as e:
    raise ValueError(f"{TF_CONFIG_ENV} is not valid JSON ({e}). It must look like "
                     '{"cluster": {"chief": ["host:port"], ...}, "task": {"type": "chief", '
                     '"index": 0}}; unset it to train on this machine alone.') from e
  cluster = value.get("cluster") if isinstance(value, dict) else None
  if not cluster:
    return None
  task = value.get("task") or {}
  task_type = task.get("type")
  if task_type not in TASK_TYPES:
    raise ValueError(f"{TF_CONFIG_ENV} task type {task_type!r} is not one of "
                     f"{', '.join(TASK_TYPES)}: set task.type to this process's role.")
  index = task.get("index", 0)
  if not isinstance(index, int) or index < 0:
    raise ValueError(f"{TF_CONFIG_ENV} task index {index!r} must be a non-negative integer.")
  if task_type != EVALUATOR and index >= len(cluster.get(task_type, ())):
    raise ValueError(f"{TF_CONFIG_ENV} names task {role_name(task_type, index)}, but its cluster "
                     f"has no such task ({json.dumps(cluster)}).")
  return Task(type=task_type, index=index, cluster={k: tuple(v) for k, v in cluster.items()})


def current_task(environ: Optional[Mapping[str, str]] = None) -> Optional[Task]:
  """This process's task from the `TF_CONFIG` environment variable; None outside a cluster."""
  environ = os.environ if environ is None else environ
  return parse_tf_config(environ.get(TF_CONFIG_ENV, ""))


def trainers(cluster: Mapping[str, Sequence[str]]) -> int:
  """How many tasks of `cluster` train: its chief and its workers (not ps, not the evaluator)."""
  return len(cluster.get(CHIEF, ())) + len(cluster.get(WORKER, ()))


def trainer_index(task: Task) -> Optional[int]:
  """This trainer's place among the trainers, as tf.estimator's global_id_in_cluster numbers them:
  the chief 0, worker i 1 + i (worker i itself when the cluster has no chief); None for a
  parameter server or the evaluator, which train on nothing."""
  if task.type == CHIEF:
    return 0
  if task.type == WORKER:
    return task.index + len(task.cluster.get(CHIEF, ()))
  return None


def trainer_shards(shard_files: Sequence[str], task: Optional[Task]) -> List[str]:
  """The training shards this task reads: trainer k of n reads shards k, k + n, k + 2n, ...

  Disjoint between trainers, their union every shard, the chief and worker 0 distinct (a
  per-worker index that forgot the chief would give them the same shards: tensorflow#23294).
  Outside a cluster, and for the evaluator and parameter servers, every shard. Fewer shards than
  trainers is refused: some trainer would read nothing, or two the same.
  """
  files = list(shard_files)
  index = trainer_index(task) if task is not None else None
  if index is None:
    return files
  count = trainers(task.cluster)
  check_enough_shards(len(files), task.cluster)
  return files[index::count]


def check_enough_shards(num_shards: int, cluster: Mapping[str, Sequence[str]]) -> None:
  """Refuses a training set of fewer shards than the cluster has trainers (see trainer_shards)."""
  count = trainers(cluster)
  if num_shards < count:
    raise ValueError(
        f"The training data has {num_shards} shard(s) but this cluster has {count} trainers "
        "(chief and workers), and each trainer reads shards of its own: prepare the records again "
        f"with --num_shards={count} or more (a multiple of {count} balances them), or use fewer "
        "workers.")


def check_cluster_settings(path: str, distribution: str, task: Task) -> None:
  """Refuses a training path / strategy / cluster combination that TensorFlow 2.15 cannot run.

  Estimator path: asynchronous training with parameter servers, the default strategy (TF itself
  rejects MirroredStrategy with a cluster; see estimator.make_run_config for multi-worker mirrored).
  Keras path: synchronous MultiWorkerMirroredStrategy over the chief and workers.
  """
  where = f"In a TF_CONFIG cluster (this process is {task.name})"
  if path == "estimator" and distribution != "none":
    raise ValueError(
        f"{where} the Estimator path trains with parameter servers and --distribution=none, not "
        f"--distribution={distribution}. Use --distribution=none, or --path=keras "
        "--distribution=multi_worker_mirrored for synchronous multi-worker training.")
  if path == "keras":
    if distribution != "multi_worker_mirrored":
      raise ValueError(
          f"{where} the Keras path needs --distribution=multi_worker_mirrored; with "
          f"--distribution={distribution} every worker would train a model of its own.")
    if PS in task.cluster or task.type in (PS, EVALUATOR):
      raise ValueError(
          f"{where} the Keras path trains synchronously over the chief and workers and validates "
          "in `fit`: its cluster has no parameter servers and no evaluator (launch-local --ps=0 "
          "--noevaluator).")


def cluster_spec(workers: int, ps: int, ports: Sequence[int]) -> dict:
  """{"chief": [...], "worker": [...], "ps": [...]} on 127.0.0.1, one port each (chief first)."""
  _check_counts(workers, ps)
  needed = 1 + workers + ps
  if len(ports) != needed:
    raise ValueError(f"A chief, {workers} workers and {ps} ps need {needed} ports, got {len(ports)}.")
  addresses = [f"{LOOPBACK_HOST}:{port}" for port in ports]
  spec = {CHIEF: addresses[:1]}
  if workers:
    spec[WORKER] = addresses[1:1 + workers]
  if ps:
    spec[PS] = addresses[1 + workers:]
  return spec


def make_tf_configs(workers: int, ps: int, evaluator: bool, ports: Sequence[int]) -> Dict[str, dict]:
  """{role name: TF_CONFIG dict} for every role, chief first, evaluator last."""
  spec = cluster_spec(workers, ps, ports)
  configs = {}
  tasks = [(CHIEF, 0)] + [(WORKER, i) for i in range(workers)] + [(PS, i) for i in range(ps)]
  if evaluator:
    tasks.append((EVALUATOR, 0))
  for task_type, index in tasks:
    configs[role_name(task_type, index)] = {"cluster": spec, "task": {"type": task_type, "index": index}}
  return configs


def free_ports(count: int) -> List[int]:
  """Ports the kernel reports free on 127.0.0.1 (all held open together, so they are distinct).

  They are released before the roles bind them: another program could take one in between, and
  the role that needed it then fails (the launcher reports it) rather than anything hanging.
  """
  sockets = []
  try:
    for _ in range(count):
      sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      sock.bind((LOOPBACK_HOST, 0))
      sockets.append(sock)
    return [sock.getsockname()[1] for sock in sockets]
  finally:
    for sock in sockets:
      sock.close()


def _check_counts(workers: int, ps: int) -> None:
  if workers < 0 or ps < 0:
    raise ValueError(f"--workers={workers} and --ps={ps} must be 0 or more.")


# ---------------------------------------------------------------- running processes


@dataclasses.dataclass(frozen=True)
class RoleProcess:
  """One process to supervise: its log prefix, command line and environment additions.

  A `service` (a parameter server) never exits by itself: it is stopped once every other role
  has finished, and its exiting earlier is a failure.
  """

  role: str
  argv: Sequence[str]
  env: Mapping[str, str]
  service: bool = False


class _Supervisor:
  """Starts processes, prefixes their output, and stops all of them when one fails."""

  def __init__(self, roles: Sequence[RoleProcess], out: TextIO, grace_s: float):
    self._roles = list(roles)
    self._out = out
    self._grace_s = grace_s
    self._print_lock = threading.Lock()
    self._processes: Dict[str, subprocess.Popen] = {}
    self._readers: List[threading.Thread] = []

  def say(self, message: str) -> None:
    self._print(f"{LAUNCHER_PREFIX} {message}")

  def _print(self, line: str) -> None:
    with self._print_lock:
      self._out.write(line + "\n")
      self._out.flush()

  def start(self) -> None:
    # Every process first, then the reader threads: preexec_fn is only safe without threads.
    for role in self._roles:
      env = dict(os.environ)
      env.update(role.env)
      # Line-buffered children, so their lines arrive as they are written, not at exit.
      env["PYTHONUNBUFFERED"] = "1"
      self._processes[role.role] = subprocess.Popen(
          list(role.argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
          # Own process group: a Ctrl-C in the terminal reaches the launcher only, which then
          # stops the roles in order instead of all of them dying at once mid-write.
          start_new_session=True, preexec_fn=_end_with_launcher)
    for role in self._roles:
      process = self._processes[role.role]
      reader = threading.Thread(target=self._stream, args=(role.role, process), daemon=True)
      reader.start()
      self._readers.append(reader)
      self.say(f"started {role.role} (pid {process.pid})")

  def _stream(self, role: str, process: subprocess.Popen) -> None:
    for line in process.stdout:
      self._print(f"[{role}] {line.rstrip()}")

  def wait(self, timeout_s: float) -> int:
    """Runs until every non-service role exited 0 (then stops the services), one fails, or timeout."""
    deadline = time.monotonic() + timeout_s
    finishing = [r.role for r in self._roles if not r.service]
    while True:
      for role in self._roles:
        code = self._processes[role.role].poll()
        if code is None:
          continue
        if role.service:
          self.say(f"{role.role} exited with code {code} before training finished; stopping "
                   "the other roles.")
          return EXIT_ROLE_FAILED
        if code != 0:
          self.say(f"{role.role} failed with exit code {code} ({_describe_exit(code)}); "
                   f"stopping the other roles. Its log lines above are prefixed [{role.role}].")
          return EXIT_ROLE_FAILED
      if all(self._processes[name].poll() == 0 for name in finishing):
        self.say(f"{', '.join(finishing)} finished; stopping the parameter servers."
                 if len(finishing) < len(self._roles) else f"{', '.join(finishing)} finished.")
        return EXIT_OK
      if time.monotonic() > deadline:
        running = [name for name, p in self._processes.items() if p.poll() is None]
        self.say(f"timed out after {timeout_s:g} s with {', '.join(running)} still running; "
                 "stopping every role. Raise --timeout_s if the run needs longer.")
        return EXIT_TIMEOUT
      time.sleep(POLL_INTERVAL_S)

  def stop_all(self) -> None:
    """SIGTERM to every live role, SIGKILL to those still alive after the grace period."""
    live = {name: p for name, p in self._processes.items() if p.poll() is None}
    for process in live.values():
      process.terminate()
    deadline = time.monotonic() + self._grace_s
    for name, process in live.items():
      try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.say(f"{name} ignored SIGTERM for {self._grace_s:g} s; killing it.")
        process.kill()
        process.wait()
    for reader in self._readers:
      # The pipes close when the processes are gone; this only drains the last lines.
      reader.join(timeout=self._grace_s)


def _end_with_launcher() -> None:
  """Runs in each child before exec: on Linux the kernel then sends it SIGTERM when the launcher
  dies, even by SIGKILL, so no parameter server (which never exits by itself) is left behind."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _describe_exit(code: int) -> str:
  if code < 0:
    return f"killed by signal {-code}"
  if code == 2:
    return "a user error: see its message"
  return "see its log"


def supervise(roles: Sequence[RoleProcess], timeout_s: float, out: TextIO = None,
              grace_s: float = STOP_GRACE_S) -> int:
  """Runs `roles` as subprocesses until done; returns EXIT_OK, EXIT_ROLE_FAILED or EXIT_TIMEOUT.

  Every role is stopped before this returns, whatever happened (including Ctrl-C).
  """
  if timeout_s <= 0:
    raise ValueError(f"--timeout_s={timeout_s} must be positive.")
  names = [r.role for r in roles]
  if len(set(names)) != len(names):
    raise ValueError(f"Role names must be unique, got {names}.")
  if all(r.service for r in roles):
    raise ValueError("At least one role must be a trainer (not a service): services never finish.")
  supervisor = _Supervisor(roles, out or sys.stdout, grace_s)
  try:
    supervisor.start()
    return supervisor.wait(timeout_s)
  except KeyboardInterrupt:
    supervisor.say("interrupted; stopping every role.")
    raise
  finally:
    supervisor.stop_all()


def train_command(train_args: Sequence[str]) -> List[str]:
  """The command every role runs: the same `estimator-ft train` of this Python."""
  return [sys.executable, "-m", "estimator_ft", "train", *train_args]


def launch_local(workers: int, ps: int, evaluator: bool, train_args: Sequence[str],
                 timeout_s: float, role_args: Optional[Mapping[str, Sequence[str]]] = None,
                 out: TextIO = None) -> int:
  """Runs a TF_CONFIG cluster of `estimator-ft train <train_args>` processes on 127.0.0.1.

  One chief, `workers` workers, `ps` parameter servers and optionally an evaluator, each with its
  own TF_CONFIG and a free port. `role_args` adds flags for single roles, e.g.
  {"worker:0": ["--verbosity=1"]}. Returns 0 when chief, workers and evaluator all exit 0 (the
  parameter servers, which never exit by themselves, are then stopped); non-zero when a role
  fails (every other role is stopped), `timeout_s` passes or Ctrl-C stops the launcher.
  """
  _check_counts(workers, ps)
  if not train_args:
    raise ValueError("Give the train flags after `--`, e.g. estimator-ft launch-local --workers=1 "
                     "--ps=1 -- --train_dir=D/train --validation_dir=D/validation --model_dir=M")
  role_args = dict(role_args or {})
  configs = make_tf_configs(workers, ps, evaluator, free_ports(1 + workers + ps))
  unknown = sorted(set(role_args) - set(configs))
  if unknown:
    raise ValueError(f"role_args names {unknown}, which this cluster does not have "
                     f"(roles: {', '.join(configs)}).")
  roles = [
      RoleProcess(role=name, argv=train_command(list(train_args) + list(role_args.get(name, ()))),
                  env={TF_CONFIG_ENV: json.dumps(tf_config)},
                  service=tf_config["task"]["type"] == PS)
      for name, tf_config in configs.items()]
  out = out or sys.stdout
  spec = next(iter(configs.values()))["cluster"]
  print(f"{LAUNCHER_PREFIX} cluster {json.dumps(spec)}"
        f"{' + evaluator' if evaluator else ''}; timeout {timeout_s:g} s", file=out, flush=True)
  try:
    return supervise(roles, timeout_s, out)
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
