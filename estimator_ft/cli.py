"""`estimator-ft SUBCOMMAND --flags`: the only module that defines or reads absl flags.

Each subcommand defines just its own flags (so `--help` lists what matters and no flag is inert),
turns them into library arguments - for training, one validated `Config` - and calls the library.
User errors (ValueError from validation or the library) print one clear message and exit 2.
Each subcommand imports its job only when it runs, so `--help` and flag errors never wait for
TensorFlow to start, and `predict` loads no training code.
"""

import dataclasses
import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from estimator_ft import cluster
from estimator_ft import config as config_lib
from estimator_ft import tf_environment
from estimator_ft import interrupts
from estimator_ft.config import Config

FLAGS = flags.FLAGS
logger = logging.getLogger("estimator_ft")

EXIT_USER_ERROR = 2

def _define_config_flags(overrides=None, skip=()):
  """One flag per Config field: its default (or `overrides`), help and choices from the field."""
  overrides = overrides or {}
  for field in dataclasses.fields(Config):
    if field.name in skip:
      continue
    default = overrides.get(field.name, field.default)
    help_text = field.metadata["help"]
    if "choices" in field.metadata:
      flags.DEFINE_enum(field.name, default, field.metadata["choices"], help_text)
    elif field.type in (bool, "bool"):
      flags.DEFINE_boolean(field.name, default, help_text)
    elif field.type in (int, "int"):
      # Ranges are checked by Config.validate, whose messages say what to use instead.
      flags.DEFINE_integer(field.name, default, help_text)
    elif field.type in (float, "float"):
      flags.DEFINE_float(field.name, default, help_text)
    else:
      flags.DEFINE_string(field.name, default, help_text)


def _field_help(name: str) -> str:
  return next(f.metadata["help"] for f in dataclasses.fields(Config) if f.name == name)


def _config_from_flags(require_model_dir=True, **forced) -> Config:
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Config) if f.name in FLAGS}
  values.update(forced)
  return Config(**values).validate(require_model_dir=require_model_dir)


# ---------------------------------------------------------------- train

def _define_train():
  _define_config_flags()


def _run_train(argv):
  _no_positional(argv)
  config = _config_from_flags()
  from estimator_ft.jobs import train as train_job
  results = train_job.run(config)
  _print_train_summary(results, config)
  return 0


def _print_train_summary(results, config):
  if "role" in results:  # a worker, ps or evaluator of a TF_CONFIG cluster (see training.run)
    print(f"\nDone: {results['role']} ({config.path} path). The chief writes checkpoints and "
          f"results.json in {config.model_dir}.")
    return
  history = results.get("history") or []
  last = history[-1] if history else {}
  lines = [
      "",
      f"Done: {config.path} path, {results.get('global_step')} steps, {len(history)} epochs, "
      f"{results.get('wall_time_s')} s.",
  ]
  if "val_accuracy" in last:
    lines.append(f"  final epoch: training loss {last.get('loss', float('nan')):.4f} / accuracy "
                 f"{last.get('accuracy', float('nan')):.4f} (running averages over the epoch); "
                 f"validation loss {last['val_loss']:.4f} / accuracy {last['val_accuracy']:.4f} "
                 "(one full pass, inference mode)")
  lines += [
      f"  checkpoints:      {config.model_dir}",
      f"  results:          {os.path.join(config.model_dir, 'results.json')}",
      f"  TensorBoard logs: {config.model_dir}   (open with: tensorboard --logdir {config.model_dir})",
      f"  exported model:   {results.get('export_path') or 'none (see estimator-ft export)'}",
  ]
  phases = results.get("phases") or []
  if len(phases) > 1:
    lines.append("  phases:           " + "; then ".join(
        f"{p['phase']} (epochs {p['epochs'][0]}-{p['epochs'][1]}, base rate "
        f"{p['learning_rate']:g}: {p['trainable']})" for p in phases))
  if results.get("skipped_images"):
    lines.append(f"  skipped images:   {len(results['skipped_images'])} (listed in results.json)")
  print("\n".join(lines))


# ---------------------------------------------------------------- compare

def _define_compare():
  # Parity needs dropout off and no augmentation: stated in the output too. The runs are for
  # comparing, not serving, so they export nothing unless asked (exports were ~half their time).
  _define_config_flags(overrides={"dropout": 0.0, "augment": False, "export_during_training": False},
                       skip=("path", "model_dir", "update_ops"))
  flags.DEFINE_string("output_dir", "", "Folder for comparison.json/.csv/.png and each path's model_dir.")
  flags.DEFINE_list("paths", ["keras", "estimator", "naive"],
                    "Paths to compare: keras, estimator, naive (= estimator with --update_ops=skip).")


