"""The Estimator `model_fn`: the training flag comes from the mode, BN updates ride in the train op.

Two things went wrong in the hand-written loop this package exists to replace, and both are
handled explicitly here:

1. Training mode. The Keras model is called with `training=(mode == TRAIN)`, so BatchNormalization
   normalises with batch statistics while training and with its moving statistics in EVAL/PREDICT
   (and Dropout is active only while training). Nothing depends on a global learning phase.
2. BatchNormalization moving-statistics updates. Inside a model_fn, Keras layers add *nothing* to
   `tf.compat.v1.GraphKeys.UPDATE_OPS`, so the usual `get_collection(UPDATE_OPS)` recipe trains
   with frozen moving statistics and evaluation then uses the initial ones. We take
   `model.get_updates_for(images)` - exactly the updates of the call on the tensors this
   model_fn was fed, never any built on the functional model's own `Input` placeholder (which
   nothing feeds; model.build_model builds none in graph mode) - and make the optimizer step
   depend on them.
"""

import math
from typing import Callable, Optional, Sequence

import tensorflow as tf

from estimator_ft import contract
from estimator_ft import model as model_lib
from estimator_ft import recipes
from estimator_ft.config import Config
from estimator_ft.data import checks
from estimator_ft.data import images as images_lib

ModeKeys = tf.estimator.ModeKeys

# Keys of the PREDICT dict, which are the serving signatures' outputs (contract.py).
PROBABILITIES = contract.PROBABILITIES
CLASS_INDEX = contract.CLASS_INDEX
CLASS_NAME = contract.CLASS_NAME
ALL_CLASS_NAMES = contract.ALL_CLASS_NAMES
# Eval metric holding the per-example mean loss. Estimator's own "loss" is a mean of per-batch
# means, which over-weights a short last batch; this one matches Keras' validation loss exactly.
EXAMPLE_LOSS = "example_loss"
# Message of the check that stops an evaluation of non-finite model outputs (weights gone NaN),
# which estimator.py turns into the same clear error as a NaN training loss.
NON_FINITE_OUTPUTS = "estimator_ft: the model's outputs are not finite"

# Names of tensors the training hooks fetch (see estimator.py).
BATCH_LOSS_TENSOR = "train_batch/loss_sum"
BATCH_CORRECT_TENSOR = "train_batch/correct"
BATCH_SIZE_TENSOR = "train_batch/size"
# The learning rate of the step a train op runs (read before the step increments the counter).
LEARNING_RATE_TENSOR = "train_batch/learning_rate"
# A bool the training summary hook feeds at every step: true on the steps that write summaries.
WRITE_SUMMARIES_TENSOR = "train_batch/write_summaries"
INPUT_IMAGES_IN_SUMMARY = 3
# The confusion matrix an evaluation accumulates (int64 [C, C], rows: true class), and the op that
# adds a batch to it: the evaluation hook of estimator.py runs one with every batch and draws the
# other for TensorBoard. Not an eval metric: eval results must stay scalars (exporters, history).
EVAL_CONFUSION_MATRIX_TENSOR = "eval_confusion_matrix/value"
EVAL_CONFUSION_UPDATE_OP = "eval_confusion_matrix/update"


class RecipeSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
  """recipes.phase_learning_rate_at in TensorFlow ops: warm-up, then constant, cosine or step
  decay, at the base rate of the phase (--head_epochs: `base` in the head phase, up to global
  step `head_steps`, then `fine_tune_base`).

  Both paths' optimizers get this one object (make_optimizer), so they use the same rate at every
  step; the optimizer calls it with its iteration count (the Estimator's global step).
  """

  def __init__(self, base: float, steps_per_epoch: int, epochs: int, schedule: str = "constant",
               warmup_epochs: float = 0.0, decay_epochs: Sequence[int] = (),
               decay_factor: float = 0.1, name: str = "recipe_schedule", head_steps: int = 0,
               fine_tune_base: Optional[float] = None):
    super().__init__()
    self.base, self.steps_per_epoch, self.epochs = float(base), int(steps_per_epoch), int(epochs)
    self.schedule, self.warmup_epochs = schedule, float(warmup_epochs)
    self.decay_epochs, self.decay_factor = tuple(int(e) for e in decay_epochs), float(decay_factor)
    self.name = name
    self.head_steps = int(head_steps)
    self.fine_tune_base = float(base if fine_tune_base is None else fine_tune_base)

  def __call__(self, step):
    with tf.name_scope(self.name):
      step = tf.cast(step, tf.float32)
      base = tf.constant(self.base, tf.float32)
      if self.head_steps:
        base = tf.where(step < float(self.head_steps), base,
                        tf.constant(self.fine_tune_base, tf.float32))
      warmup = float(recipes.warmup_steps(self.warmup_epochs, self.steps_per_epoch))
      if self.schedule == "cosine":
        remaining = max(self.epochs * self.steps_per_epoch - warmup, 1.0)
        progress = tf.minimum((step - warmup) / remaining, 1.0)
        rate = base * 0.5 * (1.0 + tf.cos(math.pi * progress))
      elif self.schedule == "step":
        passed = tf.add_n([tf.cast(step >= float(e * self.steps_per_epoch), tf.float32)
                           for e in self.decay_epochs] or [tf.constant(0.0)])
        rate = base * tf.pow(tf.constant(self.decay_factor, tf.float32), passed)
      else:
        rate = base
      if warmup > 0:
        rate = tf.where(step < warmup, base * step / warmup, rate)
      return rate

  def get_config(self):
    return {"base": self.base, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
            "schedule": self.schedule, "warmup_epochs": self.warmup_epochs,
            "decay_epochs": list(self.decay_epochs), "decay_factor": self.decay_factor,
            "name": self.name, "head_steps": self.head_steps,
            "fine_tune_base": self.fine_tune_base}


def run_phases(config: Config, steps_per_epoch: int):
  """recipes.phases of config: one phase, or --head_epochs' head and fine-tune phases."""
  return recipes.phases(config.epochs, config.head_epochs, steps_per_epoch, config.learning_rate,
                        config.fine_tune_learning_rate, config.fine_tune_from)


def make_learning_rate(config: Config, steps_per_epoch: int):
  """A float for a constant rate without warm-up or phases (what earlier runs checkpointed),
  else the RecipeSchedule of config's --lr_schedule, --warmup_epochs and --head_epochs."""
  if config.lr_schedule == "constant" and not config.warmup_epochs and not config.head_epochs:
    return config.learning_rate
  decay_epochs = recipes.parse_decay_epochs(config.lr_decay_epochs) if config.lr_schedule == "step" else ()
  phases = run_phases(config, steps_per_epoch)
  return RecipeSchedule(config.learning_rate, steps_per_epoch, config.epochs, config.lr_schedule,
                        config.warmup_epochs, decay_epochs, config.lr_decay_factor,
                        head_steps=phases[0].end_step if len(phases) > 1 else 0,
                        fine_tune_base=phases[-1].learning_rate)


def make_optimizer(config: Config, steps_total: int):
  """The same (legacy Keras) optimizer both paths use, so their updates are bit-identical."""
  steps_per_epoch = max(steps_total // max(config.epochs, 1), 1)
  learning_rate = make_learning_rate(config, steps_per_epoch)
  if config.optimizer == "momentum":
    optimizer = tf.keras.optimizers.legacy.SGD(learning_rate=learning_rate, momentum=config.momentum)
  else:
    optimizer = tf.keras.optimizers.legacy.Adam(learning_rate=learning_rate)
  if config.precision == "mixed_float16":
    optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer


class SparseCategoricalCrossentropyWithSmoothing(tf.keras.losses.Loss):
  """Keras' CategoricalCrossentropy(label_smoothing=s) on integer labels (Keras' sparse loss has
  no label smoothing): targets y * (1 - s) + s / num_classes."""

  def __init__(self, num_classes: int, label_smoothing: float = 0.0,
               reduction=tf.keras.losses.Reduction.NONE, name="sparse_categorical_crossentropy"):
    super().__init__(reduction=reduction, name=name)
    self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)

  def call(self, y_true, y_pred):
    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    targets = tf.one_hot(labels, self.num_classes, dtype=y_pred.dtype)
    return tf.keras.losses.categorical_crossentropy(targets, y_pred,
                                                    label_smoothing=self.label_smoothing)

  def get_config(self):
    return {**super().get_config(), "num_classes": self.num_classes,
            "label_smoothing": self.label_smoothing}


