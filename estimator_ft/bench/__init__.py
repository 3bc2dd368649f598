"""`estimator-ft bench`: training and input throughput, measured side by side in one process.

What it measures, with the same model, batch, optimizer and precision for every training path,
warm-up steps excluded, each figure repeated (min / median / max reported):

  estimator_img_per_s      the Estimator path (its model_fn, RunConfig and hooks), timed by a
                           SessionRunHook, on in-memory synthetic batches
  estimator_folder_img_per_s  the same graph on the image-folder pipeline (see below)
  keras_img_per_s          Keras `fit` on the same synthetic batches
  feed_dict_img_per_s      the original approach: a tf.compat.v1 Session fed numpy batches through
                           feed_dict by a Python generator that decodes the image folder with PIL
                           (what Keras' ImageDataGenerator did for the original question's loop)
  pipeline_img_per_s       the tf.data folder pipeline alone (data.make_dataset, train mode)
  python_loader_img_per_s  the same decode/resize/augment/batch in single-threaded Python + PIL
  matmul_gflops            this machine's float32 matmul rate (2048^2 and 4096^2, median); with
                           mixed precision also the rate in its compute dtype (bfloat16/float16)
  train_gflops             img/s x training FLOPs per image (3 x the TF profiler's forward FLOPs)
  estimator_epoch_overhead_s  per-epoch wall time of a real short train_and_evaluate that is not
                           training steps (checkpoints, evaluations, exports, the graphs' first
                           builds and runs), its steps priced at that run's own median step time

The Estimator and Keras runs take turns, one timing window each (two threads, one running at a
time), so both see the same moments of the machine's load and estimator/keras is the median of
ratios of neighbouring windows. The synthetic and folder phases of the Estimator run share one
graph and one session: the input_fn concatenates them, so the step-rate ratio compares input
pipelines and nothing else.

  plan            how much runs (BenchPlan), the targets, the Config it trains with
  timing          step timestamps -> rates; two loops taking turns one window each
  machine         CPU features, oneDNN state, matmul peak, FLOPs per image
  loaders         tf.data pipeline vs the Python/PIL loader
  training_rates  the paths in turn, the feed_dict loop, epoch overhead, short-run accuracy
  report          figures, ratios, targets, the terminal table
  runner          run_bench / run_plan: all of it, phase by phase
"""