def _run_compare(argv):
  _no_positional(argv)
  if not FLAGS.output_dir:
    raise ValueError("--output_dir is required: the folder for the comparison outputs.")
  config = _config_from_flags(require_model_dir=False, model_dir=FLAGS.output_dir)
  from estimator_ft.jobs import compare
  paths = compare.check_paths(FLAGS.paths)
  comparison = compare.run_compare(config, FLAGS.output_dir, paths)
  print(compare.format_report(comparison))
  return 0


# ---------------------------------------------------------------- inspect

def _define_inspect():
  for name in ("train_dir", "validation_dir", "scan_cache_dir"):
    flags.DEFINE_string(name, "", _field_help(name))
  flags.DEFINE_boolean("rescan", False, _field_help("rescan"))
  flags.DEFINE_string("output", "", "Also write the full report here as JSON.")


def _run_inspect(argv):
  _no_positional(argv)
  from estimator_ft.jobs import inspect_data
  if not (FLAGS.train_dir and FLAGS.validation_dir):
    raise ValueError("Give --train_dir and --validation_dir (each with one sub-folder per class).")
  # Exit status: 0 nothing wrong, 1 leakage / a class missing from a split / an empty class.
  return inspect_data.run_inspect(FLAGS.train_dir, FLAGS.validation_dir, FLAGS.scan_cache_dir,
                                  FLAGS.rescan, FLAGS.output)


# ---------------------------------------------------------------- prepare

def _define_prepare():
  for name in ("train_dir", "validation_dir", "scan_cache_dir"):
    flags.DEFINE_string(name, "", _field_help(name))
  flags.DEFINE_boolean("rescan", False, _field_help("rescan"))
  flags.DEFINE_enum("bad_images", "fail", config_lib.BAD_IMAGE_POLICIES, _field_help("bad_images"))
  flags.DEFINE_string("output_dir", "", "Folder for train-*-of-*.tfrecord, validation-*.tfrecord "
                      "and dataset.json (local, or any TensorFlow file system such as gs://).")
  flags.DEFINE_integer("num_shards", 0, "Training shards (validation: in proportion); 0 = about "
                       "150 MB of source images a shard. A cluster needs at least one per trainer.",
                       lower_bound=0)
  flags.DEFINE_integer("max_side", 0, "Re-encode (JPEG, quality 95) images whose longer side is "
                       "larger than this, e.g. 256 for 224-px training; 0 keeps every file's bytes. "
                       "Shrunk with antialiasing: serve images shrunk the same way.",
                       lower_bound=0)
  flags.DEFINE_integer("seed", 0, "Seed of the random order the examples are written in.")


def _run_prepare(argv):
  _no_positional(argv)
  from estimator_ft.jobs import prepare
  if not (FLAGS.train_dir and FLAGS.validation_dir):
    raise ValueError("Give --train_dir and --validation_dir (each with one sub-folder per class).")
  description = prepare.run_prepare(
      FLAGS.train_dir, FLAGS.validation_dir, FLAGS.output_dir, num_shards=FLAGS.num_shards,
      max_side=FLAGS.max_side, bad_images=FLAGS.bad_images, seed=FLAGS.seed,
      scan_cache_dir=FLAGS.scan_cache_dir, rescan=FLAGS.rescan)
  splits = description["splits"]
  print(f"Prepared {FLAGS.output_dir}: " + ", ".join(
      f"{name} {s['num_examples']} images in {len(s['shards'])} shard(s)"
      for name, s in splits.items()) + f". Train with --records_dir={FLAGS.output_dir}.")
  return 0


# ---------------------------------------------------------------- export / predict

