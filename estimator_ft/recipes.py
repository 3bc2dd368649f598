"""Fine-tuning recipes as small pure functions (standard library only), in the style of BiT's
bit_hyperrule.py: the learning rate as a function of the step, class weights from class counts,
the early-stopping decision from a metric's history, and which setting changes are safe on resume.

Both training paths get their TensorFlow versions from these (model_fn.RecipeSchedule follows
`learning_rate_at` op for op; both paths weight examples with `class_weights`), so the Keras and
Estimator paths cannot drift apart, and each rule is testable without TensorFlow.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

LR_SCHEDULES = ("constant", "cosine", "step")
CLASS_WEIGHT_HELP = "none, balanced (n / (k * n_c)) or CLASS=W,... (unnamed classes get 1)"


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
    batch_size  steps per epoch change, so warm-up, the schedule and epoch counting would shift
  Each refused item says what to do; each accepted one is logged.
  """
  refused, accepted = [], []
  schedule = new.get("lr_schedule", "constant")
  steps_matter = schedule != "constant" or float(new.get("warmup_epochs", 0) or 0) > 0
  if "epochs" in old and old["epochs"] != new.get("epochs"):
    if schedule == "cosine":
      refused.append(f"epochs: {old['epochs']} -> {new['epochs']} under --lr_schedule=cosine "
                     "(the schedule decays over the whole run, so it would jump mid-run; keep "
                     f"--epochs={old['epochs']} to resume, or start a new --model_dir)")
    else:
      accepted.append(f"--epochs {old['epochs']} -> {new['epochs']}: the {schedule} schedule "
                      "does not depend on the number of epochs; training continues to the new end")
  if "batch_size" in old and old["batch_size"] != new.get("batch_size"):
    if steps_matter:
      refused.append(f"batch_size: {old['batch_size']} -> {new['batch_size']} with a warm-up or "
                     f"--lr_schedule={schedule} (steps per epoch change, so the schedule would "
                     f"shift; keep --batch_size={old['batch_size']}, or start a new --model_dir)")
    else:
      accepted.append(f"--batch_size {old['batch_size']} -> {new['batch_size']}: constant "
                      "learning rate, so only the step count per epoch changes")
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
