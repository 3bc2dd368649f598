"""estimator_ft: fine-tune a Keras ResNet50 through tf.estimator, correctly."""
from setuptools import find_packages, setup

setup(
    name="estimator_ft",
    version="0.1.0",
    description="TensorFlow-native ResNet50 fine-tuning: Estimator model_fn with explicit "
                "training mode and BatchNorm updates, shared tf.data pipeline, Keras reference.",
    packages=find_packages(include=["estimator_ft", "estimator_ft.*"]),
    python_requires=">=3.9,<3.12",
    install_requires=[
        # tf.estimator exists only up to TensorFlow 2.15: the whole stack is pinned there.
        "tensorflow>=2.15.1,<2.16",
        "tensorflow-estimator>=2.15.0,<2.16",
        "keras>=2.15.0,<2.16",
        "numpy>=1.23,<2",
        "tensorflow-datasets>=4.9.3,<4.10",
        "tensorflow-metadata<1.16",  # >=1.16 needs protobuf 5; TF 2.15 needs protobuf < 5
        "protobuf>=3.20.3,<5",
        "pyarrow<18",  # recent pyarrow (imported by tensorflow-datasets) needs numpy 2
        "importlib_resources",  # tensorflow-datasets 4.9.6 imports it without declaring it
        "tensorboard>=2.15,<2.16",  # its event writer records the run config (estimator.py)
        # PredictionLog protos of the TF Serving warm-up file (export.py); pure protobuf modules.
        "tensorflow-serving-api>=2.15,<2.16",
        "absl-py>=1.0",
        "pillow>=9",
        "matplotlib>=3.5",
        # evaluate's statistics; 1.3 added zero_division=nan (0/0 left out of the averages).
        "scikit-learn>=1.3,<2",
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6"]},
    entry_points={"console_scripts": ["estimator-ft=estimator_ft.cli:run_main"]},
)
