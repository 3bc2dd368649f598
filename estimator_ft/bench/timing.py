"""Timing: step timestamps to rates, spreads, and two training loops taking turns one window each."""

import contextlib
import logging
import statistics
import threading
import time
from typing import Callable, Sequence

import tensorflow as tf

logger = logging.getLogger("estimator_ft")


def spread(values: Sequence[float]) -> dict:
  values = [float(v) for v in values]
  return {"min": min(values), "median": statistics.median(values), "max": max(values),
          "runs": values}


def window_rates(timestamps: Sequence[float], warmup: int, steps: int, repeats: int,
                 items_per_step: int) -> list:
  """Items/s of `repeats` consecutive windows of `steps` steps after `warmup` steps.

  timestamps[i] is when step i finished; a window's time runs from the end of the step before it.
  """
  if warmup < 1:
    raise ValueError("window_rates needs at least one warm-up step: it starts the first window's "
                     "clock when the step before it finished.")
  needed = warmup + steps * repeats
  if len(timestamps) < needed:
    raise RuntimeError(f"only {len(timestamps)} steps were timed, {needed} needed")
  rates = []
  for repeat in range(repeats):
    first = warmup + repeat * steps
    elapsed = timestamps[first + steps - 1] - timestamps[first - 1]
    rates.append(steps * items_per_step / elapsed)
  return rates


class TakeTurns:
  """Two training loops in two threads, running one timing window at a time, in turn.

  Timing the Estimator's windows and then Keras' puts any change in the machine's load between
  the two phases straight into their ratio (on a shared 2-core machine, window rates drift by
  10%). Alternating windows gives each Keras window an Estimator window measured next to it.
  """

  def __init__(self, first: str, second: str):
    self._condition = threading.Condition()
    self._names = (first, second)
    self._turn = first
    self._done = set()
    self._failed = ""

  def wait_for_turn(self, name: str) -> None:
    with self._condition:
      self._condition.wait_for(lambda: self._turn == name or self._failed)
      if self._failed and self._failed != name:
        raise RuntimeError(f"bench: the {self._failed} run failed; stopping the {name} run.")

  def pass_turn(self, name: str, done: bool = False) -> None:
    """After a window of `name`: the other loop runs next, unless it has finished already.

    done: that was `name`'s last window. It then waits until the other loop has finished its
    windows too, so whatever `name` runs next never overlaps the other's last window.
    """
    with self._condition:
      if done:
        self._done.add(name)
      other = self._names[1 - self._names.index(name)]
      self._turn = name if other in self._done else other
      self._condition.notify_all()
      if done:
        self._condition.wait_for(lambda: other in self._done or self._failed)

  def fail(self, name: str) -> None:
    with self._condition:
      self._failed = name
      self._condition.notify_all()


class WindowClock:
  """Times a warm-up window then `repeats` windows of `steps` steps, each taken in turn.

  A window's clock starts when its turn begins and stops when its last step finished, so waiting
  for the other loop is never counted.
  """

  def __init__(self, name: str, turns: TakeTurns, warmup: int, steps: int, repeats: int,
               clock: Callable[[], float] = time.perf_counter):
    self._name, self._turns = name, turns
    self._clock = clock
    self._lengths = [warmup] + [steps] * repeats
    self._window, self._step_in_window = 0, 0
    self._started = 0.0
    self.seconds = []  # per timed window (the warm-up window excluded)

  def before_step(self) -> None:
    if self._window < len(self._lengths) and self._step_in_window == 0:
      self._turns.wait_for_turn(self._name)
      self._started = self._clock()

  def after_step(self) -> None:
    if self._window >= len(self._lengths):
      return
    self._step_in_window += 1
    if self._step_in_window == self._lengths[self._window]:
      if self._window > 0:
        self.seconds.append(self._clock() - self._started)
      self._window, self._step_in_window = self._window + 1, 0
      self._turns.pass_turn(self._name, done=self._window == len(self._lengths))


class StepDurations:
  """How long each training step took, from its start to its end (a StepClockHook or
  StepClockCallback calls it): what a run's own steps cost, measured in that run."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._started = None
    self.seconds = []

  def before_step(self) -> None:
    self._started = self._clock()

  def after_step(self) -> None:
    self.seconds.append(self._clock() - self._started)


class StepClockHook(tf.estimator.SessionRunHook):
  """Calls a clock's before_step / after_step (WindowClock, StepDurations) around each
  Estimator training step."""

  def __init__(self, clock):
    self._clock = clock

  def before_run(self, run_context):
    self._clock.before_step()

  def after_run(self, run_context, run_values):
    self._clock.after_step()


class StepClockCallback(tf.keras.callbacks.Callback):
  """The same around each batch of Keras' fit."""

  def __init__(self, clock):
    super().__init__()
    self._clock = clock

  def on_train_batch_begin(self, batch, logs=None):
    self._clock.before_step()

  def on_train_batch_end(self, batch, logs=None):
    self._clock.after_step()


class StepTimer(tf.estimator.SessionRunHook):
  """Records when each Estimator training step finished."""

  def __init__(self):
    self.timestamps = []

  def after_run(self, run_context, run_values):
    self.timestamps.append(time.perf_counter())


def time_iterations(next_item: Callable[[], object], count: int) -> list:
  """Calls next_item `count` times; returns the finish time of each call."""
  timestamps = []
  for _ in range(count):
    next_item()
    timestamps.append(time.perf_counter())
  return timestamps


class PhaseClock:
  """Wall time and this process's share of the CPUs, per phase of the benchmark.

  A share well below 1 while training means other processes took the cores: the figures of that
  phase then measure the machine's load as much as the code.
  """

  def __init__(self, cores: int):
    self._cores = cores
    self.phases = {}

  @contextlib.contextmanager
  def phase(self, name: str):
    logger.info("bench: %s", name)
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    self.phases[name] = {"wall_s": wall, "cpu_share": cpu / (wall * self._cores) if wall else None}
