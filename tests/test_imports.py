"""The import graph: no cycle among the project's modules (imports inside functions count too), the layers
point one way (cli -> rounds -> loop -> scheduler and recipes -> run core -> filters / parse / dedup), the
recipes know nothing of threads, locks or the scheduler, no module is over 400 lines and no function over 60,
and every module imports on its own (in a fork of an interpreter that has loaded only third-party
libraries)."""

import ast
import json
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "selfinstruct"
RECIPES = {"selfinstruct.generate.self_instruct", "selfinstruct.generate.alpaca", "selfinstruct.generate.evol"}
# What each layer must not import (directly or through anything it imports): the layers above it.
SCHEDULER = "selfinstruct.generate.scheduler"
ABOVE = {
    "selfinstruct.generate.run": {"selfinstruct.generate.loop", SCHEDULER, *RECIPES, "selfinstruct.rounds",
                                  "selfinstruct.cli"},
    SCHEDULER: {"selfinstruct.generate.loop", *RECIPES, "selfinstruct.rounds", "selfinstruct.cli"},
    **{r: {"selfinstruct.generate.loop", SCHEDULER, "selfinstruct.rounds", "selfinstruct.cli"} for r in RECIPES},
    "selfinstruct.generate.loop": {"selfinstruct.rounds", "selfinstruct.cli"},
    "selfinstruct.rounds": {"selfinstruct.cli"},
    "selfinstruct.filters": {"selfinstruct.generate.run", *RECIPES, "selfinstruct.generate.loop"},
    "selfinstruct.generate.parse": {"selfinstruct.generate.run", *RECIPES, "selfinstruct.generate.loop"},
    "selfinstruct.dedup": {"selfinstruct.generate.run", *RECIPES, "selfinstruct.generate.loop"},
    "selfinstruct.generators.base": {"selfinstruct.generators"},  # backends share base, never the face
}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports anywhere in its text (`from pkg import mod` names mod)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, tree in mods.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle():
    edges = graph()
    assert len(edges) > 30 and edges["selfinstruct.cli"]  # the walk found the package and its imports
    cycles = sorted(m for m in edges if m in reachable(edges, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_layers_point_one_way():
    edges = graph()
    assert "selfinstruct.generate.run" in reachable(edges, "selfinstruct.generate.evol")
    assert reachable(edges, "selfinstruct.generate.loop") >= RECIPES
    for module, forbidden in ABOVE.items():
        assert not reachable(edges, module) & forbidden, f"{module} reaches {reachable(edges, module) & forbidden}"


def test_recipes_know_no_threads_or_locks():
    """A recipe's prompt logic changes without touching a lock: only the scheduler orders steps."""
    mods = modules()
    for name in RECIPES:
        imported = {a.name for n in ast.walk(mods[name]) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(mods[name]) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"threading", "concurrent.futures", "asyncio", SCHEDULER}, (name, imported)
        attributes = {n.attr for n in ast.walk(mods[name]) if isinstance(n, ast.Attribute)}
        assert not attributes & {"lock", "after", "ordered", "wait", "acquire"}, (name, attributes)


def test_no_module_over_400_lines_and_no_function_over_60():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 400:
            too_long.append((path.name, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                too_long.append((f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1))
    assert too_long == []


# One interpreter loads the third-party libraries the package imports at its modules' top level (torch and
# transformers take seconds each), then forks a child per module of ours, which imports that module alone: a
# missing import or a cycle among our modules fails the same way, without forty fresh starts of torch.
ALONE = """
import importlib, json, os, sys, traceback
for lib in json.loads(sys.argv[1]):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass  # an optional dependency: the module that needs it must cope alone
assert not [m for m in sys.modules if m.split(".")[0] == "selfinstruct"]
failed = {}
for name in json.loads(sys.argv[2]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc()[-800:].encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode()
    if os.waitpid(pid, 0)[1] != 0:
        failed[name] = err or "the import crashed"
print(json.dumps(failed))
"""


def test_every_module_imports_alone():
    mods = modules()
    libs = sorted({alias.name.split(".")[0] for tree in mods.values() for node in tree.body
                   if isinstance(node, ast.Import) for alias in node.names}
                  | {node.module.split(".")[0] for tree in mods.values() for node in tree.body
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
                  - {"selfinstruct", "__future__"})
    assert "yaml" in libs and "rich" in libs  # the top-level imports were found
    r = subprocess.run([sys.executable, "-c", ALONE, json.dumps(libs), json.dumps(sorted(mods))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {}
