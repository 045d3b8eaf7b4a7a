"""Feature folders ↔ arrays for the inference tools, evaluation and search: the official key rule,
loading global ``.npy`` features, key matching. What is done with the arrays (ranks with the
official arithmetic, top-k search) is ``metrics``'.

**Keys.** The key of a feature file is its folder relative to the given root, ``/``, and its name up
to the **first** dot (``sub/x.1.npy`` and ``sub/x.2.npy`` -> ``sub/x``; a file at the top has the
bare name as key), as in the official ``inference/clamp3_*.py``. Several query files may share a key.
A reference set keeps one file per key: the first in sorted order of relative POSIX paths (code-point
order, so ``x.1.npy`` comes before ``x.npy``), where the official scripts keep whichever ``os.walk``
meets first. Hidden files are not features (``fileio.find_files``).

**Features** are global vectors saved as ``(1, D)`` float arrays (``extract_clamp3.py --get_global``),
read as float32 (what extraction writes; similarities are float32 cosines throughout); any other
shape, a file that cannot be read, non-finite values or a dimension that differs from the folder's
first file raise ``FeatureFileError`` naming the file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fileio import find_files

FEATURE_EXTENSION = ".npy"


class FeatureFileError(ValueError):
    """A feature file that is not a readable, finite ``(1, D)`` float array of the folder's dimension."""


def feature_key(relative: str | os.PathLike) -> str:
    """The official key of a feature file given by its path relative to the folder root."""
    text = relative if isinstance(relative, str) else Path(relative).as_posix()
    folder, _, name = text.rpartition("/")
    name = name.split(".", 1)[0]
    return f"{folder}/{name}" if folder else name


# .npy header bytes already parsed by np.load -> (dtype, shape). A folder of features repeats one
# header, and parsing it (np.load evaluates the header text) costs more than reading the file.
_KNOWN_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _read_npy(path: str | os.PathLike) -> np.ndarray:
    """``np.load(path, allow_pickle=False)``, several times faster on a file whose header (dtype,
    C order, shape) is byte for byte one seen before: its data is then taken as is."""
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    if data[:6] == b"\x93NUMPY" and len(data) >= 12:
        if data[6] == 1:
            offset = 10 + int.from_bytes(data[8:10], "little")
        elif data[6] in (2, 3):
            offset = 12 + int.from_bytes(data[8:12], "little")
        known = _KNOWN_HEADERS.get(data[:offset]) if offset else None
        if known is not None:
            dtype, shape, count = known
            if len(data) - offset == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    header = data[:offset]
    if (offset and isinstance(array, np.ndarray) and not array.dtype.hasobject
            and b"'fortran_order': False" in header and len(_KNOWN_HEADERS) < 64):
        _KNOWN_HEADERS[header] = (array.dtype, array.shape, array.size)
    return array


def load_feature(path: str | os.PathLike) -> np.ndarray:
    """The ``(D,)`` float32 vector of one ``(1, D)`` global feature file."""
    try:
        array = _read_npy(path)
    except (OSError, ValueError, EOFError) as exc:
        raise FeatureFileError(f"{path}: cannot be read as a .npy array ({exc})") from exc
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[0] != 1 or array.shape[1] == 0:
        shape = getattr(array, "shape", None)
        raise FeatureFileError(f"{path}: shape {shape} is not a (1, D) global feature "
                               "(extract with --get_global)")
    if not np.issubdtype(array.dtype, np.floating):
        raise FeatureFileError(f"{path}: dtype {array.dtype} is not a float feature")
    vector = array[0].astype(np.float32)
    if not np.isfinite(vector).all():
        raise FeatureFileError(f"{path}: holds NaN or infinite values")
    return vector