def make_loss(num_classes: int, label_smoothing: float = 0.0):
  """Keras loss objects (per-example values); the Keras path compiles with the same ones.

  --label_smoothing has Keras' own meaning: BinaryCrossentropy's (target y*(1-s) + s/2) for the
  sigmoid head, CategoricalCrossentropy's (y*(1-s) + s/k) for the softmax head.
  """
  none = tf.keras.losses.Reduction.NONE
  if model_lib.num_outputs(num_classes) == 1:
    return tf.keras.losses.BinaryCrossentropy(reduction=none, label_smoothing=label_smoothing)
  if label_smoothing:
    return SparseCategoricalCrossentropyWithSmoothing(num_classes, label_smoothing, reduction=none)
  return tf.keras.losses.SparseCategoricalCrossentropy(reduction=none)


def training_class_weights(config: Config, train_split) -> Optional[list]:
  """--class_weight as one weight per class (class order), from the training split's counts; None
  for --class_weight=none. Both paths call this, so they weight the same examples the same."""
  if recipes.parse_class_weight(config.class_weight) is None:
    return None
  class_names = tuple(train_split.class_names)
  counts = checks.class_counts(train_split.labels, len(class_names))
  if config.class_weight == "balanced" and sum(counts) != train_split.num_examples:
    raise ValueError("--class_weight=balanced needs the training labels, which this data source "
                     "does not list in advance (TFDS): name the weights, --class_weight=CLASS=W,...")
  return recipes.class_weights(config.class_weight, class_names, counts)


def predicted_class(probabilities, num_classes: int):
  if model_lib.num_outputs(num_classes) == 1:
    return tf.cast(probabilities[:, 0] > 0.5, tf.int32)
  return tf.argmax(probabilities, axis=-1, output_type=tf.int32)


def class_probabilities(probabilities, num_classes: int):
  """[batch, num_classes] probabilities, also for the single sigmoid unit."""
  if model_lib.num_outputs(num_classes) == 1:
    return tf.concat([1.0 - probabilities, probabilities], axis=-1)
  return probabilities


def per_example_loss(labels, probabilities, num_classes: int, label_smoothing: float = 0.0):
  labels = tf.reshape(labels, [-1])
  if model_lib.num_outputs(num_classes) == 1:
    labels = tf.cast(labels[:, tf.newaxis], probabilities.dtype)
  return make_loss(num_classes, label_smoothing)(labels, probabilities)


