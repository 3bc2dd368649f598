"""oneDNN on for every estimator-ft process unless the user said otherwise."""

import os
import subprocess
import sys

from estimator_ft import tf_environment


def test_onednn_is_set_only_when_the_user_did_not_set_it():
  environ = {}
  note = tf_environment.enable_onednn_unless_set(environ)
  assert environ == {"TF_ENABLE_ONEDNN_OPTS": "1"} and "TF_ENABLE_ONEDNN_OPTS=0" in note
  for users_choice in ("0", "1"):
    environ = {"TF_ENABLE_ONEDNN_OPTS": users_choice}
    assert tf_environment.enable_onednn_unless_set(environ) is None
    assert environ == {"TF_ENABLE_ONEDNN_OPTS": users_choice}


def _environment_without_the_variable():
  env = dict(os.environ)
  env.pop("TF_ENABLE_ONEDNN_OPTS", None)
  return env


def test_tensorflow_runs_with_onednn_after_the_switch_on_any_x86_cpu():
  # On an AVX2-only CPU TensorFlow 2.15 leaves oneDNN off by default; after the switch it is on.
  script = ("from estimator_ft import tf_environment\n"
            "tf_environment.enable_onednn_unless_set()\n"
            "from tensorflow.python.util import _pywrap_util_port\n"
            "print('onednn', _pywrap_util_port.IsMklEnabled())\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=_environment_without_the_variable())
  assert "onednn True" in result.stdout, result.stderr[-2000:]


def test_the_cli_says_once_that_it_turned_onednn_on_and_respects_zero(tmp_path):
  command = [sys.executable, "-m", "estimator_ft", "train", f"--train_dir={tmp_path / 'none'}",
             f"--validation_dir={tmp_path / 'none'}", f"--model_dir={tmp_path / 'm'}"]
  unset = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env=_environment_without_the_variable())
  assert unset.returncode == 2  # the data folder does not exist: a user error, after the note
  assert unset.stderr.count("oneDNN CPU kernels on") == 1, unset.stderr
  off = subprocess.run(command, capture_output=True, text=True, timeout=120,
                       env={**_environment_without_the_variable(), "TF_ENABLE_ONEDNN_OPTS": "0"})
  assert off.returncode == 2 and "oneDNN" not in off.stderr, off.stderr
