"""Ctrl-C and SIGTERM as one clean stop (standard library only).

While `stop_on_signals()` is active, SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler or
`kill` sends before SIGKILL) raise `Interrupted` in the main thread, where training runs: the run
unwinds like any exception - its run lock released, half-written files never published (every
file goes through files.atomic_write; checkpoints through TensorFlow's own temporary files) - and
the train job adds where it stopped. The CLI prints that one line and exits 128 + the signal's
number, the shell's convention: 130 for SIGINT, 143 for SIGTERM, so a scheduler still sees a
terminated job. A second signal while the first one unwinds ends the process at once, and so
does a watchdog if the main thread has not noticed the first one a minute later.

Python runs the handler wherever the main thread is, and drops an exception raised inside a
finalizer (`__del__`, a weakref callback - graph construction runs many) with an "Exception
ignored" line: that Interrupted never reaches the job. So the signal is also recorded, training
and evaluation steps call `raise_if_received()`, and a block that ends normally after one raises
it then: a stop asked for is never lost.
"""

import contextlib
import os
import signal
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the main thread may take to notice a signal before the process is ended anyway.
FORCE_EXIT_AFTER_S = 60
# The signals the active stop_on_signals block has received (process-wide, as handlers are).
_received = []


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
def stop_on_signals(enabled: bool = True, force_exit_after_s: float = FORCE_EXIT_AFTER_S):
  """SIGINT and SIGTERM raise Interrupted inside the block (main thread only; a signal the
  process was started ignoring, e.g. SIGINT of a background job, stays ignored).

  Python runs a signal handler only between bytecodes of the main thread, so while the main
  thread waits inside one long C++ call (a training step, a collective op whose peer died) the
  Interrupted waits too. A watchdog thread hears the signal at once (signal.set_wakeup_fd) and
  ends the process, with a line saying so, if it is still running `force_exit_after_s` later.
  A process that waits inside C++ for good (a parameter server's server.join()) keeps the
  default actions: enabled=False.
  """
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield
    return
  _received.clear()

  def handler(signum, frame):
    del frame
    if _received:  # the first one is still unwinding: stop now
      os._exit(128 + signum)
    _received.append(signum)
    raise Interrupted(signum)

  previous = {}
  for number in SIGNALS:
    if signal.getsignal(number) is not signal.SIG_IGN:
      previous[number] = signal.signal(number, handler)
  reader, writer = os.pipe()
  os.set_blocking(writer, False)
  previous_wakeup = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
  watchdog = threading.Thread(target=_watch, args=(reader, set(previous), force_exit_after_s),
                              name="estimator_ft-signal-watchdog", daemon=True)
  watchdog.start()
  try:
    yield
  finally:
    signal.set_wakeup_fd(previous_wakeup)
    for number, old in previous.items():
      signal.signal(number, old)
    os.close(writer)  # the watchdog's read ends (EOF) and it closes the reader
    received, _received[:] = list(_received), []
  if received:  # the block's work ended, but its Interrupted was dropped on the way
    interrupted = Interrupted(received[0])
    interrupted.detail = (f"interrupted ({interrupted.signal_name}) as the job was ending; "
                          "it had finished its work")
    raise interrupted


def raise_if_received() -> None:
  """Raises Interrupted if the active block has received a signal (in the main thread only).

  Called before each training and evaluation step: normally the handler's own Interrupted is
  already unwinding the run and this never sees it; when Python dropped that one, this delivers
  the stop at the next step.
  """
  if _received and threading.current_thread() is threading.main_thread():
    raise Interrupted(_received[0])


def _watch(reader: int, numbers, force_exit_after_s: float) -> None:
  """Waits for one of `numbers` on the wakeup pipe; then gives the main thread its grace."""
  try:
    while True:
      data = os.read(reader, 64)
      if not data:
        return  # the block ended
      received = [n for n in data if n in numbers]
      if received:
        break
    time.sleep(force_exit_after_s)
    name = signal.Signals(received[0]).name
    os.write(2, (f"estimator-ft: interrupted ({name}); still running {force_exit_after_s:g} s "
                 "later (inside a long TensorFlow call), so stopped now. Checkpoints are written "
                 "atomically: re-run the same command to resume.\n").encode())
    os._exit(128 + received[0])
  except OSError:
    return
  finally:
    try:
      os.close(reader)
    except OSError:
      pass
