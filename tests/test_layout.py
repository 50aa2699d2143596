"""The package's import graph: layers point one way, no cycles; configs import no fdistill module.

Layers (docs/design.md section 2), lowest first. A module may import modules of
its own package and of lower layers only:

  -1 errors                            the user-error classes (import nothing)
  0 registry, configfile
  1 diffusion, ops, parallel           pure math, kernels, mesh and partition rules
  2 models, optim, io, data            networks; update helpers; checkpoints, readers,
                                        writers, plots; datasets
  3 objectives, teachers               losses and schedules; teacher params
  4 experiment, sampling               the assembly; drawing samples from its sampler
  5 train, eval                        the loop, the eval job
  6 modes, api, study                  the run modes; a run as a Python object; the 2-D study
  7 main, demo                         entry points
"""
import ast
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"errors": -1, "registry": 0, "configfile": 0, "diffusion": 1, "ops": 1, "parallel": 1,
          "models": 2, "optim": 2, "io": 2, "data": 2, "objectives": 3, "teachers": 3,
          "experiment": 4, "sampling": 4, "train": 5,
          "eval": 5, "modes": 6, "api": 6, "study": 6, "main": 7, "demo": 7}


def module_name(path):
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def fdistill_imports(path, modules):
  """Every ``fdistill.*`` module ``path`` imports (top level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("fdistill")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fdistill"):
      # ``from fdistill.x import y`` imports the module fdistill.x.y if there is one, else x.
      out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
              for a in node.names}
  return out


def graph():
  files = glob.glob(os.path.join(ROOT, "fdistill", "**", "*.py"), recursive=True)
  modules = {module_name(f) for f in files}
  return {module_name(f): fdistill_imports(f, modules) for f in files}


def layer(module):
  parts = module.split(".")
  return LAYERS.get(parts[1]) if len(parts) > 1 else 8  # the package root (fdistill.load)


def test_every_package_module_has_a_layer():
  assert [m for m in graph() if m != "fdistill" and layer(m) is None] == []


def test_imports_point_down_only():
  bad = []
  for module, imports in graph().items():
    for target in imports:
      same_package = target.split(".")[:2] == module.split(".")[:2]
      if not same_package and layer(target) is not None and layer(target) >= layer(module):
        bad.append(f"{module} -> {target}")
  assert bad == []


def test_no_import_cycles():
  imports_of = graph()
  edges = {m: {t for t in imports if t in imports_of} for m, imports in imports_of.items()}
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in edges[node]:
      if state.get(nxt) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
      if nxt not in state:
        visit(nxt, stack + [node])
    state[node] = "done"

  for node in edges:
    if node not in state:
      visit(node, [])


def test_configs_import_only_configs_and_ml_collections():
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    for node in ast.walk(ast.parse(open(path).read())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) else [])
      for name in names:
        assert name.split(".")[0] in ("configs", "ml_collections"), (path, name)


def test_parsing_every_config_imports_no_kernel_module():
  """Loading every config and variant (as --config does) imports nothing of fdistill/ops."""
  code = (
      "import glob, sys\n"
      "from fdistill.configfile import load_config_file\n"
      "for path in sorted(glob.glob('configs/*_*.py')):\n"
      "  if path.endswith(('__init__.py', 'common.py', 'architectures.py')):\n"
      "    continue\n"
      "  load_config_file(path)\n"
      "bad = sorted(m for m in sys.modules if m.startswith(('fdistill.ops', 'fdistill.models',"
      " 'fdistill.objectives', 'jax')))\n"
      "assert not bad, bad\n"
      "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# Names that hold a config or one of its sections in fdistill/ (``config``, ``mesh_config``,
# ``cfg``, and the short aliases the code uses for sections).
CONFIG_NAMES = re.compile(r"^(config|cfg|[a-z_]+_config|tc|ec|gc|oc|st)$")


def _root_name(node):
  """The variable an attribute chain starts from: ``config`` for ``config.data.x``."""
  while isinstance(node, ast.Attribute):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def config_defaults_in(source, path="<source>"):
  """``path:line`` of every ``.get(key, ...)`` or ``getattr(obj, key, default)`` on a config or a
  config section in ``source`` (found by walking its AST, so formatting cannot hide one)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "get":
      target = func.value
    elif isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) == 3:
      target = node.args[0]
    else:
      continue
    name = _root_name(target)
    if name is not None and CONFIG_NAMES.match(name):
      found.append(f"{path}:{node.lineno}")
  return found


def test_the_defaults_check_catches_planted_violations():
  """The check below can fail: each form of a shadowing default is found, and look-alikes
  that are no config (a mesh's shape, a batch dict) are not."""
  planted = ("def f(config, mesh_config, tc, batch, mesh):\n"
             "  a = config.data.get('resolution', 32)\n"
             "  b = mesh_config.get(\n      'rules', ())\n"
             "  c = getattr(config.eval, 'inception_path', '')\n"
             "  d = tc.get('log_every', 10)\n"
             "  e = batch.get('cond')\n"
             "  f = mesh.shape.get('fsdp', 1)\n")
  assert config_defaults_in(planted) == ["<source>:2", "<source>:3", "<source>:5", "<source>:6"]


def test_no_defaults_shadow_the_base_config():
  """Every section has a complete base config (configs/common.py), so code reads fields by
  attribute, never with ``.get(key, default)`` (or ``getattr`` with a default) that could
  disagree with it."""
  bad = []
  for path in sorted(glob.glob(os.path.join(ROOT, "fdistill", "**", "*.py"), recursive=True)):
    bad += config_defaults_in(open(path).read(), os.path.relpath(path, ROOT))
  assert bad == []


def test_toy_distributions_of_the_configs_are_the_package_s():
  """configs/ imports no fdistill module, so it lists toy2d's distributions itself."""
  from configs import common
  from fdistill.diffusion import gmm
  assert sorted(common.TOY_DISTRIBUTIONS) == sorted(gmm.TOY_DISTRIBUTIONS)


def test_every_source_folder_is_an_installed_package():
  """A folder of modules without ``__init__.py`` is left out of a normal (non-editable)
  install by setup.py's ``find_packages``, while an editable install and the suite still see
  it (fdistill/io once shipped that way). Every folder holding .py files must be found."""
  from setuptools import find_packages
  found = set(find_packages(ROOT, include=["fdistill", "fdistill.*", "configs"]))
  folders = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".")
             for top in ("fdistill", "configs")
             for p in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)}
  assert folders - found == set(), f"folders with modules but no __init__.py: {folders - found}"
