"""The package layout stays as docs/architecture.md describes it.

* Imports follow the layer rule, and no two modules import each other (directly or round a loop).
* No public class or function name is defined in two modules (one name, one place to look).
* No module grows past ``MAX_LINES`` lines.
* Every module is listed in README's Layout section and in the package docstring.

The imports are read with ``ast`` from the source, so nothing is imported or run here.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

import rlhf_course

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_course"
NAME = "rlhf_course"
MAX_LINES = 600

# The import rule, by layer: what each layer may import (besides the standard library and third
# parties).  A module's layer is its subpackage; the modules on top are named one by one.
TOP = "top"
ALLOWED = {
    "core": {"core"},
    "reward": {"core", "reward"},
    "policy": {"core", "policy"},
    "rl": {"core", "policy", "rl"},
    TOP: {"core", "reward", "policy", "rl", TOP},
    # rlhf_course/__init__.py runs before any module of the package, so it may use only core.
    "package": {"core"},
}
RULE = {
    "core": "core imports nothing above it (only core)",
    "reward": "reward imports only core and reward",
    "policy": "policy imports only core and policy",
    "rl": "rl imports only policy, core and rl",
    TOP: "course and the scripts sit on top and may import anything",
    "package": "rlhf_course/__init__.py imports only core",
}
TOP_MODULES = {f"{NAME}.bench", f"{NAME}.train_reward", f"{NAME}.train_ppo", f"{NAME}.experiments"}
TOP_PACKAGES = {"course"}
# A conventional entry point that every `python -m` module defines; never imported by name.
ENTRY_POINT = "main"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
SOURCES = {name: path.read_text(encoding="utf-8") for name, path in MODULES.items()}
TREES = {name: ast.parse(source, filename=str(MODULES[name])) for name, source in SOURCES.items()}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def layer(name: str) -> str | None:
    """The layer of a module of the package, or None for a module the rule does not place."""
    if name == NAME:
        return "package"
    if name in TOP_MODULES:
        return TOP
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in TOP_PACKAGES:
        return TOP
    if len(parts) >= 2 and parts[1] in ALLOWED and parts[1] not in (TOP, "package"):
        return parts[1]
    return None


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(node: ast.AST):
    """Every import statement in ``node``: at module level and lazy ones inside functions.

    The body of an ``if TYPE_CHECKING:`` block is skipped: it never runs, it only names types for
    annotations, so it is not a dependency (its ``else:`` branch does run and is kept).
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif _type_checking_block(child):
            for branch in child.orelse:
                yield from _import_nodes(ast.Module(body=[branch], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <module> import ...``, relative imports included."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str) -> list[tuple[str, int, str]]:
    """(imported module of the package, line, the import as written) for every import in a module.

    Counts ``import rlhf_course.x``, ``from rlhf_course.x import y`` (the module ``x.y`` when ``y``
    is a module, else ``x``) and ``from rlhf_course import x``.
    """
    found = []
    for node in _import_nodes(TREES[importer]):
        written = ast.unparse(node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == NAME or alias.name.startswith(NAME + "."):
                    found.append((alias.name, node.lineno, written))
            continue
        source = _resolve(importer, node)
        if source != NAME and not source.startswith(NAME + "."):
            continue
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            found.append((submodule if submodule in MODULES else source, node.lineno, written))
    return found


def relative(name: str) -> str:
    return name[len(NAME) + 1:] if name.startswith(NAME + ".") else name


def test_the_package_is_read_from_this_checkout():
    assert Path(rlhf_course.__file__).resolve().parent == PACKAGE
    assert len(MODULES) > 20


def test_every_module_has_a_layer():
    unplaced = [relative(name) for name in MODULES if layer(name) is None]
    assert not unplaced, (
        f"{unplaced}: not in a layer of the import rule (core, reward, policy, rl, course, or a "
        "script on top). Put the module in one of those folders, or name it in TOP_MODULES here "
        "and in docs/architecture.md."
    )


def test_imports_follow_the_layer_rule():
    breaches = []
    for importer in MODULES:
        own = layer(importer)
        for imported, line, written in imports_of(importer):
            if imported == NAME and importer != NAME:
                continue  # `import rlhf_course` itself: the package, which every import runs anyway
            target = layer(imported)
            if own is None or target is None or target not in ALLOWED[own]:
                breaches.append(
                    f"{MODULES[importer].relative_to(ROOT)}:{line}: `{written}` imports "
                    f"{relative(imported)} ({target} layer); rule: {RULE.get(own, 'module has no layer')}"
                )
    assert not breaches, "import rule broken (see docs/architecture.md):\n" + "\n".join(breaches)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = defaultdict(set)
    where = {}
    for importer in MODULES:
        for imported, line, written in imports_of(importer):
            if imported != importer and imported != NAME:
                graph[importer].add(imported)
                where.setdefault((importer, imported), f"{MODULES[importer].relative_to(ROOT)}:{line}: `{written}`")
    messages = []
    for component in _cycles(graph):
        members = set(component)
        edges = [where[(a, b)] for a in component for b in sorted(graph[a] & members)]
        messages.append(f"cycle between {', '.join(map(relative, component))}:\n    " + "\n    ".join(edges))
    assert not messages, "import cycles (lazy imports count too):\n" + "\n".join(messages)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _public_definitions(tree: ast.Module):
    """Classes and functions defined at module level (also inside module-level if/try blocks)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not node.name.startswith("_"):
                yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending.extend(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)


def _runs_as_script(source: str) -> bool:
    return re.search(r"^if __name__ == [\"']__main__[\"']:", source, re.MULTILINE) is not None


def test_no_public_name_is_defined_in_two_modules():
    defined = defaultdict(list)
    for name, tree in TREES.items():
        for node in _public_definitions(tree):
            if node.name == ENTRY_POINT and _runs_as_script(SOURCES[name]):
                continue  # `main` of a `python -m` module is reached through the module, never by name
            defined[node.name].append(f"{relative(name)}:{node.lineno}")
    clashes = {name: places for name, places in sorted(defined.items()) if len(places) > 1}
    assert not clashes, "public names defined in more than one module (rename or keep one):\n" + "\n".join(
        f"  {name}: {', '.join(places)}" for name, places in clashes.items()
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short_enough(name):
    lines = SOURCES[name].count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


# ----------------------------------------------------------------------------- every module listed


def _listed_modules():
    """The modules (files, package __init__ files aside) that README and the docstring must list."""
    return [name for name in MODULES if not is_package(name)]


def readme_layout() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def test_readme_layout_lists_every_module():
    layout = readme_layout().splitlines()
    missing = []
    for name in _listed_modules():
        parts = relative(name).split(".")
        if len(parts) == 1:  # a module at the top of the package: named as a file
            ok = any(re.search(rf"(?<![\w/]){parts[0]}\.py\b", line) for line in layout)
        else:  # `  folder/   module, module, ...` on one line
            folder, module = "/".join(parts[:-1]) + "/", parts[-1]
            ok = any(line.strip().startswith(folder) and re.search(rf"(?<![\w.]){module}(?![\w])", line.strip()[len(folder):])
                     for line in layout)
        if not ok:
            missing.append(relative(name))
    assert not missing, f"README.md's Layout section does not list {missing} (one line per folder)"


def test_package_docstring_lists_every_module():
    docstring = rlhf_course.__doc__ or ""
    missing = [relative(name) for name in _listed_modules()
               if not re.search(rf"(?<![\w.]){re.escape(relative(name))}(?![\w.])", docstring)]
    assert not missing, f"rlhf_course/__init__.py's docstring does not list {missing} (one line per module)"


def test_registry_strings_name_functions_of_the_package():
    """Derived assets of higher layers are registered in core by a "module:function" string, imported
    only on load (so core does not import them), and so are the benchmarks in ``bench``: each string
    must name a module-level function of the package."""
    from rlhf_course import bench
    from rlhf_course.core import assets

    targets = {f"asset {a.name}": a.loader for a in assets.REGISTRY.values() if isinstance(a.loader, str)}
    targets.update({f"benchmark {name}": target for name, target in bench.BENCHMARKS.items()})
    broken = []
    for what, target in targets.items():
        module, function = target.split(":")
        defined = {node.name for node in _public_definitions(TREES[module])} if module in TREES else set()
        if function not in defined:
            broken.append(f"{what}: {target}")
    assert len(targets) >= 6 and not broken, f"strings that name no function of the package: {broken}"
