"""Raw-file examples and labelled sets of the demo corpus.

``write_examples``: the held-out test tunes as plain files for the raw-file tools (``clamp3_eval.py``,
``clamp3_search.py``...): ``examples/captions/<id>.txt`` (the English caption), ``examples/sheet/<id>.abc``
and ``examples/midi/<id>.mid`` (the MIDI file the MTF was made from, written back from the MTF).

``write_label_sets``: labelled sets for classification, each tune's type (reel, jig, hornpipe...) from
its header (``captions.tune_metadata``: the ``R:`` field, or a type word in Ryan's titles), which the
model never reads (``R:`` and ``T:`` are stripped from the music, see ``demo.captions``).

The probe trains on the adapters' training pieces and is scored on the held-out test pieces, as the
retrieval evaluation is; Essen's regions are not used, because every Essen tune is in the base's
training split and none is held out.
"""

from __future__ import annotations

from pathlib import Path

from fileio import DropLog, atomic_write_bytes, atomic_write_text, read_jsonl, write_jsonl
from formats import FORMATS

from demo.captions import tune_metadata
from demo.corpus import music21_corpus_dir, read_collections

LABEL_FIELD = "tune_type"
# The three types with at least 10 of the full demo's 200 test tunes (the quick corpus uses the same
# three, whatever few of them it holds).
TUNE_TYPES = "reel,jig,hornpipe"


def label_set_paths(root: Path, fmt: str) -> dict[str, Path]:
    """The two labelled JSONLs of one format under a demo root: training and test pieces."""
    folder = root / "classification"
    return {"train": folder / f"tune_type_train_{fmt}.jsonl", "test": folder / f"tune_type_test_{fmt}.jsonl"}


def write_label_sets(root: Path) -> dict[str, int]:
    """Write the labelled sets of both formats; returns how many pieces each has."""
    tunes, _ = read_collections(music21_corpus_dir(), DropLog("demo_labels"))
    type_of = {tune.id: tune_metadata(tune.text, tune.collection).get(LABEL_FIELD) for tune in tunes}
    corpus = root / "corpus"
    sources = {"train": (corpus, "adapt_train_{fmt}.jsonl"), "test": (corpus / "test", "test_{fmt}.jsonl")}
    counts: dict[str, int] = {}
    for fmt in FORMATS:
        for split, path in label_set_paths(root, fmt).items():
            folder, name = sources[split]
            rows = []
            for record in read_jsonl(folder / name.format(fmt=fmt)):
                label = type_of.get(record["id"])
                if label:
                    files = [Path("..", folder.relative_to(root), f).as_posix() for f in record["filepaths"]]
                    rows.append({"id": record["id"], "filepaths": files[:1], LABEL_FIELD: label})
            write_jsonl(path, rows)
            counts[path.name] = len(rows)
    return counts


EXAMPLES_README = """The demo's held-out test tunes as plain files, for trying the raw-file tools (README,
"Raw-file tools, search and classification"): captions/<id>.txt holds a tune's English caption,
sheet/<id>.abc its interleaved ABC and midi/<id>.mid its MIDI rendering. Files of one tune share
their name, so clamp3_eval.py pairs them. Written by python -m demo; safe to delete.
"""


def write_examples(root: Path) -> dict[str, int]:
    """The test tunes as caption, sheet-music and MIDI files under ``root/examples``."""
    from preprocess.midi_mtf import mtf_file_to_midi

    test = root / "corpus" / "test"
    folder = root / "examples"
    counts = {"captions": 0, "sheet": 0, "midi": 0}
    for fmt in FORMATS:
        for record in read_jsonl(test / f"test_{fmt}.jsonl"):
            source = test / record["filepaths"][0]
            if fmt == "abc":
                atomic_write_text(folder / "sheet" / f"{record['id']}.abc", source.read_text(encoding="utf-8"))
                atomic_write_text(folder / "captions" / f"{record['id']}.txt", record["texts"]["caption_en"] + "\n")
                counts["sheet"] += 1
                counts["captions"] += 1
            else:
                atomic_write_bytes(folder / "midi" / f"{record['id']}.mid", mtf_file_to_midi(source))
                counts["midi"] += 1
    atomic_write_text(folder / "README.md", EXAMPLES_README)
    return counts