def _define_export():
  flags.DEFINE_string("model_dir", "", "Training model_dir holding checkpoints and config.json.")
  flags.DEFINE_string("export_dir", "", "Export base: the version goes to EXPORT_DIR/<version>/, the "
                      "layout TF Serving loads (default MODEL_DIR/export/manual; for --format=tflite "
                      "MODEL_DIR/export/tflite).")
  flags.DEFINE_enum("format", "saved_model", config_lib.EXPORT_FORMATS, "saved_model (TF Serving, `predict`) "
                    "or tflite (model.tflite + labels.txt, measured against the SavedModel).")
  flags.DEFINE_enum("quantize", "none", config_lib.TFLITE_QUANTIZATIONS,
                    "--format=tflite: none (float32), dynamic (int8 weights), float16, or int8 "
                    "(full integer, calibrated on --representative_images training images).")
  flags.DEFINE_integer("representative_images", None, "--quantize=int8: training images that "
                       "calibrate it (default: the run's setting, 100).", lower_bound=1)
  flags.DEFINE_integer("serving_warmup_requests", None, "SavedModel: TF Serving warm-up requests "
                       "(training images) in assets.extra/tf_serving_warmup_requests; 0 = none "
                       "(default: the run's setting, 3).", lower_bound=0)
  flags.DEFINE_integer("measure_images", 500, "--format=tflite: validation images on which the "
                       "TFLite model is compared with the SavedModel; 0 = no measurement.",
                       lower_bound=0)
  flags.DEFINE_integer("latency_runs", 50, "--format=tflite: single-image calls whose median "
                       "latency is reported.", lower_bound=1)
  flags.DEFINE_string("train_dir", "", "The run's training images, if they moved since training "
                      "(default: the --train_dir in config.json).")
  flags.DEFINE_string("validation_dir", "", "The run's validation images, if they moved since "
                      "training (default: the --validation_dir in config.json).")


def _run_export(argv):
  _no_positional(argv)
  from estimator_ft.jobs import export_checkpoint
  if not FLAGS.model_dir:
    raise ValueError("--model_dir is required: the training model_dir to export from.")
  path = export_checkpoint.export_from_checkpoint(
      FLAGS.model_dir, FLAGS.export_dir or None, export_format=FLAGS.format,
      quantize=FLAGS.quantize, representative_images=FLAGS.representative_images,
      serving_warmup_requests=FLAGS.serving_warmup_requests, measure_images=FLAGS.measure_images,
      latency_runs=FLAGS.latency_runs, train_dir=FLAGS.train_dir,
      validation_dir=FLAGS.validation_dir)
  if FLAGS.format == "tflite":
    from estimator_ft import export_tflite
    print(f"Exported TFLite model: {path}\n"
          f"{export_tflite.format_measurements(export_tflite.read_info(path))}")
  else:
    print(f"Exported SavedModel: {path}")
  return 0


def _define_predict():
  flags.DEFINE_string("model", "", "An exported model: a SavedModel version folder "
                      "(MODEL_DIR/export/NAME/VERSION), an export base such as MODEL_DIR/export/best "
                      "(its newest version is used), or a .tflite file with its labels.txt beside it.")
  flags.DEFINE_string("saved_model", "", "Same as --model (kept for SavedModels).")
  flags.DEFINE_integer("predict_batch_size", 32, "Images per model call (a TFLite model takes "
                       "one image per call).", lower_bound=1)


def _run_predict(argv):
  from estimator_ft import serving
  if FLAGS.model and FLAGS.saved_model:
    raise ValueError("Give --model or --saved_model, not both.")
  model = FLAGS.model or FLAGS.saved_model
  if not model:
    raise ValueError("--model is required: an exported SavedModel version folder or a .tflite file.")
  if len(argv) < 2:
    raise ValueError("Give one or more image files or folders after the flags.")
  kind, path = serving.model_kind(model)
  make_predictor = serving.Predictor
  if kind == serving.TFLITE:
    # Only for a TFLite model: it decodes with data/images (a SavedModel decodes in its graph).
    from estimator_ft import serving_tflite
    make_predictor = serving_tflite.TFLitePredictor
  # Exit status: 0 all classified, 1 some file(s) failed (each has an "error" line), 2 usage error.
  return serving.predict_cli(path, argv[1:], FLAGS.predict_batch_size, make_predictor)


# ---------------------------------------------------------------- evaluate

# The defaults of reports/metrics.py, spelled out here so `--help` needs no scikit-learn import.
_DEFAULT_THRESHOLDS = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9")


