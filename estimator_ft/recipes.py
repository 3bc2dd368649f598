"""Fine-tuning recipes as small pure functions (standard library only), in the style of BiT's
bit_hyperrule.py: the learning rate as a function of the step, class weights from class counts,
the early-stopping decision from a metric's history, the phases of two-phase fine-tuning, and
which setting changes are safe on resume.

Both training paths get their TensorFlow versions from these (model_fn.RecipeSchedule follows
`learning_rate_at` op for op; both paths weight examples with `class_weights`), so the Keras and
Estimator paths cannot drift apart, and each rule is testable without TensorFlow.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

LR_SCHEDULES = ("constant", "cosine", "step")
CLASS_WEIGHT_HELP = "none, balanced (n / (k * n_c)) or CLASS=W,... (unnamed classes get 1)"

# The phases of a run (`phases`): one "train" phase, or with --head_epochs a "head" phase (the
# whole base frozen) and then a "fine_tune" phase (trainable from --fine_tune_from).
TRAIN_PHASE, HEAD_PHASE, FINE_TUNE_PHASE = "train", "head", "fine_tune"
# --fine_tune_from value that freezes the whole base (only the head trains).
HEAD_ONLY = "none"
# --fine_tune_learning_rate=0 means learning_rate / this: the base's pretrained features need
# smaller steps than the new head (the Keras transfer-learning guide drops the rate 100x, from
# Adam's 1e-3 to 1e-5; with this package's default 1e-4 SGD rate, / 10 gives the guide's 1e-5).
FINE_TUNE_RATE_DIVISOR = 10


# ---------------------------------------------------------------- learning rate

def parse_decay_epochs(text: str) -> Tuple[int, ...]:
  """'30,60,80' -> (30, 60, 80): strictly increasing positive epochs. Raises ValueError."""
  parts = [p.strip() for p in str(text).split(",") if p.strip()]
  try:
    epochs = tuple(int(p) for p in parts)
  except ValueError:
    raise ValueError(f"--lr_decay_epochs={text!r}: give comma-separated whole epochs, e.g. "
                     "30,60,80.") from None
  if any(e < 1 for e in epochs) or list(epochs) != sorted(set(epochs)):
    raise ValueError(f"--lr_decay_epochs={text!r}: the epochs must be positive and increasing, "
                     "e.g. 30,60,80.")
  return epochs


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
  return int(round(warmup_epochs * steps_per_epoch))


def learning_rate_at(step: int, base: float, steps_per_epoch: int, epochs: int,
                     schedule: str = "constant", warmup_epochs: float = 0.0,
                     decay_epochs: Sequence[int] = (), decay_factor: float = 0.1) -> float:
  """The learning rate of the optimizer step that runs at global `step` (0 = the first step).

  Warm-up: linear from 0 at step 0 to `base` at the end of `warmup_epochs`. Then
    constant  base
    cosine    base * (1 + cos(pi * t)) / 2, t from 0 at the end of warm-up to 1 at the last step
    step      base * decay_factor ** (number of `decay_epochs` boundaries already passed)
  (step boundaries count epochs from the start of the run, warm-up included, as ResNet's recipe).
  """
  warmup = warmup_steps(warmup_epochs, steps_per_epoch)
  if step < warmup:
    return base * step / warmup
  if schedule == "cosine":
    remaining = max(epochs * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / remaining, 1.0)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
  if schedule == "step":
    passed = sum(1 for e in decay_epochs if step >= e * steps_per_epoch)
    return base * decay_factor ** passed
  return base


# ---------------------------------------------------------------- two-phase fine-tuning

@dataclasses.dataclass(frozen=True)
class Phase:
  """Epochs first_epoch..last_epoch (1-based, inclusive) = global steps first_step..end_step - 1,
  trained at base rate `learning_rate` with the layers from `trainable_from` on (none: head only)."""
  name: str
  first_epoch: int
  last_epoch: int
  first_step: int
  end_step: int
  learning_rate: float
  trainable_from: str

  def describe(self) -> dict:
    """What results.json and the log say about the phase."""
    return {"phase": self.name, "epochs": [self.first_epoch, self.last_epoch],
            "steps": [self.first_step, self.end_step], "learning_rate": self.learning_rate,
            "trainable": ("the head only: the whole base frozen, its BatchNorm in inference mode"
                          if self.trainable_from == HEAD_ONLY else
                          "the whole model" if self.trainable_from == "all" else
                          f"the head and the base from layer {self.trainable_from} on")}


def phase_line(phase: Phase) -> str:
  """One phase for the log: its epochs, base rate and what trains."""
  described = phase.describe()
  return (f"epochs {phase.first_epoch}-{phase.last_epoch} (steps {phase.first_step}-"
          f"{phase.end_step}), base learning rate {phase.learning_rate:g}, trains "
          f"{described['trainable']}")


def phases_note(run_phases: Sequence[Phase]) -> str:
  """The run plan's note on --head_epochs' phases ('' for a one-phase run)."""
  if len(run_phases) < 2:
    return ""
  return "; " + "; then ".join(f"phase {p.name}: {phase_line(p)}" for p in run_phases)


def fine_tune_rate(learning_rate: float, fine_tune_learning_rate: float) -> float:
  """Phase 2's base rate: --fine_tune_learning_rate, or 0 = learning_rate / FINE_TUNE_RATE_DIVISOR."""
  return fine_tune_learning_rate or learning_rate / FINE_TUNE_RATE_DIVISOR


def phases(epochs: int, head_epochs: int, steps_per_epoch: int, learning_rate: float,
           fine_tune_learning_rate: float, fine_tune_from: str) -> Tuple[Phase, ...]:
  """The run's phases in order. head_epochs=0: one phase, the whole run as configured. Else the
  Keras transfer-learning guide's recipe: `head_epochs` epochs of the new head alone at
  `learning_rate`, then the rest from `fine_tune_from` at fine_tune_rate(...).

  The schedule shape (warm-up, cosine, step boundaries) spans the whole run in global steps,
  as without phases; each phase scales it by its own base rate (phase_learning_rate_at).
  """
  total = epochs * steps_per_epoch
  if not head_epochs:
    return (Phase(TRAIN_PHASE, 1, epochs, 0, total, learning_rate, fine_tune_from),)
  boundary = head_epochs * steps_per_epoch
  return (Phase(HEAD_PHASE, 1, head_epochs, 0, boundary, learning_rate, HEAD_ONLY),
          Phase(FINE_TUNE_PHASE, head_epochs + 1, epochs, boundary, total,
                fine_tune_rate(learning_rate, fine_tune_learning_rate), fine_tune_from))


def phase_at(step: int, run_phases: Sequence[Phase]) -> Phase:
  """The phase of the optimizer step that runs at global `step` (0 = the first; past the end:
  the last phase)."""
  for phase in run_phases:
    if step < phase.end_step:
      return phase
  return run_phases[-1]


def phase_of_checkpoint(step: int, run_phases: Sequence[Phase]) -> Phase:
  """The phase whose training wrote the checkpoint at global `step` (the boundary checkpoint is
  phase 1's last); its model evaluates that checkpoint, as the Keras path does at the epoch end."""
  return phase_at(max(step - 1, 0), run_phases)


def phases_ahead(step: int, run_phases: Sequence[Phase]) -> Tuple[Phase, ...]:
  """The phases a run resumed at global `step` still trains, in order (empty when done)."""
  return tuple(p for p in run_phases if p.end_step > step)


def phase_learning_rate_at(step: int, run_phases: Sequence[Phase], steps_per_epoch: int,
                           epochs: int, schedule: str = "constant", warmup_epochs: float = 0.0,
                           decay_epochs: Sequence[int] = (), decay_factor: float = 0.1) -> float:
  """learning_rate_at with the base rate of the phase `step` is in."""
  return learning_rate_at(step, phase_at(step, run_phases).learning_rate, steps_per_epoch, epochs,
                          schedule, warmup_epochs, decay_epochs, decay_factor)


# ---------------------------------------------------------------- class weights

def parse_class_weight(spec: str, class_names: Optional[Sequence[str]] = None):
  """'none' -> None, 'balanced' -> 'balanced', 'a=2,b=0.5' -> {'a': 2.0, 'b': 0.5}.

  With `class_names`, names that are not classes are refused. Raises ValueError.
  """
  spec = (spec or "none").strip()
  if spec in ("none", "balanced"):
    return None if spec == "none" else spec
  weights = {}
  for part in spec.split(","):
    name, sep, value = part.partition("=")
    try:
      weight = float(value)
    except ValueError:
      weight = float("nan")
    if not sep or not name.strip() or not (weight >= 0 and math.isfinite(weight)):
      raise ValueError(f"--class_weight={spec!r}: use {CLASS_WEIGHT_HELP}, e.g. "
                       "--class_weight=cat=1,dog=3 (weights >= 0).")
    weights[name.strip()] = weight
  if class_names is not None:
    unknown = sorted(set(weights) - set(class_names))
    if unknown:
      raise ValueError(f"--class_weight names {', '.join(unknown)}, which are not classes of this "
                       f"data set: the classes are {', '.join(class_names)}.")
  return weights


def class_weights(spec: str, class_names: Sequence[str], counts: Sequence[int]) -> Optional[List[float]]:
  """The per-class training-loss weights in class order, or None for --class_weight=none.

  balanced: n / (k * n_c) (scikit-learn's and Keras' tutorial's rule): every class contributes
  the same total weight, and the weights average 1 over the examples.
  """
  parsed = parse_class_weight(spec, class_names)
  if parsed is None:
    return None
  if parsed == "balanced":
    total, k = sum(counts), len(counts)
    if min(counts) == 0:
      raise ValueError("--class_weight=balanced: a class has no training images "
                       f"({dict(zip(class_names, counts))}); add images or name the weights.")
    return [total / (k * c) for c in counts]
  return [float(parsed.get(name, 1.0)) for name in class_names]


# ---------------------------------------------------------------- early stopping

def early_stopping(values: Sequence[float], patience: int, min_delta: float = 0.0,
                   higher_is_better: bool = False) -> Dict:
  """The decision after the evaluations `values` (in order, one per epoch).

  An evaluation improves when it beats the best so far by more than `min_delta`. Returns
  {"stop": bool, "best_index": i, "best": value, "waited": evaluations since the best}; `stop`
  once `waited` reaches `patience` (patience 0: never stop).
  """
  best_index, best = None, None
  for index, value in enumerate(values):
    if value is None or not math.isfinite(value):
      continue
    if best is None or (value - best > min_delta if higher_is_better else best - value > min_delta):
      best_index, best = index, value
  waited = len(values) - 1 - best_index if best_index is not None else len(values)
  return {"stop": patience > 0 and waited >= patience, "best_index": best_index, "best": best,
          "waited": waited}


# ---------------------------------------------------------------- resume safety

def resume_changes(old: Dict, new: Dict) -> Tuple[List[str], List[str]]:
  """(refused, accepted): what a resume with settings `new` over a run made with `old` would do.

  Settings that always change the next step are in config.CHECKPOINT_DEFINING_FIELDS; these two
  depend on the schedule:
    epochs      the cosine schedule decays over all epochs: more epochs would stretch it mid-run
    batch_size  always refused: the steps taken were counted in the old batches, so epoch
                counting (the Estimator's is global step / steps per epoch), the input position,
                warm-up, the schedule and the phase boundary of --head_epochs would all shift
  Each refused item says what to do; each accepted one is logged.
  """
  refused, accepted = [], []
  schedule = new.get("lr_schedule", "constant")
  if "epochs" in old and old["epochs"] != new.get("epochs"):
    if schedule == "cosine":
      refused.append(f"epochs: {old['epochs']} -> {new['epochs']} under --lr_schedule=cosine "
                     "(the schedule decays over the whole run, so it would jump mid-run; keep "
                     f"--epochs={old['epochs']} to resume, or start a new --model_dir)")
    else:
      accepted.append(f"--epochs {old['epochs']} -> {new['epochs']}: the {schedule} schedule "
                      "does not depend on the number of epochs; training continues to the new end")
  if "batch_size" in old and old["batch_size"] != new.get("batch_size"):
    refused.append(f"batch_size: {old['batch_size']} -> {new['batch_size']} (the steps already "
                   "taken were counted in the old batches: the epochs done, where the input "
                   "resumes, a warm-up, the schedule and the phase boundary of --head_epochs "
                   f"would all shift; keep --batch_size={old['batch_size']} to resume, or start a "
                   "new --model_dir)")
  return refused, accepted


def early_stopping_report(history: Sequence[Dict], metric: str, patience: int,
                          min_delta: float = 0.0) -> Optional[Dict]:
  """What results.json says about --early_stopping_patience, from the per-epoch history (both
  paths' entries carry `val_<metric>`); None when early stopping is off.

  The decision is taken after each evaluation in order, so this finds the first epoch at which
  the run stopped (or would have): later entries, if any, are not looked at.
  """
  if patience <= 0:
    return None
  key, higher = f"val_{metric}", metric != "loss"
  evaluated = [h for h in history if h.get(key) is not None]
  for count in range(1, len(evaluated) + 1):
    decision = early_stopping([h[key] for h in evaluated[:count]], patience, min_delta, higher)
    if decision["stop"]:
      best_epoch = evaluated[decision["best_index"]]["epoch"]
      return {"stopped": True, "epoch": evaluated[count - 1]["epoch"], "best_epoch": best_epoch,
              "best": decision["best"], "metric": key,
              "reason": f"{key} did not improve by more than {min_delta:g} for {patience} "
                        f"evaluation(s) after its best, {decision['best']:.6g} at epoch "
                        f"{best_epoch} (--early_stopping_patience={patience})"}
  decision = early_stopping([h[key] for h in evaluated], patience, min_delta, higher)
  return {"stopped": False, "epoch": evaluated[-1]["epoch"] if evaluated else 0,
          "waited": decision["waited"], "metric": key,
          "reason": f"{key} improved within the last {patience} evaluation(s): trained to the end"}
