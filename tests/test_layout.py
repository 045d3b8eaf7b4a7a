"""Layout rules of docs/ARCHITECTURE.md that a new file could break without any other test noticing."""

from __future__ import annotations

import ast

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
