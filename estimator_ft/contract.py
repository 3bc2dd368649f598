"""The serving contract of an exported model, defined once (standard library only).

Training (data pipeline, model_fn), export and `estimator-ft predict` all name the model's input,
its signatures and its prediction outputs through these constants. `predict` imports nothing of
the training code, so they live in this dependency-free module rather than in model_fn or export.
"""

import os

# The model's input, and the feature key of every dataset the pipeline yields.
FEATURE_KEY = "image"

# What the folder scan reads and `predict` looks for in a folder (the formats TF decodes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")

# Signatures (export.py documents each one's inputs and outputs).
SERVING_SIGNATURE = "serving_default"  # tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
IMAGES_SIGNATURE = "predict_images"
CLASSIFY_SIGNATURE = "classification"
# The `_bytes` suffix makes TF Serving's REST API accept {"image_bytes": {"b64": "..."}}.
IMAGE_BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
# The bytes feature that the classify signature reads from each tf.Example.
EXAMPLE_IMAGE_FEATURE = IMAGE_BYTES_INPUT

# Outputs of the predict signatures, which are the model_fn's PREDICT keys.
PROBABILITIES = "probabilities"
CLASS_INDEX = "class_index"
CLASS_NAME = "class_name"
# Every class name, per example ([batch, num_classes], aligned with PROBABILITIES): lets a serving
# client label the probabilities from the model alone, and is the classify signature's `classes`.
ALL_CLASS_NAMES = "all_class_names"

SAVED_MODEL_FILE = "saved_model.pb"
# Where an export records what it was made with, and the pixel limit its signatures enforce.
EXPORT_INFO_FILE = os.path.join("assets.extra", "export_info.json")
MAX_IMAGE_PIXELS_INFO = "max_image_pixels"