def build_model_fn(config: Config, class_names, steps_per_epoch: int, initial_weights: str = "",
                   class_weights: Optional[Sequence[float]] = None,
                   phase: Optional[recipes.Phase] = None,
                   build_model: Callable[[Config, int], tf.keras.Model] = model_lib.build_model):
  """Returns the model_fn for `tf.estimator.Estimator`.

  `initial_weights` is a checkpoint prefix written by `model.save_initial_weights`; when given, a
  fresh run starts from it (a resumed run restores its own checkpoint instead). `class_weights`
  (training_class_weights) weight each example's training loss; evaluation is unweighted.
  `phase` (recipes.phases; default the run's last) decides what trains: in --head_epochs' head
  phase the whole base is frozen (its BatchNorm in inference mode, no weight decay) while the
  optimizer already holds the slots of every variable phase 2 trains, so the graphs of both
  phases have the same variables and each restores the other's checkpoints.
  `build_model` makes the model of each call (model.OneModelPerGraph: one model for all the calls
  in one graph).
  """
  class_names = tuple(class_names)
  num_classes = len(class_names)
  steps_total = config.epochs * steps_per_epoch
  phase = phase or run_phases(config, steps_per_epoch)[-1]

  def model_fn(features, labels, mode):
    images = features[contract.FEATURE_KEY] if isinstance(features, dict) else features
    training = mode == ModeKeys.TRAIN
    model = build_model(config, num_classes)
    # Built with --fine_tune_from's trainable set: phase 2's. With --head_epochs both phases
    # create the optimizer's slots for all of it, the same way, so their graphs have the same
    # variables under the same names (the head phase trains only the head's).
    fine_tune_variables = list(model.trainable_weights) if config.head_epochs else ()
    if phase.name == recipes.HEAD_PHASE:
      model_lib.freeze_whole_base(model)
    if initial_weights:
      model_lib.init_from_initial_weights(model, initial_weights)
    probabilities = model(images, training=training)
    if mode == ModeKeys.PREDICT:
      return _predict_spec(prediction_outputs(probabilities, class_names))

    all_probabilities = class_probabilities(probabilities, num_classes)
    classes = predicted_class(probabilities, num_classes)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    training_weights = None
    if training and class_weights is not None:
      training_weights = tf.gather(tf.constant(list(class_weights), tf.float32), labels)
    example_losses, regularization, loss = classification_loss(
        model, labels, probabilities, num_classes, config.label_smoothing, training_weights)
    correct = tf.cast(tf.equal(classes, labels), tf.float32)

    if mode == ModeKeys.EVAL:
      confusion_matrix_accumulator(labels, classes, num_classes)
      # A checkpoint saved right after the step that blew the weights up holds NaNs; without this
      # check the AUC metric would fail with an obscure assertion instead.
      probabilities = tf.debugging.check_numerics(probabilities, NON_FINITE_OUTPUTS)
      return tf.estimator.EstimatorSpec(
          mode, loss=loss, predictions={PROBABILITIES: all_probabilities},
          eval_metric_ops=_eval_metrics(labels, probabilities, all_probabilities, classes,
                                        example_losses + regularization, num_classes))

    train_op, _ = make_train_op(config, model, images, loss, steps_total,
                                tf.compat.v1.train.get_or_create_global_step(),
                                slot_variables=fine_tune_variables)

    # Fetched by the epoch-metrics hook: Keras-style running averages are per example.
    # Keras averages its running loss over examples (each batch's class-weighted mean x its
    # size); its accuracy is a compiled `metrics` entry, which Keras does not weight.
    batch_size = tf.shape(labels)[0]
    tf.identity(tf.cast(batch_size, tf.float32) * loss, name=BATCH_LOSS_TENSOR)
    tf.identity(tf.reduce_sum(correct), name=BATCH_CORRECT_TENSOR)
    tf.identity(batch_size, name=BATCH_SIZE_TENSOR)
    # Training accuracy, loss and learning rate go to TensorBoard as the common curves both paths
    # write (run/summaries.py, from estimator.EpochMetricsHook), not as per-batch summaries here.
    # A few input images on the summary steps only, without a step that fetches more than the
    # others: the slice holds no image unless the hook feeds `write_summaries` (see
    # estimator.TrainingSummaryHook for why every step fetches the same).
    write_summaries = tf.compat.v1.placeholder_with_default(False, [],
                                                            name=WRITE_SUMMARIES_TENSOR)
    shown = INPUT_IMAGES_IN_SUMMARY * tf.cast(write_summaries, tf.int32)
    tf.compat.v1.summary.image("input_images", _viewable(images[:shown]),
                               max_outputs=INPUT_IMAGES_IN_SUMMARY)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)

  return model_fn


def classification_loss(model: tf.keras.Model, labels, probabilities, num_classes: int,
                        label_smoothing: float = 0.0, example_weights=None):
  """(per-example losses [b], regularization scalar, the loss: mean(weights * losses) + regularization).

  Keras' SUM_OVER_BATCH_SIZE with sample weights is the same weighted mean (sum over the batch
  size); the regularization is --weight_decay's penalty (model.add_weight_decay).
  """
  example_losses = per_example_loss(labels, probabilities, num_classes, label_smoothing)
  regularization = tf.add_n(model.losses) if model.losses else tf.constant(0.0)
  weighted = example_losses if example_weights is None else example_losses * example_weights
  return example_losses, regularization, tf.reduce_mean(weighted) + regularization


def make_train_op(config: Config, model: tf.keras.Model, images, loss, steps_total: int,
                  global_step=None, slot_variables: Sequence[tf.Variable] = ()):
  """(train_op, optimizer) in graph mode: one optimizer step that runs after the BN updates of the
  model's call on `images` (unless --update_ops=skip).

  The model_fn and the benchmark's feed_dict loop both build their step here. `global_step`
  becomes the optimizer's step counter, so each train_op run increments it once.
  `slot_variables`: variables whose optimizer slots are created first, although this step may not
  train them all (--head_epochs: phase 2's in both phases; in the head phase the base's stay at
  their initial zeros).
  """
  optimizer = make_optimizer(config, steps_total)
  if global_step is not None:
    optimizer.iterations = global_step
  if slot_variables:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    # As apply_gradients creates them: under the optimizer's name scope, outside control flow.
    with tf.name_scope(inner._name), tf.init_scope():  # pylint: disable=protected-access
      inner._create_all_weights(list(slot_variables))  # pylint: disable=protected-access
  bn_updates = batchnorm_updates(model, images) if config.update_ops == "apply" else []
  # Read before the step: the rate this step applies (Keras' schedule(iterations before the step)).
  learning_rate = tf.identity(_current_learning_rate(optimizer), name=LEARNING_RATE_TENSOR)
  with tf.control_dependencies(bn_updates + [learning_rate]):
    train_op = optimizer.get_updates(loss, model.trainable_weights)[0]
  return train_op, optimizer


