"""The figures, ratios and targets of a benchmark run, and the table printed on the terminal."""

import os
import statistics
from typing import Optional

import tensorflow as tf

from estimator_ft import config as config_lib
from estimator_ft import estimator as estimator_path
from estimator_ft import tf_environment
from estimator_ft.bench.machine import MATMUL_SIZES, compute_dtype
from estimator_ft.bench.plan import MAXIMUM_TARGETS, TARGETS, fraction_of_peak_target
from estimator_ft.bench.timing import spread


# Backward costs about twice the forward pass (gradients for activations and for weights).
TRAINING_FLOPS_PER_FORWARD_FLOP = 3


def _ratio(numerator: float, denominator: float) -> Optional[float]:
  return numerator / denominator if denominator else None


def summarize(plan, matmul, forward_flops, loaders, training, feed_dict, overhead,
              end_to_end, keras_overhead=None, cpu_features=()) -> dict:
  """The result figures (medians at the top level, spreads under `spread`), ratios and targets."""
  runs = {
      "estimator_img_per_s": spread(training["estimator"]),
      "estimator_folder_img_per_s": spread(training["folder"]),
      "keras_img_per_s": spread(training["keras"]),
      "feed_dict_img_per_s": spread(feed_dict),
      "pipeline_img_per_s": spread(loaders["pipeline"]),
      "python_loader_img_per_s": spread(loaders["python_loader"]),
  }
  figures = {name: values["median"] for name, values in runs.items()}
  # The hardware limit of the dtype the model computes in: float32, or the mixed policy's.
  peak_dtype = compute_dtype(plan.precision)
  peak = matmul[peak_dtype]["peak_median"]
  train_flops = TRAINING_FLOPS_PER_FORWARD_FLOP * forward_flops
  gflops = {path: figures[f"{path}_img_per_s"] * train_flops / 1e9
            for path in ("estimator", "keras", "feed_dict")}
  ratios = {
      # Median of the ratios of windows measured next to each other (see TakeTurns).
      "estimator_over_keras": statistics.median(
          e / k for e, k in zip(training["estimator"], training["keras"])),
      "synthetic_vs_folder_step_ratio": _ratio(figures["estimator_folder_img_per_s"],
                                               figures["estimator_img_per_s"]),
      "pipeline_over_python_loader": _ratio(figures["pipeline_img_per_s"],
                                            figures["python_loader_img_per_s"]),
      "estimator_over_feed_dict": _ratio(figures["estimator_img_per_s"],
                                         figures["feed_dict_img_per_s"]),
      "estimator_fraction_of_peak": _ratio(gflops["estimator"], peak),
      "keras_fraction_of_peak": _ratio(gflops["keras"], peak),
      "estimator_epoch_overhead_s": overhead["epoch_overhead_s"],
      "end_to_end_ratio": end_to_end["end_to_end_ratio"],
  }
  targets = {}
  minimums = {**{name: minimum for name, (minimum, _) in TARGETS.items()},
              "estimator_fraction_of_peak": fraction_of_peak_target(cpu_features)}
  for name, (_, meaning) in TARGETS.items():
    value, minimum = ratios[name], minimums[name]
    targets[name] = {"value": value, "minimum": minimum, "met": value is not None and value >= minimum,
                     "meaning": meaning}
  for name, (maximum, meaning) in MAXIMUM_TARGETS.items():
    value = ratios[name]
    targets[name] = {"value": value, "maximum": maximum, "met": value is not None and value <= maximum,
                     "meaning": meaning}
  if plan.image_size != config_lib.RESNET50_NATIVE_IMAGE_SIZE:
    targets["estimator_fraction_of_peak"]["note"] = (
        f"the target is set at {config_lib.RESNET50_NATIVE_IMAGE_SIZE} px; at {plan.image_size} px "
        "the small feature maps use the cores less well")
  notes = []
  if peak_dtype != "float32":
    notes.append(f"{plan.precision}: fraction_of_peak is against the {peak_dtype} matmul peak "
                 f"({peak:.0f} GFLOP/s; float32: {matmul['float32']['peak_median']:.0f})")
  slow_precision = tf_environment.precision_note(
      plan.precision, bool(tf.config.list_physical_devices("GPU")), cpu_features)
  if slow_precision:
    notes.append(slow_precision)
  if plan.jit and not tf.config.list_physical_devices("GPU") and (
      estimator_path.CPU_GLOBAL_JIT_FLAG not in os.environ.get("TF_XLA_FLAGS", "")):
    notes.append(f"--jit on a CPU: Keras compiles with XLA, but the Estimator's session compiles "
                 f"only with TF_XLA_FLAGS={estimator_path.CPU_GLOBAL_JIT_FLAG}")
  return {
      **figures,
      "synthetic_vs_folder_step_ratio": ratios["synthetic_vs_folder_step_ratio"],
      "matmul_gflops": matmul["float32"],
      **{f"matmul_gflops_{dtype}": values for dtype, values in matmul.items() if dtype != "float32"},
      "peak_dtype": peak_dtype,
      "peak_gflops": peak,
      "forward_gflops_per_image": forward_flops / 1e9,
      "train_gflops_per_image": train_flops / 1e9,
      "train_gflops": gflops,
      "fraction_of_peak": ratios["estimator_fraction_of_peak"],
      "estimator_epoch_overhead_s": overhead["epoch_overhead_s"],
      "estimator_startup_s": overhead["startup_s"],
      "epoch_overhead_run": overhead,
      **({"keras_epoch_overhead_s": keras_overhead["epoch_overhead_s"],
          "keras_epoch_overhead_run": keras_overhead} if keras_overhead else {}),
      "end_to_end": end_to_end,
      "ratios": ratios,
      "targets": targets,
      "spread": runs,
      "notes": notes,
  }


