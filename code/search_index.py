"""A persistent, incremental search index of CLaMP 3 global feature vectors for one folder of files.

The index answers text→music and music→music queries by cosine similarity against every indexed
file, and keeps itself up to date with the folder without embedding unchanged files again. It knows
nothing of models or file formats: the caller gives it file facts (size, mtime, content hash) and,
for the files it asks about, vectors and a kind (``SearchIndex.update``'s ``embed`` callable).

**Engines.** The file table lives in SQLite (``index.sqlite``, write-ahead log), the approximate
index in FAISS; the vectors in append-only ``.npy`` segments the tables name. bench/README.md has
the measurements that chose this. On disk::

    index.sqlite               meta (format version, model_key, dimension, root, generation, times),
                               files (path, sha256, size, mtime_ns, kind), vectors (sha256 -> vid),
                               segments (which FAISS file holds which vids), dead (vids no file uses
                               any more), failures (files the embedder could not embed, and why)
    vectors-<first vid>-<id>.npy     unit float32 rows (N × D) of one segment: written once, never
                               changed, memory-mapped by readers
    ann-<id>.faiss             the optional approximate index (FAISS ``IndexIVFFlat`` over vids)

One vid per distinct content (sha256). An update writes its new vectors as one new segment and
changes the tables in one transaction, so a 1% update writes 1% of the vectors; the vectors of
files that went away stay in their segment as ``dead`` until a compaction (more than
``COMPACT_DEAD_FRACTION`` dead, or more than ``MAX_SEGMENTS`` segments) rewrites the live ones.

**Crash safety.** A writer takes SQLite's write lock, writes its segment (temporary file, fsync,
rename), then commits the tables that name it. A crash at any point leaves the last committed
version intact (SQLite's journal); files no version names are removed by the next writer.

**Concurrency.** A ``SearchIndex`` reads one committed version (a SQLite read transaction held for
its lifetime, its segments mapped at open): a writer never disturbs a reader. A second writer waits
for the lock (``wait_for_writer``); an update planned on a version another process has replaced is
refused (``IndexChangedError``) so that the caller plans again.

**Rows and duplicates.** Files with identical content (same sha256) share one vector: the content is
embedded once, and a search returns it as one hit whose ``duplicates`` lists the other paths
(``dedupe=False``: one hit per path). Identical bytes are assumed to give the same vector whatever
the file is called (the extraction cache is keyed by content too); a new or renamed file whose
content is already indexed under the same file extension reuses that vector without embedding.

**Models.** ``model_key`` names everything that decides the vectors (model, adapter, settings). An
index built with another key is refused (``ModelKeyMismatchError``) unless opened with
``rebuild=True``, which starts an empty index (the old one stays readable until the first write).

**Search** is exact by default: every live row of every segment scored in chunks with one float32
matrix product each (``torch``, on the segments' mapped rows without a copy: measured faster here
than FAISS's own flat scan, whose file format also leaves its rows unaligned; see bench/README.md), the best k per chunk kept with ``torch.topk`` plus
every row tied with the k-th, and the result ordered by (score descending, path). ``approximate=True`` searches the IVF index instead (``build_ann``), plus an
exact scan of the segments added after it was built. An index written by the earlier home-made
format (``manifest.json``, versions 1 and 2) is converted on first open.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import faiss
import numpy as np
import torch
from fileio import atomic_write, file_sha256

FORMAT_NAME = "clamp3-search-index"
FORMAT_VERSION = 3
DB_NAME = "index.sqlite"
LEGACY_MANIFEST = "manifest.json"
LEGACY_KIND_FIELD = {1: "format", 2: "kind"}
COMPACT_DEAD_FRACTION = 0.25
MAX_SEGMENTS = 32
BUSY_TIMEOUT_S = 600.0
_ADD_ROWS = 65536  # rows handed to FAISS at a time when copying a large set
DEFAULT_CHUNK_ROWS = 262144

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
                                  mtime_ns INTEGER NOT NULL, kind TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS files_kind ON files (kind);
CREATE TABLE IF NOT EXISTS vectors (sha256 TEXT PRIMARY KEY, vid INTEGER NOT NULL UNIQUE) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (first_vid INTEGER PRIMARY KEY, n_rows INTEGER NOT NULL, file TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dead (vid INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, sha256 TEXT, size INTEGER, mtime_ns INTEGER,
                                     reason TEXT);
"""


class SearchIndexError(RuntimeError):
    """A search index problem the user can act on (the message says how)."""


class ModelKeyMismatchError(SearchIndexError):
    """The index was built with another model key: its vectors cannot be compared with the query's."""


class IndexCorruptError(SearchIndexError):
    """The index on disk is not what its tables say."""


class IndexChangedError(SearchIndexError):
    """Another process wrote the index since this object read it."""


class IndexBusyError(SearchIndexError):
    """Another process held the index's write lock for longer than this one would wait."""


@dataclass(frozen=True, slots=True)
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
    (a free string chosen by the caller, e.g. the raw-file kind ``"abc"`` or ``"midi"``) and the id
    of its content's vector (``row``)."""

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
    decided. Made by ``SearchIndex.plan`` for one version of the index (``base_generation``).
    ``keep``: files whose row in the table changes without embedding (touched, or reusing indexed
    content), by path."""

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


# ---------------------------------------------------------------------------- small helpers
def normalise_relpath(path: str | os.PathLike) -> str:
    """A path relative to the indexed root as the index stores it: POSIX, no ``.``/``..``, not absolute."""
    text = os.fspath(path).replace(os.sep, "/") if os.sep != "/" else os.fspath(path)
    slashed = "/" + text
    if "/." not in slashed and "//" not in slashed and not text.endswith("/"):
        return text  # normal for sure (no empty, "." or ".." part, nothing hidden): the common case, fast
    if all(part not in ("", ".", "..") for part in text.split("/")):
        return text
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
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_faiss(index: faiss.Index, path: Path) -> None:
    """``index`` written to ``path`` atomically: a temporary name, fsync, rename."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        faiss.write_index(index, str(temporary))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _fsync_dir(path.parent)


