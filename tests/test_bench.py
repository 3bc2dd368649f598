"""`estimator-ft bench`: its arithmetic, its Python loader, and one smoke run at tiny settings.

No test here times anything against a target: speed targets live in the benchmark's own output.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from estimator_ft import cli
from estimator_ft.bench import loaders as bench_loaders
from estimator_ft.bench import machine as bench_machine
from estimator_ft.bench import plan as bench_plan
from estimator_ft.bench import runner as bench_runner
from estimator_ft.bench import scan as bench_scan
from estimator_ft.bench import sources as bench_sources
from estimator_ft.bench import timing as bench_timing
from estimator_ft.config import Config
from estimator_ft.data import folders as folders_lib
from estimator_ft.data import pipeline as pipeline_lib
from estimator_ft.jobs import prepare
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path

SIZE = 32
# Keras' caffe preprocessing of a pure red pixel: BGR order, ImageNet mean removed.
RED_PREPROCESSED = [0 - 103.939, 0 - 116.779, 255 - 123.68]


def test_window_rates_time_each_window_from_the_end_of_the_step_before():
  # Steps finished at these seconds; the first is warm-up (it would include tracing).
  timestamps = [10.0, 11.0, 12.0, 14.0, 18.0]
  rates = bench_timing.window_rates(timestamps, warmup=1, steps=2, repeats=2, items_per_step=8)
  # Window 1 = steps 2 and 3 (10 s -> 12 s), window 2 = steps 4 and 5 (12 s -> 18 s).
  assert rates == [2 * 8 / 2.0, 2 * 8 / 6.0]


def test_window_rates_refuse_a_run_with_too_few_steps():
  with pytest.raises(RuntimeError, match="only 3 steps"):
    bench_timing.window_rates([1.0, 2.0, 3.0], warmup=1, steps=2, repeats=2, items_per_step=1)


class VirtualTime:
  """A clock that only moves when a fake step says it took time: timing tests without sleeping."""

  def __init__(self):
    self.now = 0.0
    self._lock = threading.Lock()

  def __call__(self):
    with self._lock:
      return self.now

  def spend(self, seconds):
    with self._lock:
      self.now += seconds


def _run_in_turns(turns, step_seconds, log, warmup=1, steps=2, repeats=2, clock=None):
  """Two fake training loops in two threads, each step spending its loop's step time."""
  clock = clock or VirtualTime()
  clocks = {name: bench_timing.WindowClock(name, turns, warmup, steps, repeats, clock=clock)
            for name in step_seconds}
  errors = []

  def loop(name):
    try:
      for step in range(warmup + steps * repeats + 1):
        clocks[name].before_step()
        # The extra last step is what a loop runs after its timed windows (the folder phase).
        log.append(name if step < warmup + steps * repeats else name + " after")
        clock.spend(step_seconds[name])
        clocks[name].after_step()
    except RuntimeError as e:
      errors.append(str(e))

  threads = [threading.Thread(target=loop, args=(name,)) for name in step_seconds]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=30)
  return clocks, errors


def test_two_loops_take_turns_one_window_each_and_waiting_is_not_timed():
  log = []
  turns = bench_timing.TakeTurns("estimator", "keras")
  clocks, errors = _run_in_turns(turns, {"keras": 5.0, "estimator": 1.0}, log)
  assert errors == []
  # Warm-up window (1 step), then windows of 2 steps, strictly alternating, estimator first.
  assert log[:10] == ["estimator", "keras"] + ["estimator"] * 2 + ["keras"] * 2 + [
      "estimator"] * 2 + ["keras"] * 2
  # The estimator finished first, but ran nothing more until keras' last window had ended.
  assert sorted(log[10:]) == ["estimator after", "keras after"]
  # Each window is exactly its own two steps: keras' 10 s windows, run in between, never count
  # in the estimator's 2 s ones (the clock moves only while a step runs).
  assert clocks["estimator"].seconds == [2.0, 2.0]
  assert clocks["keras"].seconds == [10.0, 10.0]


def test_a_failed_loop_stops_the_other_instead_of_hanging_it():
  turns = bench_timing.TakeTurns("estimator", "keras")
  turns.fail("estimator")
  clocks, errors = _run_in_turns(turns, {"keras": 0.0}, [])
  assert errors == ["bench: the estimator run failed; stopping the keras run."]
  assert clocks["keras"].seconds == []


