"""The one tf.data image pipeline, shared by every path, and the data sources it reads.

The Estimator input_fn, the Keras `fit` path, the side-by-side comparison, the serving signature
and the benchmarks all read images through this package, so a difference between two paths can
never come from a difference in decoding, resizing, augmentation or preprocessing.

  split       Split / Splits (a resolved source), DataError, steps_per_epoch; no TensorFlow
  images      decode, resize, augment, preprocess: pure functions of their arguments
  folders     the image-folder scan and its bad-file checks
  tfds_source TFDS datasets as a source
  records     sharded TFRecords (estimator-ft prepare) as a source: reading, per-epoch order
  loading     load_splits: resolve and check both splits before any model is built
  pipeline    make_dataset / make_input_fn: a resolved Split -> batches
  synthetic   random in-memory batches of the same structure (tests, benchmarks)
  samples     a few encoded images of a split (warm-up requests, int8 calibration, measurements)
"""
