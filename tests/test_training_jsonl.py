"""Training JSONL generation on a tiny PDMX-like data tree built from official fixture outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fileio import write_jsonl
from formats import FORMATS
from preprocess import training_jsonl
from preprocess.pdmx import METADATA_NAME

SCRIPT = Path(__file__).resolve().parent.parent / "preprocessing" / "generate_training_jsonl.py"
N_PIECES = 40
ABC_SOURCES = ["bach_bwv1.6.abc", "demos_chorale_with_parallels.abc", "corelli_opus3no1_1grave.abc"]
MTF_SOURCES = ["m21test_test01.mtf", "edge_multitrack_8.mtf", "m21test_test03.mtf"]


def piece_id(i: int) -> str:
    return f"Qm{i:04d}x"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def tree(tmp_path, official_dir) -> Path:
    """data/{abc_interleaved,mtf}/<a>/<ab>/<id>.* plus processed/pdmx_metadata.jsonl."""
    data = tmp_path / "data"
    records = []
    for i in range(N_PIECES):
        pid = piece_id(i)
        rel = f"{pid[2]}/{pid[2:4]}/{pid}"
        abc = data / "abc_interleaved" / f"{rel}.abc"
        mtf = data / "mtf" / f"{rel}.mtf"
        abc.parent.mkdir(parents=True, exist_ok=True)
        mtf.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(official_dir / "outputs/int_abc" / ABC_SOURCES[i % 3], abc)
        shutil.copy(official_dir / "outputs/mtf" / MTF_SOURCES[i % 3], mtf)
        records.append({
            "id": pid, "row": i,
            "paths": {"mxl": f"mxl/{rel}.mxl", "mid": f"mid/{rel}.mid", "pdf": f"pdf/{rel}.pdf"},
            "text": {"title": f"Piece number {i}", "artists": ["Anon", f"Composer {i % 4}"],
                     "genres": ["classical"], "tags": [] if i % 2 else ["choral", "baroque"]},
            "license": "Public Domain",
        })
    records[5]["text"]["title"] = "Für Elise!"
    records[6]["text"] = {"title": "Greensleeves", "song_name": "Alas, my love"}
    write_jsonl(data / "processed" / METADATA_NAME, records)
    return data


def generate(tree: Path, out: Path | None = None, **kwargs) -> training_jsonl.TrainingJsonlSummary:
    kwargs.setdefault("valid_fraction", 0.25)
    kwargs.setdefault("progress", False)
    return training_jsonl.generate(tree / "processed", tree, out or tree / "training", **kwargs)


def split_ids(out: Path) -> dict[tuple[str, str], list[str]]:
    return {(f, s): [r["id"] for r in read(out / training_jsonl.output_name(f, s))] for f in FORMATS
            for s in training_jsonl.SPLITS}


def test_records_follow_the_official_format(tree):
    generate(tree)
    out = tree / "training"
    rows = read(out / "clamp3_train_abc.jsonl") + read(out / "clamp3_valid_abc.jsonl")
    assert len(rows) == N_PIECES
    for row in rows:
        assert list(row)[:2] == ["id", "filepaths"]
        assert len(row["filepaths"]) == 1 and row["filepaths"][0].startswith("../abc_interleaved/")
        for key, value in row.items():
            if key != "filepaths":
                assert isinstance(value, str) or (isinstance(value, list) and value
                                                  and all(isinstance(v, str) for v in value)), (key, value)
        # empty lists are left out (odd pieces have no tags; piece 6 has only titles)
        assert ("tags" in row) == (int(row["id"][2:6]) % 2 == 0 and row["id"] != piece_id(6))
    first = next(r for r in rows if r["id"] == piece_id(0))
    assert first["filepaths"] == ["../abc_interleaved/0/00/Qm0000x.abc"]
    assert first["title"] == "Piece number 0" and first["tags"] == ["choral", "baroque"]


def test_filepaths_resolve_relative_to_the_jsonl(tree, official_dir):
    generate(tree)
    out = tree / "training"
    for format, sources, folder in (("abc", ABC_SOURCES, "int_abc"), ("mtf", MTF_SOURCES, "mtf")):
        for split in training_jsonl.SPLITS:
            jsonl = out / training_jsonl.output_name(format, split)
            for row in read(jsonl):
                file = jsonl.parent / row["filepaths"][0]  # what the official loader does
                assert file.is_file() and file.suffix == "." + format
                i = int(row["id"][2:6])
                assert file.read_bytes() == (official_dir / "outputs" / folder / sources[i % 3]).read_bytes()


def test_split_is_by_piece_deterministic_and_shared_by_formats(tree, tmp_path):
    generate(tree)
    first = split_ids(tree / "training")
    assert set(first[("abc", "train")]) == set(first[("mtf", "train")])
    assert set(first[("abc", "valid")]) == set(first[("mtf", "valid")])
    assert not set(first[("abc", "train")]) & set(first[("abc", "valid")])
    assert first[("abc", "valid")], "0.25 of 40 pieces should give some validation pieces"
    assert len(first[("abc", "train")]) > len(first[("abc", "valid")])
    for pid in first[("abc", "valid")]:
        assert training_jsonl.split_of(pid, 0.25, 42) == "valid"

    # Same result on a second run, and for a piece whatever other pieces are in the metadata.
    generate(tree, tmp_path / "again")
    assert split_ids(tmp_path / "again") == first
    meta = tree / "processed" / METADATA_NAME
    lines = meta.read_text(encoding="utf-8").splitlines()
    meta.write_text("\n".join(reversed(lines[::2])) + "\n", encoding="utf-8")
    generate(tree, tmp_path / "subset")
    sub = split_ids(tmp_path / "subset")
    for key, ids in sub.items():
        assert set(ids) <= set(first[key])

    # Another seed moves pieces around.
    generate(tree, tmp_path / "seed7", seed=7)
    assert split_ids(tmp_path / "seed7")[("abc", "valid")] != first[("abc", "valid")]


def test_a_piece_written_in_both_formats_has_one_pair_id_on_one_side_of_the_split(tree):
    """Both records of a piece with both files carry its id as ``pair_id`` (in the same split,
    since the split is by piece); a piece that lost one format to the file check has none, and
    ``pair_ids=False`` writes records the official loader reads as they were."""
    (tree / "abc_interleaved/0/00/Qm0001x.abc").unlink()
    summary = generate(tree)
    out = tree / "training"
    rows = {(f, s): read(out / training_jsonl.output_name(f, s)) for f in FORMATS for s in training_jsonl.SPLITS}
    pairs = {(f, s): {r["id"]: r.get("pair_id") for r in found} for (f, s), found in rows.items()}
    for split in training_jsonl.SPLITS:
        abc, mtf = pairs[("abc", split)], pairs[("mtf", split)]
        assert {i: p for i, p in mtf.items() if i != piece_id(1)} == abc == {i: i for i in abc}
        assert summary.pairs[split] == len(abc)
    assert piece_id(1) in pairs[("mtf", "train")] | pairs[("mtf", "valid")]
    assert (pairs[("mtf", "train")] | pairs[("mtf", "valid")])[piece_id(1)] is None
    assert sum(summary.pairs.values()) == N_PIECES - 1
    assert any(line.startswith("pairs (both formats, pair_id): train ") for line in summary.lines())
    first = next(r for r in rows[("mtf", "train")] + rows[("mtf", "valid")] if r["id"] == piece_id(0))
    assert list(first)[:3] == ["id", "filepaths", "pair_id"] and "pair_id" not in first["title"]
    info = json.loads((out / training_jsonl.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert info["pair_ids"] is True and sum(info["pairs"].values()) == N_PIECES - 1

    generate(tree, pair_ids=False)
    assert not any("pair_id" in r for f in FORMATS for s in training_jsonl.SPLITS
                   for r in read(out / training_jsonl.output_name(f, s)))


def test_split_of_fraction_is_about_right():
    ids = [f"piece{i}" for i in range(4000)]
    share = sum(training_jsonl.split_of(i, 0.02) == "valid" for i in ids) / len(ids)
    assert 0.012 < share < 0.028
    assert all(training_jsonl.split_of(i, 0.0) == "train" for i in ids[:100])


def test_missing_files_are_dropped_by_default_and_reported(tree):
    (tree / "abc_interleaved/0/00/Qm0001x.abc").unlink()
    summary = generate(tree)
    ids = split_ids(tree / "training")
    assert piece_id(1) not in ids[("abc", "train")] + ids[("abc", "valid")]
    assert piece_id(1) in ids[("mtf", "train")] + ids[("mtf", "valid")]
    assert summary.dropped_by_format()[("abc", "missing file")] == 1
    log = read(tree / "training" / training_jsonl.DROPPED_NAME)
    assert log == [{"id": piece_id(1), "format": "abc", "reason": "missing file",
                    "file": str(tree / "abc_interleaved/0/00/Qm0001x.abc")}]
    # --allow_missing keeps the record (for writing the JSONL before the conversion has run)
    generate(tree, allow_missing=True)
    ids = split_ids(tree / "training")
    assert piece_id(1) in ids[("abc", "train")] + ids[("abc", "valid")]


def test_verify_files_drops_bad_files_with_reasons(tree):
    (tree / "abc_interleaved/0/00/Qm0001x.abc").unlink()
    (tree / "mtf/0/00/Qm0002x.mtf").write_bytes(b"")
    (tree / "abc_interleaved/0/00/Qm0003x.abc").write_bytes(b"X:1\nK:C\n" + b"\xff\xfe abc |\n")
    (tree / "abc_interleaved/0/00/Qm0004x.abc").write_text("no barlines and no header\n", encoding="utf-8")
    (tree / "mtf/0/00/Qm0007x.mtf").write_text("   \n\n", encoding="utf-8")
    # without --verify_files these all exist and are kept
    assert len(generate(tree).drops) == 1
    summary = generate(tree, verify_files=True)
    log = {(d["id"], d["format"]): d["reason"] for d in read(tree / "training" / training_jsonl.DROPPED_NAME)}
    assert log == {
        (piece_id(1), "abc"): "missing file",
        (piece_id(2), "mtf"): "empty file",
        (piece_id(3), "abc"): "not UTF-8 (byte 8)",
        (piece_id(4), "abc"): "patchilizer produced no content patches",
        (piece_id(7), "mtf"): "blank file (whitespace only)",
    }
    assert len(summary.drops) == 5
    counts = summary.written
    assert counts[("abc", "train")] + counts[("abc", "valid")] == N_PIECES - 3
    assert counts[("mtf", "train")] + counts[("mtf", "valid")] == N_PIECES - 2
    assert any("[abc] missing file: 1" in line for line in summary.lines())


def test_verify_files_in_parallel_gives_the_same_result(tree, tmp_path):
    (tree / "mtf/0/00/Qm0002x.mtf").write_bytes(b"")
    assert 2 * N_PIECES >= 64  # enough files for the process pool to be used
    generate(tree, tmp_path / "one", verify_files=True, workers=1)
    generate(tree, tmp_path / "two", verify_files=True, workers=2)
    names = [training_jsonl.output_name(f, s) for f in FORMATS for s in training_jsonl.SPLITS]
    for name in [*names, training_jsonl.DROPPED_NAME]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_exclude_titles_from_text_or_jsonl(tree, tmp_path):
    plain = tmp_path / "titles.txt"
    plain.write_text("fur elise\n\n  PIECE   NUMBER 12 \n", encoding="utf-8")
    summary = generate(tree, exclude_titles=plain)
    kept = {i for ids in split_ids(tree / "training").values() for i in ids}
    assert piece_id(5) not in kept and piece_id(12) not in kept and piece_id(11) in kept
    assert summary.dropped_by_format()[("piece", "title in --exclude_titles")] == 2

    wikimt = tmp_path / "wikimt.jsonl"
    wikimt.write_text(
        json.dumps({"title": "Alas, my love!", "leadsheet": "X:1\n"}) + "\n"
        + json.dumps({"title": "", "leadsheet": "X:1\n"}) + "\n"
        + json.dumps({"title": "Piece Number 1."}) + "\n", encoding="utf-8")
    generate(tree, exclude_titles=wikimt)
    kept = {i for ids in split_ids(tree / "training").values() for i in ids}
    assert piece_id(6) not in kept  # matched through its song name
    assert piece_id(1) not in kept and piece_id(10) in kept  # whole titles only, not prefixes
    assert len(kept) == N_PIECES - 2  # the blank title excludes nothing


def test_exclude_titles_jsonl_with_a_broken_line_is_an_error(tree, tmp_path):
    # A broken record is reported, not read as a title that would exclude nothing.
    titles = tmp_path / "titles.jsonl"
    titles.write_text(json.dumps({"title": "Fur Elise"}) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"titles\.jsonl:2"):
        generate(tree, exclude_titles=titles)


def test_normalise_title():
    assert training_jsonl.normalise_title("  Für   Elise! ") == "fur elise"
    assert training_jsonl.normalise_title("Ода к радости") == "oda k radosti"
    assert training_jsonl.normalise_title("Rock'n'Roll -- Part_2") == "rock n roll part 2"
    assert training_jsonl.normalise_title("...") == ""


def test_outputs_are_complete_files_only(tree):
    generate(tree)
    names = sorted(p.name for p in (tree / "training").iterdir())
    assert names == sorted([training_jsonl.output_name(f, s) for f in FORMATS for s in training_jsonl.SPLITS]
                           + [training_jsonl.DROPPED_NAME, training_jsonl.SUMMARY_NAME])
    info = json.loads((tree / "training" / training_jsonl.SUMMARY_NAME).read_text(encoding="utf-8"))
    assert sum(info["written"].values()) == 2 * N_PIECES


def test_every_format_has_its_converted_files():
    assert tuple(training_jsonl.CONVERTED_FILES) == FORMATS
    assert {f: c.suffix for f, c in training_jsonl.CONVERTED_FILES.items()} == {"abc": ".abc", "mtf": ".mtf"}


@pytest.mark.slow
def test_script_from_another_directory(tree, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--metadata_dir", str(tree / "processed"), "--data_dir", str(tree),
         "--output_dir", str(tree / "training"), "--valid_fraction", "0.25", "--quiet", "--workers", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "abc: train" in result.stdout
    assert (tree / "training" / "clamp3_valid_mtf.jsonl").is_file()

    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--metadata_dir", str(tmp_path / "nothing"), "--data_dir", str(tree),
         "--output_dir", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "metadata file not found" in bad.stderr
