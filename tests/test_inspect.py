"""The scan manifest (a second start decodes only what changed) and `estimator-ft inspect`."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from estimator_ft.config import Config
from estimator_ft.data import folders as folders_lib
from estimator_ft.data import loading as loading_lib
from estimator_ft.data import manifest as manifest_lib
from estimator_ft.jobs import inspect_data
try:
  from tests import images  # repo root on sys.path: `python -m pytest`, or tests/ is a package
except ImportError:
  import images  # bare `pytest`: it puts tests/ itself on sys.path


def write_clean_pair(root, per_class=3):
  for split_index, split in enumerate(("train", "validation")):
    for class_index, name in enumerate(("cat", "dog")):
      for i in range(per_class):
        images.write_png(root / split / name / f"{i}.png", size=12,
                         seed=1000 * split_index + 100 * class_index + i)
  return root / "train", root / "validation"


# ------------------------------------------------------------------ the manifest


def test_a_second_scan_decodes_nothing_and_a_changed_file_is_checked_again(tmp_path, caplog):
  train, _ = write_clean_pair(tmp_path / "data")
  cache = str(tmp_path / "cache")
  first = folders_lib.survey_folder(str(train), "train", cache)
  assert first.decoded == 6 and os.path.exists(first.manifest)
  second = folders_lib.survey_folder(str(train), "train", cache)
  assert second.decoded == 0 and second.files == first.files
  # A file rewritten with other bytes (other size), one added, one truncated: those three only.
  images.write_png(train / "cat" / "0.png", size=14, seed=7)
  images.write_png(train / "dog" / "new.png", size=12, seed=8)
  with open(train / "dog" / "1.png", "r+b") as f:
    f.truncate(20)
  third = folders_lib.survey_folder(str(train), "train", cache)
  assert third.decoded == 3 and len(third.files) == 7
  reasons = {os.path.basename(p): f.reason for p, _, f in third.files if f.reason}
  assert list(reasons) == ["1.png"] and "cannot be decoded" in reasons["1.png"]
  # A cached bad verdict stays bad; --rescan decodes everything again.
  assert folders_lib.survey_folder(str(train), "train", cache).bad() == third.bad()
  assert folders_lib.survey_folder(str(train), "train", cache, rescan=True).decoded == 7


INTERRUPTED_SCAN_FILES = 3000


def test_an_interrupted_first_scan_keeps_what_it_had_checked(tmp_path):
  """A first scan saves its verdicts as it goes: killed (preempted, OOM) at 1.3 M images, the
  next start used to decode them all again."""
  train = tmp_path / "train"
  for index in range(INTERRUPTED_SCAN_FILES):
    images.write_png(train / ("a", "b")[index % 2] / f"{index}.png", size=8, seed=index)
  cache = tmp_path / "cache"
  manifest = manifest_lib.manifest_path(str(train), str(cache))
  scan = (f"from estimator_ft.data import folders\n"
          f"folders.survey_folder({str(train)!r}, 'train', {str(cache)!r}, "
          f"manifest_save_every_s=0.05)\n")
  child = subprocess.Popen([sys.executable, "-c", scan], cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while child.poll() is None and not os.path.exists(manifest):
    time.sleep(0.005)
  child.kill()  # as kill -9: no cleanup runs
  child.wait()
  assert child.returncode == -9, "the scan ended before its first partial save: use more files"
  saved = len(json.loads(open(manifest).read())["files"]["path"])
  assert 0 < saved < INTERRUPTED_SCAN_FILES
  resumed = folders_lib.survey_folder(str(train), "train", str(cache))
  assert resumed.decoded == INTERRUPTED_SCAN_FILES - saved
  assert len(resumed.files) == INTERRUPTED_SCAN_FILES and not resumed.bad()


@pytest.mark.parametrize("damage", ["garbage", "other_version", "other_settings", "bad_entry",
                                    "short_column"])
def test_a_damaged_or_foreign_manifest_is_ignored_with_a_warning(tmp_path, caplog, damage):
  train, _ = write_clean_pair(tmp_path / "data")
  cache = str(tmp_path / "cache")
  path = folders_lib.survey_folder(str(train), "train", cache).manifest
  record = json.loads(open(path).read())
  if damage == "garbage":
    text = "{not json"
  else:
    if damage == "other_version":
      record["version"] = manifest_lib.VERSION + 1
    elif damage == "other_settings":
      record["settings"] = {"tensorflow": "1.0"}
    elif damage == "bad_entry":
      # One entry's key no longer parses: that file alone is checked again.
      record["files"]["size"][0] = "broken"
    else:
      # Columns that no longer line up: nothing in the manifest can be trusted.
      record["files"]["sha1"].pop()
    text = json.dumps(record)
  with open(path, "w") as f:
    f.write(text)
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    again = folders_lib.survey_folder(str(train), "train", cache)
  assert again.decoded == (1 if damage == "bad_entry" else 6)
  assert "manifest" in caplog.text.lower()


def test_a_read_only_data_folder_and_an_unwritable_cache_both_work(tmp_path, caplog):
  train, _ = write_clean_pair(tmp_path / "data")
  for folder, _, names in os.walk(train):
    os.chmod(folder, 0o555)
  try:
    cache = tmp_path / "cache"
    assert folders_lib.survey_folder(str(train), "train", str(cache)).decoded == 6
    assert folders_lib.survey_folder(str(train), "train", str(cache)).decoded == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="estimator_ft"):
      survey = folders_lib.survey_folder(str(train), "train", str(blocker / "cache"))
    assert survey.decoded == 6 and not survey.bad()
    assert "--scan_cache_dir" in caplog.text
  finally:
    for folder, _, _ in os.walk(train):
      os.chmod(folder, 0o755)


def test_a_long_scan_reports_progress_with_a_rate_and_an_eta(tmp_path, caplog):
  train, _ = write_clean_pair(tmp_path / "data", per_class=4)
  with caplog.at_level(logging.INFO, logger="estimator_ft"):
    folders_lib.survey_folder(str(train), "train", str(tmp_path / "cache"), progress_every_s=0)
  lines = [r.getMessage() for r in caplog.records if "files/s" in r.getMessage()]
  assert lines and all("of 8 files" in line and "ETA" in line for line in lines), lines


# ------------------------------------------------------------------ inspect


@pytest.fixture(scope="module")
def flawed_pair(tmp_path_factory):
  """A pair with one of each defect planted."""
  root = tmp_path_factory.mktemp("flawed")
  train, validation = write_clean_pair(root)
  images.write_png(train / "cat" / "gray.png", size=10, mode="L")
  images.write_png(train / "cat" / "alpha.png", size=10, mode="RGBA")
  images.write_jpeg(train / "cat" / "cmyk.jpg", size=10, mode="CMYK")
  images.write_gif(train / "dog" / "palette.gif", size=10, seed=3)
  rotated = Image.new("RGB", (30, 20), (200, 10, 10))
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated.save(train / "dog" / "rotated.jpg", "JPEG", exif=exif.tobytes())
  images.write_truncated(train / "dog" / "broken.png", kind="png")
  shutil.copy(train / "dog" / "0.png", train / "dog" / "copy_of_0.png")     # duplicate in train
  shutil.copy(train / "cat" / "1.png", validation / "cat" / "leaked.png")   # train -> validation
  (train / "bird").mkdir()                                                  # only in train, empty
  images.write_png(train / "bird" / "only.png", size=12, seed=99)
  (validation / "fish").mkdir()                                             # only in validation
  return train, validation


def test_inspect_finds_every_planted_defect(flawed_pair, tmp_path):
  train, validation = flawed_pair
  report = inspect_data.inspect_folders(str(train), str(validation), str(tmp_path / "cache"))
  t, v = report["splits"]["train"], report["splits"]["validation"]
  assert t["images_per_class"] == {"bird": 1, "cat": 6, "dog": 6}
  assert v["images_per_class"] == {"cat": 4, "dog": 3, "fish": 0}
  assert t["class_ratio"] == 6.0 and v["class_ratio"] is None  # fish is empty
  assert t["colour_modes"] == {"gray": 1, "with_alpha": 1, "cmyk": 1, "palette": 1}
  assert t["exif_rotated"] == 1
  assert t["formats"] == {"PNG": 10, "JPEG": 2, "GIF": 1}
  assert t["shorter_side"] == {"min": 10, "median": 12, "max": 20}
  assert [os.path.basename(b["path"]) for b in t["bad_files"]] == ["broken.png"]
  assert [[os.path.basename(p) for p in g] for g in t["duplicates"]] == [["0.png", "copy_of_0.png"]]
  assert [(os.path.basename(e["validation"]), os.path.basename(e["train"]))
          for e in report["leakage"]] == [("leaked.png", "1.png")]
  assert report["classes_only_in"] == {"train": ["bird"], "validation": ["fish"]}
  assert v["empty_classes"] == ["fish"]
  assert len(report["problems"]) == 4 and any("leakage" in p for p in report["problems"])
  assert any("imbalanced" in w for w in report["warnings"])  # train: 6 vs 1
  assert report["files_checked"] == 14 + 7 and report["files_decoded_this_time"] == 21
  again = inspect_data.inspect_folders(str(train), str(validation), str(tmp_path / "cache"))
  assert again["files_decoded_this_time"] == 0
  for name, split in again["splits"].items():
    assert {**split, "files_decoded_this_time": None} == {
        **report["splits"][name], "files_decoded_this_time": None}


def test_inspect_cli_exit_status_table_and_json(flawed_pair, tmp_path):
  train, validation = flawed_pair
  clean_train, clean_validation = write_clean_pair(tmp_path / "clean")

  def run(train_dir, validation_dir, output):
    return subprocess.run([sys.executable, "-m", "estimator_ft", "inspect",
                           f"--train_dir={train_dir}", f"--validation_dir={validation_dir}",
                           f"--output={output}"], capture_output=True, text=True, timeout=120)

  flawed = run(train, validation, tmp_path / "flawed.json")
  assert flawed.returncode == 1, flawed.stderr
  assert "PROBLEM: 1 validation file(s) have the same bytes" in flawed.stdout
  assert "leakage:" in flawed.stdout and "broken.png" in flawed.stdout
  assert json.loads((tmp_path / "flawed.json").read_text())["leakage"]
  clean = run(clean_train, clean_validation, tmp_path / "clean.json")
  assert clean.returncode == 0, clean.stderr
  assert "No problems found." in clean.stdout
  assert json.loads((tmp_path / "clean.json").read_text())["problems"] == []


def test_train_warns_about_imbalance_and_leakage_before_it_starts(tmp_path, caplog):
  train, validation = write_clean_pair(tmp_path / "data", per_class=2)
  for i in range(5):
    images.write_png(train / "cat" / f"extra{i}.png", size=12, seed=500 + i)  # 7 cats : 2 dogs
  shutil.copy(train / "dog" / "0.png", validation / "dog" / "same.png")
  config = Config(train_dir=str(train), validation_dir=str(validation), image_size=32,
                  batch_size=2, scan_cache_dir=str(tmp_path / "cache"))
  with caplog.at_level(logging.WARNING, logger="estimator_ft"):
    loading_lib.load_splits(config)
  assert "'cat' has 7 images, 'dog' 2 (3.5:1)" in caplog.text
  assert "1 validation file(s) have the same bytes as a training file" in caplog.text
