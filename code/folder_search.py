"""Search a folder of music by text, by a piece of music, or by an image's caption: the folder's
persistent index (``search_index``) kept up to date through the raw-file embedder (``embedder``), and
the query turned into one vector.

The index of a folder lives under ``SEARCH_INDEX_DIR`` (one sub-folder per searched folder) unless
a folder is named. Its model key combines the keys of every model a file can go through (the ABC
and MTF adapters or the base, and the text tower), so an index built with other weights, other
adapters or ``--no_adapter`` is never mixed with this one's vectors: it is rebuilt, from the feature
cache where the files were embedded before.

**Opening** (``open_folder_index``, the search command's policy): the folder's index is brought up
to date before a search (created on the first; rebuilt, with a notice, when it was built with other
models), or with ``update=False`` searched as it is, without looking at the folder.

**Queries.** A path to a music file (any kind ``rawfiles`` reads): music → music, the file itself
(and identical copies) left out of the results. A ``.txt`` file: its text. An image: its caption
(``--caption``, else a ``.txt`` file of the same name beside it, else the ``CAPTION_MODEL`` hook).
Anything else: the query is the text itself ("a lively jig in D major").
"""

from __future__ import annotations

import hashlib
import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import formats
import numpy as np
import rawfiles
from embedder import Embedder
from fileio import DropLog, repo_path
from search_index import (
    FileFacts,
    IndexBusyError,
    IndexChangedError,
    SearchIndex,
    UpdateSummary,
    file_facts,
    index_info,
    wait_for_writer,
)

# How often an update that another process overtook is planned again before the index is searched
# as that process left it.
UPDATE_ATTEMPTS = 4

# What an index holds: every kind but text, i.e. music (symbolic kinds) and MERT features (audio);
# text files in a folder of scores are notes about them, not pieces.
INDEXED_KINDS = frozenset(kind for kind, modality in formats.MODALITY_OF_KIND.items() if modality != "text")
INDEXED_EXTENSIONS = tuple(sorted(ext for ext, kind in formats.KIND_OF_EXTENSION.items() if kind in INDEXED_KINDS))


def index_model_key(embedder: Embedder) -> str:
    """One key for every model an indexed file or a query can go through: the CLaMP 3 models and the
    MERT model audio files go through first (``none`` while it is not there: the audio files of the
    folder are then failures, tried again once it is)."""
    from audio.mert_model import MertModelError

    parts = [f"{slot}={embedder.model_key(slot)}" for slot in ("abc", "mtf", None)]
    try:
        parts.append(f"mert={embedder.mert_key()}")
    except MertModelError:
        parts.append("mert=none")
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:20]


def kinds_of_choice(choice: str | None) -> tuple[str, ...] | None:
    """The raw-file kinds a ``--format`` choice keeps: a format's kinds, ``audio``'s (audio files and
    MERT features), or every kind (None)."""
    if choice is None:
        return None
    if choice == "audio":
        return tuple(kind for kind, modality in formats.MODALITY_OF_KIND.items() if modality == "audio")
    return formats.KINDS_OF_FORMAT[choice]


def default_index_dir(cfg: dict[str, Any], folder: str | os.PathLike, base_model: bool = False) -> Path:
    """``SEARCH_INDEX_DIR/<folder name>-<digest of its absolute path>``, with ``-base`` for the base
    model's (``base_model``: no adapter): searching with and without the adapters keeps two indexes
    instead of rebuilding one at every switch (the search page keeps the same two)."""
    resolved = Path(os.path.abspath(folder))
    digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:12]
    return repo_path(cfg["SEARCH_INDEX_DIR"]) / f"{resolved.name or 'root'}-{digest}{'-base' if base_model else ''}"


def uses_adapters(embedder: Embedder) -> bool:
    """Whether any format goes through an adapter (else every vector is the base model's)."""
    return any(embedder.choice.adapters.values())


