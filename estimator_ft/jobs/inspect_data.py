"""`estimator-ft inspect`: what a careful person checks in an image-folder pair before a long run.

Reads the scan manifest (data/manifest.py), so on unchanged data it decodes nothing and takes
seconds. Reports images per class and split, the class ratio, image sizes, formats and colour
modes (gray, RGBA, CMYK, palette), EXIF-rotated JPEGs (the pipeline decodes them unrotated), bad
files with their reasons, files whose bytes are in both splits (leakage) or twice in one split,
and classes that are empty or present in one split only. The last three make training or its
validation figures wrong: `problems`, and exit status 1.
"""

import statistics
from typing import Dict, List

from estimator_ft import files
from estimator_ft.data import checks
from estimator_ft.data import folders

SPLITS = ("train", "validation")
EXIT_OK = 0
EXIT_PROBLEMS = 1
# PIL modes by what they mean for training (the pipeline turns all of them into RGB).
MODE_KINDS = {"gray": ("1", "L", "LA", "I", "I;16", "F"), "with_alpha": ("RGBA", "LA", "PA"),
              "cmyk": ("CMYK",), "palette": ("P", "PA")}
# Lines of each list the terminal table shows; report.json has them all.
MAX_LISTED = 10


def _spread(values: List[int]) -> dict:
  if not values:
    return {"min": None, "median": None, "max": None}
  return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _split_report(survey: folders.FolderSurvey) -> dict:
  usable = [(path, index, facts) for path, index, facts in survey.files if not facts.reason]
  counts = checks.class_counts([index for _, index, _ in usable], len(survey.class_names))
  formats: Dict[str, int] = {}
  for _, _, facts in usable:
    formats[facts.format or "unknown"] = formats.get(facts.format or "unknown", 0) + 1
  return {
      "folder": survey.root,
      "files_checked": len(survey.files),
      "files_decoded_this_time": survey.decoded,
      "manifest": survey.manifest,
      "images_per_class": dict(zip(survey.class_names, counts)),
      # None for an empty class (listed in empty_classes): JSON has no infinity.
      "class_ratio": checks.imbalance_ratio(counts) if counts and min(counts) else None,
      "shorter_side": _spread([min(f.width, f.height) for _, _, f in usable if f.width]),
      "longer_side": _spread([max(f.width, f.height) for _, _, f in usable if f.width]),
      "formats": formats,
      "colour_modes": {kind: sum(f.mode in modes for _, _, f in usable)
                       for kind, modes in MODE_KINDS.items()},
      "exif_rotated": sum(f.orientation not in (0, 1) for _, _, f in usable),
      "bad_files": [{"path": path, "reason": reason} for path, reason in survey.bad()],
      "duplicates": checks.duplicate_groups([p for p, _, _ in usable],
                                            [f.sha1 for _, _, f in usable]),
      "empty_classes": [name for name, count in zip(survey.class_names, counts) if count == 0],
  }


def inspect_folders(train_dir: str, validation_dir: str, cache_dir: str = "",
                    rescan: bool = False) -> dict:
  """The report (see the module docstring); raises DataError when a folder is not usable at all."""
  surveys = {"train": folders.survey_folder(train_dir, "train", cache_dir, rescan),
             "validation": folders.survey_folder(validation_dir, "validation", cache_dir, rescan)}
  report = {"splits": {name: _split_report(survey) for name, survey in surveys.items()}}
  usable = {name: [(p, f.sha1) for p, _, f in survey.files if not f.reason]
            for name, survey in surveys.items()}
  shared = checks.shared_files(*zip(*usable["train"]), *zip(*usable["validation"])) if (
      usable["train"] and usable["validation"]) else []
  report["leakage"] = [{"validation": v, "train": t} for v, t in shared]
  classes = {name: set(survey.class_names) for name, survey in surveys.items()}
  report["classes_only_in"] = {
      "train": sorted(classes["train"] - classes["validation"]),
      "validation": sorted(classes["validation"] - classes["train"])}
  report["files_checked"] = sum(s["files_checked"] for s in report["splits"].values())
  report["files_decoded_this_time"] = sum(s["files_decoded_this_time"]
                                          for s in report["splits"].values())
  report["problems"] = problems(report)
  report["warnings"] = [w for name, survey in surveys.items() for w in [
      checks.imbalance_warning(name, survey.class_names,
                               list(report["splits"][name]["images_per_class"].values()))] if w]
  return report


