"""Ctrl-C and SIGTERM as one clean stop (standard library only).

While `stop_on_signals()` is active, SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler or
`kill` sends before SIGKILL) raise `Interrupted` in the main thread, where training runs: the run
unwinds like any exception - its run lock released, half-written files never published (every
file goes through files.atomic_write; checkpoints through TensorFlow's own temporary files) - and
the train job adds where it stopped. The CLI prints that one line and exits 128 + the signal's
number, the shell's convention: 130 for SIGINT, 143 for SIGTERM, so a scheduler still sees a
terminated job. A second signal while the first one unwinds ends the process at once.
"""

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """The run was stopped by a signal. `detail` says where (set by the job that was running)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.detail = ""

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT and SIGTERM raise Interrupted inside the block (main thread only; a signal the
  process was started ignoring, e.g. SIGINT of a background job, stays ignored)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  fired = []

  def handler(signum, frame):
    del frame
    if fired:  # the first one is still unwinding: stop now
      os._exit(128 + signum)
    fired.append(signum)
    raise Interrupted(signum)

  previous = {}
  for number in SIGNALS:
    if signal.getsignal(number) is not signal.SIG_IGN:
      previous[number] = signal.signal(number, handler)
  try:
    yield
  finally:
    for number, old in previous.items():
      signal.signal(number, old)
