"""How much the benchmark runs (`BenchPlan`), its targets, and the Config it trains with."""

import dataclasses
import os

from estimator_ft import config as config_lib
from estimator_ft.config import Config


TARGETS = {
    # name: (minimum, why it matters)
    "estimator_over_keras": (1.0, "the Estimator path costs nothing against Keras fit"),
    "synthetic_vs_folder_step_ratio": (0.95, "the input pipeline is not the bottleneck"),
    "pipeline_over_python_loader": (2.0, "tf.data feeds faster than the original Python loader"),
    "estimator_fraction_of_peak": (0.85, "training runs near this CPU's matmul peak (224 px)"),
}
# The fraction-of-peak target by CPU kind (224 px float32): convolutions reach more of the
# matmul peak with AVX-512 than with AVX2 (+ oneDNN) alone.
FRACTION_OF_PEAK_TARGETS = (("avx512f", 0.85), ("avx2", 0.80))


def fraction_of_peak_target(cpu_features) -> float:
  """The estimator_fraction_of_peak target for a CPU with these features (machine.cpu_info)."""
  for feature, target in FRACTION_OF_PEAK_TARGETS:
    if feature in cpu_features:
      return target
  return FRACTION_OF_PEAK_TARGETS[-1][1]
MAXIMUM_TARGETS = {
    # name: (maximum, why it matters)
    "estimator_epoch_overhead_s": (5.0, "an epoch's evaluation and best export cost at most 5 s "
                                        "(64 px, 2 cores)"),
    "end_to_end_ratio": (1.0, "a complete short train takes no longer on the Estimator path "
                              "than on Keras fit"),
}


@dataclasses.dataclass(frozen=True)
class BenchPlan:
  """How much of everything to run. `make_plan` fills it from the command-line settings."""
  image_size: int
  batch_size: int
  steps: int  # timed training steps per repeat
  repeats: int
  warmup_steps: int
  loader_batches: int  # timed batches per repeat for the two input loaders
  overhead_epochs: int
  overhead_steps_per_epoch: int
  matmul_repeats: int
  precision: str
  jit: bool
  accuracy_steps: int


# The short accuracy run trains from random weights with the settings under which
# tests/test_training.py sees the sample task learn. Momentum SGD did not learn in 100 steps at
# 64 px, batch 16 (0.01 diverged: training loss 0.98 -> 3.8; 1e-3 stayed at 0.97). BN momentum 0.9
# lets the moving statistics settle within the run (see config.batchnorm_momentum).
ACCURACY_SETTINGS = dict(optimizer="adam", learning_rate=1e-3, batchnorm_momentum=0.9, dropout=0.0)

# The full run's amounts beyond --steps and --repeats. Warm-up covers graph optimisation, tracing
# and the input pipeline filling its buffers.
WARMUP_STEPS = 3

MIN_LOADER_BATCHES = 10

OVERHEAD_EPOCHS = 3

MIN_OVERHEAD_STEPS_PER_EPOCH = 3

MATMUL_REPEATS = 5

QUICK_LIMITS = dict(steps=5, repeats=2, warmup_steps=3, loader_batches=8, overhead_epochs=2,
                    overhead_steps_per_epoch=3, matmul_repeats=3)

# Keeps the Estimator's checkpoint saver out of the timed steps: it saves at the start and at the
# end of the run only.
_NO_CHECKPOINT_DURING_TIMING = 10**9
# Summaries at the first step only (both paths write theirs then): no timed step encodes the
# input-image summary or writes an event. (Which steps write no longer changes the training
# step's fetches: see estimator.TrainingSummaryHook.)
_NO_SUMMARY_DURING_TIMING = 10**9
_NO_PROGRESS_LOG = 10**9


def make_plan(image_size: int = 64, batch_size: int = 32, steps: int = 20, repeats: int = 3,
              quick: bool = False, precision: str = "float32", jit: bool = False,
              accuracy_steps: int = 0) -> BenchPlan:
  config_lib.check_image_size(image_size)
  for name, value in (("batch_size", batch_size), ("steps", steps), ("repeats", repeats)):
    config_lib.check_at_least(name, value, 1)
  config_lib.check_at_least("accuracy_steps", accuracy_steps, 0, "0 skips the accuracy run.")
  config_lib.check_choice("precision", precision, config_lib.PRECISIONS)
  plan = BenchPlan(image_size=image_size, batch_size=batch_size, steps=steps, repeats=repeats,
                   warmup_steps=WARMUP_STEPS, loader_batches=max(steps, MIN_LOADER_BATCHES),
                   overhead_epochs=OVERHEAD_EPOCHS,
                   overhead_steps_per_epoch=max(steps // 2, MIN_OVERHEAD_STEPS_PER_EPOCH),
                   matmul_repeats=MATMUL_REPEATS, precision=precision, jit=jit,
                   accuracy_steps=accuracy_steps)
  if quick:
    plan = dataclasses.replace(plan, **{name: min(getattr(plan, name), limit)
                                        for name, limit in QUICK_LIMITS.items()})
  return plan


def bench_config(plan: BenchPlan, data_dir: str, model_dir: str) -> Config:
  return Config(
      train_dir=os.path.join(data_dir, "train"), validation_dir=os.path.join(data_dir, "validation"),
      model_dir=model_dir, image_size=plan.image_size, batch_size=plan.batch_size, weights="none",
      precision=plan.precision, jit=plan.jit, epochs=1,
      save_checkpoints_steps=_NO_CHECKPOINT_DURING_TIMING,
      save_summary_steps=_NO_SUMMARY_DURING_TIMING,
      log_every_n_steps=_NO_PROGRESS_LOG).validate()
