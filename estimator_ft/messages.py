"""One-line messages from TensorFlow errors (standard library only, so `predict` can use it)."""

import re


def short_tf_error(error: Exception) -> str:
  """TF's op error text without the node names and op suffix nobody can act on: its first line."""
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
  message = re.sub(r"\s*\[Op:\w+\]\s*$", "", message)
  lines = message.strip().splitlines()
  return lines[0] if lines else type(error).__name__
