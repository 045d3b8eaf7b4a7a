"""The trainer's start-up: bad JSONL lines are drops, the music-file check is shared by the ranks
and cached in the run folder (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import train_clamp3_lora
from helpers import history, make_records, options, train_job


def drops(tmp_path: Path, fmt: str = "abc") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / f"{fmt.upper()}_drops.jsonl").read_text().splitlines()]


def training_log(tmp_path: Path, fmt: str = "abc") -> str:
    return (tmp_path / "run" / f"{fmt.upper()}_training.log").read_text()


def add_bad_lines(jsonl: Path) -> None:
    """An invalid line and a JSON line that is not an object, among the good ones (lines 3 and 5)."""
    lines = jsonl.read_text().splitlines()
    lines[2:2] = ['{"id": "cut", "filepaths": ["music/x.abc"], "title": ']
    lines[4:4] = ["[1, 2]"]
    jsonl.write_text("\n".join(lines) + "\n")


def test_bad_jsonl_lines_are_logged_as_drops_and_training_goes_on(tmp_path, word_tokenizer):
    jsonl = make_records(tmp_path, "abc")
    add_bad_lines(jsonl)
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, TRAIN_DEVICE="cpu")) == 0
    rows = drops(tmp_path)
    assert [(row["line"], row["reason"]) for row in rows] == [
        (3, "bad JSONL line: not valid JSON (Expecting value)"),
        (5, "bad JSONL line: expected a JSON object, not list")]
    assert all(row["jsonl"] == str(jsonl) for row in rows)
    assert "left out 2" in training_log(tmp_path)
    assert len(history(tmp_path)) == 1


def test_a_jsonl_without_a_usable_record_is_a_one_line_error(tmp_path, word_tokenizer, capsys):
    make_records(tmp_path, "abc")
    (tmp_path / "train_abc.jsonl").write_text('{"id": \n[1, 2]\n"text"\n')
    assert train_clamp3_lora.main(options(tmp_path, word_tokenizer, TRAIN_DEVICE="cpu")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: [abc] no usable training record in ") and "left out 3" in err
    assert len(drops(tmp_path)) == 3


def test_a_resume_takes_unchanged_file_checks_from_the_run_folder(tmp_path, word_tokenizer):
    add_bad_lines(make_records(tmp_path, "abc"))
    args = options(tmp_path, word_tokenizer, LORA_NUM_EPOCHS=1, TRAIN_DEVICE="cpu")
    assert train_clamp3_lora.main(args) == 0
    cache = json.loads((tmp_path / "run" / "file_checks.abc.json").read_text())
    assert len(cache["files"]) == 32 and cache["settings"]["patch_size"] > 0
    assert "32 music files checked, 0 unchanged ones taken from file_checks.abc.json" in training_log(tmp_path)
    changed = sorted((tmp_path / "music").iterdir())[0]
    changed.write_text(changed.read_text() + "\n")  # another size: checked again
    assert train_clamp3_lora.main(args + ["--resume", "latest"]) == 0
    assert "1 music files checked, 31 unchanged ones taken from file_checks.abc.json" in training_log(tmp_path)
    assert len(drops(tmp_path)) == 2  # written anew, not appended to


@pytest.mark.slow  # two torchrun jobs
def test_two_ranks_share_the_file_check_and_load_what_one_process_loads(tmp_path, word_tokenizer):
    for name in ("one", "two"):
        jsonl = make_records(tmp_path / name, "abc")
        add_bad_lines(jsonl)
        (tmp_path / name / "music" / "empty.abc").write_text("")
        with jsonl.open("a") as f:
            f.write(json.dumps({"id": "empty", "filepaths": ["music/empty.abc"], "title": "w1"}) + "\n")
            f.write(json.dumps({"id": "gone", "filepaths": ["music/gone.abc"], "title": "w2"}) + "\n")
    one = train_job(1, options(tmp_path / "one", word_tokenizer, LORA_BATCH_SIZE=4, LORA_NUM_EPOCHS=1,
                              NUM_WORKERS=2, TRAIN_DEVICE="cpu"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = train_job(2, options(tmp_path / "two", word_tokenizer, LORA_BATCH_SIZE=2, LORA_NUM_EPOCHS=1,
                              NUM_WORKERS=2, TRAIN_DEVICE="cpu"))
    assert two.returncode == 0, two.stderr[-3000:]

    def comparable(name: str) -> list[dict]:
        return [{k: str(v).replace(str(tmp_path / name), "") for k, v in row.items()} for row in drops(tmp_path / name)]

    assert comparable("one") == comparable("two") and len(comparable("two")) == 4
    for name in ("one", "two"):
        assert "34 music files checked" in training_log(tmp_path / name)
        cache = json.loads((tmp_path / name / "run" / "file_checks.abc.json").read_text())
        assert len(cache["files"]) == 33  # the missing file is never cached
    assert "on 2 process(es)" in training_log(tmp_path / "two")

    def records_line(name: str) -> str:
        line = next(line for line in training_log(tmp_path / name).splitlines() if "] records: " in line)
        return line.split("] ", 1)[1].replace(str(tmp_path / name), "")

    assert records_line("one") == records_line("two")