def batchnorm_updates(model: tf.keras.Model, fed_tensor) -> list:
  """The moving mean/variance assignments of the model call on `fed_tensor`, and nothing else.

  Frozen BN layers (trainable=False) run in inference mode and contribute no updates.
  """
  return list(model.get_updates_for(fed_tensor)) + list(model.get_updates_for(None))


def _current_learning_rate(optimizer):
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  return tf.cast(inner._decayed_lr(tf.float32), tf.float32)  # pylint: disable=protected-access


def _viewable(images):
  """Undoes ResNet50's caffe preprocessing (BGR, mean-centred) for TensorBoard's image panel."""
  mean_bgr = tf.constant(images_lib.IMAGENET_MEAN_BGR, tf.float32)
  rgb = tf.reverse(tf.cast(images, tf.float32) + mean_bgr, axis=[-1])
  return tf.cast(tf.clip_by_value(rgb, 0.0, 255.0), tf.uint8)


def confusion_matrix_accumulator(labels, classes, num_classes: int):
  """(value, update op) of a confusion matrix over an evaluation, named for the evaluation hook.

  A local metric variable, so every evaluation starts from zeros like the eval metrics.
  """
  with tf.compat.v1.name_scope(None):
    matrix = tf.compat.v1.Variable(
        tf.zeros([num_classes, num_classes], tf.int64), trainable=False, name="eval_confusion_matrix",
        collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES, tf.compat.v1.GraphKeys.METRIC_VARIABLES])
    batch = tf.math.confusion_matrix(labels, classes, num_classes=num_classes, dtype=tf.int64)
    update = tf.identity(matrix.assign_add(batch), name=EVAL_CONFUSION_UPDATE_OP)
    value = tf.identity(matrix.read_value(), name=EVAL_CONFUSION_MATRIX_TENSOR)
  return value, update


def _eval_metrics(labels, probabilities, all_probabilities, classes, example_losses, num_classes):
  metrics = {
      "accuracy": tf.compat.v1.metrics.accuracy(labels, classes),
      EXAMPLE_LOSS: tf.compat.v1.metrics.mean(example_losses),
  }
  if num_classes == 2:
    positive = probabilities[:, 0]
    metrics["auc"] = tf.compat.v1.metrics.auc(labels, positive, summation_method="careful_interpolation")
    metrics["precision"] = tf.compat.v1.metrics.precision(labels, classes)
    metrics["recall"] = tf.compat.v1.metrics.recall(labels, classes)
  else:
    # Top-k only where it says more than accuracy: k below the number of classes.
    k = min(5, num_classes - 1)
    in_top_k = tf.math.in_top_k(labels, all_probabilities, k)
    metrics[f"top_{k}_accuracy"] = tf.compat.v1.metrics.mean(tf.cast(in_top_k, tf.float32))
  return metrics


def prediction_outputs(probabilities, class_names) -> dict:
  """The PREDICT outputs from the model's output; the serving signatures of both paths use them."""
  class_names = tuple(class_names)
  num_classes = len(class_names)
  all_probabilities = class_probabilities(probabilities, num_classes)
  classes = predicted_class(probabilities, num_classes)
  names = tf.constant(class_names)
  batch = tf.shape(all_probabilities)[0]
  return {PROBABILITIES: all_probabilities, CLASS_INDEX: classes, CLASS_NAME: tf.gather(names, classes),
          ALL_CLASS_NAMES: tf.tile(names[tf.newaxis, :], [batch, 1])}


def _predict_spec(predictions):
  export_outputs = {
      tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY: tf.estimator.export.PredictOutput(predictions),
      "classification": tf.estimator.export.ClassificationOutput(
          scores=predictions[PROBABILITIES], classes=predictions[ALL_CLASS_NAMES]),
  }
  return tf.estimator.EstimatorSpec(ModeKeys.PREDICT, predictions=predictions,
                                    export_outputs=export_outputs)