def _define_evaluate():
  flags.DEFINE_string("model_dir", "", "A training model_dir: evaluate one of its checkpoints "
                      "(see --checkpoint). Or give --saved_model.")
  flags.DEFINE_string("checkpoint", "latest", "With --model_dir: latest, best (the checkpoint "
                      "export/best holds; Estimator path) or a checkpoint PATH (e.g. "
                      "model.ckpt-120 or ckpt-120, relative to --model_dir or absolute).")
  flags.DEFINE_string("saved_model", "", "An exported SavedModel instead of --model_dir: a "
                      "version folder or an export base such as MODEL_DIR/export/best.")
  flags.DEFINE_string("validation_dir", "", "The images to evaluate on, one sub-folder per class "
                      "of the model (a validation or test folder); default: the run's own "
                      "--validation_dir.")
  flags.DEFINE_string("output_dir", "", "Folder for report.json, per_class.csv, misclassified.csv "
                      "and the PNG plots.")
  flags.DEFINE_enum("bad_images", "fail", config_lib.BAD_IMAGE_POLICIES, _field_help("bad_images"))
  flags.DEFINE_integer("batch_size", 32, "Images per model call.", lower_bound=1)
  flags.DEFINE_list("thresholds", list(_DEFAULT_THRESHOLDS), "Two classes: the thresholds on "
                    "p(positive class) of the threshold table (the F1-best one is added).")
  flags.DEFINE_integer("calibration_bins", 10, "Equal-width confidence bins of the calibration "
                       "error and the reliability diagram.", lower_bound=1)


def _parse_thresholds(values):
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"--thresholds={','.join(values)}: give comma-separated probabilities, e.g. "
                     "--thresholds=0.3,0.5,0.7.") from None


def _run_evaluate(argv):
  _no_positional(argv)
  from estimator_ft.jobs import evaluate
  report = evaluate.run_evaluate(
      FLAGS.output_dir, validation_dir=FLAGS.validation_dir, model_dir=FLAGS.model_dir,
      checkpoint=FLAGS.checkpoint, saved_model=FLAGS.saved_model, bad_images=FLAGS.bad_images,
      batch_size=FLAGS.batch_size, thresholds=_parse_thresholds(FLAGS.thresholds),
      calibration_bins=FLAGS.calibration_bins)
  print(evaluate.format_report(report))
  return 0


# ---------------------------------------------------------------- launch-local

def _define_launch_local():
  # Defaults: the Estimator path's asynchronous parameter-server cluster. The Keras path
  # (--path=keras --distribution=multi_worker_mirrored) needs --ps=0 --noevaluator.
  flags.DEFINE_integer("workers", 1, "Worker processes besides the chief.", lower_bound=0)
  flags.DEFINE_integer("ps", 1, "Parameter-server processes (Estimator path; 0 for the Keras path).",
                       lower_bound=0)
  flags.DEFINE_boolean("evaluator", True, "Start an evaluator process that evaluates each new "
                       "checkpoint (Estimator path; --noevaluator for the Keras path).")
  flags.DEFINE_integer("timeout_s", 1800, "Stop every role and fail after this many seconds.", lower_bound=1)


def _run_launch_local(argv):
  return cluster.launch_local(workers=FLAGS.workers, ps=FLAGS.ps, evaluator=FLAGS.evaluator,
                              train_args=list(argv[1:]), timeout_s=FLAGS.timeout_s)


# ---------------------------------------------------------------- bench

def _define_bench():
  flags.DEFINE_integer("image_size", 64, "Image size (224 for the fraction-of-peak target).",
                       lower_bound=config_lib.RESNET50_MIN_IMAGE_SIZE)
  flags.DEFINE_integer("batch_size", 32, "Batch size of every path.", lower_bound=1)
  flags.DEFINE_integer("steps", 20, "Timed training steps per repeat (after warm-up).", lower_bound=1)
  flags.DEFINE_integer("repeats", 3, "Repeats of each measurement (min/median/max reported).", lower_bound=1)
  flags.DEFINE_boolean("quick", False, "At most 5 steps x 2 repeats: about two minutes at 64 px on "
                       "2 quiet cores.")
  flags.DEFINE_enum("precision", "float32", config_lib.PRECISIONS,
                    "Training precision of every path: " + _field_help("precision"))
  flags.DEFINE_boolean("jit", False, "Compile with XLA (Keras jit_compile; the Estimator session's "
                       "auto-clustering).")
  flags.DEFINE_string("data_dir", "data/sample", "Image folder with train/ and validation/ for the "
                      "input-pipeline, feed_dict and epoch-overhead measurements (generated sample "
                      "images if it does not exist).")
  flags.DEFINE_integer("accuracy_steps", 0, "If > 0, also train both paths this many steps on "
                       "--data_dir from the same weights and report validation loss/accuracy (to "
                       "compare precisions).", lower_bound=0)
  flags.DEFINE_string("output", "", "Write the results JSON here.")
  flags.DEFINE_string("records_dir", "", "Also measure the tf.data pipeline reading these "
                      "prepared records (estimator-ft prepare), next to the folder pipeline.")
  flags.DEFINE_integer("scan_files", 0, "If > 0, measure only the folder scan instead: a first "
                       "and a second start on this many generated 224-px JPEGs (the scan "
                       "manifest's speed-up).", lower_bound=0)
  flags.DEFINE_integer("source_images", 0, "If > 0, measure only the training pipeline on three "
                       "sources of this many generated photo-sized JPEGs (500x375, ~110 KB): the "
                       "folder, its records, and its records prepared with --max_side=256; "
                       "--repeats rounds (default here 8) of --steps batches (48), each window in a "
                       "process of its own, at --image_size (224).", lower_bound=0)
  flags.DEFINE_boolean("compare_onednn", False, "Run the bench twice, in two processes: with "
                       "TF_ENABLE_ONEDNN_OPTS=0 and =1, and report both and their ratios.")