def _write_segment(path: Path, parts: Iterable[np.ndarray], n_rows: int, dimension: int) -> None:
    """A float32 ``(n_rows, dimension)`` .npy written part by part (no second copy of a large set in
    memory), atomically: a temporary name, fsync, rename."""
    def write(handle: IO[bytes]) -> None:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (n_rows, dimension)})
        written = 0
        for part in parts:
            part = np.ascontiguousarray(part, dtype="<f4")
            handle.write(memoryview(part).cast("B"))
            written += part.shape[0]
        if written != n_rows:
            raise AssertionError(f"wrote {written} rows, announced {n_rows}")

    atomic_write(path, write, binary=True)
    _fsync_dir(path.parent)


def _read_segment(path: Path) -> np.ndarray:
    try:
        # Mapped copy-on-write: shared with the page cache like a read-only map, opening costs nothing,
        # and the array is writable as torch.from_numpy wants (nothing writes to it).
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"{path}: not a readable .npy file ({exc})") from exc


def _bitmap_selector(mask: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """A FAISS selector of the ids where ``mask`` is True, and the bitmap it points into (keep it alive
    as long as the selector)."""
    bits = np.packbits(mask.astype(bool), bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits


# ---------------------------------------------------------------------------- the database
def _connect(folder: Path) -> sqlite3.Connection:
    db = sqlite3.connect(folder / DB_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL: in WAL mode a commit survives any crash of the process (SIGKILL included) and the
    # database stays consistent on power loss (the last commits may be lost; a segment they named is
    # then an orphan the next writer removes); FULL's fsync per commit is not needed for that.
    db.execute("PRAGMA synchronous=NORMAL")
    # A 1% update of a million files touches pages all over the path and hash indexes: with SQLite's
    # default 2 MB page cache they are read again and again (measured 2.2 s of SQL at 1M, bench_search).
    db.execute("PRAGMA cache_size=-131072")  # KiB: 128 MiB at most, used only as pages are touched
    db.execute("PRAGMA mmap_size=4294967296")
    return db


def _read_meta(db: sqlite3.Connection) -> dict[str, Any]:
    try:
        return {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as exc:
        raise IndexCorruptError(f"the index database cannot be read ({exc})") from exc


def index_info(folder: str | os.PathLike) -> dict | None:
    """What the index in ``folder`` says of itself (format version, model_key, dimension, root,
    generation, counts, times), or ``None`` if there is none. Converts an index of the earlier format."""
    folder = Path(folder)
    meta = _read_meta_of(folder)
    if not meta and (folder / LEGACY_MANIFEST).exists():
        _convert_legacy(folder)
        meta = _read_meta_of(folder)
    return _checked_meta(folder, meta) if meta else None


def _read_meta_of(folder: Path) -> dict:
    if not (folder / DB_NAME).exists():
        return {}
    db = _connect(folder)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return _read_meta(db) if "meta" in tables else {}  # a first write that crashed left no tables
    except sqlite3.DatabaseError as exc:
        raise IndexCorruptError(f"{folder / DB_NAME}: cannot be read ({exc})") from exc
    finally:
        db.close()


def _checked_meta(folder: Path, meta: dict) -> dict:
    if meta.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"{folder / DB_NAME}: not a {FORMAT_NAME} database")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexCorruptError(f"{folder / DB_NAME}: format version {meta.get('format_version')}, this code "
                                f"reads {FORMAT_VERSION}; rebuild the index (--rebuild)")
    return meta


def wait_for_writer(folder: str | os.PathLike, timeout_s: float = 600.0, poll_s: float = 0.2) -> bool:
    """Wait until no process holds the write lock of the index in ``folder``: True once free (or when
    there is no index), False after ``timeout_s``. Readers never need it; a second writer does."""
    path = Path(folder) / DB_NAME
    if not path.exists():
        return True
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


@dataclass
class _Segment:
    first_vid: int
    n_rows: int
    file: str
    vectors: np.ndarray  # (n_rows, D) float32, mapped
    live: np.ndarray | None  # None: every row is live
    matrix: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = torch.from_numpy(self.vectors)  # the mapped rows themselves, no copy


class SearchIndex:
    """The index of one folder for one ``model_key``; see the module docstring.

    Open with ``SearchIndex.open`` (or bulk-write with ``SearchIndex.build``), keep it current with
    ``update`` (or ``plan`` + ``apply``), query with ``search``. Thread-safe for concurrent searches,
    not for a search during an update of the same object.
    """

    def __init__(self, folder: Path, model_key: str, root: str | None, db: sqlite3.Connection | None,
                 replace_on_write: bool, generation: int = 0):
        self.folder = folder
        self._model_key = model_key
        self._root = root
        self._db = db
        self._lock = threading.RLock()
        self._token = secrets.token_hex(8)
        # True for a new or rebuilding index: its first update writes (and replaces whatever is there)
        # even if it adds nothing.
        self._replace_on_write = replace_on_write
        self._empty_generation = generation  # of an empty view: the version on disk when it was opened
        self._load_view()

    # ----- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | os.PathLike, model_key: str, *, root: str | os.PathLike | None = None,
             create: bool = True, rebuild: bool = False) -> SearchIndex:
        """The index in ``folder`` for ``model_key``. Missing: an empty one (written by the first
        update) if ``create``, else ``FileNotFoundError``. Built with another key: ``ModelKeyMismatchError``
        unless ``rebuild`` (then an empty index that replaces it on the first update). ``root``, if
        given, is recorded as the indexed folder at the next write."""
        folder = Path(folder)
        info = index_info(folder)
        root_text = None if root is None else str(root)
        if info is None:
            if not create:
                raise FileNotFoundError(f"no search index in {folder}")
            return cls(folder, model_key, root_text, None, replace_on_write=True)
        if info.get("model_key") != model_key:
            if rebuild:
                return cls(folder, model_key, root_text, None, replace_on_write=True,
                           generation=int(info.get("generation", 0)))
            raise ModelKeyMismatchError(
                f"the search index in {folder} was built with model_key {info.get('model_key')!r}, "
                f"not {model_key!r} (another model, adapter or setting): its vectors cannot be compared "
                "with this model's. Rebuild it (rebuild=True / --rebuild) or use another index folder.")
        for attempt in range(3):
            try:
                return cls(folder, model_key, root_text, _connect(folder), replace_on_write=False)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # a compaction removed a segment between our reading the tables and mapping it
        raise AssertionError("unreachable")

    def _load_view(self) -> None:
        """Read one committed version: meta, segments (mapped) and dead rows; hold it (a read
        transaction) until the next write or ``refresh``."""
        self._cache: dict[Any, Any] = {}
        self._ann: faiss.Index | None = None
        if self._db is None:
            self._meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_key": self._model_key,
                          "dimension": None, "root": self._root, "generation": self._empty_generation, "next_vid": 0,
                          "counts": {"files": 0, "vectors": 0, "failures": 0}, "created": None, "updated": None}
            self._segments: list[_Segment] = []
            return
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            meta = _checked_meta(self.folder, _read_meta(self._db))
            if meta.get("model_key") != self._model_key:  # rebuilt by another process since index_info
                raise ModelKeyMismatchError(f"the search index in {self.folder} is now built with model_key "
                                            f"{meta.get('model_key')!r}, not {self._model_key!r}")
            dead = np.fromiter((v for (v,) in self._db.execute("SELECT vid FROM dead")), dtype=np.int64)
            segments = []
            for first_vid, n_rows, name in self._db.execute(
                    "SELECT first_vid, n_rows, file FROM segments ORDER BY first_vid"):
                vectors = _read_segment(self.folder / name)
                if vectors.dtype != np.float32 or vectors.shape != (n_rows, meta["dimension"]):
                    raise IndexCorruptError(f"{self.folder / name}: vectors of shape {vectors.shape} "
                                            f"({vectors.dtype}), the index says {n_rows} × {meta['dimension']} float32")
                inside = dead[(dead >= first_vid) & (dead < first_vid + n_rows)] - first_vid
                live = None
                if len(inside):
                    live = np.ones(n_rows, dtype=bool)
                    live[inside] = False
                segments.append(_Segment(first_vid, n_rows, name, vectors, live))
        self._meta, self._segments = meta, segments

    def refresh(self) -> bool:
        """Read the latest committed version if another process wrote one; True if it did."""
        if self._db is None:
            return False
        latest = index_info(self.folder)
        if latest is None or latest.get("generation") == self.generation:
            return False
        self._load_view()
        return True

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @classmethod
    def build(cls, folder: str | os.PathLike, model_key: str, root: str | os.PathLike | None,
              files: Sequence[IndexEntry | Mapping[str, Any]], vectors: np.ndarray,
              replace_existing: bool = False) -> SearchIndex:
        """Bulk build: write an index of ``files`` at once, ``vectors[i]`` being the vector of ``files[i]``
        (their ``row`` field, if any, is ignored). For large synthetic or precomputed sets (the
        benchmark), where planning file by file is not needed. Files sharing a sha256 keep the first
        one's vector. An existing index is replaced only with ``replace_existing``."""
        folder = Path(folder)
        if index_info(folder) is not None and not replace_existing:
            raise SearchIndexError(f"{folder} already holds a search index (pass replace_existing=True)")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(files):
            raise ValueError(f"{len(files)} files but vectors of shape {vectors.shape}")
        first_of: dict[str, int] = {}
        rows: list[tuple[str, str, int, int, str]] = []
        seen: set[str] = set()
        for i, item in enumerate(files):
            get = item.__getitem__ if isinstance(item, Mapping) else lambda name, item=item: getattr(item, name)
            path, sha = normalise_relpath(get("path")), str(get("sha256"))
            if path in seen:
                raise ValueError(f"{path} is given twice")
            seen.add(path)
            first_of.setdefault(sha, i)
            rows.append((path, sha, int(get("size")), int(get("mtime_ns")), str(get("kind"))))
        sources = np.fromiter(first_of.values(), dtype=np.int64, count=len(first_of))

        def parts() -> Iterator[np.ndarray]:
            for start in range(0, len(sources), _ADD_ROWS):
                yield _unit_rows(vectors[sources[start:start + _ADD_ROWS]], f"vectors[{start}:]")

        index = cls(folder, model_key, None if root is None else str(root), None, replace_on_write=True)
        index._write(upsert=rows, delete=[], new_shas=list(first_of), new_vectors=parts,
                     dimension=int(vectors.shape[1]), failures={}, check_generation=False)
        return index

    # ----- facts -----------------------------------------------------------------------------------

    @property
    def model_key(self) -> str:
        return self._model_key

    @property
    def dimension(self) -> int | None:
        return self._meta.get("dimension")

    @property
    def root(self) -> str | None:
        return self._root if self._root is not None else self._meta.get("root")

    @property
    def generation(self) -> int:
        return int(self._meta["generation"])

    @property
    def info(self) -> dict:
        """The index's own description (what ``index_info`` reads)."""
        return dict(self._meta)

    @property
    def n_vectors(self) -> int:
        """Distinct contents indexed (live vectors)."""
        return int(self._meta["counts"]["vectors"])

    def __len__(self) -> int:
        return int(self._meta["counts"]["files"])

    def _query(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
        if self._db is None:
            return []
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    @property
    def entries(self) -> list[IndexEntry]:
        """Every indexed file, in path order (read from the table when first asked)."""
        if "entries" not in self._cache:
            self._cache["entries"] = [IndexEntry(*row) for row in self._query(
                "SELECT f.path, f.sha256, f.size, f.mtime_ns, f.kind, v.vid FROM files f "
                "JOIN vectors v USING (sha256) ORDER BY f.path")]
        return self._cache["entries"]

    @property
    def failures(self) -> dict[str, dict]:
        """Files the embedder could not embed: path -> {path, sha256, size, mtime_ns, reason}."""
        if "failures" not in self._cache:
            self._cache["failures"] = {
                path: {"path": path, "sha256": sha, "size": size, "mtime_ns": mtime_ns, "reason": reason}
                for path, sha, size, mtime_ns, reason in self._query(
                    "SELECT path, sha256, size, mtime_ns, reason FROM failures ORDER BY path")}
        return self._cache["failures"]

    def entry(self, path: str | os.PathLike) -> IndexEntry | None:
        rows = self._query("SELECT f.path, f.sha256, f.size, f.mtime_ns, f.kind, v.vid FROM files f "
                           "JOIN vectors v USING (sha256) WHERE f.path = ?", (normalise_relpath(path),))
        return IndexEntry(*rows[0]) if rows else None

    def _vector_of_vid(self, vid: int) -> np.ndarray:
        starts = [s.first_vid for s in self._segments]
        segment = self._segments[bisect.bisect_right(starts, vid) - 1]
        with self._lock:
            return np.array(segment.vectors[vid - segment.first_vid], dtype=np.float32)

    def vector(self, path: str | os.PathLike) -> np.ndarray | None:
        """The stored (unit) vector of an indexed file: a music→music query on an indexed file needs
        no embedding."""
        entry = self.entry(path)
        return None if entry is None else self._vector_of_vid(entry.row)

    def vector_for_sha256(self, sha256: str) -> np.ndarray | None:
        vid = self._vids_of([sha256]).get(sha256)
        return None if vid is None else self._vector_of_vid(vid)

    def _vids_of(self, shas: Iterable[str]) -> dict[str, int]:
        shas = list(dict.fromkeys(shas))
        found: dict[str, int] = {}
        for start in range(0, len(shas), 900):  # SQLite's bound on parameters per statement
            chunk = shas[start:start + 900]
            found.update(self._query(f"SELECT sha256, vid FROM vectors WHERE sha256 IN ({','.join('?' * len(chunk))})",
                                     chunk))
        return found

    # ----- updating --------------------------------------------------------------------------------

    def plan(self, files: Mapping[str | os.PathLike, FileFacts | Sequence], *,
             retry_failed: bool = False) -> UpdatePlan:
        """Compare the folder's files (relative path -> ``FileFacts`` or ``(size, mtime_ns, sha256 or a
        callable giving it)``) with the index. A file is unchanged if its size and mtime are, or else
        if its sha256 is (the sha is computed only then); a new or changed file whose content is
        indexed under the same extension reuses that vector; the others are ``to_embed``; indexed
        files not in ``files`` are removed. Files that failed before and are unchanged are skipped
        unless ``retry_failed``."""
        # Size and mtime of every indexed file (a million rows read in about a second); hashes and
        # kinds only for the files whose size or mtime differ.
        current = {path: (size, mtime_ns) for path, size, mtime_ns in self._query(
            "SELECT path, size, mtime_ns FROM files")}
        old_failures = self.failures
        plan = UpdatePlan(base_generation=self.generation, to_embed=[], keep={}, facts={}, added=[], updated=[],
                          removed=[], unchanged=[], reused=[], skipped_failed=[], failures={},
                          index_token=self._token)
        candidates: list[str] = []
        unchanged = plan.unchanged
        differing = []
        facts: dict[str, FileFacts] = {}
        posix = os.sep == "/"
        indexed_stat = current.get
        # One pass over a million files: normalise_relpath's common case inlined, each file compared
        # as it comes; the lists sorted afterwards (linear for the sorted listing a folder walk gives).
        for path, fact in files.items():
            if not posix or type(path) is not str or not path or "/." in "/" + path or "//" in path \
                    or path.endswith("/"):
                path = normalise_relpath(path)
            if type(fact) is not FileFacts:
                fact = _as_facts(fact)
            facts[path] = fact
            old = indexed_stat(path)
            if old is not None and old[0] == fact.size and old[1] == fact.mtime_ns:
                unchanged.append(path)
            else:
                differing.append(path)
        unchanged.sort()
        differing.sort()
        indexed = self._rows_of_paths([p for p in differing if p in current])
        for path in differing:
            fact = facts[path]
            old = indexed.get(path)
            failure = old_failures.get(path) if old is None else None
            if failure is not None and not retry_failed and failure["size"] == fact.size \
                    and failure["mtime_ns"] == fact.mtime_ns:
                plan.skipped_failed.append(path)
                plan.failures[path] = failure
                continue
            sha = fact.digest()
            plan.facts[path] = (fact.size, fact.mtime_ns, sha)
            if old is not None and old[0] == sha:
                plan.keep[path] = IndexEntry(path, sha, fact.size, fact.mtime_ns, old[1], -1)  # touched only
                plan.unchanged.append(path)
                continue
            if failure is not None and not retry_failed and failure["sha256"] == sha:
                plan.skipped_failed.append(path)
                plan.failures[path] = {**failure, "size": fact.size, "mtime_ns": fact.mtime_ns}
                continue
            (plan.added if old is None else plan.updated).append(path)
            candidates.append(path)
        # A content indexed under the same extension is reused; the first such file (in path order)
        # gives its kind.
        donors: dict[tuple[str, str], tuple[str, int]] = {}
        wanted = sorted({plan.facts[p][2] for p in candidates})
        removed = current.keys() - facts.keys()
        for shas in (wanted[i:i + 900] for i in range(0, len(wanted), 900)):
            for path, sha, kind, vid in self._query(
                    "SELECT f.path, f.sha256, f.kind, v.vid FROM files f JOIN vectors v USING (sha256) "
                    f"WHERE f.sha256 IN ({','.join('?' * len(shas))}) ORDER BY f.path", shas):
                donors.setdefault((sha, _suffix(path)), (kind, vid))
        for path in candidates:
            size, mtime_ns, sha = plan.facts[path]
            donor = donors.get((sha, _suffix(path)))
            if donor is not None:
                plan.keep[path] = IndexEntry(path, sha, size, mtime_ns, donor[0], donor[1])
                plan.reused.append(path)
            else:
                plan.to_embed.append(path)
        plan.removed = sorted(removed)
        if any(e.row == -1 for e in plan.keep.values()):
            unchanged.sort()  # touched files joined the list after the others
        return plan

    def _rows_of_paths(self, paths: list[str]) -> dict[str, tuple[str, str]]:
        """path -> (sha256, kind) of these indexed files."""
        found: dict[str, tuple[str, str]] = {}
        for start in range(0, len(paths), 900):
            chunk = paths[start:start + 900]
            found.update((path, (sha, kind)) for path, sha, kind in self._query(
                f"SELECT path, sha256, kind FROM files WHERE path IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def apply(self, plan: UpdatePlan, results: Mapping[str, EmbedResult | BaseException]) -> UpdateSummary:
        """Write the index ``plan`` describes, with ``results[path] = (sha256, vector, kind)`` for the
        files of ``plan.to_embed`` (or an exception: the file is reported as failed and left out; a
        missing result counts as a failure too). Writes nothing if nothing changed."""
        if plan.index_token != self._token or plan.base_generation != self.generation:
            raise IndexChangedError("this plan was made for another state of the index; plan again")
        summary = UpdateSummary(added=list(plan.added), updated=list(plan.updated), removed=list(plan.removed),
                                unchanged=list(plan.unchanged), reused=list(plan.reused),
                                skipped_failed=list(plan.skipped_failed))
        failures = dict(plan.failures)
        dimension = self.dimension
        upsert = [(e.path, e.sha256, e.size, e.mtime_ns, e.kind) for e in plan.keep.values()]
        new_vectors: dict[str, np.ndarray] = {}  # sha -> unit vector, in order of first use
        known = self._vids_of(plan.facts[p][2] for p in plan.to_embed)
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
            if sha not in known and sha not in new_vectors:
                new_vectors[sha] = unit
            upsert.append((path, sha, size, mtime_ns, str(kind)))
        summary.added = [p for p in summary.added if p not in summary.failed]
        summary.updated = [p for p in summary.updated if p not in summary.failed]
        # A changed file whose new content failed is no longer indexed under its old content.
        delete = list(plan.removed) + [p for p in plan.updated if p in summary.failed]
        root_changed = self._root is not None and self._root != self._meta.get("root")
        if (not self._replace_on_write and not upsert and not delete and not new_vectors
                and failures == self.failures and not root_changed):
            return summary
        fresh = list(new_vectors.values())
        self._write(upsert=upsert, delete=delete, new_shas=list(new_vectors),
                    new_vectors=lambda: iter([np.stack(fresh)] if fresh else []),
                    dimension=dimension, failures=failures, check_generation=True, base=plan.base_generation)
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

    # ----- writing ---------------------------------------------------------------------------------

    def _write(self, *, upsert: list[tuple[str, str, int, int, str]], delete: list[str], new_shas: list[str],
               new_vectors: Callable[[], Iterator[np.ndarray]], dimension: int | None,
               failures: Mapping[str, dict], check_generation: bool, base: int | None = None) -> None:
        """One new version in one transaction: the new vectors as a new segment, the file table's
        changes, the vectors no file uses any more marked dead, a compaction if due."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("COMMIT")  # end this object's read snapshot
            db = self._db if self._db is not None else _connect(self.folder)
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise IndexBusyError(f"another process is updating the search index in {self.folder}") from exc
            obsolete: list[str] = []
            try:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                disk = _read_meta(db)
                disk_generation = int(disk.get("generation", 0)) if disk else 0
                if disk and disk.get("format") != FORMAT_NAME:
                    raise IndexCorruptError(f"{self.folder / DB_NAME}: not a {FORMAT_NAME} database")
                if check_generation and disk_generation != (base if base is not None else self.generation):
                        raise IndexChangedError(f"the search index in {self.folder} was updated by another "
                                                "process since it was opened; open it again")
                referenced = {name for (name,) in db.execute("SELECT file FROM segments")}
                referenced |= {disk.get("ann_file")} if disk.get("ann_file") else set()
                self._remove_orphans(referenced)
                if self._replace_on_write:
                    obsolete.extend(referenced)
                    for table in ("files", "vectors", "segments", "dead", "failures"):
                        db.execute(f"DELETE FROM {table}")
                    disk = {**disk, "next_vid": 0, "ann_file": None, "dimension": None,
                            "created": None}
                next_vid = int(disk.get("next_vid") or 0)
                dimension = dimension if dimension is not None else disk.get("dimension")
                # The new segment, under the lock (so that no other writer counts it an orphan).
                if new_shas:
                    name = f"vectors-{next_vid:012d}-{secrets.token_hex(4)}.npy"
                    _write_segment(self.folder / name, new_vectors(), len(new_shas), int(dimension or 0))
                    db.execute("INSERT INTO segments VALUES (?, ?, ?)", (next_vid, len(new_shas), name))
                    db.executemany("INSERT INTO vectors VALUES (?, ?)",
                                   zip(new_shas, range(next_vid, next_vid + len(new_shas)), strict=True))
                    next_vid += len(new_shas)
                db.execute("CREATE TEMP TABLE IF NOT EXISTS gone (sha256 TEXT PRIMARY KEY)")
                db.execute("DELETE FROM gone")
                changing = delete + [row[0] for row in upsert]
                for start in range(0, len(changing), 900):
                    chunk = changing[start:start + 900]
                    db.execute("INSERT OR IGNORE INTO gone SELECT sha256 FROM files WHERE path IN "
                               f"({','.join('?' * len(chunk))})", chunk)
                db.executemany("DELETE FROM files WHERE path = ?", ((p,) for p in delete))
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", upsert)
                # CROSS JOIN: from the few changed contents to their vectors, never a scan of every vector.
                db.execute("DELETE FROM gone WHERE EXISTS (SELECT 1 FROM files f WHERE f.sha256 = gone.sha256)")
                db.execute("INSERT OR IGNORE INTO dead SELECT v.vid FROM gone g CROSS JOIN vectors v "
                           "ON v.sha256 = g.sha256")
                db.execute("DELETE FROM vectors WHERE sha256 IN (SELECT sha256 FROM gone)")
                db.execute("DELETE FROM failures")
                db.executemany("INSERT INTO failures VALUES (?, ?, ?, ?, ?)",
                               ((f["path"], f["sha256"], f["size"], f["mtime_ns"], f["reason"])
                                for f in (failures[p] for p in sorted(failures))))
                n_dead = db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
                n_segments = db.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
                n_stored = db.execute("SELECT COALESCE(SUM(n_rows), 0) FROM segments").fetchone()[0]
                ann_file = disk.get("ann_file")
                if n_segments > MAX_SEGMENTS or n_dead > COMPACT_DEAD_FRACTION * n_stored:
                    obsolete.extend(self._compact(db, int(dimension or 0)))
                    next_vid = db.execute("SELECT COALESCE(SUM(n_rows), 0) FROM segments").fetchone()[0]
                    if ann_file:
                        obsolete.append(ann_file)
                    ann_file = None
                now = _now()
                counts = {"files": db.execute("SELECT COUNT(*) FROM files").fetchone()[0],
                          "vectors": db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0],
                          "failures": len(failures)}
                meta = {**disk, "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "model_key": self._model_key, "dimension": dimension,
                        "root": self._root if self._root is not None else disk.get("root"),
                        "generation": max(disk_generation, self.generation) + 1, "next_vid": next_vid,
                        "counts": counts, "created": disk.get("created") or now, "updated": now,
                        "ann_file": ann_file}
                if not ann_file:
                    meta.pop("ann_covers", None)
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               ((key, json.dumps(value)) for key, value in meta.items()))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if self._db is None:
                    db.close()
                raise
            self._db, self._replace_on_write = db, False
            for name in obsolete:  # named by no version any more; a reader that mapped one keeps it
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
            self._load_view()

    def _compact(self, db: sqlite3.Connection, dimension: int) -> list[str]:
        """Rewrite the live vectors as one segment, vids renumbered from 0 in their old order. Returns
        the names of the segment files it replaced."""
        old = [(first, n, name) for first, n, name in db.execute(
            "SELECT first_vid, n_rows, file FROM segments ORDER BY first_vid")]
        dead = np.fromiter((v for (v,) in db.execute("SELECT vid FROM dead")), dtype=np.int64)

        def live_parts() -> Iterator[np.ndarray]:
            for first, n, name in old:
                vectors = _read_segment(self.folder / name)
                inside = dead[(dead >= first) & (dead < first + n)] - first
                keep = None
                if len(inside):
                    keep = np.ones(n, dtype=bool)
                    keep[inside] = False
                for start in range(0, n, _ADD_ROWS):
                    stop = min(start + _ADD_ROWS, n)
                    block = vectors[start:stop]
                    yield block if keep is None else block[keep[start:stop]]

        n_live = db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        name = f"vectors-{0:012d}-{secrets.token_hex(4)}.npy"
        if n_live:
            _write_segment(self.folder / name, live_parts(), n_live, dimension)
        db.execute("CREATE TEMP TABLE IF NOT EXISTS renumber (vid INTEGER PRIMARY KEY, new_vid INTEGER)")
        db.execute("DELETE FROM renumber")
        db.execute("INSERT INTO renumber SELECT vid, ROW_NUMBER() OVER (ORDER BY vid) - 1 FROM vectors")
        # Through negative ids first: the UNIQUE constraint holds at every step.
        db.execute("UPDATE vectors SET vid = -1 - (SELECT new_vid FROM renumber r WHERE r.vid = vectors.vid)")
        db.execute("UPDATE vectors SET vid = -1 - vid")
        db.execute("DELETE FROM segments")
        db.execute("DELETE FROM dead")
        if n_live:
            db.execute("INSERT INTO segments VALUES (0, ?, ?)", (n_live, name))
        return [name for _, _, name in old]

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Files of this index that no version names: left by a writer that crashed (called under the
        write lock, so no other writer is writing one now)."""
        for path in self.folder.iterdir():
            name = path.name
            ours = (name.startswith("vectors-") and name.endswith(".npy")) or (
                name.startswith("ann-") and name.endswith(".faiss")) or (
                name.startswith((".vectors-", ".ann-")) and name.endswith(".tmp"))
            if ours and name not in referenced:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ----- the approximate index -------------------------------------------------------------------

    def build_ann(self, n_lists: int | None = None, seed: int = 0,
                  say: Callable[[str], None] | None = None) -> dict:
        """Build (or rebuild) the approximate index: FAISS ``IndexIVFFlat`` over every live vector,
        ``n_lists`` clusters (default about 4·√N) trained on a sample of at most 64 vectors per
        cluster. Returns what it built (n_lists, vectors, seconds). Written beside the segments and
        named in the tables; an update keeps it (new vectors are searched exactly beside it), a
        compaction drops it."""
        started = time.perf_counter()
        total = self.n_vectors
        if not total or self.dimension is None:
            raise SearchIndexError(f"the search index in {self.folder} is empty: nothing to build an approximate "
                                   "index of")
        n_lists = int(n_lists or max(1, min(65536, round(4 * np.sqrt(total)))))
        n_lists = max(1, min(n_lists, total))
        vids, parts = [], []
        for segment in self._segments:
            local = np.arange(segment.n_rows) if segment.live is None else np.flatnonzero(segment.live)
            vids.append(local + segment.first_vid)
            parts.append(local)
        all_vids = np.concatenate(vids) if vids else np.zeros(0, np.int64)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(all_vids, size=min(len(all_vids), 40 * n_lists), replace=False))
        if say is not None:
            say(f"approximate index: training {n_lists} clusters on {len(sample)} of {len(all_vids)} vectors")
        quantizer = faiss.IndexFlatIP(self.dimension)
        ann = faiss.IndexIVFFlat(quantizer, self.dimension, n_lists, faiss.METRIC_INNER_PRODUCT)
        ann.cp.seed = seed
        ann.train(self._vectors_of_vids(sample))
        for segment, local in zip(self._segments, parts, strict=True):
            for start in range(0, len(local), _ADD_ROWS):
                chunk = local[start:start + _ADD_ROWS]
                block = segment.vectors[chunk]
                ann.add_with_ids(np.ascontiguousarray(block), (chunk + segment.first_vid).astype(np.int64))
        name = f"ann-{secrets.token_hex(4)}.faiss"
        _write_faiss(ann, self.folder / name)
        covers = int(self._meta["next_vid"])
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                disk = _read_meta(self._db)
                if int(disk["generation"]) != self.generation:
                    raise IndexChangedError(f"the search index in {self.folder} changed while its approximate "
                                            "index was built; build it again")
                previous = disk.get("ann_file")
                meta = {"ann_file": name, "ann_covers": covers, "ann_lists": n_lists,
                        "generation": self.generation + 1}
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                     ((k, json.dumps(v)) for k, v in meta.items()))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
                raise
        if previous:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / previous).unlink()
        self._load_view()
        return {"n_lists": n_lists, "vectors": int(len(all_vids)), "seconds": time.perf_counter() - started}

    def _vectors_of_vids(self, vids: np.ndarray) -> np.ndarray:
        out = np.empty((len(vids), self.dimension), dtype=np.float32)
        starts = np.array([s.first_vid for s in self._segments])
        where = np.searchsorted(starts, vids, side="right") - 1
        for number, segment in enumerate(self._segments):
            chosen = np.flatnonzero(where == number)
            for start in range(0, len(chosen), _ADD_ROWS):
                part = chosen[start:start + _ADD_ROWS]
                local = vids[part] - segment.first_vid
                out[part] = segment.vectors[local]
        return out

    @property
    def has_ann(self) -> bool:
        return bool(self._meta.get("ann_file"))

    def _ann_index(self) -> faiss.Index:
        if self._ann is None:
            path = self.folder / self._meta["ann_file"]
            try:
                self._ann = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                self._ann = faiss.read_index(str(path))
        return self._ann

    # ----- searching -------------------------------------------------------------------------------

    def _allowed_vids(self, kinds: frozenset[str]) -> np.ndarray | None:
        """Vids with at least one file of these kinds (None: every vid has one)."""
        key = ("kinds", kinds)
        if key not in self._cache:
            present = {kind for (kind,) in self._query("SELECT DISTINCT kind FROM files")}
            if present <= kinds:
                self._cache[key] = None
            else:
                wanted = sorted(kinds)
                self._cache[key] = np.fromiter(
                    (vid for (vid,) in self._query(
                        f"SELECT DISTINCT v.vid FROM files f JOIN vectors v USING (sha256) "
                        f"WHERE f.kind IN ({','.join('?' * len(wanted))})", wanted)), dtype=np.int64)
        return self._cache[key]

    def search(self, queries: np.ndarray | Any, k: int = 10, *,
               exclude_sha256: str | Iterable[str] | None = None,
               exclude_per_query: Sequence[str | Iterable[str] | None] | None = None,
               dedupe: bool = True, kinds: Iterable[str] | None = None,
               approximate: bool = False, n_probe: int = 32,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> list[list[Hit]]:
        """The ``k`` best files for each query (``(Q, D)``, or one ``(D,)`` vector: still a list of one
        list), by cosine similarity, best first, equal scores in path order. ``dedupe``: identical
        contents are one hit (``duplicates`` names the other paths). ``exclude_sha256``: contents left
        out of every query's results (a music→music query leaves out the query file, and its copies);
        ``exclude_per_query``: the same, one item per query. ``kinds``: only files of these kinds.
        ``approximate``: through the IVF index (``build_ann``; built now if missing), probing
        ``n_probe`` clusters. ``chunk_rows``: rows scored per matrix product of the exact scan."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        matrix = np.asarray(queries.detach().cpu() if hasattr(queries, "detach") else queries, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[None]
        n_queries = matrix.shape[0]
        if matrix.ndim != 2 or (self.dimension is not None and matrix.shape[1] != self.dimension):
            raise ValueError(f"queries of shape {tuple(matrix.shape)} do not match the index's dimension "
                             f"{self.dimension}")
        if exclude_per_query is not None and len(exclude_per_query) != n_queries:
            raise ValueError(f"{len(exclude_per_query)} exclude_per_query items for {n_queries} queries")
        if not len(self) or not n_queries:
            return [[] for _ in range(n_queries)]
        units = _unit_rows(matrix, "queries")

        def shas(item: str | Iterable[str] | None) -> set[str]:
            return set() if item is None else {item} if isinstance(item, str) else set(item)

        common = shas(exclude_sha256)
        per_query = [common | shas(exclude_per_query[q]) if exclude_per_query is not None else common
                     for q in range(n_queries)]
        vid_of = self._vids_of(set().union(*per_query)) if any(per_query) else {}
        allowed = self._allowed_vids(frozenset(kinds)) if kinds is not None else None
        if allowed is not None and not len(allowed):
            return [[] for _ in range(n_queries)]
        if approximate and not self.has_ann:
            self.build_ann()
        # Queries that exclude the same contents are searched together.
        groups: dict[frozenset[int], list[int]] = {}
        for q in range(n_queries):
            groups.setdefault(frozenset(vid_of[s] for s in per_query[q] if s in vid_of), []).append(q)
        candidates: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * n_queries
        for excluded, members in groups.items():
            found = self._top_vids(units[members], k, np.fromiter(excluded, np.int64, len(excluded)), allowed,
                                   approximate, n_probe, chunk_rows)
            for q, result in zip(members, found, strict=True):
                candidates[q] = result
        return [self._hits(vids, scores, k, dedupe, None if kinds is None else frozenset(kinds))
                for vids, scores in candidates]

    def search_one(self, query: np.ndarray | Any, k: int = 10, **options: Any) -> list[Hit]:
        """``search`` for one ``(D,)`` query vector: its list of hits."""
        return self.search(np.asarray(query.detach().cpu() if hasattr(query, "detach") else query).reshape(1, -1),
                           k, **options)[0]

    def _top_vids(self, units: np.ndarray, k: int, excluded: np.ndarray, allowed: np.ndarray | None,
                  approximate: bool, n_probe: int, chunk_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, the vids scoring at least the k-th best score (every vid tied with the k-th is in,
        so ordering by path afterwards is exact), with their float32 scores, best first."""
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(units))]
        segments = self._segments
        if approximate:
            covers = int(self._meta.get("ann_covers") or 0)
            segments = [s for s in segments if s.first_vid >= covers]
            ann = self._ann_index()
            dead = np.fromiter((v for s in self._segments if s.live is not None and s.first_vid < covers
                                for v in np.flatnonzero(~s.live) + s.first_vid), dtype=np.int64)
            mask = np.ones(covers, dtype=bool)
            mask[dead] = False
            mask[excluded[excluded < covers]] = False
            if allowed is not None:
                keep = np.zeros(covers, dtype=bool)
                keep[allowed[allowed < covers]] = True
                mask &= keep
            selector, bits = _bitmap_selector(mask)
            params = faiss.SearchParametersIVF(sel=selector, nprobe=max(1, n_probe))
            with self._lock:
                scores, ids = ann.search(units, k, params=params)
            del bits
            for q in range(len(units)):
                ok = ids[q] >= 0
                parts[q].append((ids[q][ok].astype(np.int64), scores[q][ok]))
        for segment in segments:
            mask = None if segment.live is None else segment.live.copy()
            inside = excluded[(excluded >= segment.first_vid) & (excluded < segment.first_vid + segment.n_rows)]
            if len(inside) or allowed is not None:
                mask = np.ones(segment.n_rows, dtype=bool) if mask is None else mask
                mask[inside - segment.first_vid] = False
                if allowed is not None:
                    keep = np.zeros(segment.n_rows, dtype=bool)
                    local = allowed[(allowed >= segment.first_vid) & (allowed < segment.first_vid + segment.n_rows)]
                    keep[local - segment.first_vid] = True
                    mask &= keep
            if mask is not None and not mask.any():
                continue
            found = _top_rows(segment.matrix, torch.from_numpy(units), k,
                              None if mask is None else torch.from_numpy(mask), chunk_rows)
            for q, (rows, scores) in enumerate(found):
                parts[q].append((rows + segment.first_vid, scores))
        out = []
        for q in range(len(units)):
            vids = np.concatenate([p[0] for p in parts[q]]) if parts[q] else np.zeros(0, np.int64)
            scores = np.concatenate([p[1] for p in parts[q]]) if parts[q] else np.zeros(0, np.float32)
            order = np.lexsort((vids, -scores))
            vids, scores = vids[order], scores[order]
            if len(scores) > k:
                keep = scores >= scores[k - 1]
                vids, scores = vids[keep], scores[keep]
            out.append((vids, scores.astype(np.float32)))
        return out

    def _hits(self, vids: np.ndarray, scores: np.ndarray, k: int, dedupe: bool,
              kinds: frozenset[str] | None) -> list[Hit]:
        if not len(vids):
            return []
        members: dict[int, list[tuple[str, str, str]]] = {}
        listed = vids.tolist()
        for start in range(0, len(listed), 900):
            chunk = listed[start:start + 900]
            for vid, path, sha, kind in self._query(
                    "SELECT v.vid, f.path, f.sha256, f.kind FROM vectors v JOIN files f USING (sha256) "
                    f"WHERE v.vid IN ({','.join('?' * len(chunk))}) ORDER BY f.path", chunk):
                if kinds is None or kind in kinds:
                    members.setdefault(vid, []).append((path, sha, kind))
        hits: list[tuple[float, str, str, str, tuple[str, ...]]] = []
        for vid, score in zip(listed, scores.tolist(), strict=True):
            group = members.get(vid, [])
            paths = [m[0] for m in group]
            if not group:
                continue
            if dedupe:
                hits.append((score, *group[0], tuple(paths[1:])))
            else:
                hits.extend((score, *m, tuple(p for p in paths if p != m[0])) for m in group)
        hits.sort(key=lambda h: (-h[0], h[1]))
        return [Hit(rank, score, path, sha, kind, duplicates)
                for rank, (score, path, sha, kind, duplicates) in enumerate(hits[:k], 1)]


