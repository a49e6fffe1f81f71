"""The repository as a newcomer reads it: every path the docs and docstrings name exists, every
package under moe/ imports, and no module of ours imports another in a circle."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import moe

ROOT = Path(__file__).resolve().parents[1]
# A repository path: one of the top-level folders, then a file with an extension or a folder
# ending in "/" (so f-string prefixes and ratios such as "moe/dense" are not taken for paths).
PATH = re.compile(r"(?<![\w./-])((?:moe|tests|scripts|configs|docs|data)/(?:[\w*-]+/)*"
                  r"(?:[\w*-]+\.[a-z]+\b|(?=[^\w.-])))")
# Written by runs or tests, never committed (see .gitignore), or patterns.
NOT_IN_GIT = ("data/cache", "runs/", "wandb/")


def _texts():
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "data/README.md"]:
        yield path, path.read_text()
    for path in [*ROOT.glob("moe/**/*.py"), *ROOT.glob("scripts/*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # docstrings and string constants: comments follow below
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield path, node.value
        yield path, "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines()
                              if "#" in line)


def test_every_repository_path_named_in_docs_and_docstrings_exists():
    missing = set()
    for where, text in _texts():
        for found in PATH.findall(text):
            name = found.rstrip(".")
            if any(name.startswith(p) for p in NOT_IN_GIT) or "*" in name or "<" in name:
                continue
            if not (ROOT / name).exists():
                missing.add(f"{where.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(sorted(missing))


def test_every_module_imports():
    for info in pkgutil.walk_packages(moe.__path__, "moe."):
        importlib.import_module(info.name)


def _runtime_nodes(tree):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only, never
    run); lazy imports inside functions count."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def test_no_import_cycles_and_no_loose_modules():
    """moe/ has packages only (each with a job, README tour), and no two modules import each
    other, even lazily through a chain."""
    assert sorted(p.name for p in (ROOT / "moe").glob("*.py")) == ["__init__.py"]
    files = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in ROOT.glob("moe/**/*.py")}
    modules = set(files.values())
    graph = {}
    for path, name in files.items():
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    # Packages re-export their parts: an edge to a package is an edge to its __init__ only.
    seen, stack, cycles = set(), [], []

    def visit(node, on_path):
        for dep in graph[node]:
            if dep in on_path:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in seen:
                seen.add(dep)
                stack.append(dep)
                visit(dep, on_path | {dep})
                stack.pop()

    for start in sorted(graph):
        if start not in seen:
            seen.add(start)
            stack.append(start)
            visit(start, {start})
            stack.pop()
    assert not cycles, cycles[:3]
