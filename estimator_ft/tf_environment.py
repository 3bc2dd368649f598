"""Process settings that must be made before TensorFlow is imported, and what the CPU can run
fast (standard library only).

TensorFlow 2.15 turns its oneDNN kernels on by default only on CPUs with AVX512_VNNI, AVX512_BF16
or AMX. On an AVX2-only x86 CPU (a Zen 3 EPYC, most laptops and CI machines) they stay off, and
ResNet50 trained 2.8x slower there (estimator-ft bench --quick at 64 px: 14.9 img/s without,
41.8 img/s with TF_ENABLE_ONEDNN_OPTS=1). TensorFlow reads the variable once, at import.
"""

import os
from typing import Collection, MutableMapping, Optional

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"

# CPU flags (/proc/cpuinfo) under which bfloat16 has fast kernels: oneDNN's AVX512_BF16 and AMX.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def enable_onednn_unless_set(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
  """Sets TF_ENABLE_ONEDNN_OPTS=1 unless the user set it (a "0" is respected).

  Returns the line to log once about it, or None when the user's own setting stands. Call it
  before TensorFlow is imported; afterwards it changes nothing in this process.
  """
  environ = os.environ if environ is None else environ
  if ONEDNN_VARIABLE in environ:
    return None
  environ[ONEDNN_VARIABLE] = "1"
  return (f"oneDNN CPU kernels on ({ONEDNN_VARIABLE}=1, set by estimator-ft because it was "
          f"unset; TensorFlow enables them by default only on AVX-512/AMX CPUs). Set "
          f"{ONEDNN_VARIABLE}=0 to turn them off.")


def cpuinfo_field(name: str, path: str = "/proc/cpuinfo") -> str:
  """The first `name` line of /proc/cpuinfo (Linux), or "" where there is none."""
  try:
    with open(path) as f:
      for line in f:
        if line.split(":", 1)[0].strip() == name:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def precision_note(precision: str, has_gpu: bool, cpu_flags: Collection[str]) -> Optional[str]:
  """What to say when --precision has no fast kernels on this machine (None when it has).

  float16 has none on CPUs; bfloat16 needs AVX512_BF16 or AMX. `cpu_flags`: /proc/cpuinfo's.
  """
  if has_gpu or precision == "float32":
    return None
  if precision == "mixed_float16":
    return ("--precision=mixed_float16 on a CPU: float16 has no fast CPU kernels (ResNet50 trained "
            "at ~0.7 img/s at 64 px on 2 cores, against ~78 in float32); it is meant for GPUs. "
            "Use float32 here, or mixed_bfloat16 on a CPU with AVX512_BF16 or AMX.")
  if precision == "mixed_bfloat16" and not set(BFLOAT16_CPU_FLAGS) & set(cpu_flags):
    return ("--precision=mixed_bfloat16 on a CPU without AVX512_BF16 or AMX: bfloat16 runs on slow "
            "fallback kernels there (with oneDNN held to AVX2, 2 training steps at 32 px had not "
            "finished after 10 minutes). Use float32 here.")
  return None
