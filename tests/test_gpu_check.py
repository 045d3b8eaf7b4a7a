"""bench/gpu_check.py (``make gpu-check``) in its CPU mode at the tiny size: every CPU part runs,
passes its checks, prints one table and writes the JSON report."""

from __future__ import annotations

import json

import pytest
from helpers import REPO_ROOT, load_script

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))  # its helpers: bench_extract, bench_train
    return load_script(SCRIPT)


def test_without_cuda_it_says_so_and_runs_the_cpu_parts(gpu_check):
    assert gpu_check.choose_mode(cpu=False, cuda_available=False) == (
        "cpu", "no CUDA GPU here: running the CPU parts only (what --cpu runs)")
    assert gpu_check.choose_mode(cpu=True, cuda_available=False)[0] == "cpu"


def test_cpu_mode_at_the_tiny_size(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    # bf16 on CPU runs CPU autocast: the comparison with fp32 is exercised too.
    assert gpu_check.main(["--cpu", "--size", "tiny", "--precisions", "fp32,bf16", "--batch", "4", "--check_batch", "4",
                           "--global_batch", "16", "--micro_batch", "4", "--pieces", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU mode" in printed and "| part | case | result | limit | status |" in printed
    assert "all checks pass" in printed
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["ok"] is True and report["settings"]["size"] == "tiny"
    rows = report["rows"]
    assert {r["part"] for r in rows} == {"tests", "precision", "gradcache", "extraction", "bench"}
    assert all(r["status"] in ("PASS", "INFO", "SKIP") for r in rows), [r for r in rows if r["status"] == "FAIL"]
    by_part = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(r)
    assert [r["values"]["precision"] for r in by_part["precision"]] == ["fp32", "bf16"]
    bf16 = by_part["precision"][1]["values"]
    assert bf16["gradient_cosine_vs_fp32"] >= 0.99 and bf16["loss_gap_vs_fp32"] <= 0.02
    assert [r["values"]["precision"] for r in by_part["gradcache"]] == ["fp32", "bf16"]
    fp32_cache = by_part["gradcache"][0]["values"]
    assert fp32_cache["gradient_gap"] <= 1e-4 < fp32_cache["control_gradient_gap"]
    assert [r["values"]["dtype"] for r in by_part["extraction"]] == ["float32", "bfloat16"]
    assert by_part["extraction"][0]["values"]["max_abs_diff"] <= 1e-4
    bench = by_part["bench"]
    assert len(bench) == 3 and all(r["values"]["samples_per_s"] > 0 for r in bench)
    assert bench[-1]["case"].startswith("GradCache 16 / micro 4")
    assert by_part["tests"][0]["status"] == "SKIP"


def test_a_failing_part_is_reported_and_fails_the_run(gpu_check, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(gpu_check, "extraction_part", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu", "--size", "tiny", "--parts", "extraction", "--out", str(out)]) == 1
    assert "SOME CHECKS FAIL" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert rows == [{"part": "extraction", "case": "error", "result": "RuntimeError: no kernel", "limit": "",
                     "status": "FAIL", "values": {}}]
