"""The machine: CPU features, oneDNN state, the matmul peak and the model's FLOPs."""

import os
import platform
import time
from typing import Callable, Sequence

import tensorflow as tf

from estimator_ft import estimator as estimator_path
from estimator_ft import model as model_lib
from estimator_ft import tf_environment
from estimator_ft.bench.plan import MATMUL_REPEATS
from estimator_ft.bench.timing import spread
from estimator_ft.config import Config


MATMUL_SIZES = (2048, 4096)


def cpu_kind(cpuinfo_field: Callable[[str], str] = tf_environment.cpuinfo_field) -> str:
  """Vendor, family and model ("AuthenticAMD family 25 model 17"), or "" where /proc/cpuinfo does
  not say: the model name alone ("AMD EPYC") is the same for Zen 3, 4 and 5, whose speeds differ
  2-6x and whose AVX-512 decides oneDNN's default."""
  vendor, family, model = (cpuinfo_field(name) for name in ("vendor_id", "cpu family", "model"))
  return f"{vendor} family {family} model {model}" if vendor and family and model else ""


def onednn_enabled() -> bool:
  """Whether TensorFlow's oneDNN kernels are on in this process (TF_ENABLE_ONEDNN_OPTS aware)."""
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
  return bool(_pywrap_util_port.IsMklEnabled())


def cpu_environment() -> dict:
  """The machine: device, cores, the CPU features oneDNN depends on, and whether it is on."""
  flags = set(tf_environment.cpuinfo_field("flags").split())
  gpus = tf.config.list_physical_devices("GPU")
  cpu = tf_environment.cpuinfo_field("model name") or platform.processor() or platform.machine()
  return {
      "device": ", ".join(d.name for d in gpus) if gpus else f"CPU: {cpu}",
      "cpu_kind": cpu_kind(),
      "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}),
      "tensorflow": tf.__version__,
      "onednn": onednn_enabled(),
      "TF_ENABLE_ONEDNN_OPTS": os.environ.get(
          "TF_ENABLE_ONEDNN_OPTS", "unset (TensorFlow's default: on only with AVX-512 VNNI/BF16 or AMX)"),
      "load_average_1min": os.getloadavg()[0],
      "python": platform.python_version(),
  }


def environment(session_config) -> dict:
  """The machine and the TensorFlow settings the training figures depend on."""
  return {
      **cpu_environment(),
      "threads": {
          "estimator_intra_op": session_config.intra_op_parallelism_threads,
          "estimator_inter_op": session_config.inter_op_parallelism_threads,
          "eager_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
          "eager_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
          "note": "0 = TensorFlow picks (one per core)",
      },
      "xla_cpu_global_jit": estimator_path.CPU_GLOBAL_JIT_FLAG in os.environ.get("TF_XLA_FLAGS", ""),
  }


def matmul_gflops(sizes: Sequence[int] = MATMUL_SIZES, repeats: int = MATMUL_REPEATS,
                  dtype: str = "float32", clock: Callable[[], float] = time.perf_counter) -> dict:
  """Matmul rate per size (2 n^3 FLOPs each) and the best median, first call excluded (warm-up)."""
  results = {}
  for n in sizes:
    a = tf.cast(tf.random.uniform([n, n]), dtype)
    b = tf.cast(tf.random.uniform([n, n]), dtype)
    tf.matmul(a, b).numpy()
    rates = []
    for _ in range(repeats):
      started = clock()
      tf.matmul(a, b).numpy()
      rates.append(2 * n**3 / (clock() - started) / 1e9)
    results[str(n)] = spread(rates)
  results["peak_median"] = max(results[str(n)]["median"] for n in sizes)
  return results


def compute_dtype(precision: str) -> str:
  """The dtype the convolutions and matmuls run in under a Keras precision policy."""
  return tf.keras.mixed_precision.Policy(precision).compute_dtype


def forward_flops_per_image(config: Config, num_classes: int) -> int:
  """FLOPs of one inference-mode forward pass at batch 1, counted by the TF profiler.

  Counted on the float32 model: mixed precision changes the speed of a FLOP, not their number.
  The model is built eagerly and traced at batch 1, so the graph holds only fully shaped ops.
  """
  model = model_lib.build_model(config.replace(precision="float32"), num_classes)
  forward = tf.function(lambda images: model(images, training=False))
  concrete = forward.get_concrete_function(
      tf.TensorSpec([1, config.image_size, config.image_size, 3], tf.float32))
  options = tf.compat.v1.profiler.ProfileOptionBuilder(
      tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
  profile = tf.compat.v1.profiler.profile(graph=concrete.graph, cmd="op", options=options)
  tf.keras.backend.clear_session()
  return int(profile.total_float_ops)
