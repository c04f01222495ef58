"""How the code is shaped: the numbers issue #16 ("one clear shape") tracks, measured from the source.

    python tools/shape_report.py            # a Markdown table
    python tools/shape_report.py --json

Counts: each recipe module's constructor arguments; string comparisons inside the training-step methods (switches
on strings such as ``distribution_loss == "sid"``); imports of underscore names across modules; module import
cycles (top-level imports, counting the package ``__init__`` files an import runs); imports inside functions (library
and tools separately); the longest files.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [ROOT / "sfplus", ROOT / "callbacks", ROOT / "datamodules"]
STEP_METHODS = {"training_step", "_generator_update", "_critic_update", "_rollout", "_score_timesteps"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("callbacks", "datamodules"):
        parts = ["sfplus", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def library_files() -> list[Path]:
    return sorted(p for d in LIBRARY for p in d.rglob("*.py"))


def resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    names = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        here = module_name(p)
        tree = ast.parse(p.read_text())
        edges = graph.setdefault(here, set())
        for node in tree.body:  # top level only: what runs at import time
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ([node] if not isinstance(node, ast.Try) else node.body):
                if isinstance(sub, ast.Import):
                    targets = [a.name for a in sub.names]
                elif isinstance(sub, ast.ImportFrom):
                    mod = resolve(sub, here, p.name == "__init__.py")
                    targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in names else mod for a in sub.names]
                else:
                    continue
                for target in targets:
                    edges.update(_runs_on_import(target, here, names))
    return graph


def _runs_on_import(target: str, here: str, names: set[str]) -> set[str]:
    """What importing ``target`` from ``here`` executes: the module and every package ``__init__`` above it that is
    not also above ``here`` (those are already running when ``here`` is)."""
    parts = target.split(".")
    above_here = {".".join(here.split(".")[:i]) for i in range(1, len(here.split(".")))}
    run = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - above_here
    return {m for m in run if m in names and m != here}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def private_imports(files: list[Path]) -> list[str]:
    found = []
    for p in files:
        here = module_name(p)
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = resolve(node, here, p.name == "__init__.py") or ""
                if mod.startswith("sfplus") and mod != here:
                    found += [f"{here}: {mod}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def inner_imports(files: list[Path]) -> int:
    count = 0
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node))
    return count


def step_string_switches(files: list[Path]) -> int:
    count = 0
    for p in files:
        if "modules" not in p.parts:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in STEP_METHODS:
                for n in ast.walk(node):
                    if isinstance(n, ast.Compare) and any(
                        isinstance(c, ast.Constant) and isinstance(c.value, str) for c in [n.left, *n.comparators]
                    ):
                        count += 1
    return count


def recipe_arguments() -> dict[str, int]:
    sys.path.insert(0, str(ROOT))
    from sfplus.modules import DiffusionModule, DistillModule, ODEInitModule

    return {cls.__name__: len(inspect.signature(cls.__init__).parameters) - 1
            for cls in (DistillModule, ODEInitModule, DiffusionModule)}


def report() -> dict:
    files = library_files()
    tools = sorted((ROOT / "tools").rglob("*.py"))
    longest = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in files), reverse=True)[:5]
    return {
        "recipe_arguments": recipe_arguments(),
        "string_switches_in_training_steps": step_string_switches(files),
        "cross_module_private_imports": private_imports(files),
        "import_cycles": cycles(import_graph(files)),
        "imports_inside_functions": {"library": inner_imports(files), "tools": inner_imports(tools)},
        "longest_files": [f"{path} ({n})" for n, path in longest],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    r = report()
    if parser.parse_args().json:
        print(json.dumps(r, indent=1))
        return
    print("| measure | value |\n|---|---|")
    print("| recipe arguments | " + ", ".join(f"{k} {v}" for k, v in r["recipe_arguments"].items()) + " |")
    print(f"| string switches in training steps | {r['string_switches_in_training_steps']} |")
    print(f"| cross-module private imports | {len(r['cross_module_private_imports'])} |")
    print(f"| import cycles | {len(r['import_cycles'])} |")
    inner = r["imports_inside_functions"]
    print(f"| imports inside functions | library {inner['library']}, tools {inner['tools']} |")
    print("| longest files | " + ", ".join(r["longest_files"]) + " |")


if __name__ == "__main__":
    main()
