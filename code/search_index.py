"""A persistent, incremental search index of CLaMP 3 global feature vectors for one folder of files.

The index answers text→music and music→music queries by cosine similarity against every indexed
file, and keeps itself up to date with the folder without embedding unchanged files again. It knows
nothing of models or file formats: the caller gives it file facts (size, mtime, content hash) and,
for the files it asks about, vectors and a kind (``SearchIndex.update``'s ``embed`` callable).

**On disk** (a folder, written only by this module)::

    manifest.json            format version, model_key, dimension, root, counts, times, and the
                             names of the two files below (the manifest is the index: a file it
                             does not name is not part of it)
    vectors-<gen>-<id>.npy   float32 (rows × D), L2-normalised: one row per distinct content
    entries-<gen>-<id>.jsonl one line per indexed file: path (POSIX, relative to the root), sha256,
                             size, mtime_ns, kind, row (version 1 called the kind "format";
                             such an index is still read, and its next write is version 2)

**Crash safety.** An update writes new vectors and entries files under new names (each atomically:
temporary file, fsync, rename), then the manifest that names them (atomically), and only then
deletes the files no manifest names. A crash at any point leaves the previous manifest and the files
it names intact; leftovers are removed by the next update. A reader that finds a named file already
deleted (an update finished between its reading the manifest and the file) reads the manifest again.
Updates take an exclusive lock (``.lock``) and refuse to write over an index that changed since it
was opened (``IndexChangedError``).

**Rows and duplicates.** Files with identical content (same sha256) share one row: the content is
embedded once, and a search returns it as one hit whose ``duplicates`` lists the other paths
(``dedupe=False``: one hit per path). Identical bytes are assumed to give the same vector whatever
the file is called (the extraction cache is keyed by content too); a new or renamed file whose
content is already indexed under the same file extension reuses that row without embedding.

**Models.** ``model_key`` names everything that decides the vectors (model, adapter, settings). An
index built with another key is refused (``ModelKeyMismatchError``) unless opened with
``rebuild=True``, which starts an empty index (the old one stays readable until the first write).

**Search** is brute force and exact: rows are scored in chunks with one float32 matmul each
(``torch``, using the caller's ``torch.set_num_threads``), the best k per chunk kept with
``torch.topk`` plus every row tied with the k-th, and the survivors ordered by (score descending,
path). See bench/bench_search.py for timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch
from fileio import atomic_write, atomic_write_text, file_sha256

try:  # POSIX advisory locks; elsewhere updates are not protected against a concurrent writer.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT_NAME = "clamp3-search-index"
FORMAT_VERSION = 2
# The versions this code reads, with the entries' name of the kind field (version 1 called it "format").
KIND_FIELD = {1: "format", 2: "kind"}
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
# Rows scored per matmul. Measured on 2 cores with D = 768: 128k-256k rows per chunk are equally fast
# for one query and 256k a little faster for 16; 32k chunks are 1.3-1.4 times slower (per-call
# overhead). Larger chunks only grow the (queries × chunk) score buffer, bounded below anyway.
DEFAULT_CHUNK_ROWS = 262144
# Rows gathered or written at a time when an update copies the kept rows: bounds the extra memory.
_COPY_ROWS = 65536


class SearchIndexError(RuntimeError):
    """A search index that cannot be opened, read or written as asked."""


class ModelKeyMismatchError(SearchIndexError):
    """The index on disk was built with another model (or adapter, or settings)."""


class IndexCorruptError(SearchIndexError):
    """The index files disagree with each other or with the format."""


class IndexChangedError(SearchIndexError):
    """Another process updated the index since this one opened it (or planned the update)."""


class IndexBusyError(SearchIndexError):
    """Another process is writing the index right now."""


@dataclass(frozen=True)
class FileFacts:
    """What the caller knows about one file of the folder. ``sha256`` may be a callable returning the
    hex digest, so a file whose size and mtime are unchanged is never read."""

    size: int
    mtime_ns: int
    sha256: str | Callable[[], str]

    def digest(self) -> str:
        value = self.sha256() if callable(self.sha256) else self.sha256
        if not isinstance(value, str) or len(value) != 64:
            raise ValueError(f"sha256 must be a 64-character hex digest, got {value!r}")
        return value


@dataclass(frozen=True)
class IndexEntry:
    """One indexed file: its path relative to the root (POSIX), content hash, stat facts, kind
    (a free string chosen by the caller, e.g. the raw-file kind ``"abc"`` or ``"midi"``) and its row
    of the vectors."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    kind: str
    row: int


@dataclass(frozen=True)
class Hit:
    """One search result. ``duplicates``: the other indexed paths with identical content (folded into
    this hit when searching with ``dedupe=True``), in path order."""

    rank: int
    score: float
    path: str
    sha256: str
    kind: str
    duplicates: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        row = asdict(self)
        row["duplicates"] = list(self.duplicates)
        return row


