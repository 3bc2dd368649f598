"""The progress line both paths log: rates, no 'nan', and an ETA that counts evaluations ahead."""

from estimator_ft import progress


def test_no_rate_yet_reads_as_a_dash_and_a_question_mark_not_nan():
  line = progress.progress_line(2, 15, 38, None, 32, 0.5)
  assert "nan" not in line and "- steps/s  - img/s" in line and line.endswith("ETA ?")
  assert progress.steps_per_second(0, 1.0) is None and progress.steps_per_second(5, 0.0) is None


def test_eta_adds_the_evaluations_still_ahead():
  # 20 steps left at 2 steps/s = 10 s, plus 2 evaluations of 30 s each.
  line = progress.progress_line(1, 20, 40, 2.0, 8, 0.25, pause_s=30.0, pauses_ahead=2)
  assert "2.00 steps/s  16.0 img/s" in line and line.endswith("ETA 0:01:10")
  assert progress.progress_line(1, 20, 40, 2.0, 8, 0.25).endswith("ETA 0:00:10")


def test_evaluations_left_after_a_step():
  # Evaluations after steps 10, 20, 30, 40 (the last step too).
  assert [progress.pauses_left(s, 40, 10) for s in (0, 9, 10, 25, 39, 40)] == [4, 4, 3, 2, 1, 0]
  assert progress.pauses_left(5, 35, 10) == 4  # 10, 20, 30 and the final step 35


def test_pause_timer_means_only_real_pauses():
  timer = progress.PauseTimer()
  assert timer.mean is None
  for seconds in (3.0, float("nan"), -1.0, 5.0):
    timer.add(seconds)
  assert timer.mean == 4.0


def test_format_seconds():
  assert progress.format_seconds(3725.9) == "1:02:05"
  assert progress.format_seconds(float("inf")) == "?"
