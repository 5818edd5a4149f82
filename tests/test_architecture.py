"""The package's shape, as rules a change cannot break unnoticed: short modules grouped in sub-packages by concern,
no import circle, an import inside a function only where a comment says why, one module that reads and writes the
study's stored attributes, one that names the run folder's files, and a report that reads without training."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "transferlab"
MAX_LINES = 600
CONCERNS = ("config", "data", "models", "engine", "scoring", "inference", "study", "report")


def modules() -> dict[str, Path]:
    """transferlab.x.y -> its file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("transferlab", *path.relative_to(PACKAGE).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, ast.AST, bool]]:
    """(imported transferlab module, the import node, whether it sits inside a function) of one module."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("transferlab") and target in known and target != name:
                found.append((target, node, id(node) in inner))
    return found


def test_modules_are_short_and_grouped_by_concern():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: k for n, k in lengths.items() if k > MAX_LINES} == {}
    for concern in CONCERNS:
        assert (PACKAGE / concern / "__init__.py").is_file(), concern
    # beside the sub-packages only what every layer shares: the command line, errors, files, progress, URLs
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert flat == ["__main__", "cli", "errors", "fsutil", "progress", "urls", "version"], flat


def test_no_import_circle_even_through_imports_inside_functions():
    known = modules()
    graph = {name: {target for target, _, _ in imports_of(name, path, known)} for name, path in known.items()}
    # a package's own __init__ importing its modules is how a package is built, not a circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_package_circle_but_the_runner_writing_the_report():
    """Sub-packages form layers. One edge is allowed against them: study/runner.py writes the report when a study
    ends, while the report reads the study's records and storage (the layers below the runner)."""
    known = modules()

    def package(module: str) -> str:
        return module.split(".")[1] if module.count(".") >= 2 else module

    edges = {(package(name), package(target)) for name, path in known.items()
             for target, _, _ in imports_of(name, path, known)
             if package(name) != package(target) and name != "transferlab.study.runner"}  # fmt: skip
    edges = {(a, b) for a, b in edges if a in CONCERNS and b in CONCERNS}
    closure = set(edges)
    while True:
        more = {(a, d) for a, b in closure for c, d in closure if b == c} - closure
        if not more:
            break
        closure |= more
    assert {a for a, b in closure if a == b} == set(), sorted(closure)


def test_an_import_inside_a_function_says_why():
    unexplained = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                    "#" in lines[i - 1] for i in (node.lineno, node.end_lineno)
                ):
                    unexplained.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert unexplained == []


def test_stored_attributes_are_read_and_written_in_study_records_only():
    pattern = re.compile(r"user_attrs|set_user_attr")
    found = [f"{path.relative_to(REPO_ROOT)}:{i}" for name, path in modules().items()
             if name != "transferlab.study.records" for i, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line) and "records" not in line]  # fmt: skip
    # the two places that hand a whole record to Optuna go through TrialRecord.attrs
    assert all("attrs(" in (REPO_ROOT / where.split(":")[0]).read_text() for where in found), found


def test_the_run_folders_file_names_live_in_engine_rundir():
    names = re.compile(
        r"""["'](metrics\.json|state\.pt|split\.json|digests\.npz|config\.json|best\.pt|epochs\.csv)["']"""
    )
    found = [f"{path.relative_to(REPO_ROOT)}:{i}" for name, path in modules().items()
             if name not in ("transferlab.engine.rundir",)
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if names.search(line.split("#")[0]) and '"""' not in line]  # fmt: skip
    assert found == []


def test_the_report_and_the_help_load_no_training():
    code = (
        "import sys, transferlab.report.write, transferlab.cli\n"
        "loaded = [m for m in ('transferlab.engine.train', 'transferlab.engine.loop', 'transferlab.study.runner',"
        " 'transferlab.study.worker') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_tests_are_grouped_by_the_package_they_test_and_share_only_helpers():
    tests = REPO_ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders == set(CONCERNS) | {"cli"}, folders
    top = {p.name for p in tests.glob("test_*.py")}
    assert top == {"test_architecture.py", "test_shared.py"}, top  # the layout itself; the product on real data
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test modules share a name (pytest imports them by basename)"
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules_named = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                modules_named = [node.module or ""]
            assert not any(m.startswith("test_") for m in modules_named), f"{path} imports a test module"
