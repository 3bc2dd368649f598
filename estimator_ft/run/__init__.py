"""The run layer both training paths share, below both of them and above the model.

  model_dir    the model_dir contract: run lock, config.json, results.json, history files,
               initial weights, checkpoint names, the cluster chief's files
  events       the one reader of TensorFlow event files
  errors       NaNLossError and its message
  runtime      process-wide TensorFlow state of a run: distribution strategy, op determinism
  summaries    the run's config as a TensorBoard text summary
  faults       damaged checkpoints and failed writes, made into clear messages
"""