def folder_facts(folder: Path) -> tuple[dict[str, FileFacts], list[str]]:
    """The index's view of a folder: facts of every indexable file, and the other files the
    raw-file tools know (audio, images, text), which are not indexed."""
    indexable, skipped = [], []
    for rel in rawfiles.discover(folder):
        (indexable if rel.suffix.lower() in INDEXED_EXTENSIONS else skipped).append(rel.as_posix())
    return file_facts(folder, indexable), skipped


def update_index(embedder: Embedder, folder: str | os.PathLike, index_dir: str | os.PathLike,
                 rebuild: bool = False, drops: DropLog | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 say: Callable[[str], None] | None = None) -> tuple[SearchIndex, UpdateSummary, list[str]]:
    """The folder's index, brought up to date: new and changed files embedded, removed ones dropped.
    A different model key rebuilds it when ``rebuild`` (the CLI's default), else raises
    ``search_index.ModelKeyMismatchError``. Returns the index, what the update did, and the files
    of the folder that are not indexed (not music).

    Another process updating the same index meanwhile is not an error: this update waits for it
    (``say`` is told), plans again from what it wrote (the features of files embedded here come
    back from the content cache) and writes; after ``UPDATE_ATTEMPTS`` overtaken tries, the index
    is used as the other process left it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to search not found: {folder}")
    log = drops if drops is not None else DropLog("search")
    model_key = index_model_key(embedder)

    def embed(paths: list[str]) -> dict[str, Any]:
        results = embedder.embed_files([folder / p for p in paths], drops=log)
        return {path: result if isinstance(result, rawfiles.RawFileError)
                else (result.sha256, result.feature[0], result.kind)
                for path, result in zip(paths, results, strict=True)}

    for _ in range(UPDATE_ATTEMPTS):
        index = SearchIndex.open(index_dir, model_key, root=folder.resolve(), rebuild=rebuild)
        facts, skipped = folder_facts(folder)
        try:
            summary = index.update(facts, embed, batch_size=int(embedder.cfg["EXTRACT_FILES_PER_CHUNK"]),
                                   progress=progress)
            return index, summary, skipped
        except (IndexChangedError, IndexBusyError):
            if say is not None:
                say(f"index: {index_dir} was updated by another process meanwhile; waiting for it, then "
                    "updating from what it wrote")
            wait_for_writer(index_dir)
            rebuild = False  # the other process wrote this model's index: build on it
    if say is not None:
        say(f"index: {index_dir} keeps changing under this update; searched as the other process left it")
    return SearchIndex.open(index_dir, model_key, create=False), UpdateSummary(), skipped


def open_folder_index(embedder: Embedder, folder: str | os.PathLike, index_dir: str | os.PathLike, *,
                      update: bool = True, drops: DropLog | None = None,
                      say: Callable[[str], None] = print,
                      progress: Callable[[int, int], None] | None = None) -> SearchIndex:
    """The index a search of ``folder`` uses, with a line to ``say`` about it. ``update``: brought up
    to date (``update_index``; ``progress(done, total)`` after each chunk of files embedded), rebuilt
    when it was built with other models or adapters (say names it); else the index in ``index_dir``
    as it is (``FileNotFoundError`` if there is none, ``search_index.ModelKeyMismatchError`` if it
    was built with other models). An index of another folder is refused (``ValueError``)."""
    model_key = index_model_key(embedder)
    if not update:
        index = SearchIndex.open(index_dir, model_key, create=False)
        say(f"index: {index_dir} ({index.n_vectors} pieces; not updated)")
        return index
    previous = index_info(index_dir)
    indexed = previous.get("root") if previous else None
    holds = previous and (previous["counts"]["files"] or previous["counts"]["failures"])
    if indexed and holds and Path(indexed) != Path(folder).resolve():
        # An update would drop every file of the other folder: the index is not this folder's.
        raise ValueError(f"the index in {index_dir} is the index of {indexed}, not of {Path(folder).resolve()}: "
                         "give each folder its own --index (or none: each folder gets one under SEARCH_INDEX_DIR)")
    if previous and previous.get("model_key") != model_key:
        say(f"index: {index_dir} was built with other models or adapters: rebuilt (features come "
            "from the cache where these models embedded the files before)")
    started = time.perf_counter()
    index, summary, skipped = update_index(embedder, folder, index_dir, rebuild=True, drops=drops,
                                           progress=progress, say=say)
    say(f"index: {index_dir}: {summary.line()} ({time.perf_counter() - started:.1f} s)"
        + (f"; not music, left out: {len(skipped)} file(s)" if skipped else ""))
    return index


# ---------------------------------------------------------------------------- queries
@dataclass
class Query:
    """What a search is asked: ``text`` (typed, from a .txt file or an image caption) or ``path`` of a
    music file; ``source`` says where the query came from, for the output."""

    source: str
    text: str | None = None
    path: Path | None = None


def caption_image(path: Path, caption_model: str) -> str:
    """A caption for an image through the user's captioning hook (``CAPTION_MODEL``): either
    ``module:function`` (a Python callable taking the image path, returning text), or a local folder
    of a transformers image-captioning model (e.g. BLIP), loaded with ``local_files_only``. Nothing is
    ever downloaded."""
    if not caption_model:
        raise rawfiles.RawFileError(path, "caption", "an image is searched through its caption: pass --caption "
                                    "\"...\", put the caption in a .txt file of the same name beside the image, "
                                    "or set CAPTION_MODEL to a local captioning model (README, 'Image to music')")
    if ":" in caption_model and not Path(caption_model).exists():
        module_name, _, function_name = caption_model.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            raise rawfiles.RawFileError(path, "caption", f"CAPTION_MODEL {caption_model!r}: {exc}") from exc
        text = function(str(path))
    else:
        text = _transformers_caption(path, repo_path(caption_model))
    if not isinstance(text, str) or not text.strip():
        raise rawfiles.RawFileError(path, "caption", f"the captioning hook {caption_model!r} returned no text")
    return text.strip()


def _transformers_caption(path: Path, folder: Path) -> str:
    if not folder.is_dir():
        raise rawfiles.RawFileError(path, "caption", f"CAPTION_MODEL folder not found: {folder}")
    try:
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True).eval()
        with Image.open(path) as image:
            inputs = processor(images=image.convert("RGB"), return_tensors="pt")
        import torch

        with torch.inference_mode():
            tokens = model.generate(**inputs, max_new_tokens=40)
        return processor.decode(tokens[0], skip_special_tokens=True)
    except rawfiles.RawFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's model can fail in many ways; name it and the image
        raise rawfiles.RawFileError(path, "caption", f"captioning with {folder} failed: "
                                    f"{type(exc).__name__}: {exc}") from exc


def resolve_query(query: str, caption: str | None, caption_model: str) -> Query:
    """The query a command line asks for (see the module docstring)."""
    if caption is not None:
        if not caption.strip():
            raise ValueError("--caption is empty")
        return Query(f"caption of {query}" if query else "caption", text=caption.strip())
    path = Path(query)
    if not path.is_file():
        if not query.strip():
            raise ValueError("the query is empty")
        return Query("text", text=query.strip())
    suffix = path.suffix.lower()
    if suffix in rawfiles.IMAGE_EXTENSIONS:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file() and sidecar.read_text(encoding="utf-8").strip():
            return Query(f"caption of {path} ({sidecar})", text=sidecar.read_text(encoding="utf-8").strip())
        return Query(f"caption of {path} (CAPTION_MODEL)", text=caption_image(path, caption_model))
    kind = rawfiles.kind_of(path)  # raises with the reason for audio and unknown types
    if kind == "text":
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"{path}: the query file is empty")
        return Query(f"text of {path}", text=text)
    return Query(f"music file {path}", path=path)


def query_vector(embedder: Embedder, query: Query) -> tuple[np.ndarray, str | None]:
    """The query's global feature ``(D,)`` and, for a music file, its content hash (left out of the results)."""
    if query.text is not None:
        return embedder.embed_texts([query.text])[0], None
    result = embedder.embed_files([query.path], drops=DropLog("query"))[0]
    if isinstance(result, rawfiles.RawFileError):
        raise result
    return result.feature[0], result.sha256