def _run_bench(argv):
  _no_positional(argv)
  if FLAGS.source_images:
    ignored = [f"--{name}" for name in ("quick", "precision", "jit", "data_dir", "accuracy_steps",
                                        "records_dir", "scan_files", "compare_onednn")
               if FLAGS[name].present]
    if ignored:  # before TensorFlow is imported: a settings mistake costs no start-up
      raise ValueError(f"--source_images measures the input pipeline alone, on data it generates: "
                       f"{', '.join(ignored)} would do nothing there. Drop them, or run the "
                       "training bench without --source_images.")
  from estimator_ft.bench import runner
  if FLAGS.scan_files:
    runner.run_scan_bench(FLAGS.scan_files, FLAGS.output)
    return 0
  if FLAGS.source_images:
    # The training bench's defaults (64 px, 3 x 20 steps) are not this measurement's: what is
    # not given takes sources_rates' own (224 px, the goal's size; 8 rounds of 48 batches).
    given = {name: FLAGS[flag].value for name, flag in (
        ("image_size", "image_size"), ("batch_size", "batch_size"), ("batches", "steps"),
        ("rounds", "repeats")) if FLAGS[flag].present}
    runner.run_sources_bench(FLAGS.source_images, output=FLAGS.output, **given)
    return 0
  if FLAGS.compare_onednn:
    settings = ("image_size", "batch_size", "steps", "repeats", "quick", "precision", "jit",
                "data_dir", "accuracy_steps")
    runner.run_onednn_comparison([FLAGS[name].serialize() for name in settings], FLAGS.output)
    return 0
  runner.run_bench(image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
                  repeats=FLAGS.repeats, quick=FLAGS.quick, precision=FLAGS.precision, jit=FLAGS.jit,
                  data_dir=FLAGS.data_dir, output=FLAGS.output, accuracy_steps=FLAGS.accuracy_steps,
                  records_dir=FLAGS.records_dir)
  return 0


# ---------------------------------------------------------------- dispatch

SUBCOMMANDS = {
    "train": (_define_train, _run_train, "fine-tune ResNet50 (Estimator or Keras path)"),
    "compare": (_define_compare, _run_compare, "train keras / estimator / naive side by side"),
    "inspect": (_define_inspect, _run_inspect,
                "check an image-folder pair before training: classes, sizes, bad files, leakage"),
    "prepare": (_define_prepare, _run_prepare,
                "write an image-folder pair as sharded TFRecords for --records_dir"),
    "export": (_define_export, _run_export,
               "export a SavedModel or a TFLite model from the latest checkpoint"),
    "predict": (_define_predict, _run_predict,
                "classify image files with an exported SavedModel or TFLite model"),
    "evaluate": (_define_evaluate, _run_evaluate,
                 "the report on a checkpoint or SavedModel: per class, confusion, ROC/PR, calibration"),
    "launch-local": (_define_launch_local, _run_launch_local,
                     "run a TF_CONFIG cluster on 127.0.0.1: launch-local [flags] -- <train flags>"),
    "bench": (_define_bench, _run_bench, "measure training and input-pipeline throughput"),
}


def _no_positional(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}: every setting is a --flag (see --help).")


