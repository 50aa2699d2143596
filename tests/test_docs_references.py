"""Every code path, function, class or test that the docs and docstrings name exists.

Read statically (no imports): README.md and docs/**/*.md, and the docstrings and comments of
fdistill/, configs/ and benchmarks/. Checked references:

* paths of this repository (``fdistill/objectives/rcm.py``, ``objectives/rcm.py`` inside the
  package, ``tests/test_layout.py``, ``docs/fid.md``), with an optional ``:name`` that must be
  defined in that file (``configs/common.py:fdistill_objective``; after a config file with
  ``get_config`` it is a command-line variant, not checked) or ``:line`` within it;
* dotted names under the package (``fdistill.experiment.build``, ``fdistill.io.console``);
* Sphinx roles (:func:`noise.critic_levels`, :class:`Plan`), resolved from the file they
  appear in: its own names (its classes' too), its folder's modules, its imports, then the
  package root;
* ``Class.attribute`` where ``Class`` is a class of fdistill/ (``Objective.steps``).

Not checked: the rest of a line after ``FATAL:`` (a quoted error repeats the user's input).

Each checker is shown to fail on a planted stale reference (the first tests).
"""
import ast
import functools
import glob
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = sorted(d for d in os.listdir(os.path.join(ROOT, "fdistill"))
                      if os.path.isdir(os.path.join(ROOT, "fdistill", d)) and d != "__pycache__")
# First path components that name this repository's files (others are other projects' paths,
# e.g. FastGen's methods/..., or run outputs such as runs/...).
REPO_DIRS = ("fdistill", "configs", "benchmarks", "tests", "docs", "launch", "notebooks", ".ci")
PATH = re.compile(r"(?<![\w/.~<>$-])((?:\.ci|[a-z_0-9]+)/[\w/.-]*?\.(?:py|md|ipynb|sh|png|json))"
                  r"(?::([A-Za-z_][\w.]*|\d+))?")
DOTTED = re.compile(r"(?<![\w./-])(fdistill(?:\.\w+)+)(?![\w/])")
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr):`~?([\w.]+)`")
CLASS_ATTR = re.compile(r"``([A-Z]\w*)\.([a-z_]\w*)``")


# --- What is defined where (AST of each file, cached).

@functools.lru_cache(maxsize=None)
def tree_of(path):
  return ast.parse(open(path).read())


