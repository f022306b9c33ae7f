"""The package's layering: a module imports only from its own layer or the layers below.

Layers, bottom up (docs/design.md): the array code that knows nothing of methods or of the
trainer; data, checkpoints, weight conversion and the methods; the run builder and the
evaluators; the commands built on them (the loop, restore, the evaluation and compile
commands, ``main``); the tools beside the library (the rehearsal and the local pod). Imports are
read from the source (every ``import`` and ``from ... import``, inside functions too), so a
lazy import that runs back up is caught as well. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import os

import contrastive_jax

PACKAGE = os.path.dirname(contrastive_jax.__file__)

# Module prefixes per layer, bottom up; the longest matching prefix decides.
LAYERS = (
    ("errors", "configs"),
    ("losses", "distributed", "sharding", "models", "optim", "train_state", "metrics",
     "grad_cache", "hardware", "hlo_stats", "gpu_targets"),
    ("data", "checkpoint", "convert", "methods"),
    ("runs", "evaluate"),
    ("train", "restore", "evaluate.__main__", "evaluate.zero_shot_imagenet", "compile_for",
     "main"),
    ("tools",),
)


def layer_of(module: str) -> int | None:
  """The layer of ``module`` (dotted, without the package name); None when unassigned."""
  best, layer = -1, None
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
        best, layer = len(prefix), index
  return layer


def package_modules() -> dict[str, str]:
  """``{dotted module name (without the package name): file path}`` of every module."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__") if rel != "__init__" else ""] = path
  return out


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package modules ``module`` imports (dotted, without the package name)."""
  is_package = path.endswith("__init__.py")
  here = module.split(".") if module else []
  parent = here if is_package else here[:-1]
  found = set()

  def add(dotted: str) -> None:
    if dotted == "contrastive_jax" or not dotted.startswith("contrastive_jax."):
      return
    name = dotted[len("contrastive_jax."):]
    while name and name not in modules:  # an attribute of a module: its module
      name = name.rpartition(".")[0]
    if name:
      found.add(name)

  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = parent[:len(parent) - (node.level - 1)]
        origin = ".".join(["contrastive_jax", *base] + ([node.module] if node.module else []))
      else:
        origin = node.module or ""
      for alias in node.names:
        add(f"{origin}.{alias.name}")
  return found


def test_every_module_has_a_layer():
  missing = sorted(m for m in package_modules() if m and layer_of(m) is None)
  assert not missing, f"give these modules a layer in tests/test_layers.py LAYERS: {missing}"


def test_no_module_imports_a_higher_layer():
  modules = package_modules()
  upward = []
  for module, path in sorted(modules.items()):
    if not module or layer_of(module) is None:
      continue
    for target in sorted(imports_of(module, path, modules)):
      if layer_of(target) is not None and layer_of(target) > layer_of(module):
        upward.append(f"{module} (layer {layer_of(module)}) imports {target} "
                      f"(layer {layer_of(target)})")
  assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
  """The walk finds a function-level import that runs up (the test above can fail)."""
  path = tmp_path / "probe.py"
  path.write_text("def f():\n  from contrastive_jax.evaluate import runner\n")
  modules = package_modules()
  assert imports_of("methods.probe", str(path), modules) == {"evaluate.runner"}
  assert layer_of("evaluate.runner") > layer_of("methods.probe")