# absl's app.run answers these with its main module's flags only - none, since __main__ defines
# none - and "Try --helpfull", exit 1. Answered here with the subcommand's own flags, exit 0.
HELP_ARGUMENTS = ("-h", "-help", "--help", "--helpshort", "-?")
FULL_HELP_ARGUMENTS = ("-helpfull", "--helpfull")


def _help_wanted(arguments) -> str:
  """"full", "short" or "" for the help flags among the subcommand's own arguments (those after
  `--` belong to launch-local's training command)."""
  own = arguments[:arguments.index("--")] if "--" in arguments else arguments
  if any(a in FULL_HELP_ARGUMENTS for a in own):
    return "full"
  return "short" if any(a in HELP_ARGUMENTS for a in own) else ""


def _subcommand_help(name: str) -> str:
  """`estimator-ft NAME --help`: what NAME does and every flag it defines, with its help."""
  text = FLAGS.module_help(sys.modules[__name__])
  # absl heads the list with the module's name ("estimator_ft.cli:").
  lines = [line for line in text.splitlines()
           if line.strip() and not (line[0] != " " and line.rstrip().endswith(":"))]
  return "\n".join([f"usage: estimator-ft {name} [--flags]", "", SUBCOMMANDS[name][2], "",
                    "flags:", *lines, "",
                    "(--helpfull also lists absl's own flags, such as --verbosity.)"])


def _usage():
  lines = ["usage: estimator-ft SUBCOMMAND [--flags]   (estimator-ft SUBCOMMAND --help for its flags)", ""]
  lines += [f"  {name:13s} {help_text}" for name, (_, _, help_text) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def _configure_logging():
  """Our progress lines readable; TensorFlow's own noise off unless --verbosity asks for it."""
  verbose = FLAGS.verbosity > 0
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
  logger.handlers[:] = [handler]
  logger.setLevel(logging.DEBUG if verbose else logging.INFO)
  logger.propagate = False
  # TensorFlow's Python logger keeps this level when TensorFlow is imported later (and importing
  # it here would make every flag error wait for TensorFlow's start-up).
  logging.getLogger("tensorflow").setLevel(logging.INFO if verbose else logging.ERROR)
  if not verbose:
    absl_logging.set_verbosity(absl_logging.WARNING)  # e.g. SavedModel's "Writing fingerprint"


def _stops_cleanly_on_signals() -> bool:
  """False for a parameter server of a TF_CONFIG cluster: it waits inside TensorFlow's C++
  server.join(), where a Python signal handler never runs, so SIGINT and SIGTERM must keep their
  default action (end the process) or the launcher's and a scheduler's SIGTERM would not stop it."""
  try:
    task = cluster.current_task()
  except ValueError:
    return True  # a malformed TF_CONFIG: the train job reports it
  return task is None or task.type != cluster.PS


def _main_for(run_fn, startup_note=None):
  def main(argv):
    _configure_logging()
    if startup_note:
      logger.info(startup_note)
    try:
      with interrupts.stop_on_signals(enabled=_stops_cleanly_on_signals()):
        return run_fn(argv)
    except ValueError as e:  # user errors: one clear message, no traceback
      print(f"estimator-ft: error: {e}", file=sys.stderr)
      return EXIT_USER_ERROR
    except interrupts.Interrupted as e:  # Ctrl-C, SIGTERM: where it stopped, no traceback
      print(f"estimator-ft: {e.detail or f'interrupted ({e.signal_name})'}", file=sys.stderr)
      return e.exit_status
  return main


def run_main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else EXIT_USER_ERROR)
  name = argv[1]
  if name not in SUBCOMMANDS:
    print(f"estimator-ft: unknown subcommand {name!r}.\n\n{_usage()}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  if not any(a.startswith(("--verbosity", "-v")) for a in argv):
    # Before TensorFlow is imported: hides its C++ start-up chatter (CUDA probing, oneDNN notice).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  onednn_note = tf_environment.enable_onednn_unless_set()
  define_flags, run_fn, _ = SUBCOMMANDS[name]
  define_flags()
  wanted = _help_wanted(argv[2:])
  if wanted:
    print(_subcommand_help(name) if wanted == "short" else
          f"usage: estimator-ft {name} [--flags]\n\n{FLAGS.get_help().strip()}")
    sys.exit(0)
  app.run(_main_for(run_fn, onednn_note), argv=[f"estimator-ft {name}"] + argv[2:])
