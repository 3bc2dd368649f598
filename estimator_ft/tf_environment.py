"""Process settings that must be made before TensorFlow is imported (standard library only).

TensorFlow 2.15 turns its oneDNN kernels on by default only on CPUs with AVX512_VNNI, AVX512_BF16
or AMX. On an AVX2-only x86 CPU (a Zen 3 EPYC, most laptops and CI machines) they stay off, and
ResNet50 trained 2.8x slower there (estimator-ft bench --quick at 64 px: 14.9 img/s without,
41.8 img/s with TF_ENABLE_ONEDNN_OPTS=1). TensorFlow reads the variable once, at import.
"""

import os
from typing import MutableMapping, Optional

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


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
