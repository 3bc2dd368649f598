"""The progress line both training paths log, and the duration format (standard library only).

The Estimator's ProgressHook and the Keras path's progress callback measure their own windows of
steps and hand them here, so the two paths print the same line.
"""

import math
from typing import Optional

# The last training step either path's progress hook saw, for the message of an interrupted run.
_last_step = {"step": None}


def record_step(step: Optional[int]) -> None:
  """Called by the progress hooks after each training step (None: a new run begins)."""
  _last_step["step"] = step


def recorded_step() -> Optional[int]:
  return _last_step["step"]


def format_seconds(seconds: float) -> str:
  """H:MM:SS, or "?" when there is no estimate (yet)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def steps_per_second(steps: int, elapsed_s: float) -> Optional[float]:
  """The rate of a timed window of steps; None when the window says nothing (no steps, no time)."""
  if steps <= 0 or not elapsed_s or elapsed_s <= 0 or not math.isfinite(elapsed_s):
    return None
  return steps / elapsed_s


class PauseTimer:
  """The mean length of the pauses training makes at each evaluation (checkpoint, validation
  pass, exports), so the ETA can count the ones still ahead, not only the steps."""

  def __init__(self):
    self._total = 0.0
    self._count = 0

  def add(self, seconds: float) -> None:
    if seconds is not None and math.isfinite(seconds) and seconds > 0:
      self._total += seconds
      self._count += 1

  @property
  def mean(self) -> Optional[float]:
    return self._total / self._count if self._count else None


def pauses_left(step: int, max_steps: int, steps_between_pauses: int) -> int:
  """Evaluations still ahead of `step` when one follows every `steps_between_pauses` steps and
  the last step."""
  if step >= max_steps or steps_between_pauses < 1:
    return 0
  return math.ceil(max_steps / steps_between_pauses) - step // steps_between_pauses


def progress_line(epoch: int, step: int, max_steps: int, rate: Optional[float], batch_size: int,
                  loss: float, loss_note: str = "", pause_s: Optional[float] = None,
                  pauses_ahead: int = 0) -> str:
  """`epoch 2  step 30/60  1.50 steps/s  48.0 img/s  loss 0.4321  ETA 0:00:20`.

  rate: steps/s of the last window, None when it could not be measured (e.g. the first line after
  a resume): then the rate and the ETA read "-" and "?" rather than "nan". The ETA adds
  `pauses_ahead` evaluations of `pause_s` each once one has been timed.
  """
  if rate is None:
    speed = "- steps/s  - img/s"
    eta = "?"
  else:
    speed = f"{rate:.2f} steps/s  {rate * batch_size:.1f} img/s"
    # An asynchronous cluster's shared step can end past max_steps.
    eta = format_seconds(max(max_steps - step, 0) / rate + pauses_ahead * (pause_s or 0.0))
  loss_text = f"{loss:.4f}" if loss is not None and math.isfinite(loss) else str(loss)
  note = f" ({loss_note})" if loss_note else ""
  return f"epoch {epoch}  step {step}/{max_steps}  {speed}  loss {loss_text}{note}  ETA {eta}"
