"""Extraction and raw-file embedding over several processes (torchrun, gloo on CPU): the rank split,
the per-rank failure logs merged by rank 0, the summary of all ranks, and outputs bitwise those of
one process with the same settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import extract_clamp3
import numpy as np
import pytest
from extraction import chunk_ranges, merge_rank_logs, plan_folder, rank_log_path, split_chunks
from helpers import OFFICIAL, REPO_ROOT, TINY_MODEL_CONFIG, TINY_WEIGHTS, free_port, torchrun

TINY = ["--weights", str(TINY_WEIGHTS), "--model_config", str(TINY_MODEL_CONFIG)]
CHUNK = "--EXTRACT_FILES_PER_CHUNK=8"  # 62 fixture files make 8 chunks, so both ranks get work


def same_files(a: Path, b: Path) -> None:
    """The same relative file names, and every file the same bytes."""
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert names_a == names_b
    for rel in names_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"


# ---------------------------------------------------------------------------- the split, without processes
def test_split_chunks_gives_each_chunk_to_one_rank_balanced_by_bytes():
    weights = [50, 10, 10, 10, 10, 10, 30, 0]
    shares = split_chunks(weights, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(weights)))  # each exactly once
    assert all(share == sorted(share) for share in shares)
    loads = sorted(sum(weights[i] for i in share) for share in shares)
    assert loads == [40, 40, 50]
    assert split_chunks(weights, 1) == [list(range(len(weights)))]  # one process: every chunk in order
    assert split_chunks([5], 4) == [[0], [], [], []]
    assert split_chunks(weights, 3) == shares  # a pure function: every rank computes the same split
    assert [list(r) for r in chunk_ranges(5, 2)] == [[0, 1], [2, 3], [4]]


def test_rank_logs_are_named_per_rank_and_merged_by_rank_0(tmp_path):
    log = tmp_path / "logs" / "extract_clamp3_failures.jsonl"
    assert rank_log_path(log, 0, 4) == log and rank_log_path(log, 3, 1) == log
    assert rank_log_path(log, 2, 4) == tmp_path / "logs" / "extract_clamp3_failures.rank2.jsonl"
    assert rank_log_path(None, 1, 2) is None
    log.parent.mkdir()
    log.write_text('{"file": "a"}\n')
    rank_log_path(log, 2, 3).write_text('{"file": "c"}')  # no final newline: one is added
    merge_rank_logs(log, 3)  # rank 1 wrote nothing
    assert [json.loads(line)["file"] for line in log.read_text().splitlines()] == ["a", "c"]
    assert sorted(p.name for p in log.parent.iterdir()) == [log.name]


# ---------------------------------------------------------------------------- extract_clamp3.py
@pytest.fixture()
def inputs(tmp_path) -> Path:
    """The 62 official fixture inputs and two bad files, placed so that each rank gets one."""
    root = tmp_path / "in"
    for sub in ("int_abc", "int_abc_from_abc_inputs", "mtf"):
        shutil.copytree(OFFICIAL / "outputs" / sub, root / sub)
    (root / "aaa_empty.abc").write_bytes(b"")
    (root / "mtf" / "m21test_test00.npy").write_bytes(b"not an array")
    return root


@pytest.mark.slow  # three launches of two processes
def test_torchrun_extraction_is_bitwise_one_process_and_resumes(tmp_path, inputs):
    one, two = tmp_path / "one", tmp_path / "two"
    log_one, log_two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["--get_global", *TINY, CHUNK, "--EXTRACT_DEVICE=cpu", "--quiet"]
    # The bad files fall on different ranks, so both ranks have a failure to log.
    plan = plan_folder(inputs, two, files_per_chunk=8)
    shares = split_chunks(plan.chunk_weights(), 2)
    rank_of = {rel.name: rank for rank, share in enumerate(shares) for index in share
               for rel in plan.chunks()[index]}
    assert {rank_of["aaa_empty.abc"], rank_of["m21test_test00.npy"]} == {0, 1}

    assert extract_clamp3.main([str(inputs), str(one), *common, "--error_log", str(log_one)]) == 0
    result = torchrun(REPO_ROOT / "code" / "extract_clamp3.py", 2,
                    [str(inputs), str(two), *common, "--error_log", str(log_two)])
    assert result.returncode == 0, result.stderr
    same_files(one, two)  # bitwise, every output
    assert len(list(two.rglob("*.npy"))) == 62
    lines = [line for line in result.stdout.splitlines() if line.startswith("extract:")]
    assert len(lines) == 1  # rank 0 alone prints the summary, of every rank
    counts = re.search(r"62 extracted, 0 skipped \(already done\), 2 failed \(2 processes; extracted per rank: "
                       r"(\d+), (\d+)\)", lines[0])
    assert counts, lines[0]
    per_rank = [int(counts.group(1)), int(counts.group(2))]
    assert sum(per_rank) == 62 and min(per_rank) > 0
    assert per_rank == [sum(len(plan.chunks()[i]) for i in share) - sum(
        rel.name in ("aaa_empty.abc", "m21test_test00.npy") for i in share for rel in plan.chunks()[i])
        for share in shares]  # each rank wrote exactly its own chunks
    assert "[rank 1] [extract]" in result.stderr
    rows = [json.loads(line) for line in log_two.read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in rows) == ["aaa_empty.abc", "m21test_test00.npy"]
    assert not list(tmp_path.glob("two.rank*.jsonl"))  # merged into the main log and removed
    assert json.loads((tmp_path / "two.extract_config.json").read_text())["get_global"] is True

    # A rerun (the older launcher) skips every finished file; the failures are retried and logged again.
    (two / "mtf" / "m21test_test01.npy").unlink()
    again = torchrun(REPO_ROOT / "code" / "extract_clamp3.py", 2,
                   [str(inputs), str(two), *common, "--error_log", str(log_two)], launcher="torch.distributed.launch")
    assert again.returncode == 0, again.stderr
    assert "1 extracted, 61 skipped (already done), 2 failed (2 processes" in again.stdout
    assert len(log_two.read_text().splitlines()) == 4
    np.testing.assert_allclose(np.load(two / "mtf" / "m21test_test01.npy"), np.load(one / "mtf" / "m21test_test01.npy"),
                               rtol=0, atol=1e-5)  # a resumed run batches what is left: within 1e-5


@pytest.mark.slow  # one launch of two processes
def test_a_rank_that_cannot_start_stops_every_rank_cleanly(tmp_path, inputs):
    (inputs / "caption.txt").write_text("w1 w2", encoding="utf-8")
    result = torchrun(REPO_ROOT / "code" / "extract_clamp3.py", 2,
                    [str(inputs), str(tmp_path / "out"), *TINY, "--EXTRACT_DEVICE=cpu", "--quiet",
                     f"--TEXT_MODEL_NAME={tmp_path / 'no_tokenizer'}"])
    assert result.returncode != 0  # torchrun reports the exit codes 2 (with its own traceback)
    assert result.stderr.count("error: text tokenizer folder not found") == 2  # each rank, no hang
    assert 'extract_clamp3.py", line' not in result.stderr  # and no traceback of the script's own
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- clamp3_embd.py
@pytest.mark.slow  # two "nodes" of one process each
def test_clamp3_embd_over_two_nodes_is_bitwise_one_process(tmp_path):
    source = tmp_path / "raw"
    shutil.copytree(OFFICIAL / "outputs" / "int_abc", source / "abc")
    (source / "mid").mkdir()
    for name in ("edge_empty_track", "edge_exact_513_patches", "edge_multitrack_8", "edge_sysex_pitchwheel_cc",
                 "m21test_test01"):  # MIDI, converted to MTF; no two inputs have one model input
        shutil.copy(OFFICIAL / "inputs" / "mid" / f"{name}.mid", source / "mid")
    (source / "song.wav").write_bytes(b"RIFF")  # refused, with the reason
    script = REPO_ROOT / "clamp3_embd.py"

    def arguments(out: Path, tag: str) -> list[str]:
        return [str(source), str(out), "--get_global", *TINY, "--no_adapter", "--quiet", "--EXTRACT_DEVICE=cpu",
                "--EXTRACT_FILES_PER_CHUNK=6", "--cache_dir", str(tmp_path / f"cache_{tag}"),
                "--error_log", str(tmp_path / f"{tag}.jsonl")]

    single = subprocess.run([sys.executable, str(script), *arguments(tmp_path / "one", "one")],
                            capture_output=True, text=True, check=False)
    assert single.returncode == 0, single.stderr
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(script), *arguments(tmp_path / "two", "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err
    same_files(tmp_path / "one", tmp_path / "two")  # a separate cache each: both computed every feature
    assert len(list((tmp_path / "two").rglob("*.npy"))) == 27
    manifests = [json.loads((tmp_path / f"{tag}.embd_manifest.json").read_text()) for tag in ("one", "two")]
    assert manifests[0]["outputs"] == manifests[1]["outputs"] and list(manifests[1]["outputs"]) == list(
        manifests[0]["outputs"])  # written by rank 0, in input order
    stdout = outputs[0][0]
    assert "(2 processes): 27 written, 0 unchanged, 0 removed (their inputs are gone), 1 failed" in stdout
    assert "features: 27 embedded, 0 from the cache, 1 failed" in stdout
    assert "clamp3_embd:" not in outputs[1][0]  # rank 1 prints no summary
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["song.wav"] and not list(tmp_path.glob("two.rank*"))
    # A rerun with two processes: nothing rewritten; a removed input's output is deleted by rank 0.
    (source / "abc" / "bach_bwv190.7-inst.abc").unlink()
    again = torchrun(script, 2, arguments(tmp_path / "two", "two"))
    assert again.returncode == 0, again.stderr
    assert "0 written, 26 unchanged, 1 removed" in again.stdout
    assert not (tmp_path / "two" / "abc" / "bach_bwv190.7-inst.npy").exists()