def _fmt(value, digits=1) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
  settings, env = results["settings"], results["environment"]
  # Older result files have no cpu_kind.
  cpu_kind = f" ({env['cpu_kind']})" if env.get("cpu_kind") else ""
  lines = [
      f"estimator-ft bench: {settings['image_size']} px, batch {settings['batch_size']}, "
      f"{settings['precision']}{', XLA' if settings['jit'] else ''}, {settings['steps']} steps x "
      f"{settings['repeats']} repeats after {settings['warmup_steps']} warm-up steps",
      f"{env['device']}{cpu_kind}, {env['cpu_cores']} cores, TF {env['tensorflow']}, oneDNN "
      f"{'on' if env['onednn'] else 'off'}, load average {env['load_average_1min']:.2f} before, "
      f"{env['load_average_1min_after']:.2f} after",
      "",
      f"{'images/s':34s} {'median':>9s} {'min':>9s} {'max':>9s}",
  ]
  for name, values in results["spread"].items():
    lines.append(f"{name:34s} {values['median']:9.1f} {values['min']:9.1f} {values['max']:9.1f}")
  lines.append("")
  for dtype in ("float32", "bfloat16", "float16"):
    key = "matmul_gflops" if dtype == "float32" else f"matmul_gflops_{dtype}"
    for size in MATMUL_SIZES if key in results else ():
      values = results[key][str(size)]
      lines.append(f"{f'matmul GFLOP/s {dtype} {size}^2':34s} {values['median']:9.1f} "
                   f"{values['min']:9.1f} {values['max']:9.1f}")
  overhead = results["epoch_overhead_run"]
  lines += [
      "",
      f"training GFLOP per image {results['train_gflops_per_image']:.3f} (3 x forward "
      f"{results['forward_gflops_per_image']:.3f}); train GFLOP/s: "
      + ", ".join(f"{path} {value:.1f}" for path, value in results["train_gflops"].items()),
      f"Estimator train with in-process evaluation: startup {overhead['startup_s']:.1f} s, overhead "
      f"{overhead['epoch_overhead_s']:.1f} s per epoch (evaluation {_fmt(overhead['evaluation_s'])} s, "
      f"export {_fmt(overhead['export_s'])} s, {overhead['exports']} exports in "
      f"{overhead['epochs']} epochs; the run's median step {overhead['seconds_per_step']:.2f} s)",
      *([f"Keras fit, the same run: startup {results['keras_epoch_overhead_run']['startup_s']:.1f} s, "
         f"overhead {results['keras_epoch_overhead_s']:.1f} s per epoch (validation, checkpoint, "
         "tracing, the final export; the run's median step "
         f"{results['keras_epoch_overhead_run']['seconds_per_step']:.2f} s)"]
        if "keras_epoch_overhead_run" in results else []),
      f"complete {results['end_to_end']['epochs']}-epoch train, wall: " + ", ".join(
          f"{path} {seconds:.1f} s" for path, seconds in results["end_to_end"]["wall_s"].items()),
      "",
      f"{'ratio':34s} {'value':>9s}",
  ]
  for name, value in results["ratios"].items():
    target = results["targets"].get(name)
    verdict = ""
    if target:
      bound = (f">= {target['minimum']}" if "minimum" in target else f"<= {target['maximum']}")
      verdict = f"   target {bound}: {'met' if target['met'] else 'NOT met'}"
    lines.append(f"{name:34s} {_fmt(value, 2):>9s}{verdict}")
  if "accuracy" in results:
    accuracy = results["accuracy"]
    lines.append(f"\nafter {accuracy['steps']} steps from the same weights:")
    lines += [f"  {path}: train loss {accuracy[path]['first_step_loss']:.4f} at step 1, "
              f"{accuracy[path]['last_quarter_train_loss']:.4f} over the last quarter; val_loss "
              f"{accuracy[path]['val_loss']:.4f}, val_accuracy {accuracy[path]['val_accuracy']:.4f}"
              for path in ("estimator", "keras")]
  lines += [f"note: {note}" for note in results["notes"]]
  lines.append("\nphase (wall s, share of the CPUs this process got):")
  lines.append("  " + "; ".join(f"{name} {phase['wall_s']:.0f} s {_fmt(phase['cpu_share'], 2)}"
                                for name, phase in results["phases"].items()))
  lines.append(f"wall time {results['wall_time_s']:.0f} s")
  return "\n".join(lines)