@dataclass(frozen=True)
class FeatureSet:
    """The features of one folder: ``files`` relative to ``root`` (sorted), their keys, one row each.

    ``shadowed`` lists the files left out because an earlier file has their key (only when the set
    was loaded with ``first_per_key``)."""

    root: str
    files: list[Path]
    keys: list[str]
    vectors: np.ndarray
    shadowed: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def path(self, index: int) -> str:
        """The file as the official tools name it: the root as given, joined with the relative path."""
        return os.path.join(self.root, *self.files[index].parts)

    def shadowed_paths(self) -> list[str]:
        return [os.path.join(self.root, *relative.parts) for relative in self.shadowed]

    def index_of_key(self) -> dict[str, int]:
        """Key -> row, for a set with one file per key."""
        index = {key: i for i, key in enumerate(self.keys)}
        if len(index) != len(self.keys):
            raise ValueError(f"{self.root}: several files share a key; load it with first_per_key=True")
        return index


def load_query_and_reference(query_root: str | os.PathLike, reference_root: str | os.PathLike,
                              first_reference_per_key: bool = True) -> tuple[FeatureSet, FeatureSet]:
    """Both folders of an inference tool; features of different dimensions are an error."""
    queries = load_feature_folder(query_root)
    references = load_feature_folder(reference_root, first_per_key=first_reference_per_key)
    if queries.dimension != references.dimension:
        raise FeatureFileError(f"query features have dimension {queries.dimension}, reference features "
                               f"{references.dimension}")
    return queries, references


def load_feature_folder(root: str | os.PathLike, first_per_key: bool = False) -> FeatureSet:
    """Every ``.npy`` feature under ``root`` (recursively), optionally only the first file per key."""
    relatives = find_files(root, [FEATURE_EXTENSION])
    if not relatives:
        raise FileNotFoundError(f"no {FEATURE_EXTENSION} files under {root}")
    files: list[Path] = []
    keys: list[str] = []
    shadowed: list[Path] = []
    seen: set[str] = set()
    for relative in relatives:
        key = feature_key(relative.as_posix())
        if first_per_key and key in seen:
            shadowed.append(relative)
            continue
        seen.add(key)
        files.append(relative)
        keys.append(key)
    vectors = np.empty((0, 0), dtype=np.float32)
    for i, relative in enumerate(files):
        vector = load_feature(os.path.join(root, relative))
        if i == 0:
            vectors = np.empty((len(files), vector.shape[0]), dtype=np.float32)
        elif vector.shape[0] != vectors.shape[1]:
            raise FeatureFileError(f"{os.path.join(root, relative)}: dimension {vector.shape[0]}, but "
                                   f"{os.path.join(root, files[0])} has {vectors.shape[1]}")
        vectors[i] = vector
    return FeatureSet(str(root), files, keys, vectors, shadowed)


@dataclass(frozen=True)
class KeyMatch:
    """Which reference row has each query file's key (``-1``: none), and the keys without a partner."""

    targets: np.ndarray
    unmatched_query_keys: list[str]
    unmatched_reference_keys: list[str]

    @property
    def complete(self) -> bool:
        return not self.unmatched_query_keys and not self.unmatched_reference_keys

    def unmatched_rows(self, queries: FeatureSet, references: FeatureSet) -> list[dict]:
        """Rows of ``unmatched_files.jsonl`` in the official form (``unmatched_query``: the key's files;
        ``unmatched_reference``: its one file), plus the key."""
        query_files: dict[str, list[str]] = {}
        for i, key in enumerate(queries.keys):
            query_files.setdefault(key, []).append(queries.path(i))
        reference_index = references.index_of_key()
        return ([{"unmatched_query": query_files[key], "key": key} for key in self.unmatched_query_keys]
                + [{"unmatched_reference": [references.path(reference_index[key])], "key": key}
                   for key in self.unmatched_reference_keys])


def match_keys(queries: FeatureSet, references: FeatureSet) -> KeyMatch:
    """Pair every query file with the reference of its key (references: one file per key)."""
    reference_index = references.index_of_key()
    targets = np.array([reference_index.get(key, -1) for key in queries.keys], dtype=np.int64)
    query_keys = set(queries.keys)
    unmatched_queries = sorted({key for key in queries.keys if key not in reference_index})
    unmatched_references = [key for key in references.keys if key not in query_keys]
    return KeyMatch(targets, unmatched_queries, unmatched_references)
