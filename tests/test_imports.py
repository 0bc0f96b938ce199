"""The shape of the package: no import cycle among jaxprune's modules (imports inside functions
included, since a late import only hides a cycle), and no module over 400 lines."""

from __future__ import annotations

import ast
import pathlib
import re

import jaxprune

MAX_LINES = 400


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every .py under `root` (a package's __init__ is the package)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join((package, *parts))] = path
  return out


def _targets(node: ast.AST, here: str, is_package: bool, modules: set[str], package: str) -> set[str]:
  """The package's modules that the import statement (or import_module call) `node` in module
  `here` loads: `from a.b import c` names module a.b.c where c is a module, else a.b."""
  if isinstance(node, ast.Import):
    return {_existing(a.name, modules) for a in node.names if _within(a.name, package)}
  if isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      pkg = here.split(".") if is_package else here.split(".")[:-1]
      base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
    if not _within(base, package):
      return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _existing(base, modules) for a in node.names}
  if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
    return _dynamic_targets(node.args[0] if node.args else None, modules, package)
  return set()


def _dynamic_targets(arg, modules: set[str], package: str) -> set[str]:
  """Modules an `importlib.import_module(arg)` may load: a constant name, or every module an
  f-string's pattern matches (its holes standing for identifiers)."""
  if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
    return {_existing(arg.value, modules)} if _within(arg.value, package) else set()
  if isinstance(arg, ast.JoinedStr):
    pattern = "".join(re.escape(v.value) if isinstance(v, ast.Constant) else r"\w+" for v in arg.values)
    return {m for m in modules if re.fullmatch(pattern, m)}
  return set()


def _within(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


def _existing(name: str, modules: set[str]) -> str:
  """`name`, or its longest prefix that is a module (`import a.b.f` where f is not a module)."""
  while name not in modules and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
  """{module: modules it imports anywhere in its file}, among the package's own modules. A
  module's import of itself (a `__main__` entry re-importing its real name) is left out."""
  files = module_files(root, package)
  modules = set(files)
  graph = {}
  for name, path in files.items():
    is_package = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      deps |= _targets(node, name, is_package, modules, package)
    graph[name] = deps - {name}
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a path that ends where it starts) through each knot of modules."""
  return [_cycle_in(graph, group) for group in knots(graph)]


def knots(graph: dict[str, set[str]]) -> list[set[str]]:
  """The groups of two or more modules that all reach each other through imports (strongly
  connected components; Tarjan's algorithm, iterative)."""
  index, low, on_stack, stack, groups = {}, {}, set(), [], []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is None:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          group = set()
          while True:
            m = stack.pop()
            on_stack.discard(m)
            group.add(m)
            if m == node:
              break
          if len(group) > 1:
            groups.append(group)
      elif child not in index:
        index[child] = low[child] = len(index)
        stack.append(child)
        on_stack.add(child)
        work.append((child, iter(sorted(graph.get(child, ())))))
      elif child in on_stack:
        low[node] = min(low[node], index[child])
  return groups


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
  """The shortest cycle through the group's first module (breadth-first, inside the group)."""
  first = min(group)
  parent = {first: None}
  queue = [first]
  for node in queue:
    for child in sorted(graph[node] & group):
      if child == first:
        path = [node]
        while parent[path[-1]] is not None:
          path.append(parent[path[-1]])
        return [first, *reversed(path[:-1]), first]
      if child not in parent:
        parent[child] = node
        queue.append(child)
  raise AssertionError(f"no cycle through {first} in {sorted(group)}")


def _root() -> pathlib.Path:
  return pathlib.Path(jaxprune.__file__).parent


def test_no_import_cycle_among_jaxprune_modules():
  graph = import_graph(_root(), "jaxprune")
  # The walk saw late imports and `from package import module` (the cases that hide cycles).
  assert "jaxprune.eval.lm_eval" in graph["jaxprune.eval"]  # inside __getattr__
  assert "jaxprune.sharding" in graph["jaxprune.stats.passes"]  # `from jaxprune import sharding`
  found = [(_cycle_in(graph, group), group) for group in knots(graph)]
  assert not found, "import cycles (one per knot of modules that import each other):\n  " + "\n  ".join(
      " -> ".join(c) + (f"   [the knot: {', '.join(sorted(g))}]" if len(g) > len(c) - 1 else "") for c, g in found)


def test_no_module_over_400_lines():
  sizes = {name: len(path.read_text().splitlines()) for name, path in module_files(_root(), "jaxprune").items()}
  big = {name: n for name, n in sizes.items() if n > MAX_LINES}
  assert not big, f"modules over {MAX_LINES} lines (split them by idea): {dict(sorted(big.items()))}"


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_the_walk_finds_cycles_hidden_in_functions_and_package_imports(tmp_path):
  """A made-up package whose only cycle goes through a function-level relative import and a
  `from pkg import module`: the walk reports it as a path; without that import it reports none."""
  _write(tmp_path / "pkg", {
      "__init__.py": "",
      "a.py": "from pkg import b\n",
      "b.py": "import os\nfrom pkg.sub.c import helper\n",
      "sub/__init__.py": "",
      "sub/c.py": "def helper():\n  from .. import a\n  return a\n",
      "d.py": "import importlib\nimportlib.import_module(f'pkg.{\"x\"}')\n",
      "x.py": "import pkg.sub.c\n",
  })
  graph = import_graph(tmp_path / "pkg", "pkg")
  assert graph["pkg.b"] == {"pkg.sub.c"}  # `helper` is not a module: its module is the target
  assert graph["pkg.d"] >= {"pkg.a", "pkg.x"}  # the f-string may name any module of the package
  assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
  (tmp_path / "pkg" / "sub" / "c.py").write_text("def helper():\n  return 1\n")
  assert find_cycles(import_graph(tmp_path / "pkg", "pkg")) == []