def test_step_durations_time_each_step_from_its_start_to_its_end():
  ticks = iter([10.0, 10.5, 11.0, 13.0, 20.0, 20.25])  # a gap between steps is not a step
  durations = bench_timing.StepDurations(clock=lambda: next(ticks))
  for _ in range(3):
    durations.before_step()
    durations.after_step()
  assert durations.seconds == [0.5, 2.0, 0.25]


def test_no_timed_step_writes_summaries():
  plan = bench_plan.make_plan()
  config = bench_plan.bench_config(plan, "data/sample", "/tmp/unused")
  # The most steps one bench training runs: warm-up, every timed repeat, the folder-input run.
  steps_run = plan.warmup_steps + 2 * plan.steps * plan.repeats
  assert config.save_summary_steps > steps_run
  assert config.save_checkpoints_steps > steps_run


def test_the_fraction_of_peak_target_follows_the_cpu_kind():
  assert bench_plan.fraction_of_peak_target(["avx2", "avx512f", "avx512_vnni"]) == 0.85
  assert bench_plan.fraction_of_peak_target(["avx2"]) == 0.80
  assert bench_plan.fraction_of_peak_target([]) == 0.80


def test_spread_reports_min_median_max_of_the_runs():
  assert bench_timing.spread([3, 1, 2]) == {"min": 1.0, "median": 2.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
  # An even number of runs: the median is the mean of the middle two, not one of the runs.
  assert bench_timing.spread([4, 1, 3, 2])["median"] == 2.5


def test_quick_plan_caps_the_work_and_keeps_the_settings():
  plan = bench_plan.make_plan(image_size=224, batch_size=16, steps=50, repeats=7, quick=True,
                         precision="mixed_bfloat16")
  assert (plan.steps, plan.repeats) == (bench_plan.QUICK_LIMITS["steps"], bench_plan.QUICK_LIMITS["repeats"])
  assert (plan.image_size, plan.batch_size, plan.precision) == (224, 16, "mixed_bfloat16")
  assert bench_plan.make_plan(steps=2, repeats=1, quick=True).steps == 2  # already under the cap


@pytest.mark.parametrize("settings, message", [
    (dict(image_size=16), "too small"),
    (dict(steps=0), "--steps=0"),
    (dict(precision="float8"), "--precision"),
    (dict(accuracy_steps=-1), "--accuracy_steps"),
])
def test_bad_settings_are_refused_with_what_to_do(settings, message):
  with pytest.raises(ValueError, match=message):
    bench_plan.make_plan(**settings)


@pytest.mark.parametrize("precision, dtype", [
    ("float32", "float32"), ("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_the_peak_is_measured_in_the_dtype_the_model_computes_in(precision, dtype):
  assert bench_machine.compute_dtype(precision) == dtype


def test_matmul_rate_is_two_n_cubed_flops_per_timed_call():
  # A clock that says every timed call took 0.5 s: the rates follow from the sizes alone.
  ticks = iter(range(100))
  rates = bench_machine.matmul_gflops(sizes=(64, 128), repeats=2, clock=lambda: 0.5 * next(ticks))
  assert rates["64"]["runs"] == [2 * 64**3 / 0.5 / 1e9] * 2
  assert rates["128"]["runs"] == [2 * 128**3 / 0.5 / 1e9] * 2
  assert rates["peak_median"] == 2 * 128**3 / 0.5 / 1e9


def test_the_cpu_kind_tells_apart_cpus_with_one_model_name():
  # Zen 3, 4 and 5 EPYCs all say "AMD EPYC"; their speeds differ 2-6x.
  zen5 = {"vendor_id": "AuthenticAMD", "cpu family": "26", "model": "2", "model name": "AMD EPYC"}
  assert bench_machine.cpu_kind(lambda name: zen5.get(name, "")) == (
      "AuthenticAMD family 26 model 2")
  assert bench_machine.cpu_kind(lambda name: "") == ""  # no /proc/cpuinfo: nothing made up


def _solid_colour_folder(root, count=4):
  for index in range(count):
    images.write_png(root / "train" / "red" / f"{index}.png", size=48, solid=images.RED)
    images.write_png(root / "train" / "also_red" / f"{index}.png", size=48, solid=images.RED)
  return folders_lib.scan_image_folder(str(root / "train"), "train")


def test_python_loader_preprocesses_exactly_like_the_pipeline(tmp_path):
  split = _solid_colour_folder(tmp_path)
  python_images, python_labels = next(bench_loaders.python_batches(split, SIZE, batch_size=4, augment=False))
  config = Config(image_size=SIZE, batch_size=8, augment=False)
  pipeline_images = next(iter(pipeline_lib.make_dataset(split, config, "eval")))[0]["image"].numpy()
  assert python_images.shape == (4, SIZE, SIZE, 3) and python_images.dtype == np.float32
  np.testing.assert_allclose(python_images[0, 5, 5], RED_PREPROCESSED, atol=1e-3)
  # Both resizes of a flat colour stay flat up to float rounding; a swapped channel order or a
  # missing mean would be off by tens.
  np.testing.assert_allclose(python_images.mean(axis=(0, 1, 2)), pipeline_images.mean(axis=(0, 1, 2)),
                             atol=0.05)
  assert set(python_labels.tolist()) <= {0, 1} and python_labels.dtype == np.int32


def test_python_loader_augments_every_image_differently(tmp_path):
  for index in range(4):
    images.write_png(tmp_path / "a" / f"{index}.png", size=48, seed=0)
    images.write_png(tmp_path / "b" / f"{index}.png", size=48, seed=0)
  split = folders_lib.scan_image_folder(str(tmp_path), "train")
  batch, _ = next(bench_loaders.python_batches(split, SIZE, batch_size=8, augment=True, seed=3))
  # The same source image eight times: random flips and crops make the copies differ.
  assert len({copy.tobytes() for copy in batch}) > 1
  assert np.isfinite(batch).all()


def test_subset_keeps_every_class(tiny_dataset):
  split = folders_lib.scan_image_folder(str(tiny_dataset / "train"), "train")
  subset = bench_loaders.subset(split, 6)  # pylint: disable=protected-access
  assert subset.num_examples == len(subset.paths) == 6
  assert sorted(subset.labels) == [0, 0, 0, 1, 1, 1]


def test_python_loader_refuses_a_batch_larger_than_the_split(tiny_dataset):
  split = folders_lib.scan_image_folder(str(tiny_dataset / "train"), "train")
  with pytest.raises(ValueError, match="lower --batch_size"):
    next(bench_loaders.python_batches(split, SIZE, batch_size=split.num_examples + 1))


def test_a_data_dir_without_validation_is_refused(tmp_path):
  (tmp_path / "train").mkdir()
  with pytest.raises(ValueError, match="no validation/ folder"):
    bench_loaders.resolve_data_dir(str(tmp_path), str(tmp_path / "scratch"))


@pytest.mark.slow
def test_quick_bench_writes_sane_figures(tiny_dataset, tmp_path, capsys):
  output = tmp_path / "bench.json"
  # Smaller than --quick: one short epoch for the overhead run, one matmul per size.
  plan = dataclasses.replace(
      bench_plan.make_plan(image_size=SIZE, batch_size=4, steps=1, repeats=1, quick=True),
      warmup_steps=1, loader_batches=2, overhead_epochs=1, overhead_steps_per_epoch=1,
      matmul_repeats=1)
  records_dir = tmp_path / "records"
  prepare.run_prepare(str(tiny_dataset / "train"), str(tiny_dataset / "validation"),
                      str(records_dir))
  returned = bench_runner.run_plan(plan, str(tiny_dataset), str(output), quick=True,
                                   records_dir=str(records_dir))
  results = json.loads(output.read_text())
  assert results["estimator_img_per_s"] == pytest.approx(returned["estimator_img_per_s"])

  figures = ("estimator_img_per_s", "estimator_folder_img_per_s", "keras_img_per_s",
             "feed_dict_img_per_s", "pipeline_img_per_s", "python_loader_img_per_s")
  # The same Estimator session continued on the prepared records after the folder.
  (records_rate,) = results["estimator_records_img_per_s"]["runs"]
  assert 0 < records_rate < 1e5
  assert results["synthetic_vs_records_step_ratio"] == pytest.approx(
      records_rate / results["estimator_img_per_s"])
  assert results["records_over_folder_pipeline"] == pytest.approx(
      results["records_pipeline_img_per_s"]["median"] / results["pipeline_img_per_s"])
  for name in figures:
    runs = results["spread"][name]
    assert len(runs["runs"]) == 1
    assert runs["min"] <= results[name] == runs["median"] <= runs["max"]
    assert 0 < results[name] < 1e5, name
  for size in ("2048", "4096"):
    assert 1 < results["matmul_gflops"][size]["median"] < 1e5

  # ResNet50's forward pass is 7.7 GFLOP at 224 px and scales with the pixel count (roughly).
  assert 0.1 < results["forward_gflops_per_image"] < 0.25
  assert results["train_gflops_per_image"] == pytest.approx(3 * results["forward_gflops_per_image"])
  expected_gflops = results["estimator_img_per_s"] * results["train_gflops_per_image"]
  assert results["train_gflops"]["estimator"] == pytest.approx(expected_gflops)
  assert results["peak_dtype"] == "float32"
  assert results["fraction_of_peak"] == pytest.approx(
      expected_gflops / results["matmul_gflops"]["peak_median"])
  ratios = results["ratios"]
  # One window each here, so the median of paired-window ratios is the ratio of the two figures.
  assert ratios["estimator_over_keras"] == pytest.approx(
      results["estimator_img_per_s"] / results["keras_img_per_s"])
  assert results["synthetic_vs_folder_step_ratio"] == pytest.approx(
      results["estimator_folder_img_per_s"] / results["estimator_img_per_s"])
  for name, target in results["targets"].items():
    if "minimum" in target:
      assert target["met"] == (target["value"] >= target["minimum"]), name
    else:
      assert target["met"] == (target["value"] <= target["maximum"]), name
  end_to_end = results["end_to_end"]
  assert end_to_end["wall_s"]["estimator"] > 0 and end_to_end["wall_s"]["keras"] > 0
  assert ratios["end_to_end_ratio"] == pytest.approx(
      end_to_end["wall_s"]["estimator"] / end_to_end["wall_s"]["keras"])

  overhead = results["epoch_overhead_run"]
  assert 0 < overhead["startup_s"] < overhead["wall_s"]
  assert results["estimator_epoch_overhead_s"] == overhead["epoch_overhead_s"]
  assert overhead["evaluation_s"] > 0 and overhead["exports"] >= overhead["epochs"]
  assert math.isfinite(overhead["epoch_overhead_s"])
  # Steps priced at the run's own step time, which lies inside its wall time after start-up.
  assert 0 < overhead["seconds_per_step"] < overhead["wall_s"] - overhead["startup_s"]
  keras_overhead = results["keras_epoch_overhead_run"]
  assert (0 < keras_overhead["seconds_per_step"]
          < keras_overhead["wall_s"] - keras_overhead["startup_s"])
  assert 0 < keras_overhead["startup_s"] < keras_overhead["wall_s"]
  assert results["keras_epoch_overhead_s"] == keras_overhead["epoch_overhead_s"]
  assert keras_overhead["epochs"] == overhead["epochs"] == 1
  assert keras_overhead["steps_per_epoch"] == overhead["steps_per_epoch"] == 1

  env = results["environment"]
  assert results["targets"]["estimator_fraction_of_peak"]["minimum"] == (
      bench_plan.fraction_of_peak_target(env["cpu_features"]))
  assert env["tensorflow"].startswith("2.15") and env["cpu_cores"] >= 1
  assert env["cpu_kind"] == bench_machine.cpu_kind()
  assert isinstance(env["onednn"], bool)
  assert set(results["phases"]) >= {
      "Estimator and Keras fit in turn, then Estimator on folder input and on records",
      "feed_dict loop"}
  table = capsys.readouterr().out
  for name in figures + ("estimator_over_keras", "pipeline_over_python_loader", "end_to_end_ratio"):
    assert name in table
  assert f"({env['cpu_kind']})" in table if env["cpu_kind"] else "()" not in table


def test_scan_benchmark_decodes_every_file_once_then_none(tmp_path):
  figures = bench_scan.scan_rates(10, str(tmp_path))
  assert figures["decoded"] == {"first": 10, "second": 0}
  assert figures["files"] == 10 and figures["image_size"] == 224
  written = [p.read_bytes() for p in (tmp_path / "scan_data").rglob("*.jpg")]
  assert len(written) == len(set(written)) == 10  # ten distinct files


def test_photo_like_jpegs_cost_what_an_ilsvrc_photo_costs_to_decode(tmp_path):
  data = bench_sources.write_photo_folders(str(tmp_path), train_images=8)
  # The folder path's decode cost grows with the entropy-coded bytes: the goal is judged on
  # files of ILSVRC's mean size, not on flat images that flatter the folder path.
  assert abs(data["mean_file_bytes"] / bench_sources.ILSVRC_MEAN_FILE_BYTES - 1) < 0.1
  files = sorted((tmp_path / "train").rglob("*.jpg"))
  assert len(files) == 8 and len({p.read_bytes() for p in files}) == 8
  with Image.open(files[0]) as image:
    assert image.size == (bench_sources.PHOTO_WIDTH, bench_sources.PHOTO_HEIGHT)


def test_sources_bench_refuses_fewer_photos_than_classes(tmp_path):
  with pytest.raises(ValueError, match="--source_images=1: give at least 2"):
    bench_sources.sources_rates(str(tmp_path), 1)
  assert list(tmp_path.iterdir()) == []  # nothing generated


def test_sources_take_turns_in_a_reversed_order_every_other_round():
  assert bench_sources.source_order(0) == bench_sources.SOURCES
  assert bench_sources.source_order(1) == tuple(reversed(bench_sources.SOURCES))
  assert bench_sources.source_order(2) == bench_sources.SOURCES


def test_sources_summary_pairs_each_round_with_the_folder_of_the_same_round():
  folder, records, max_side = bench_sources.SOURCES

  def windows(*pairs):
    return [{"img_per_s": rate, "cpu_ms_per_image": cpu} for rate, cpu in pairs]

  summary = bench_sources.summarize({folder: windows((100, 4.0), (50, 5.0), (100, 4.0)),
                                     records: windows((110, 4.0), (60, 4.0), (90, 5.0)),
                                     max_side: windows((250, 1.6), (90, 2.5), (150, 2.1))})
  wall = summary[f"{max_side}_over_folder"]["wall"]
  assert wall["rounds"] == [2.5, 1.8, 1.5] and wall["median"] == 1.8
  assert wall["rounds_at_goal"] == 1
  # Per CPU-second: the folder's CPU ms an image over the records' (fewer ms, more images).
  per_cpu = summary[f"{max_side}_over_folder"]["per_cpu_second"]
  assert per_cpu["rounds"] == [2.5, 2.0, 4.0 / 2.1] and per_cpu["rounds_at_goal"] == 2
  assert summary[f"{records}_over_folder"]["wall"]["rounds"] == [1.1, 1.2, 0.9]
  assert "rounds_at_goal" not in summary[f"{records}_over_folder"]["wall"]  # the goal is max_side's


def test_sources_bench_times_each_source_in_a_process_of_its_own(tmp_path, capsys):
  output = tmp_path / "sources.json"
  results = bench_runner.run_sources_bench(16, image_size=SIZE, batch_size=4, batches=2,
                                           rounds=1, output=str(output))
  assert json.loads(output.read_text())["windows"] == results["windows"]
  windows = results["windows"]
  assert set(windows) == set(bench_sources.SOURCES)
  process_ids = [w["process_id"] for name in bench_sources.SOURCES for w in windows[name]]
  assert len(set(process_ids)) == 3 and os.getpid() not in process_ids
  for name in bench_sources.SOURCES:
    (window,) = windows[name]
    assert window["images"] == 2 * 4 and window["img_per_s"] > 0 and window["cpu_ms_per_image"] > 0
  # The same photos three ways: records keep the bytes, max_side re-encodes the 500x375 files.
  data = results["data"]
  assert data["records_bytes"] > 16 * data["mean_file_bytes"]
  assert data["records_max_side_256_bytes"] < data["records_bytes"] / 2
  ratio = results["records_max_side_256_over_folder"]["wall"]
  assert ratio["rounds"] == [windows["records_max_side_256"][0]["img_per_s"] /
                             windows["folder"][0]["img_per_s"]]
  assert "records_max_side_256 / folder, wall: median" in capsys.readouterr().out


def test_source_images_refuses_flags_it_would_ignore():
  result = subprocess.run(
      [sys.executable, "-m", "estimator_ft", "bench", "--source_images=8", "--quick",
       "--records_dir=r"], capture_output=True, text=True, timeout=120)
  assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
  assert ("--source_images measures the input pipeline alone, on data it generates: --quick, "
          "--records_dir would do nothing there.") in result.stderr
  assert "Wrote" not in result.stderr  # refused before any photo was generated
