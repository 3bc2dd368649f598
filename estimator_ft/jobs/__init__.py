"""The jobs `estimator-ft` runs, each on top of the two training paths and the run layer.

  train              train either path into a model_dir (and a TF_CONFIG cluster's other roles)
  export_checkpoint  export a SavedModel from a model_dir's latest checkpoint, either path
  compare            keras vs estimator vs the broken loop, same start, same batches
  inspect_data       check an image-folder pair before training
  prepare            an image-folder pair -> sharded TFRecords + dataset.json (--records_dir)
  evaluate           the report on a checkpoint or SavedModel: per-class figures, confusion
                     matrix, ROC/PR and thresholds, calibration, the misclassified images
The benchmarks (`estimator_ft.bench`) and `predict` (`estimator_ft.serving`) live beside them.
"""
