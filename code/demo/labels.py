"""Labelled sets of the demo corpus for classification: each tune's type (reel, jig, hornpipe...) from
its header (``captions.tune_metadata``: the ``R:`` field, or a type word in Ryan's titles), which the
model never reads (``R:`` and ``T:`` are stripped from the music, see ``demo.captions``).

The probe trains on the adapters' training pieces and is scored on the held-out test pieces, as the
retrieval evaluation is; Essen's regions are not used, because every Essen tune is in the base's
training split and none is held out.
"""

from __future__ import annotations

from pathlib import Path

from fileio import DropLog, read_jsonl, write_jsonl

from demo.captions import tune_metadata
from demo.corpus import music21_corpus_dir, read_collections

LABEL_FIELD = "tune_type"


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
    for fmt in ("abc", "mtf"):
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
