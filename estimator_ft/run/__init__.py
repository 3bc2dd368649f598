"""The run layer both training paths share, below both of them and above the model.

  model_dir    the model_dir contract: run lock, config.json, results.json, history files,
               initial weights, checkpoint names, the cluster chief's files
  events       the one reader of TensorFlow event files
  errors       NaNLossError and its message
  runtime      process-wide TensorFlow state of a run: distribution strategy, op determinism
  summaries    what both paths write for TensorBoard: the run's config, and the common curves
               (same tags at the global step, so the paths overlay in one card)
  faults       damaged checkpoints and failed writes, made into clear messages
"""
