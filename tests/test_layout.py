"""Layout rules of docs/ARCHITECTURE.md that a new file could break without any other test noticing."""

from __future__ import annotations

import ast

import pytest
from helpers import REPO_ROOT

CODE = REPO_ROOT / "code"
SCRIPT_FOLDERS = [REPO_ROOT, REPO_ROOT / "inference", REPO_ROOT / "classification", REPO_ROOT / "bench",
                  *(p for p in (REPO_ROOT / "preprocessing").rglob("*") if p.is_dir()), REPO_ROOT / "preprocessing"]
SHADOWING = {"utils", "datasets", "evaluate", "code"}  # stdlib or PyPI packages a module would hide


def code_modules() -> set[str]:
    names = {p.stem for p in CODE.glob("*.py")}
    names |= {p.name for p in CODE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names


def test_no_code_module_shares_a_name_with_a_script():
    modules = code_modules()
    for folder in SCRIPT_FOLDERS:
        if folder.is_dir():
            clash = modules & {p.stem for p in folder.glob("*.py")}
            assert not clash, f"{folder}: scripts named like modules of code/: {sorted(clash)}"


def test_no_module_shadows_a_common_package():
    names = {p.stem for p in CODE.rglob("*.py")} | {p.name for p in CODE.rglob("*") if p.is_dir()}
    assert not names & SHADOWING, sorted(names & SHADOWING)


def test_top_level_scripts_define_no_pytest_tests():
    for script in REPO_ROOT.glob("*.py"):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        tests = [node.name for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.lower().startswith("test")]
        assert not tests, f"{script.name} defines {tests}: pytest would collect them"


def module_name(path) -> str:
    parts = list(path.relative_to(CODE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_project_modules(path, name: str, modules: set[str]) -> set[str]:
    """Every project module ``path`` imports anywhere: top level, inside functions, under TYPE_CHECKING."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return (found & modules) - {name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return cycles


def test_import_cycles_are_found_by_the_checker():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_between_project_modules():
    paths = {module_name(path): path for path in CODE.rglob("*.py")}
    modules = set(paths)
    graph = {name: imported_project_modules(path, name, modules) for name, path in paths.items()}
    assert sum(map(len, graph.values())) > 100  # the checker sees the imports
    assert import_cycles(graph) == []


HEAVY_MODULES = ("torch", "transformers", "peft")
HELP_PROBE = """
import os, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    if sys.argv[0] == "-m demo":
        runpy.run_module("demo", run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python script.py` does
        runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
else:
    code = None
print("HEAVY", [name for name in HEAVY_MODULES if name in sys.modules], "EXIT", code)
""".replace("HEAVY_MODULES", repr(HEAVY_MODULES))


def scripts() -> list[str]:
    folders = [REPO_ROOT, REPO_ROOT / "code", REPO_ROOT / "inference", REPO_ROOT / "classification",
               REPO_ROOT / "bench", *sorted(p for p in (REPO_ROOT / "preprocessing").rglob("*") if p.is_dir()),
               REPO_ROOT / "preprocessing"]
    found = [str(path.relative_to(REPO_ROOT)) for folder in folders for path in sorted(folder.glob("*.py"))
             if folder != REPO_ROOT / "code" or '__name__ == "__main__"' in path.read_text(encoding="utf-8")]
    return [*found, "-m demo"]


def test_the_script_list_finds_every_kind_of_script():
    listed = set(scripts())
    assert {"clamp3_search.py", "code/train_clamp3_lora.py", "code/extract_clamp3.py", "inference/clamp3_eval.py",
            "classification/train_cls.py", "preprocessing/abc/batch_xml2abc.py", "bench/bench_train.py",
            "-m demo"} <= listed
    assert "code/config.py" not in listed


def help_probe(script: str) -> str:
    """The last line the probe prints after ``script --help``: ``HEAVY [<heavy modules loaded>] EXIT <code>``."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HELP_PROBE, script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, check=False)
    assert "usage:" in done.stdout, (done.stdout[-500:], done.stderr[-2000:])
    return done.stdout.rstrip().splitlines()[-1]


@pytest.mark.parametrize("script", scripts())
def test_help_parses_arguments_before_loading_the_model_libraries(script):
    """--help answers at once: the script prints its usage without importing torch or transformers
    (importing them takes seconds; a researcher reads --help before anything else)."""
    assert help_probe(script) == "HEAVY [] EXIT 0"
