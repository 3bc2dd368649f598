"""What a person reads about a model's predictions: statistics and plots (no TensorFlow).

  metrics   classification statistics of (labels, probabilities, class names): per class,
            averages, confusion matrix, top-k, ROC/PR and thresholds (two classes), calibration,
            the misclassified examples - a pure function of its arrays, through scikit-learn
  plots     matplotlib Figures of those statistics (object-oriented API, no pyplot): confusion
            heat map with class names, ROC and precision-recall curves, reliability diagram

`estimator-ft evaluate` (jobs/evaluate) writes them as files; the training paths draw the
confusion matrix of each evaluation into TensorBoard with the same plot.
"""