def problems(report: dict) -> List[str]:
  """What makes training or its validation figures wrong (each one sets exit status 1)."""
  found = []
  if report["leakage"]:
    found.append(f"{len(report['leakage'])} validation file(s) have the same bytes as a training "
                 "file (leakage)")
  for name, only in report["classes_only_in"].items():
    if only:
      found.append(f"class(es) only in {name}: {', '.join(only)}")
  for name, split in report["splits"].items():
    if split["empty_classes"]:
      found.append(f"empty class folder(s) in {name}: {', '.join(split['empty_classes'])}")
  return found


def _fmt_spread(spread: dict) -> str:
  return "-" if spread["min"] is None else f"{spread['min']}/{spread['median']:g}/{spread['max']}"


def format_report(report: dict) -> str:
  """The terminal table."""
  lines = []
  classes = sorted(set().union(*(s["images_per_class"] for s in report["splits"].values())))
  width = max([5] + [len(c) for c in classes])
  lines.append(f"{'class':{width}s} {'train':>9s} {'validation':>11s}")
  for name in classes:
    cells = [report["splits"][s]["images_per_class"].get(name) for s in SPLITS]
    lines.append(f"{name:{width}s} " + f"{'-' if cells[0] is None else cells[0]:>9} "
                 f"{'-' if cells[1] is None else cells[1]:>11}")
  for key, label in (("class_ratio", "largest/smallest class"),):
    values = [report["splits"][s][key] for s in SPLITS]
    lines.append(f"{label:{width}s} " + " ".join(
        f"{('-' if v is None else f'{v:.1f}'):>{w}}" for v, w in zip(values, (9, 11))))
  lines.append("")
  for name in SPLITS:
    split = report["splits"][name]
    modes = ", ".join(f"{k} {v}" for k, v in split["colour_modes"].items() if v) or "all RGB"
    lines.append(f"{name}: {split['files_checked']} files checked, "
                 f"{split['files_decoded_this_time']} decoded this time; sides (shorter) "
                 f"{_fmt_spread(split['shorter_side'])} px min/median/max; formats "
                 f"{', '.join(f'{k} {v}' for k, v in sorted(split['formats'].items())) or '-'}; "
                 f"{modes}; EXIF-rotated {split['exif_rotated']}")
    for entry in split["bad_files"][:MAX_LISTED]:
      lines.append(f"  bad: {entry['path']}: {entry['reason']}")
    for group in split["duplicates"][:MAX_LISTED]:
      lines.append(f"  same bytes: {', '.join(group)}")
  for entry in report["leakage"][:MAX_LISTED]:
    lines.append(f"leakage: {entry['validation']} = {entry['train']}")
  lines.append("")
  lines += [f"warning: {w}" for w in report["warnings"]]
  lines += [f"PROBLEM: {p}" for p in report["problems"]] or ["No problems found."]
  return "\n".join(lines)


def run_inspect(train_dir: str, validation_dir: str, cache_dir: str = "", rescan: bool = False,
                output: str = "") -> int:
  """`estimator-ft inspect`: prints the table, writes `output` (JSON) if given; the exit status."""
  report = inspect_folders(train_dir, validation_dir, cache_dir, rescan)
  print(format_report(report))
  if output:
    files.write_json_atomic(output, report)
    print(f"\nReport written to {output}")
  return EXIT_PROBLEMS if report["problems"] else EXIT_OK