def names_in(body):
  """Names bound at the top of ``body``: defs, classes, assignments, imports."""
  out = set()
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      out.add(node.name)
    elif isinstance(node, ast.Assign):
      out |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      out.add(node.target.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      out |= {(a.asname or a.name).split(".")[0] for a in node.names}
    elif isinstance(node, (ast.If, ast.Try, ast.With)):
      out |= names_in(node.body)
  return out


def module_file(dotted):
  """The file of module ``dotted`` (``fdistill.io.console``), or None."""
  base = os.path.join(ROOT, *dotted.split("."))
  for candidate in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(candidate):
      return candidate
  return None


def class_body(path, name):
  for node in tree_of(path).body:
    if isinstance(node, ast.ClassDef) and node.name == name:
      return node.body
  return None


def resolves_in_module(path, attrs):
  """Whether ``attrs`` (``["Objective", "steps"]``) is defined in the module at ``path``: a
  top-level name, then (for a class) a name in its body; a submodule of a package counts."""
  if not attrs:
    return True
  if path.endswith("__init__.py"):
    sub = module_file(module_name(path) + "." + attrs[0])
    if sub is not None:
      return resolves_in_module(sub, attrs[1:])
  if attrs[0] not in names_in(tree_of(path).body):
    return False
  if len(attrs) == 1:
    return True
  body = class_body(path, attrs[0])
  if body is None:  # an imported name or a value: its attributes are not checked here
    return True
  return attrs[1] in names_in(body) | {"__init__"}


def module_name(path):
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def resolves_dotted(dotted):
  """``fdistill.a.b.c``: the longest prefix that is a module, then attributes inside it."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    path = module_file(".".join(parts[:i]))
    if path is not None:
      return resolves_in_module(path, parts[i:])
  return False


def imported_modules(path):
  """{alias: module} of a file's ``import fdistill.x as y`` / ``from fdistill.x import y``."""
  out = {}
  for node in ast.walk(tree_of(path)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fdistill"):
      for a in node.names:
        out[a.asname or a.name] = f"{node.module}.{a.name}"
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("fdistill"):
          out[a.asname or a.name.split(".")[-1]] = a.name
  return out


def in_a_class_of(path, name):
  """Whether ``name`` is defined in the body of a class of the file (a method, a field)."""
  return any(name in names_in(node.body) for node in tree_of(path).body
             if isinstance(node, ast.ClassDef))


def resolves_role(name, path):
  """A Sphinx role's target as the file at ``path`` sees it (a doc file: from the root)."""
  if path is None or not path.endswith(".py") or name.startswith("fdistill."):
    return resolves_dotted(name) or resolves_dotted("fdistill." + name)
  parts = name.split(".")
  imported = imported_modules(path)
  if parts[0] not in imported and resolves_in_module(path, parts[:1]):
    return resolves_in_module(path, parts)  # the file's own name
  if len(parts) == 1 and in_a_class_of(path, name):
    return True
  sibling = os.path.join(os.path.dirname(path), parts[0] + ".py")
  if os.path.isfile(sibling):  # a module of the same package or folder
    return resolves_in_module(sibling, parts[1:])
  if parts[0] in imported:
    return resolves_dotted(".".join([imported[parts[0]]] + parts[1:]))
  return resolves_dotted(name) or resolves_dotted("fdistill." + name)


@functools.lru_cache(maxsize=None)
def package_classes():
  """{class name: file} of every class defined in fdistill/ (names defined once only)."""
  seen = {}
  for path in glob.glob(os.path.join(ROOT, "fdistill", "**", "*.py"), recursive=True):
    for node in tree_of(path).body:
      if isinstance(node, ast.ClassDef):
        seen.setdefault(node.name, []).append(path)
  return {name: paths[0] for name, paths in seen.items() if len(paths) == 1}


# --- The checks, on one text.

def is_config_file(ref):
  """A config file (``get_config``), whose ``:name`` suffixes are command-line variants."""
  path = os.path.join(ROOT, ref)
  return os.path.isfile(path) and "get_config" in names_in(tree_of(path).body)


def path_problem(ref, line, where):
  """None if ``ref`` (a repository path) exists and its ``:name`` / ``:line`` is in it."""
  relative = os.path.dirname(where) if where else ROOT
  bases = [ROOT, os.path.join(ROOT, "fdistill"), relative]
  found = next((os.path.join(b, ref) for b in bases if os.path.exists(os.path.join(b, ref))), None)
  if found is None:
    return f"{ref}: no such file"
  if line is None or not ref.endswith(".py"):
    return None
  if line.isdigit():
    return None if int(line) <= len(open(found).read().splitlines()) else f"{ref}:{line}: past EOF"
  return None if resolves_in_module(found, line.split(".")) else f"{ref}:{line}: not defined"


def problems_in(text, where=None):
  """Stale references in ``text`` (from the file ``where``, which relative names start from)."""
  text = re.sub(r"FATAL:[^\n]*", "", text)  # a quoted error repeats the user's bad input
  bad = []
  for m in PATH.finditer(text):
    ref, line = m.group(1), m.group(2)
    first = ref.split("/")[0]
    if first in PACKAGE_DIRS and not ref.endswith(".py"):
      continue  # a run's output (<workdir>/eval/done.json), not a file of the package
    if line and first == "configs" and not line.isdigit() and is_config_file(ref):
      line = None  # configs/toy2d_fdistill.py:js: a --config variant, not a name
    if first in REPO_DIRS or first in PACKAGE_DIRS:
      problem = path_problem(ref, line, where)
      if problem:
        bad.append(problem)
  for m in DOTTED.finditer(text):
    name = m.group(1)
    if name.endswith((".py", ".md", ".ipynb")):  # a file name, not a module path
      continue
    if not resolves_dotted(name):
      bad.append(f"{name}: not defined")
  for m in ROLE.finditer(text):
    if not resolves_role(m.group(1), where):
      bad.append(f"{m.group(1)}: not defined")
  classes = package_classes()
  for m in CLASS_ATTR.finditer(text):
    cls, attr = m.groups()
    if cls in classes and not resolves_in_module(classes[cls], [cls, attr]):
      bad.append(f"{cls}.{attr}: not defined")
  return bad


def python_texts(path):
  """The docstrings and comments of a Python file, one string each, with their line."""
  source = open(path).read()
  out = []
  for node in ast.walk(tree_of(path)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False)
      if doc:
        out.append((getattr(node, "lineno", 1), doc))
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out.append((tok.start[0], tok.string))
  return out


def stale_references():
  bad = []
  docs = [os.path.join(ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
  for path in docs:
    bad += [f"{os.path.relpath(path, ROOT)}: {p}" for p in problems_in(open(path).read(), path)]
  sources = sorted(glob.glob(os.path.join(ROOT, "fdistill", "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "configs", "*.py"))
                   + glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
  for path in sources:
    for line, text in python_texts(path):
      bad += [f"{os.path.relpath(path, ROOT)}:{line}: {p}" for p in problems_in(text, path)]
  return bad


# --- Tests.

def test_each_check_catches_a_planted_stale_reference():
  here = os.path.join(ROOT, "fdistill", "objectives", "fdistill.py")
  fine = ("docs/design.md, objectives/scaffold.py, configs/common.py:fdistill_objective, "
          "tests/test_layout.py, fdistill.experiment.build, :func:`noise.critic_levels`, "
          ":class:`fdistill.optim.update.Updater`, ``Objective.steps``, "
          "methods/distribution_matching/f_distill.py (FastGen's), runs/demo/summary.md, "
          "| exit 2: FATAL: --config=configs/nope.py: no such file |")
  assert problems_in(fine, here) == []
  planted = ("tests/test_configs.py; objectives/fdistill.py:grad_and_update; "
             "fdistill.experiment.build_everything; :func:`noise.no_such_levels`; "
             "``Objective.branches``; configs/common.py:99999")
  assert problems_in(planted, here) == [
      "tests/test_configs.py: no such file",
      "objectives/fdistill.py:grad_and_update: not defined",
      "configs/common.py:99999: past EOF",
      "fdistill.experiment.build_everything: not defined",
      "noise.no_such_levels: not defined",
      "Objective.branches: not defined"]


def test_docs_and_docstrings_name_only_what_exists():
  assert stale_references() == []