@dataclass
class UpdatePlan:
    """What ``SearchIndex.apply`` will do: ``to_embed`` needs vectors from the caller; the rest is
    decided. Made by ``SearchIndex.plan`` for one state of the index (``base_generation``)."""

    base_generation: int
    to_embed: list[str]
    keep: dict[str, IndexEntry]
    facts: dict[str, tuple[int, int, str]]
    added: list[str]
    updated: list[str]
    removed: list[str]
    unchanged: list[str]
    reused: list[str]
    skipped_failed: list[str]
    failures: dict[str, dict]
    index_token: str = ""


@dataclass
class UpdateSummary:
    """The result of an update, each list in path order. ``added``/``updated`` are the new and changed
    files now indexed (``reused``: those of them whose content was already indexed, so not embedded);
    ``failed``: files the embedder could not embed, with the reason (left out of the index, and not
    tried again while unchanged unless ``retry_failed``); ``skipped_failed``: such files from earlier
    updates; ``written``: whether anything changed on disk."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    embedded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_failed: list[str] = field(default_factory=list)
    written: bool = False

    def line(self) -> str:
        """One line for a command's output."""
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
                f"{len(self.unchanged)} unchanged, {len(self.embedded)} embedded, {len(self.reused)} reused, "
                f"{len(self.failed)} failed" + (f", {len(self.skipped_failed)} skipped (failed before)"
                                                 if self.skipped_failed else ""))

    def to_dict(self) -> dict:
        return asdict(self)


EmbedResult = tuple[str, Any, str]
"""What an embedder returns for one file: ``(sha256 of the content embedded, vector (D,), kind)``."""


