"""estimator_ft: fine-tune a Keras ResNet50 through tf.estimator with correct BatchNorm handling.

Layout (one module, one job):
  config      the frozen run configuration, validation, config.json in model_dir
  data        tf.data image pipeline shared by every path (folder scan, decode, augment, TFDS)
  model       the one ResNet50 + head builder, weights loading, layer freezing
  model_fn    the Estimator model_fn: training flag from mode, BN updates in the train op
  estimator   Estimator training runner (train_and_evaluate, hooks, results.json)
  keras_path  the Keras `fit` reference path
  compare     keras vs estimator vs the broken loop, side by side
  export      SavedModel export for serving (TF Serving layout) and predict
  cluster     multi-worker TF_CONFIG launcher
  bench       throughput benchmarks
  cli         absl flags and subcommands (the only module that reads flags)
"""

__version__ = "0.1.0"
