"""test_pipeline.py and evaluation.preflight on the tiny checkpoint, with adapters made here."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import formats
import lora
import pytest
import runconfig
import torch
from evaluation import preflight, testsets
from helpers import REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, make_sources
from modeling import ModelConfig, load_clamp3

SCRIPT = REPO_ROOT / "test_pipeline.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A two-piece-per-format test set and one adapter per format; the ABC one has non-zero LoRA B
    weights, so its features differ from the base's."""
    root = tmp_path_factory.mktemp("preflight")
    paths = make_sources(root / "sources")
    plan = testsets.plan_test_set(testsets.default_sources(paths["wikimt"], paths["midicaps"]),
                                  {"abc": 2, "mtf": 2}, [], seed=42)
    test_dir = testsets.write_test_set(plan, root / "test", lambda path: path.write_text("{}\n"))
    cfg = runconfig.build_config(overrides={"LORA_R": 4})
    adapters = {}
    for fmt in formats.FORMATS:
        torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapters in any test order
        model = lora.add_adapter(load_clamp3(ModelConfig.from_json(TINY_MODEL_CONFIG), TINY_WEIGHTS), cfg, fmt)
        if fmt == "abc":
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(std=0.5)
        adapters[fmt] = root / f"adapter_{fmt}"
        model.save_pretrained(str(adapters[fmt]))
    return {"test_dir": test_dir, "abc": adapters["abc"], "mtf": adapters["mtf"], "root": root}


def arguments(setup: dict[str, Path], tokenizer: Path, report: Path, *extra: str) -> list[str]:
    return ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG),
            "--test_data_dir", str(setup["test_dir"]), "--report", str(report),
            f"--TEXT_MODEL_NAME={tokenizer}", f"--LORA_ABC_ADAPTER_DIR={setup['abc']}",
            f"--LORA_MTF_ADAPTER_DIR={setup['mtf']}", "--EXTRACT_DEVICE=cpu", *extra]


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    """The script's main() without a new interpreter (it imports torch, which is slow to start)."""
    main = runpy.run_path(str(SCRIPT), run_name="test_pipeline_script")["main"]
    code = main(args)
    return code, capsys.readouterr().out


def lines_of(output: str) -> dict[str, str]:
    """check name -> its PASS/FAIL line."""
    out = {}
    for line in output.splitlines():
        if line.startswith(("PASS  ", "FAIL  ")):
            out[line[6:].split(":", 1)[0]] = line
    return out


@pytest.mark.slow  # end to end through the CLI subprocess
def test_preflight_passes_on_the_tiny_checkpoint(setup, word_tokenizer, tmp_path):
    report = tmp_path / "report.json"
    result = run_script(arguments(setup, word_tokenizer, report))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = lines_of(result.stdout)
    assert set(lines) == {"model config", "text tokenizer", "test data abc", "test data mtf", "base weights",
                          "forward symbolic abc (base)", "forward symbolic mtf (base)", "forward text (base)",
                          "adapter abc", "adapter mtf"}
    assert all(line.startswith("PASS") for line in lines.values()), result.stdout
    assert "ready to evaluate" in result.stdout
    # The trained-looking ABC adapter changes the features; the fresh MTF one (B = 0) does not.
    assert "identical to the base" not in lines["adapter abc"]
    assert "identical to the base" in lines["adapter mtf"]
    saved = json.loads(report.read_text())
    assert saved["passed"] is True and len(saved["checks"]) == 10
    assert saved["config"]["TEXT_MODEL_NAME"] == str(word_tokenizer)


@pytest.mark.slow  # end to end through the CLI subprocess
def test_a_missing_adapter_fails_with_the_fix(setup, word_tokenizer, tmp_path):
    args = arguments(setup, word_tokenizer, tmp_path / "report.json", f"--LORA_MTF_ADAPTER_DIR={tmp_path / 'none'}")
    result = run_script(args)
    assert result.returncode == 1
    line = lines_of(result.stdout)["adapter mtf"]
    assert line.startswith("FAIL") and "train_clamp3_lora.py --format mtf" in line
    assert "LORA_MTF_ADAPTER_DIR" in line and "--skip_adapters" in line
    assert lines_of(result.stdout)["adapter abc"].startswith("PASS")


def test_skip_adapters_checks_the_base_alone(setup, word_tokenizer, tmp_path, capsys):
    args = arguments(setup, word_tokenizer, tmp_path / "report.json", "--skip_adapters",
                     f"--LORA_MTF_ADAPTER_DIR={tmp_path / 'none'}")
    code, output = run_in_process(args, capsys)
    assert code == 0, output
    assert not any(name.startswith("adapter") for name in lines_of(output))


def test_missing_weights_fail_with_the_fix(setup, word_tokenizer, tmp_path, capsys):
    args = arguments(setup, word_tokenizer, tmp_path / "report.json", "--weights", str(tmp_path / "none.pth"))
    code, output = run_in_process(args, capsys)
    lines = lines_of(output)
    assert code == 1
    assert lines["base weights"].startswith("FAIL") and "--weights" in lines["base weights"]
    assert "CLAMP3_WEIGHTS_PATH" in lines["base weights"]
    assert "not run: the base weights did not load" in lines["forward text (base)"]
    assert lines["text tokenizer"].startswith("PASS") and lines["test data abc"].startswith("PASS")
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


def test_a_missing_tokenizer_fails_with_the_fix(setup, tmp_path, capsys):
    code, output = run_in_process(arguments(setup, tmp_path / "no_tokenizer", tmp_path / "r.json",
                                            "--skip_adapters"), capsys)
    lines = lines_of(output)
    assert code == 1
    assert lines["text tokenizer"].startswith("FAIL") and "TEXT_MODEL_NAME" in lines["text tokenizer"]
    assert lines["forward text (base)"].startswith("FAIL")
    assert lines["forward symbolic abc (base)"].startswith("PASS")


def test_missing_or_broken_test_data_fails_with_the_fix(setup, word_tokenizer, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    record = {"id": "x", "filepaths": ["abc/x.abc"], "source": "wikimt", "texts": {}}
    (broken / testsets.TEST_FILES["abc"]).write_text(json.dumps(record) + "\n")
    cfg = runconfig.build_config(overrides={"TEXT_MODEL_NAME": str(word_tokenizer)})
    settings = preflight.PreflightSettings(cfg=cfg, weights=TINY_WEIGHTS, model_config_path=TINY_MODEL_CONFIG,
                                           test_data_dir=broken, skip_adapters=True)
    checks = preflight.Preflight(settings).checks()
    results = {r.name: r for r in preflight.run_checks(checks, echo=None)}
    assert not results["test data abc"].ok and "x: no text" in results["test data abc"].message
    assert not results["test data mtf"].ok and "prepare_test_data.py" in results["test data mtf"].message
    assert "not run: the mtf test data failed" in results["forward symbolic mtf (base)"].message


def test_a_check_that_raises_is_a_failure_and_the_others_still_run():
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    checks = [preflight.Check("broken", broken), preflight.Check("fine", lambda: (True, "ok"))]
    results = preflight.run_checks(checks, echo=None)
    assert [(r.name, r.ok) for r in results] == [("broken", False), ("fine", True)]
    assert results[0].line() == "FAIL  broken: RuntimeError: boom"
