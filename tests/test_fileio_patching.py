"""fileio's JSONL and DropLog, and patching.patched."""

import json
import types

import pytest
from fileio import DropLog, iter_jsonl, read_jsonl, write_jsonl
from patching import patched


def test_jsonl_round_trip_and_bad_line_named(tmp_path):
    rows = [{"id": "a", "title": "Émile"}, {"id": "b"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(path) == rows
    assert "Émile" in path.read_text(encoding="utf-8")
    path.write_text('{"a": 1}\n\n[1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl:3: expected a JSON object"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n{bad\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_drop_log_counts_rows_streams_and_summarises(tmp_path):
    echoed = []
    log_path = tmp_path / "logs" / "drops.jsonl"
    with DropLog("train", log_path, echo=echoed.append) as log:
        assert not log_path.exists()  # nothing written before the first row
        log.add("empty text", id="p1")
        log.add("missing file", file="a.abc")
        log.fail("b.abc", "read", "missing file")
    assert len(log) == 3
    assert log.counts == {"missing file": 2, "empty text": 1}
    assert log.summary_line() == "train: left out 3 (missing file 2, empty text 1)"
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["reason"] for r in lines] == ["empty text", "missing file", "missing file"]
    assert lines[2]["file"] == "b.abc" and lines[2]["stage"] == "read" and "time" in lines[2]
    assert echoed[0] == "[train] p1: empty text"
    assert read_jsonl(log.write(tmp_path / "all.jsonl")) == log.rows
    assert DropLog("x").summary_line() == "x: nothing left out"


def test_patched_restores_values_and_absence():
    class Thing:
        shared = "class"

    thing = Thing()
    thing.own = 1
    module = types.ModuleType("m")
    module.value = "before"
    with patched(thing, own=2, shared="instance"), patched(module, value="during", extra=3):
        assert (thing.own, thing.shared, module.value, module.extra) == (2, "instance", "during", 3)
    assert thing.own == 1 and "shared" not in vars(thing) and thing.shared == "class"
    assert module.value == "before" and not hasattr(module, "extra")
    with pytest.raises(RuntimeError), patched(thing, own=5):
        raise RuntimeError
    assert thing.own == 1


def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path):
    import os

    from fileio import atomic_write_text

    path = atomic_write_text(tmp_path / "out.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's owner-only 0600