def wait_for_writer(folder: str | os.PathLike, timeout_s: float = 600.0, poll_s: float = 0.2) -> bool:
    """Wait until no process holds the update lock of the index in ``folder``: True once free (or
    when there is no lock), False after ``timeout_s``. Readers never need it; a second writer does."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return True
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(poll_s)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True


def normalise_relpath(path: str | os.PathLike) -> str:
    """A path relative to the indexed root as the index stores it: POSIX, no ``.``/``..``, not absolute."""
    text = os.fspath(path).replace(os.sep, "/") if os.sep != "/" else os.fspath(path)
    if all(part not in ("", ".", "..") for part in text.split("/")):
        return text  # already normal: the common case, without the cost of a PurePosixPath
    pure = PurePosixPath(text)
    if pure.is_absolute() or not pure.parts or ".." in pure.parts:
        raise ValueError(f"not a path relative to the indexed root: {text!r}")
    return pure.as_posix()


def file_facts(root: str | os.PathLike, relpaths: Iterable[str | os.PathLike]) -> dict[str, FileFacts]:
    """``FileFacts`` of files under ``root`` (e.g. ``fileio.find_files(root, extensions)``), with a lazy
    sha256: ``SearchIndex.plan`` reads a file only when its size or mtime differs from the index."""
    root = Path(root)
    facts = {}
    for relative in relpaths:
        key = normalise_relpath(relative)
        full = root / key
        stat = full.stat()
        facts[key] = FileFacts(stat.st_size, stat.st_mtime_ns, lambda full=full: file_sha256(full))
    return facts


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _as_facts(value: FileFacts | Sequence) -> FileFacts:
    if isinstance(value, FileFacts):
        return value
    size, mtime_ns, sha = value
    return FileFacts(int(size), int(mtime_ns), sha)


def _suffix(path: str) -> str:
    """The file extension, lower-cased (``""`` for none or a hidden file), without a path object."""
    name = path.rpartition("/")[2]
    stem, dot, extension = name.rpartition(".")
    return "." + extension.lower() if dot and stem.strip(".") and extension else ""


def _unit_rows(vectors: np.ndarray, what: str) -> np.ndarray:
    """float32 rows scaled to unit length; a non-finite or zero row is an error (it has no direction)."""
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {rows.shape}")
    # float32 sums: accurate to ~1e-7 for D = 768, and no float64 copy of a large block.
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(bad)[0])} is zero or not finite")
    return (rows / norms).astype(np.float32)


def _write_npy_rows(f: IO[bytes], parts: Iterable[np.ndarray], n_rows: int, dimension: int) -> None:
    """A float32 ``(n_rows, dimension)`` .npy file written part by part, so copying a large index
    never holds a second full matrix in memory."""
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                             "shape": (n_rows, dimension)})
    written = 0
    for part in parts:
        part = np.ascontiguousarray(part, dtype="<f4")
        f.write(memoryview(part).cast("B"))
        written += part.shape[0]
    if written != n_rows:
        raise AssertionError(f"wrote {written} rows, announced {n_rows}")


def _entries_text(entries: Sequence[IndexEntry]) -> str:
    # ensure_ascii: a file name that is not valid UTF-8 (lone surrogates from os.fsdecode) survives
    # as a JSON escape instead of failing the write.
    return "".join(json.dumps({"path": e.path, "sha256": e.sha256, "size": e.size, "mtime_ns": e.mtime_ns,
                               "kind": e.kind, "row": e.row}) + "\n" for e in entries)


def _parse_entries(path: Path, kind_field: str = KIND_FIELD[FORMAT_VERSION]) -> list[IndexEntry]:
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    try:  # one json.loads of the whole file is several times faster than one per line
        rows = json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError as exc:
        raise IndexCorruptError(f"{path}: not valid JSONL ({exc.msg})") from exc
    try:
        return [IndexEntry(r["path"], r["sha256"], int(r["size"]), int(r["mtime_ns"]), r[kind_field], int(r["row"]))
                for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexCorruptError(f"{path}: an entry lacks a field or has a wrong type ({exc})") from exc


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of the index in ``folder`` (``None`` if there is none), checked for its format."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") not in tuple(KIND_FIELD):  # a tuple: no hashing of a bad value
        raise IndexCorruptError(f"{path}: format version {manifest.get('format_version')}, this code reads "
                                f"{' and '.join(map(str, KIND_FIELD))}; rebuild the index")
    return manifest


def _load_vectors(folder: Path, manifest: dict, preload: bool) -> np.ndarray:
    """The vectors file the manifest names, mapped (or read, with ``preload``) and checked against it."""
    dimension = manifest.get("dimension")
    n_rows = int(manifest["counts"]["vectors"])
    if manifest.get("vectors_file"):
        path = folder / manifest["vectors_file"]
        try:
            # "c" (copy-on-write): pages are shared with the page cache like "r", but the array is
            # writable, which torch.from_numpy wants. Nothing ever writes to it.
            vectors = np.load(path, mmap_mode=None if preload else "c", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"{path}: cannot be read as .npy ({exc})") from exc
    else:
        vectors = np.zeros((0, dimension or 0), dtype=np.float32)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != n_rows or (
            n_rows and vectors.shape[1] != dimension):
        raise IndexCorruptError(f"{folder}: vectors of shape {vectors.shape} ({vectors.dtype}), manifest "
                                f"says {n_rows} × {dimension} float32")
    return vectors


# Chosen so that tests can make a write fail between the data files and the manifest.
def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


class SearchIndex:
    """The index of one folder for one ``model_key``; see the module docstring.

    Open with ``SearchIndex.open`` (or bulk-write with ``SearchIndex.build``), keep it current with
    ``update`` (or ``plan`` + ``apply``), query with ``search``. Thread-safe for concurrent searches,
    not for a search during an update of the same object.
    """

    def __init__(self, folder: Path, manifest: dict, entries: list[IndexEntry], vectors: np.ndarray):
        self.folder = folder
        self._manifest = manifest
        self._entries = entries  # sorted by path
        self._vectors = vectors  # (rows, D) float32, unit rows; usually a copy-on-write memory map
        self._matrix = torch.from_numpy(vectors) if vectors.size else torch.zeros(vectors.shape)
        self._token = secrets.token_hex(8)
        # What the folder holds now: the generation this object was read at (an update refuses to
        # write over a newer one), and whether it holds this object's version at all (False for a new
        # or rebuilding index, which the first update must write even if it adds nothing).
        self._disk_generation = int(manifest["generation"])
        self._on_disk = manifest.get("updated") is not None
        self._disk_root = manifest.get("root")
        self._reset_caches()

    # ----- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | os.PathLike, model_key: str, *, root: str | os.PathLike | None = None,
             create: bool = True, rebuild: bool = False, preload: bool = False) -> SearchIndex:
        """The index in ``folder`` for ``model_key``. Missing: an empty one (written by the first
        update) if ``create``, else ``FileNotFoundError``. Built with another key: ``ModelKeyMismatchError``
        unless ``rebuild`` (then an empty index that replaces it on the first update). ``root``, if
        given, is recorded as the indexed folder at the next write. ``preload`` reads the vectors
        into memory instead of mapping them (the map is faster to open; the first search pages it in)."""
        folder = Path(folder)
        for attempt in range(3):
            manifest = read_manifest(folder)
            if manifest is None:
                if not create:
                    raise FileNotFoundError(f"no search index in {folder}")
                return cls._empty(folder, model_key, root, generation=0, created=None)
            if manifest.get("model_key") != model_key:
                if rebuild:
                    return cls._empty(folder, model_key, root, generation=int(manifest["generation"]),
                                      created=None)
                raise ModelKeyMismatchError(
                    f"the search index in {folder} was built with model_key {manifest.get('model_key')!r}, "
                    f"not {model_key!r} (another model, adapter or setting): its vectors cannot be compared "
                    "with this model's. Rebuild it (rebuild=True / --rebuild) or use another index folder.")
            try:
                index = cls._read(folder, manifest, preload)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                continue  # an update replaced the files between our reading the manifest and them
            if root is not None:
                index._manifest["root"] = str(root)
            return index
        raise AssertionError("unreachable")

    @classmethod
    def _empty(cls, folder: Path, model_key: str, root: str | os.PathLike | None, generation: int,
               created: str | None) -> SearchIndex:
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_key": model_key,
                    "dimension": None, "root": None if root is None else str(root), "generation": generation,
                    "vectors_file": None, "entries_file": None, "vector_dtype": "float32",
                    "counts": {"files": 0, "vectors": 0, "failures": 0}, "failures": [],
                    "created": created, "updated": None}
        return cls(folder, manifest, [], np.zeros((0, 0), dtype=np.float32))

    @classmethod
    def _read(cls, folder: Path, manifest: dict, preload: bool) -> SearchIndex:
        vectors = _load_vectors(folder, manifest, preload)
        n_rows = vectors.shape[0]
        entries = (_parse_entries(folder / manifest["entries_file"], KIND_FIELD[manifest["format_version"]])
                   if manifest.get("entries_file") else [])
        if len(entries) != int(manifest["counts"]["files"]):
            raise IndexCorruptError(f"{folder}: {len(entries)} entries, manifest says {manifest['counts']['files']}")
        if any(not 0 <= e.row < n_rows for e in entries):
            raise IndexCorruptError(f"{folder}: an entry points outside the {n_rows} vectors")
        return cls(folder, manifest, entries, vectors)

    @classmethod
    def build(cls, folder: str | os.PathLike, model_key: str, root: str | os.PathLike | None,
              files: Sequence[IndexEntry | Mapping[str, Any]], vectors: np.ndarray,
              replace_existing: bool = False) -> SearchIndex:
        """Bulk build: write an index of ``files`` at once, ``vectors[i]`` being the vector of ``files[i]``
        (their ``row`` field, if any, is ignored). For large synthetic or precomputed sets (the
        benchmark), where planning file by file is not needed. Files sharing a sha256 keep the first
        one's vector. An existing index is replaced only with ``replace_existing``."""
        folder = Path(folder)
        existing = read_manifest(folder)
        if existing is not None and not replace_existing:
            raise SearchIndexError(f"{folder} already holds a search index (pass replace_existing=True)")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(files):
            raise ValueError(f"{len(files)} files but vectors of shape {vectors.shape}")
        first_row: dict[str, int] = {}
        source_rows: list[int] = []
        entries = []
        seen_paths = set()
        for i, item in enumerate(files):
            get = item.__getitem__ if isinstance(item, Mapping) else lambda name, item=item: getattr(item, name)
            path, sha = normalise_relpath(get("path")), get("sha256")
            if path in seen_paths:
                raise ValueError(f"{path} is given twice")
            seen_paths.add(path)
            row = first_row.get(sha)
            if row is None:
                row = first_row[sha] = len(source_rows)
                source_rows.append(i)
            entries.append(IndexEntry(path, sha, int(get("size")), int(get("mtime_ns")), str(get("kind")), row))
        entries.sort(key=lambda e: e.path)
        index = cls._empty(folder, model_key, root, generation=int(existing["generation"]) if existing else 0,
                           created=None)
        sources = np.asarray(source_rows, dtype=np.int64)

        def parts() -> Iterator[np.ndarray]:
            for start in range(0, len(sources), _COPY_ROWS):
                chunk = sources[start:start + _COPY_ROWS]
                yield _unit_rows(vectors[chunk], f"vectors[{start}:]")

        index._commit(entries, (len(sources), int(vectors.shape[1]), parts), failures={}, check_disk=False)
        return index

    # ----- facts -----------------------------------------------------------------------------------

    @property
    def model_key(self) -> str:
        return self._manifest["model_key"]

    @property
    def dimension(self) -> int | None:
        return self._manifest["dimension"]

    @property
    def root(self) -> str | None:
        return self._manifest["root"]

    @property
    def generation(self) -> int:
        return int(self._manifest["generation"])

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))

    @property
    def entries(self) -> list[IndexEntry]:
        """Every indexed file, in path order."""
        return list(self._entries)

    @property
    def n_vectors(self) -> int:
        """Distinct contents (rows of the vector matrix)."""
        return int(self._vectors.shape[0])

    @property
    def failures(self) -> dict[str, dict]:
        """Files left out because they could not be embedded: path -> {sha256, size, mtime_ns, reason}."""
        return {f["path"]: dict(f) for f in self._manifest.get("failures", [])}

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, path: str | os.PathLike) -> IndexEntry | None:
        return self._by_path().get(normalise_relpath(path))

    def vector(self, path: str | os.PathLike) -> np.ndarray | None:
        """The stored (unit) vector of an indexed file: a music→music query on an indexed file needs
        no embedding."""
        entry = self.entry(path)
        return None if entry is None else np.array(self._vectors[entry.row])

    def vector_for_sha256(self, sha256: str) -> np.ndarray | None:
        row = self._row_of_sha().get(sha256)
        return None if row is None else np.array(self._vectors[row])

    # ----- caches (derived from entries; rebuilt after every commit) --------------------------------

    def _reset_caches(self) -> None:
        self._cache: dict[str, Any] = {}

    def _by_path(self) -> dict[str, IndexEntry]:
        if "by_path" not in self._cache:
            self._cache["by_path"] = {e.path: e for e in self._entries}
        return self._cache["by_path"]

    def _row_of_sha(self) -> dict[str, int]:
        if "row_of_sha" not in self._cache:
            self._cache["row_of_sha"] = {e.sha256: e.row for e in self._entries}
        return self._cache["row_of_sha"]

    def _row_members(self) -> tuple[np.ndarray, np.ndarray]:
        """Entry indices grouped by row (each group in path order) and each row's start in them."""
        if "members" not in self._cache:
            rows = np.fromiter((e.row for e in self._entries), dtype=np.int64, count=len(self._entries))
            order = np.argsort(rows, kind="stable")  # entries are in path order, so groups are too
            starts = np.searchsorted(rows[order], np.arange(self.n_vectors + 1))
            self._cache["members"] = (order, starts)
        return self._cache["members"]

    def _kind_mask(self, kinds: frozenset[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Rows with at least one file of these kinds, and which entries have them."""
        key = ("kinds", kinds)
        if key not in self._cache:
            wanted = np.fromiter((e.kind in kinds for e in self._entries), dtype=bool, count=len(self._entries))
            rows = np.zeros(self.n_vectors, dtype=bool)
            rows[np.fromiter((e.row for e in self._entries), dtype=np.int64, count=len(self._entries))[wanted]] = True
            self._cache[key] = (torch.from_numpy(rows), wanted)
        return self._cache[key]

    # ----- updating --------------------------------------------------------------------------------

    def plan(self, files: Mapping[str | os.PathLike, FileFacts | Sequence], *,
             retry_failed: bool = False) -> UpdatePlan:
        """Compare the folder's files (relative path -> ``FileFacts`` or ``(size, mtime_ns, sha256 or a
        callable giving it)``) with the index. A file is unchanged if its size and mtime are, or else
        if its sha256 is (the sha is computed only then); a new or changed file whose content is
        indexed under the same extension reuses that row; the others are ``to_embed``; indexed files
        not in ``files`` are removed. Files that failed before and are unchanged are skipped unless
        ``retry_failed``."""
        facts = {normalise_relpath(p): _as_facts(f) for p, f in files.items()}
        current = self._by_path()
        old_failures = self.failures
        donors: dict[tuple[str, str], IndexEntry] = {}
        for e in self._entries:
            donors.setdefault((e.sha256, _suffix(e.path)), e)
        plan = UpdatePlan(base_generation=self.generation, to_embed=[], keep={}, facts={}, added=[], updated=[],
                          removed=[], unchanged=[], reused=[], skipped_failed=[], failures={},
                          index_token=self._token)
        for path in sorted(facts):
            fact = facts[path]
            old = current.get(path)
            if old is not None and old.size == fact.size and old.mtime_ns == fact.mtime_ns:
                plan.keep[path] = old
                plan.unchanged.append(path)
                continue
            failure = old_failures.get(path) if old is None else None
            if failure is not None and not retry_failed and failure["size"] == fact.size \
                    and failure["mtime_ns"] == fact.mtime_ns:
                plan.skipped_failed.append(path)
                plan.failures[path] = failure
                continue
            sha = fact.digest()
            plan.facts[path] = (fact.size, fact.mtime_ns, sha)
            if old is not None and old.sha256 == sha:
                plan.keep[path] = replace(old, size=fact.size, mtime_ns=fact.mtime_ns)  # touched, not changed
                plan.unchanged.append(path)
                continue
            if failure is not None and not retry_failed and failure["sha256"] == sha:
                plan.skipped_failed.append(path)
                plan.failures[path] = {**failure, "size": fact.size, "mtime_ns": fact.mtime_ns}
                continue
            (plan.added if old is None else plan.updated).append(path)
            donor = donors.get((sha, _suffix(path)))
            if donor is not None:
                plan.keep[path] = IndexEntry(path, sha, fact.size, fact.mtime_ns, donor.kind, donor.row)
                plan.reused.append(path)
            else:
                plan.to_embed.append(path)
        plan.removed = sorted(set(current) - set(facts))
        return plan

    def apply(self, plan: UpdatePlan, results: Mapping[str, EmbedResult | BaseException]) -> UpdateSummary:
        """Write the index ``plan`` describes, with ``results[path] = (sha256, vector, kind)`` for the
        files of ``plan.to_embed`` (or an exception: the file is reported as failed and left out; a
        missing result counts as a failure too). Writes nothing if nothing changed."""
        if plan.index_token != self._token or plan.base_generation != self.generation:
            raise IndexChangedError("this plan was made for another state of the index; plan again")
        summary = UpdateSummary(added=list(plan.added), updated=list(plan.updated), removed=list(plan.removed),
                                unchanged=list(plan.unchanged), reused=list(plan.reused),
                                skipped_failed=list(plan.skipped_failed))
        entries = dict(plan.keep)
        failures = dict(plan.failures)
        dimension = self.dimension
        row_of_sha = self._row_of_sha()
        new_rows: dict[str, np.ndarray] = {}  # sha -> unit vector, in order of first use
        pending: dict[str, tuple[str, int, int, str]] = {}
        for path in plan.to_embed:
            size, mtime_ns, planned_sha = plan.facts[path]
            result = results.get(path)
            try:
                if result is None:
                    raise SearchIndexError("the embedder returned no result for this file")
                if isinstance(result, BaseException):
                    raise result
                sha, vector, kind = result
                vector = np.asarray(vector, dtype=np.float32)
                if vector.ndim == 2 and vector.shape[0] == 1:
                    vector = vector[0]  # a (1, D) global feature as extraction saves it
                if vector.ndim != 1 or (dimension is not None and vector.shape[0] != dimension):
                    raise ValueError(f"vector of shape {vector.shape}, the index has dimension {dimension}")
                square = float(np.dot(vector, vector))  # per file: one small check, no array temporaries
                if not np.isfinite(square) or square == 0:
                    raise ValueError("the vector is zero or not finite")
                unit = vector / np.float32(np.sqrt(square))
            except Exception as exc:  # noqa: BLE001 - every failure is reported per file, the rest go on
                reason = str(exc) if isinstance(exc, SearchIndexError) else f"{type(exc).__name__}: {exc}"
                summary.failed[path] = reason
                failures[path] = {"path": path, "sha256": planned_sha, "size": size, "mtime_ns": mtime_ns,
                                  "reason": reason}
                continue
            dimension = int(unit.shape[0])
            summary.embedded.append(path)
            if sha not in row_of_sha and sha not in new_rows:
                new_rows[sha] = unit
            pending[path] = (sha, size, mtime_ns, str(kind))
        summary.added = [p for p in summary.added if p not in summary.failed]
        summary.updated = [p for p in summary.updated if p not in summary.failed]

        # Compact: keep the old rows some entry still uses (in their order), then the new ones.
        used_old = sorted({e.row for e in entries.values()} | {row_of_sha[s] for s, *_ in pending.values()
                                                               if s in row_of_sha})
        remap = {old: new for new, old in enumerate(used_old)}
        new_row_of_sha = {sha: len(used_old) + i for i, sha in enumerate(new_rows)}
        final = []
        for path in sorted(set(entries) | set(pending)):
            if path in entries:
                final.append(replace(entries[path], row=remap[entries[path].row]))
            else:
                sha, size, mtime_ns, kind = pending[path]
                row = remap[row_of_sha[sha]] if sha in row_of_sha else new_row_of_sha[sha]
                final.append(IndexEntry(path, sha, size, mtime_ns, kind, row))

        vectors_same = not new_rows and len(used_old) == self.n_vectors
        vectors_plan = None
        if not vectors_same:
            old_rows = np.asarray(used_old, dtype=np.int64)
            fresh = np.stack(list(new_rows.values())) if new_rows else None

            def parts() -> Iterator[np.ndarray]:
                for start in range(0, len(old_rows), _COPY_ROWS):
                    yield self._vectors[old_rows[start:start + _COPY_ROWS]]
                if fresh is not None:
                    yield fresh

            vectors_plan = (len(used_old) + len(new_rows), dimension, parts)
        if (self._on_disk and vectors_same and final == self._entries and failures == self.failures
                and self._manifest.get("root") == self._disk_root):
            return summary
        self._commit(final, vectors_plan, failures)
        summary.written = True
        return summary

    def update(self, files: Mapping[str | os.PathLike, FileFacts | Sequence],
               embed: Callable[[list[str]], Mapping[str, EmbedResult | BaseException]], *,
               batch_size: int | None = None, retry_failed: bool = False,
               progress: Callable[[int, int], None] | None = None) -> UpdateSummary:
        """``plan`` + ``embed`` + ``apply`` in one call. ``embed(paths)`` gets the relative paths that need
        vectors (``batch_size`` at a time, all at once by default) and returns, per path, ``(sha256,
        vector, kind)`` or an exception for a file it could not embed. An exception *raised* by
        ``embed`` aborts the update and writes nothing (a broken model is not a broken file).
        ``progress(done, total)`` is called before the first batch and after each."""
        plan = self.plan(files, retry_failed=retry_failed)
        results: dict[str, EmbedResult | BaseException] = {}
        todo = plan.to_embed
        step = batch_size or max(len(todo), 1)
        if progress is not None and todo:
            progress(0, len(todo))  # before the first batch: a long first update is not silent
        for start in range(0, len(todo), step):
            batch = todo[start:start + step]
            answer = embed(list(batch))
            results.update({normalise_relpath(p): r for p, r in answer.items()})
            if progress is not None:
                progress(min(start + step, len(todo)), len(todo))
        return self.apply(plan, results)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_NAME, "a") as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise IndexBusyError(f"another process is updating the search index in {self.folder}") from exc
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _commit(self, entries: list[IndexEntry], vectors_plan: tuple[int, int, Callable] | None,
                failures: Mapping[str, dict], check_disk: bool = True) -> None:
        """Write a new version: data files under new names, then the manifest naming them, then remove
        what no manifest names. ``vectors_plan``: ``(rows, dimension, parts)`` for new vectors, or None
        to keep the current file."""
        with self._lock():
            on_disk = read_manifest(self.folder)
            disk_generation = int(on_disk["generation"]) if on_disk else 0
            if check_disk and disk_generation != self._disk_generation:
                raise IndexChangedError(f"the search index in {self.folder} was updated by another process "
                                        "since it was opened; open it again")
            generation = max(disk_generation, self.generation) + 1
            tag = f"{generation:06d}-{secrets.token_hex(4)}"
            # An index read at an older version is written at this one, entries file included.
            upgrade = self._manifest.get("format_version") != FORMAT_VERSION
            manifest = dict(self._manifest, format_version=FORMAT_VERSION)
            if vectors_plan is not None:
                n_rows, dimension, parts = vectors_plan
                name = f"vectors-{tag}.npy"
                atomic_write(self.folder / name, lambda f: _write_npy_rows(f, parts(), n_rows, dimension),
                             binary=True)
                manifest.update(vectors_file=name, dimension=dimension)
            else:
                n_rows = self.n_vectors
            if entries != self._entries or not manifest.get("entries_file") or upgrade:
                name = f"entries-{tag}.jsonl"
                atomic_write_text(self.folder / name, _entries_text(entries))
                manifest["entries_file"] = name
            now = _now()
            manifest.update(generation=generation, created=manifest.get("created") or now, updated=now,
                            counts={"files": len(entries), "vectors": n_rows, "failures": len(failures)},
                            failures=[failures[p] for p in sorted(failures)])
            _write_manifest(self.folder / MANIFEST_NAME, manifest)
            # The new version is in place; from here on, only this object's view and the cleanup.
            # The entries are already in memory: only the vectors are mapped again (from the new file).
            vectors = _load_vectors(self.folder, manifest, preload=False) if vectors_plan is not None else self._vectors
            self._manifest, self._entries, self._vectors = manifest, list(entries), vectors
            self._matrix = torch.from_numpy(vectors) if vectors.size else torch.zeros(vectors.shape)
            self._disk_generation, self._on_disk, self._disk_root = generation, True, manifest.get("root")
            self._reset_caches()
            self._remove_unreferenced(manifest)

    def _remove_unreferenced(self, manifest: dict) -> None:
        keep = {manifest.get("vectors_file"), manifest.get("entries_file")}
        for path in self.folder.iterdir():
            name = path.name
            ours = (name.startswith(("vectors-", "entries-", ".vectors-", ".entries-"))
                    and name.endswith((".npy", ".jsonl", ".tmp")))
            if ours and name not in keep:
                # A reader that has the old vectors mapped keeps them (POSIX unlink semantics).
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ----- searching -------------------------------------------------------------------------------

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10, *,
               exclude_sha256: str | Iterable[str] | None = None,
               exclude_per_query: Sequence[str | Iterable[str] | None] | None = None,
               dedupe: bool = True, kinds: Iterable[str] | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> list[list[Hit]]:
        """The ``k`` best files for each query (``(Q, D)``, or one ``(D,)`` vector: still a list of one
        list), by cosine similarity, best first, equal scores in path order. ``dedupe``: identical
        contents are one hit (``duplicates`` names the other paths). ``exclude_sha256``: contents left
        out of every query's results (a music→music query leaves out the query file, and its copies);
        ``exclude_per_query``: the same, one item per query. ``kinds``: only files of these kinds."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        matrix = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
        matrix = matrix.detach().to(dtype=torch.float32, device="cpu")
        if matrix.ndim == 1:
            matrix = matrix[None]
        n_queries = matrix.shape[0]
        if matrix.ndim != 2 or (self.dimension is not None and matrix.shape[1] != self.dimension):
            raise ValueError(f"queries of shape {tuple(matrix.shape)} do not match the index's dimension "
                             f"{self.dimension}")
        if exclude_per_query is not None and len(exclude_per_query) != n_queries:
            raise ValueError(f"{len(exclude_per_query)} exclude_per_query items for {n_queries} queries")
        if not len(self._entries) or not n_queries:
            return [[] for _ in range(n_queries)]
        units = torch.from_numpy(_unit_rows(matrix.numpy(), "queries"))

        def shas(item: str | Iterable[str] | None) -> set[str]:
            return set() if item is None else {item} if isinstance(item, str) else set(item)

        row_of_sha = self._row_of_sha() if exclude_sha256 is not None or exclude_per_query is not None else {}
        common = {row_of_sha[s] for s in shas(exclude_sha256) if s in row_of_sha}
        excluded = [common | ({row_of_sha[s] for s in shas(exclude_per_query[q]) if s in row_of_sha}
                              if exclude_per_query is not None else set()) for q in range(n_queries)]
        row_mask, entry_ok = (None, None)
        if kinds is not None:
            row_mask, entry_ok = self._kind_mask(frozenset(kinds))
        # Each row holds at least one allowed path, so k rows (plus the excluded) give k hits.
        k_rows = min(k + max(len(e) for e in excluded), self.n_vectors)
        candidates = _top_rows(self._matrix, units, k_rows, row_mask, chunk_rows)
        order, starts = self._row_members()
        results = []
        for q, (rows, scores) in enumerate(candidates):
            hits: list[tuple[float, str, IndexEntry, tuple[str, ...]]] = []
            for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
                if row in excluded[q]:
                    continue
                members = [self._entries[i] for i in order[starts[row]:starts[row + 1]]
                           if entry_ok is None or entry_ok[i]]
                paths = [m.path for m in members]
                if dedupe:
                    hits.append((score, paths[0], members[0], tuple(paths[1:])))
                else:
                    hits.extend((score, m.path, m, tuple(p for p in paths if p != m.path)) for m in members)
            hits.sort(key=lambda h: (-h[0], h[1]))
            results.append([Hit(rank, score, path, entry.sha256, entry.kind, duplicates)
                            for rank, (score, path, entry, duplicates) in enumerate(hits[:k], 1)])
        return results

    def search_one(self, query: np.ndarray | torch.Tensor, k: int = 10, **options: Any) -> list[Hit]:
        """``search`` for one ``(D,)`` query vector: its list of hits."""
        return self.search(np.asarray(query).reshape(1, -1) if not isinstance(query, torch.Tensor)
                           else query.reshape(1, -1), k, **options)[0]


