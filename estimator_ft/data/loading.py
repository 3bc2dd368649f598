"""`load_splits`: resolve and check the train and validation data of a run, before any model."""

import logging
import os

from estimator_ft.data import checks
from estimator_ft.data import folders
from estimator_ft.data import records
from estimator_ft.data import tfds_source
from estimator_ft.data.split import DataError, Split, Splits

logger = logging.getLogger("estimator_ft")


def load_splits(config) -> Splits:
  """Resolves and checks the train and validation data of `config`; raises DataError if unusable.

  Every check runs here, before any model is built, so bad data fails in seconds, not mid-epoch.
  """
  config.validate_data_settings(DataError)
  if config.tfds_name:
    train = tfds_source.tfds_split(config, "train")
    tfds_source.log_stored_order(train, config.shuffle_buffer)
    validation = tfds_source.tfds_split(config, "validation")
    source = f"TFDS {config.tfds_name}"
  elif config.records_dir:
    train = records.records_split(config.records_dir, "train")
    validation = records.records_split(config.records_dir, "validation")
    source = f"--records_dir={config.records_dir}"
  else:
    train = folders.scan_image_folder(config.train_dir, "train", config.bad_images,
                                      config.scan_cache_dir, config.rescan,
                                      max_image_pixels=config.max_image_pixels)
    validation = folders.scan_image_folder(config.validation_dir, "validation", config.bad_images,
                                           config.scan_cache_dir, config.rescan,
                                           max_image_pixels=config.max_image_pixels)
    if os.path.realpath(config.train_dir) == os.path.realpath(config.validation_dir):
      logger.warning("--train_dir and --validation_dir are the same folder: validation results "
                     "will not measure generalisation.")
    source = f"--train_dir={config.train_dir} and --validation_dir={config.validation_dir}"

  if len(train.class_names) < 2:
    raise DataError(f"{source} has only one class ({train.class_names[0]!r}); need at least 2 "
                    "classes (one sub-folder each for a folder source).")
  if train.class_names != validation.class_names:
    only_train = sorted(set(train.class_names) - set(validation.class_names))
    only_validation = sorted(set(validation.class_names) - set(train.class_names))
    raise DataError(
        f"Train and validation classes differ (only in train: {only_train or 'none'}; only in "
        f"validation: {only_validation or 'none'}). Both need the same class sub-folders, so "
        "that label i means the same class in both.")
  if config.batch_size > train.num_examples:
    raise DataError(f"The train split has {train.num_examples} images, smaller than "
                    f"--batch_size={config.batch_size}; lower --batch_size.")
  _warn_about_the_data_set(train, validation)
  logger.info("Data from %s: %d train and %d validation images, %d classes.", source,
              train.num_examples, validation.num_examples, len(train.class_names))
  return Splits(train=train, validation=validation, class_names=train.class_names)


def _warn_about_the_data_set(train: Split, validation: Split) -> None:
  """What `estimator-ft inspect` would flag, said before a run starts: imbalance, leakage."""
  for split in (train, validation):
    if split.labels:
      counts = checks.class_counts(split.labels, len(split.class_names))
      warning = checks.imbalance_warning(split.name, split.class_names, counts)
      if warning:
        logger.warning(warning)
  if train.content_hashes and validation.content_hashes:
    warning = checks.leakage_warning(checks.shared_files(
        train.paths, train.content_hashes, validation.paths, validation.content_hashes))
    if warning:
      logger.warning(warning)
