"""The package's layers and the one direction imports take through them (docs/ARCHITECTURE.md, "Layers").

Imports are read from the source with ``ast`` (every import statement in a module, at any depth of its functions,
so that an import hidden inside a function counts as much as one at the top), resolved to modules of this
checkout, and followed transitively. Two conventions:
- importing ``a.b.c`` runs the package ``a.b``'s ``__init__`` first: that edge is added, except to the top package
  ``s2fast``, whose only imports at load are its configs (the rest is loaded on attribute access, which keeps
  ``import s2fast`` cheap);
- a block under ``if __name__ == "__main__":`` runs only when its module is the program, which is then the top of
  the stack (s2fast/adapters/table.py registers the digits pipeline there before listing the registry): skipped.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The sampler: what a call of a wrapped pipeline runs through, top (face) to bottom (kernels).
CORE_PREFIXES = ("s2fast.api", "s2fast.serving", "s2fast.binding", "s2fast.controller", "s2fast.fork_choice",
                 "s2fast.engine", "s2fast.graphs", "s2fast.attention", "s2fast.fused_step", "s2fast.plan",
                 "s2fast.masks", "s2fast.sgg", "s2fast.config", "s2fast.adapters", "s2fast.kernels",
                 "s2fast.reference", "s2fast.context_parallel", "s2fast.distributed", "s2fast.branch_parallel",
                 "s2fast.step_cache", "s2fast.step_trace")
# What no module of the core may reach, at any depth: the command, the demos, the modular guiders (the classic
# path never needs them), the digits model, the random test models and the evaluation folder.
ABOVE_CORE = ("s2fast.cli", "s2fast.demo", "s2fast.cost_demo", "s2fast.guiders", "s2fast.digits", "s2fast.tiny",
              "s2fast.tiny_tokenizers",
              "s2fast_eval")
# Imports inside functions that stay: each loads an optional dependency (triton; the compiled extension).
OPTIONAL_BACKENDS = {"s2fast.kernels.flow_step_triton", "s2fast.kernels.flow_step_cuda"}


def _modules(folder: Path, package: str) -> Dict[str, Path]:
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def checkout_modules() -> Dict[str, Path]:
    """Every module of the installed package (s2fast, kernels/ as s2fast.kernels) and of the evaluation folder."""
    return {**_modules(ROOT / "s2fast", "s2fast"), **_modules(ROOT / "kernels", "s2fast.kernels"),
            **_modules(ROOT / "evaluation" / "s2fast_eval", "s2fast_eval")}


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _statements(tree: ast.AST) -> Iterable[ast.AST]:
    """Every import statement, at any depth, outside ``if __name__ == "__main__":`` blocks; with the depth."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack.append((child, nested))


def imports_of(name: str, path: Path, known: Set[str]) -> List[tuple]:
    """(imported module of ``known``, whether the import sits in a function) for each import of module ``name``."""
    is_package = path.name == "__init__.py"
    found = []
    for node, in_function in _statements(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from . import x``: the submodule x; when x is no module here (the compiled extension, a name the
            # package's __init__ defines), the package itself, which is the importer's own parent
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else
                       (None if node.module is None and node.level else module) for alias in node.names]
        for target in filter(None, targets):
            while target and target not in known:  # import a.b.c names a.b.c, else the deepest known package
                target = target.rpartition(".")[0]
            if target:
                found.append((target, in_function))
    return found


def import_graph(modules: Dict[str, Path], with_parents: bool = True) -> Dict[str, Set[str]]:
    """Module -> the modules its imports name. ``with_parents``: also the edge to each module's package (importing
    a.b.c runs a.b's __init__ first; not the top package's, see the docstring). Cycles are looked for without those
    edges: a package's __init__ importing its own submodules is how packages are built, and Python initialises
    the package first."""
    known = set(modules)
    graph = {name: {t for t, _ in imports_of(name, path, known) if t != name} for name, path in modules.items()}
    for name in modules if with_parents else ():
        parent = name.rpartition(".")[0]
        if parent in known and parent.count("."):
            graph[name].add(parent)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = checkout_modules()
GRAPH = import_graph(MODULES)


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(MODULES, with_parents=False)) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, CORE_PREFIXES)))
def test_the_core_never_reaches_up(module):
    above = sorted(m for m in reachable(GRAPH, module) if _under(m, ABOVE_CORE))
    assert above == [], f"{module} imports, at some depth, {above}"


def test_the_guiders_never_reach_the_command_the_demo_or_the_evaluation_folder():
    for module in (m for m in MODULES if _under(m, ("s2fast.guiders",))):
        above = sorted(m for m in reachable(GRAPH, module) if _under(m, [p for p in ABOVE_CORE if p != "s2fast.guiders"]))
        assert above == [], f"{module} imports, at some depth, {above}"


def test_the_installed_package_never_imports_the_evaluation_folder():
    for module in (m for m in MODULES if _under(m, ("s2fast",))):
        assert not any(_under(m, ("s2fast_eval",)) for m in GRAPH[module]), module


def test_no_import_of_the_package_inside_a_function_of_the_core():
    """An import inside a function hides an arrow from the reader (it was how the cycles hid); the core has none
    but those that load an optional dependency."""
    known = set(MODULES)
    hidden = [(name, target) for name, path in MODULES.items() if _under(name, CORE_PREFIXES)
              for target, in_function in imports_of(name, path, known)
              if in_function and target not in OPTIONAL_BACKENDS]
    assert hidden == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """The analysis above on a made-up package: an import cycle hidden in a function, a core module reaching the
    command through a helper, and a main guard that is skipped."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "a.py": "def f():\n    from . import b\n", "b.py": "from .a import f\n",
             "core.py": "from .sub import helper\n", "sub/__init__.py": "", "sub/helper.py": "from ..cli import main\n",
             "cli.py": "main = 1\n", "table.py": "if __name__ == '__main__':\n    from . import cli\n"}
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    modules = _modules(pkg, "pkg")
    graph = import_graph(modules)
    assert cycles(import_graph(modules, with_parents=False)) == [["pkg.a", "pkg.b"]]
    assert "pkg.cli" in reachable(graph, "pkg.core")
    assert graph["pkg.table"] == set()
    assert ("pkg.b", True) in imports_of("pkg.a", modules["pkg.a"], set(modules))


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> Set[str]:
    """The file list of a wheel built from a copy of this checkout's sources (the build writes into its folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("s2fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "S2FAST_BUILD_CUDA")}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = glob.glob(str(out / "*.whl"))
    return set(zipfile.ZipFile(wheel).namelist())


def test_the_wheel_holds_the_sampler_and_no_research_tools(wheel_files):
    shipped = {f for f in wheel_files if f.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "s2fast").rglob("*.py")}
    expected |= {"s2fast/kernels/" + str(p.relative_to(ROOT / "kernels")) for p in (ROOT / "kernels").rglob("*.py")}
    assert shipped == expected  # every module of the package (the guiders too), nothing else
    research = ("train", "frontier", "frontier_report", "autoguidance", "evaluate", "data", "toys", "toy_model",
                "toy_eval", "toy_alignment", "lineplot")
    assert not [f for f in wheel_files if Path(f).stem in research or "/quality/" in f or "s2fast_eval" in f]
    assert {"s2fast/digits/weights/model_index.json", "s2fast/digits/weights/classifier.safetensors"} <= wheel_files