# ---------------------------------------------------------------------------- the earlier format
def _convert_legacy(folder: Path) -> None:
    """Convert an index of the home-made format (manifest.json + entries JSONL + vectors .npy, versions
    1 and 2) to this one, in place, keeping its files, vectors, failures and generation; then remove
    the old files. Nothing is embedded again."""
    manifest_path = folder / LEGACY_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # another process converted it meanwhile
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"{manifest_path}: cannot be read ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or version not in (1, 2):
        raise IndexCorruptError(f"{manifest_path}: not a {FORMAT_NAME} manifest this code can convert "
                                f"(format version {version}); rebuild the index")
    kind_field = LEGACY_KIND_FIELD[version]
    entries = []
    try:
        lines = (folder / manifest["entries_file"]).read_text(encoding="utf-8").splitlines() \
            if manifest.get("entries_file") else []
        vectors = (np.load(folder / manifest["vectors_file"], mmap_mode="r") if manifest.get("vectors_file")
                   else np.zeros((0, manifest.get("dimension") or 0), np.float32))
    except FileNotFoundError:
        return  # another process converted it meanwhile
    for line in lines:
        if line.strip():
            row = json.loads(line)
            entries.append({"path": row["path"], "sha256": row["sha256"], "size": row["size"],
                            "mtime_ns": row["mtime_ns"], "kind": row[kind_field], "row": int(row["row"])})
    index = SearchIndex(folder, manifest["model_key"], manifest.get("root"), None, replace_on_write=True,
                        generation=int(manifest.get("generation", 0)))
    by_row = sorted(entries, key=lambda e: e["row"])
    first_of: dict[str, int] = {}
    for e in by_row:
        first_of.setdefault(e["sha256"], e["row"])
    rows = np.fromiter(first_of.values(), dtype=np.int64, count=len(first_of))
    failures = {f["path"]: f for f in manifest.get("failures", [])}
    index._write(upsert=[(e["path"], e["sha256"], e["size"], e["mtime_ns"], e["kind"]) for e in entries],
                 delete=[], new_shas=list(first_of),
                 new_vectors=lambda: (np.asarray(vectors[rows[s:s + _ADD_ROWS]], dtype=np.float32)
                                      for s in range(0, len(rows), _ADD_ROWS)),
                 dimension=manifest.get("dimension"), failures=failures, check_generation=False)
    index.close()
    for name in (LEGACY_MANIFEST, manifest.get("entries_file"), manifest.get("vectors_file"), ".lock"):
        if name:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()


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
