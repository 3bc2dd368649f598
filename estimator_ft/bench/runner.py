"""`estimator-ft bench`: every measurement of a plan, in one process, in phases."""

import dataclasses
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time

from estimator_ft import estimator as estimator_path
from estimator_ft import files
from estimator_ft.bench.loaders import (input_loader_rates, records_pipeline_rates, records_source,
                                        resolve_data_dir)
from estimator_ft.bench.machine import (compute_dtype, cpu_environment, environment,
                                        forward_flops_per_image, matmul_gflops)
from estimator_ft.bench import scan
from estimator_ft.bench import sources
from estimator_ft.bench.plan import TARGETS, BenchPlan, bench_config, make_plan
from estimator_ft.bench.report import format_table, summarize
from estimator_ft.bench.timing import PhaseClock, spread
from estimator_ft.bench.training_rates import (end_to_end_times, estimator_epoch_overhead,
                                               feed_dict_rates, keras_epoch_overhead,
                                               paired_training_rates, short_run_accuracy)
from estimator_ft.data import loading


def _write_results(results: dict, output: str) -> None:
  """The results JSON at `output` (nothing when it is empty), its folder made if need be."""
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    files.write_json_atomic(output, results)
    print(f"\nResults written to {output}")


def run_bench(image_size: int = 64, batch_size: int = 32, steps: int = 20, repeats: int = 3,
              quick: bool = False, precision: str = "float32", jit: bool = False,
              data_dir: str = "data/sample", output: str = "", accuracy_steps: int = 0,
              records_dir: str = "") -> dict:
  """`estimator-ft bench`: every measurement; prints a table, writes `output` (JSON) if given."""
  plan = make_plan(image_size, batch_size, steps, repeats, quick, precision, jit, accuracy_steps)
  return run_plan(plan, data_dir, output, quick=quick, records_dir=records_dir)


def run_plan(plan: BenchPlan, data_dir: str, output: str = "", quick: bool = False,
             records_dir: str = "") -> dict:
  """Runs `plan`; returns the results dict that run_bench prints and writes."""
  started = time.time()
  with tempfile.TemporaryDirectory(prefix="estimator_ft_bench_") as scratch:
    data_dir = resolve_data_dir(data_dir, scratch)
    config = bench_config(plan, data_dir, os.path.join(scratch, "estimator"))
    splits = loading.load_splits(config)
    num_classes = len(splits.class_names)
    # The Estimator path's own session settings, used by the feed_dict loop too.
    session_config = estimator_path.make_run_config(config, 1).session_config
    env = environment(session_config)
    clock = PhaseClock(env["cpu_cores"])
    with clock.phase("matmul peak"):
      matmul = {"float32": matmul_gflops(repeats=plan.matmul_repeats)}
      dtype = compute_dtype(plan.precision)
      if dtype != "float32":
        matmul[dtype] = matmul_gflops(repeats=plan.matmul_repeats, dtype=dtype)
    with clock.phase("forward FLOPs"):
      forward_flops = forward_flops_per_image(config, num_classes)
    with clock.phase("tf.data pipeline vs Python loader"):
      loaders = input_loader_rates(splits.train, config, plan)
    records_rates = records = None
    if records_dir:
      records = records_source(records_dir, config, num_classes)
      with clock.phase("tf.data pipeline on records"):
        records_rates = records_pipeline_rates(*records, plan)
    with clock.phase("Estimator and Keras fit in turn, then Estimator on folder input"
                     + (" and on records" if records else "")):
      training = paired_training_rates(config, splits, plan, records)
    with clock.phase("feed_dict loop"):
      feed_dict = feed_dict_rates(config, splits.train, num_classes, plan, session_config)
    with clock.phase("Estimator train_and_evaluate epoch overhead"):
      overhead = estimator_epoch_overhead(
          config.replace(model_dir=os.path.join(scratch, "overhead")), splits, plan)
    with clock.phase("Keras fit epoch overhead"):
      keras_overhead = keras_epoch_overhead(
          config.replace(model_dir=os.path.join(scratch, "keras_overhead")), splits, plan)
    with clock.phase("a complete short train on each path, end to end"):
      end_to_end = end_to_end_times(config, plan, scratch)
    accuracy = None
    if plan.accuracy_steps:
      with clock.phase("short-run accuracy"):
        accuracy = short_run_accuracy(config, splits, plan.accuracy_steps, scratch)
  results = {"settings": {**dataclasses.asdict(plan), "quick": quick, "data_dir": data_dir,
                          "train_images": splits.train.num_examples,
                          "validation_images": splits.validation.num_examples},
             "environment": env}
  results.update(summarize(plan, matmul, forward_flops, loaders, training, feed_dict, overhead,
                           end_to_end, keras_overhead, env["cpu_features"]))
  if accuracy:
    results["accuracy"] = accuracy
  if records_rates:
    median = statistics.median(records_rates)
    results["records_pipeline_img_per_s"] = {"median": median, "all": records_rates,
                                             "records_dir": records_dir}
    results["records_over_folder_pipeline"] = median / statistics.median(loaders["pipeline"])
    results["estimator_records_img_per_s"] = spread(training["records"])
    results["synthetic_vs_records_step_ratio"] = (
        results["estimator_records_img_per_s"]["median"] / results["estimator_img_per_s"])
  env["load_average_1min_after"] = os.getloadavg()[0]
  results["phases"] = clock.phases
  results["wall_time_s"] = time.time() - started
  print(format_table(results))
  if records_rates:
    print(f"records pipeline ({records_dir}): {results['records_pipeline_img_per_s']['median']:.1f} "
          f"img/s, {results['records_over_folder_pipeline']:.2f}x the folder pipeline; the "
          f"Estimator on records {results['estimator_records_img_per_s']['median']:.1f} img/s, "
          f"{results['synthetic_vs_records_step_ratio']:.2f}x its synthetic rate (target >= "
          f"{TARGETS['synthetic_vs_folder_step_ratio'][0]})")
  _write_results(results, output)
  return results


