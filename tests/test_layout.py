"""The package's layers: every import points down, no cycles, every module importable alone."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "estimator_ft"

# The order of the layers (estimator_ft/__init__.py): a module may import only modules of its own
# layer or of a layer before it. Standard-library-only modules come first.
LAYERS = (
    ("contract", "files", "progress", "messages", "image_formats", "cluster", "sample_data",
     "tf_environment", "memory", "interrupts"),
    ("config", "recipes"),
    ("storage",),
    ("reports",),
    ("data",),
    ("model",),
    ("model_fn",),
    ("run",),
    ("serving",),
    ("serving_tflite",),
    ("export",),
    ("export_tflite",),
    ("estimator", "keras_path"),
    ("jobs", "bench"),
    ("cli", "__main__"),
)
# Modules that may import estimator_ft inside a function: the CLI imports each subcommand's job only
# when that subcommand runs (fast --help; `predict` loads no training code).
LAZY_IMPORTERS = ("estimator_ft.cli",)


def module_names():
  names = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return names


def _path_of(name):
  relative = pathlib.Path(*name.split("."))
  package_init = PACKAGE.parent / relative / "__init__.py"
  return package_init if package_init.exists() else PACKAGE.parent / relative.with_suffix(".py")


def imports_of(name, modules):
  """{imported estimator_ft module: True if the import is inside a function} for module `name`."""
  tree = ast.parse(_path_of(name).read_text())
  found = {}

  def resolve(target):
    while target and target not in modules:
      target = target.rpartition(".")[0]
    return target

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      targets = []
      if isinstance(child, ast.Import):
        targets = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        targets = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
      for target in targets:
        module = resolve(target)
        if module and module not in (name, "estimator_ft"):
          found[module] = found.get(module, False) or inner
      visit(child, inner)

  visit(tree, False)
  return found


def layer_of(name):
  top = name.split(".")[1] if name != "estimator_ft" else ""
  for index, layer in enumerate(LAYERS):
    if top in layer:
      return index
  raise AssertionError(f"{name} is in no layer of test_layout.LAYERS: add it there and to the "
                       "module map in estimator_ft/__init__.py")


def test_every_import_points_down_a_layer_and_there_is_no_cycle():
  modules = set(module_names())
  graph = {name: imports_of(name, modules) for name in modules}
  upward = [f"{name} -> {target}" for name, targets in graph.items() if name != "estimator_ft"
            for target in targets if layer_of(target) > layer_of(name)]
  assert not upward, upward
  lazy = [f"{name} -> {target}" for name, targets in graph.items() for target, inner in targets.items()
          if inner and name not in LAZY_IMPORTERS]
  assert not lazy, f"function-local imports of estimator_ft modules: {lazy}"

  state, cycles = {}, []

  def walk(node, stack):
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        walk(target, stack + [target])
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      walk(name, [name])
  assert not cycles, cycles


def test_the_cycle_walk_finds_a_planted_cycle(tmp_path, monkeypatch):
  # The checker itself must be able to fail: two modules importing each other form a cycle.
  package = tmp_path / "estimator_ft"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "contract.py").write_text("from estimator_ft import files\n")
  (package / "files.py").write_text("def f():\n  from estimator_ft import contract\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
  modules = set(module_names())
  assert modules == {"estimator_ft", "estimator_ft.contract", "estimator_ft.files"}
  assert imports_of("estimator_ft.files", modules) == {"estimator_ft.contract": True}
  assert imports_of("estimator_ft.contract", modules) == {"estimator_ft.files": False}


def test_every_module_imports_alone():
  # One interpreter; before each module, every estimator_ft module is forgotten, so a module that
  # only works after some other one was imported first fails here. TensorFlow stays loaded.
  script = (
      "import importlib, sys\n"
      f"names = {module_names()!r}\n"
      "failed = []\n"
      "for name in names:\n"
      "  for loaded in [m for m in sys.modules if m == 'estimator_ft' or m.startswith('estimator_ft.')]:\n"
      "    del sys.modules[loaded]\n"
      "  try:\n"
      "    importlib.import_module(name)\n"
      "  except Exception as e:\n"
      "    failed.append(f'{name}: {type(e).__name__}: {e}')\n"
      "print('\\n'.join(failed))\n"
      "sys.exit(1 if failed else 0)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent)
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_standard_library_layer_and_predict_import_no_training_code():
  script = (
      "import sys\n"
      "import estimator_ft.contract, estimator_ft.files, estimator_ft.progress, estimator_ft.cluster\n"
      "import estimator_ft.sample_data, estimator_ft.config, estimator_ft.memory\n"
      "import estimator_ft.interrupts, estimator_ft.recipes\n"
      "assert 'tensorflow' not in sys.modules, 'the standard-library layer imported TensorFlow'\n"
      "import estimator_ft.serving\n"
      "training = sorted(m for m in sys.modules if m.startswith('estimator_ft.') and m not in (\n"
      "    'estimator_ft.serving', 'estimator_ft.contract', 'estimator_ft.image_formats',\n"
      "    'estimator_ft.messages', 'estimator_ft.files', 'estimator_ft.progress',\n"
      "    'estimator_ft.cluster', 'estimator_ft.sample_data', 'estimator_ft.config',\n"
      "    'estimator_ft.memory', 'estimator_ft.interrupts', 'estimator_ft.recipes'))\n"
      "assert not training, training\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
  assert result.returncode == 0, result.stderr[-2000:]


# What a TFLite `predict` may load. The interpreter holds the model alone, so serving_tflite decodes,
# resizes and preprocesses before it with the pipeline's own functions (data/images), rather than a
# copy of them that could drift. data/images imports TensorFlow and data/split (standard library)
# only, and neither is training code: no model, tf.data pipeline, Estimator or Keras path.
TFLITE_PREDICT_MODULES = {
    "estimator_ft", "estimator_ft.serving_tflite", "estimator_ft.serving", "estimator_ft.contract",
    "estimator_ft.image_formats", "estimator_ft.messages", "estimator_ft.data",
    "estimator_ft.data.images", "estimator_ft.data.split"}


def test_the_tflite_predictor_loads_the_image_functions_and_no_training_code():
  script = (
      "import sys\n"
      "import estimator_ft.serving_tflite\n"
      "print(' '.join(sorted(m for m in sys.modules if m.startswith('estimator_ft'))))\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  loaded = set(result.stdout.split())
  assert loaded == TFLITE_PREDICT_MODULES, loaded ^ TFLITE_PREDICT_MODULES
