"""oneDNN on for every estimator-ft process unless the user said otherwise; a precision without
fast kernels on this machine named before the run starts."""

import os
import subprocess
import sys

import pytest

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


def test_the_cpuinfo_reader_takes_a_fields_first_line_and_says_nothing_without_the_file(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
                     "flags\t\t: fpu\n")
  assert tf_environment.cpuinfo_field("flags", str(cpuinfo)) == "fpu avx2 avx512_bf16"
  assert tf_environment.cpuinfo_field("model name", str(cpuinfo)) == ""
  assert tf_environment.cpuinfo_field("flags", str(tmp_path / "absent")) == ""


def test_a_precision_without_fast_kernels_here_is_named_with_what_to_use():
  note = tf_environment.precision_note
  avx2, zen4, sapphire_rapids = {"avx2"}, {"avx2", "avx512f", "avx512_bf16"}, {"amx_bf16"}
  # float16 has no fast CPU kernels anywhere; bfloat16 needs AVX512_BF16 or AMX.
  assert "meant for GPUs" in note("mixed_float16", False, zen4)
  assert "Use float32" in note("mixed_bfloat16", False, avx2)
  for quiet in [("float32", False, avx2), ("mixed_bfloat16", False, zen4),
                ("mixed_bfloat16", False, sapphire_rapids), ("mixed_float16", True, avx2),
                ("mixed_bfloat16", True, avx2)]:
    assert note(*quiet) is None, quiet


def test_a_float16_run_on_a_cpu_is_warned_before_its_data_is_read(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if tf.config.list_physical_devices("GPU"):
    pytest.skip("float16 is what a GPU is for")
  result = subprocess.run(
      [sys.executable, "-m", "estimator_ft", "train", f"--train_dir={tmp_path / 'none'}",
       f"--validation_dir={tmp_path / 'none'}", f"--model_dir={tmp_path / 'm'}",
       "--precision=mixed_float16"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2  # the missing folder, after the warning
  assert result.stderr.count("--precision=mixed_float16 on a CPU") == 1, result.stderr[-2000:]