def run_scan_bench(num_files: int, output: str = "") -> dict:
  """`estimator-ft bench --scan_files=N`: the folder scan's first and second start, alone."""
  with tempfile.TemporaryDirectory(prefix="estimator_ft_bench_scan_") as scratch:
    results = {"scan": scan.scan_rates(num_files, scratch), "environment": cpu_environment()}
  figures = results["scan"]
  print(f"folder scan of {figures['files']} {figures['image_size']}-px JPEGs: first start "
        f"{figures['first_scan_s']:.1f} s ({figures['first_files_per_s']:.0f} files/s), second "
        f"start {figures['second_scan_s']:.2f} s ({figures['second_files_per_s']:.0f} files/s): "
        f"{figures['second_over_first_speedup']:.0f}x faster")
  _write_results(results, output)
  return results


def run_sources_bench(train_images: int, output: str = "", **settings) -> dict:
  """`estimator-ft bench --source_images=N`: the training pipeline on a folder of N photo-sized
  JPEGs, on its records and on its records prepared with --max_side, alone (bench/sources.py;
  `settings`: sources_rates' image_size, batch_size, batches, rounds)."""
  with tempfile.TemporaryDirectory(prefix="estimator_ft_bench_sources_") as scratch:
    results = sources.sources_rates(scratch, train_images, **settings)
  print(sources.format_summary(results))
  _write_results(results, output)
  return results


def run_onednn_comparison(bench_args, output: str = "") -> dict:
  """`estimator-ft bench --compare_onednn ...`: the same bench with oneDNN off and on.

  TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, so each setting runs in a
  process of its own, one after the other; the figures of both and their ratios are reported.
  """
  runs = {}
  with tempfile.TemporaryDirectory(prefix="estimator_ft_bench_onednn_") as scratch:
    for name, setting in (("onednn_off", "0"), ("onednn_on", "1")):
      path = os.path.join(scratch, f"{name}.json")
      subprocess.run([sys.executable, "-m", "estimator_ft", "bench", *bench_args,
                      f"--output={path}"], check=True,
                     env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting})
      with open(path) as f:
        runs[name] = json.load(f)
  figures = ("estimator_img_per_s", "keras_img_per_s", "fraction_of_peak")
  results = {**runs, "on_over_off": {
      name: runs["onednn_on"][name] / runs["onednn_off"][name] for name in figures
      if runs["onednn_off"].get(name)}}
  print("\noneDNN on / off (" + runs["onednn_on"]["environment"]["device"] + "): " + ", ".join(
      f"{name} {ratio:.2f}x" for name, ratio in results["on_over_off"].items()))
  _write_results(results, output)
  return results