def _top_rows(matrix: torch.Tensor, queries: torch.Tensor, k: int, row_mask: torch.Tensor | None,
              chunk_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the rows scoring at least the k-th best score (so every row tied with the k-th is
    in: the caller's final order by path is then exact), with their float32 scores. Rows outside
    ``row_mask`` never appear."""
    n_rows = matrix.shape[0]
    n_queries = queries.shape[0]
    found_rows: list[list[np.ndarray]] = [[] for _ in range(n_queries)]
    found_scores: list[list[np.ndarray]] = [[] for _ in range(n_queries)]
    # Bound the (queries × chunk) score buffer at 128 MB for large query batches.
    chunk_rows = max(1, min(chunk_rows, max(8192, (1 << 25) // max(n_queries, 1))))
    queries_t = queries.T.contiguous()
    with torch.no_grad():
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            # (chunk × D) @ (D × Q), then transposed: measured faster than queries @ chunk.T for
            # batches of queries (the same for one), see bench/bench_search.py.
            sims = (matrix[start:stop] @ queries_t).T.contiguous()  # (Q, chunk)
            if row_mask is not None:
                sims.masked_fill_(~row_mask[start:stop], float("-inf"))
            width = stop - start
            kk = min(k + 1, width)
            values, indices = torch.topk(sims, kk, dim=1, sorted=True)
            values_np, indices_np = values.numpy(), indices.numpy()
            # topk breaks ties arbitrarily. Only when the (k+1)-th best equals the k-th can a tie
            # cross the cut; then (rarely) take every row of the chunk reaching the k-th score.
            tied = ((values_np[:, k] == values_np[:, k - 1]) & np.isfinite(values_np[:, k - 1])
                    if kk > k else np.zeros(n_queries, dtype=bool))
            for q in range(n_queries):
                if tied[q]:
                    where = torch.nonzero(sims[q] >= values[q, k - 1], as_tuple=True)[0]
                    rows_q, scores_q = where.numpy(), sims[q, where].numpy()
                else:
                    rows_q, scores_q = indices_np[q, :k], values_np[q, :k]
                finite = np.isfinite(scores_q)
                found_rows[q].append(rows_q[finite].astype(np.int64) + start)
                found_scores[q].append(scores_q[finite].astype(np.float32))
    out = []
    for q in range(n_queries):
        rows = np.concatenate(found_rows[q]) if found_rows[q] else np.zeros(0, np.int64)
        scores = np.concatenate(found_scores[q]) if found_scores[q] else np.zeros(0, np.float32)
        order = np.lexsort((rows, -scores))
        rows, scores = rows[order], scores[order]
        if len(scores) > k:
            keep = scores >= scores[k - 1]
            rows, scores = rows[keep], scores[keep]
        out.append((rows, scores))
    return out
