"""estimator_ft: fine-tune a Keras ResNet50 through tf.estimator with correct BatchNorm handling.

Layers, each importing only from those above it in this list (tests/test_layout.py checks it):

  contract, files, progress,      standard library only: the serving contract's names, atomic
  messages, image_formats,        writes, the progress line, one-line TF errors, header checks
  cluster, sample_data,           (sizes, pixel limit, EXIF, non-regular files), TF_CONFIG roles
  memory, interrupts              and the local launcher, the sample-data generator, the memory
                                  estimate, Ctrl-C/SIGTERM as a clean stop
  config, recipes                 the frozen run configuration: defaults, flag help, validators;
                                  the recipes as pure functions (schedule, class weights, early
                                  stopping, resume rules)
  storage                         a run's files on this machine or any TensorFlow file system
                                  (gs://, ram://): the one place that decides local calls (fsync,
                                  one-step renames) or tf.io.gfile
  reports/                        classification statistics (scikit-learn) and their plots
                                  (matplotlib): metrics, plots; no TensorFlow
  data/                           the one tf.data pipeline: split, images, folders, tfds_source,
                                  records (sharded TFRecords), loading, pipeline, synthetic,
                                  samples
  model                           the one ResNet50 + head builder, initial-weights checkpoint
  model_fn                        the Estimator model_fn: training flag from mode, BN updates in
                                  the train op (and the train op the benchmark's loop reuses)
  run/                            what both paths share: model_dir contract, events, errors,
                                  runtime (strategy, determinism), summaries, faults
  serving                         `predict` and the TF Serving version layout (TF + contract only)
  serving_tflite                  `predict` on a .tflite model (serving + data/images only)
  export                          SavedModel signatures, warm-up requests, publishing, exporters
                                  (no training path)
  export_tflite                   TFLite conversion, quantization, measurement against the SavedModel
  estimator, keras_path           the two training paths
  jobs/                           train, export_checkpoint, compare, inspect_data, prepare,
                                  evaluate
  bench/                          `estimator-ft bench`: plan, timing, machine, loaders,
                                  training_rates, report, runner
  cli                             absl flags and subcommands (the only module that reads flags)
"""

__version__ = "0.1.0"
