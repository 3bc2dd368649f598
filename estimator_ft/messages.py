"""One-line messages from TensorFlow errors (standard library only, so `predict` can use it)."""

import re

# What TensorFlow puts before the error itself when a graph or tf.function fails: a header, and
# where the failing op was defined (a traceback, or a note that there is none).
_PREAMBLE = re.compile(r"^(Graph execution error:|Detected at node .*|Node: .*|<stack traces unavailable>)$")


def short_tf_error(error: Exception) -> str:
  """TF's op error text without the node names and op suffix nobody can act on: its first line.

  The first line of the error itself: the "Graph execution error:" header and the traceback of
  the op's definition that TF 2.15 puts before it are skipped.
  """
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
  message = re.sub(r"\s*\[Op:\w+\]\s*$", "", message)
  lines = [line for line in message.strip().splitlines()
           if line.strip() and not line[0].isspace() and not _PREAMBLE.match(line.strip())]
  return lines[0].strip() if lines else type(error).__name__
