"""Raw files to model inputs: what each file is, and the text (or array) the model reads from it.

Each file's **kind** comes from its extension (``formats.KIND_OF_EXTENSION``): ``.txt`` text; ``.abc``
ABC; ``.xml``/``.mxl``/``.musicxml`` MusicXML; ``.mid``/``.midi`` MIDI; ``.mtf`` MTF; ``.npy`` MERT
features; ``.wav``/``.mp3``/``.flac``/``.ogg`` audio, which ``embedder`` turns into MERT features
(``code/audio/``, the model named by ``MERT_MODEL_PATH``). MusicXML goes through the project's converters to interleaved ABC (xml2abc, then
interleaving, as the official pipeline does), MIDI to MTF with ``--m3_compatible``. An ``.abc`` file
that is already interleaved (body lines start with ``[V:``, what this project's converters write) is
read as it is; plain ABC is normalised first (ABC → MusicXML → ABC → interleaved, see
``preprocess.abc_normalise``), so it reaches the model in the layout the model was trained on.
Other audio containers are refused with the conversion to make, images with the caption route.

The models, the cache and ``Embedder`` are in ``embedder``; folders, the scripts' options and the
two-folder tools in ``rawfile_tools``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from fileio import find_files
from formats import FORMAT_OF_KIND, KIND_OF_EXTENSION
from preprocess import abc_normalise, interleave, midi_mtf, xml2abc
from preprocess.errors import ConversionError, describe_exception

# Audio in containers whose decoding is not checked here: refused with the conversion to make.
OTHER_AUDIO_EXTENSIONS = frozenset({".m4a", ".aac", ".aif", ".aiff", ".opus", ".wma"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
# Every extension a folder walk looks at: the supported ones, and those refused with a reason.
SEEN_EXTENSIONS = tuple(sorted(set(KIND_OF_EXTENSION) | OTHER_AUDIO_EXTENSIONS | IMAGE_EXTENSIONS))
# Bump when a conversion's output changes, so cached conversions are made again.
CONVERTER_VERSION = 1
ABC_MODES = ("auto", "as_is", "interleave", "normalise")


class RawFileError(ValueError):
    """A file the raw-file tools cannot turn into a feature: the file, the stage and the reason."""

    def __init__(self, path: str | os.PathLike, stage: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.stage, self.reason = str(path), stage, reason


def kind_of(path: str | os.PathLike) -> str:
    """The kind of a file from its extension; other audio containers, images and unknown types raise
    ``RawFileError``."""
    suffix = Path(path).suffix.lower()
    if suffix in KIND_OF_EXTENSION:
        return KIND_OF_EXTENSION[suffix]
    if suffix in OTHER_AUDIO_EXTENSIONS:
        raise RawFileError(path, "kind", f"audio in {suffix} is not read here: convert it to .flac, .wav, .mp3 or "
                           f".ogg (e.g. ffmpeg -i {Path(path).name} {Path(path).stem}.flac)")
    if suffix in IMAGE_EXTENSIONS:
        raise RawFileError(path, "kind", f"an image ({suffix}) is searched through its caption: pass a caption "
                           "text file or --caption \"...\" (clamp3_search.py --help, 'Image to music')")
    raise RawFileError(path, "kind", f"unsupported file type {suffix or '(no extension)'!r}; supported: "
                       + " ".join(sorted(KIND_OF_EXTENSION)))


def format_of(path: str | os.PathLike) -> str | None:
    """``abc`` for sheet music, ``mtf`` for MIDI/MTF, None for text, MERT features and audio."""
    return FORMAT_OF_KIND.get(kind_of(path))


def is_interleaved_abc(text: str) -> bool:
    """Interleaved ABC writes every body line as ``[V:n]...``; plain ABC never starts a line so."""
    return any(line.startswith("[V:") for line in text.splitlines())


def model_input_text(path: str | os.PathLike, kind: str | None = None, abc_mode: str = "auto") -> str:
    """The text the model reads for one symbolic or text file (no cache): interleaved ABC, MTF or
    the caption. Raises ``RawFileError`` naming the stage that failed."""
    path = Path(path)
    kind = kind or kind_of(path)
    if abc_mode not in ABC_MODES:
        raise ValueError(f"abc_mode must be one of {ABC_MODES}, not {abc_mode!r}")
    try:
        if kind == "musicxml":
            return interleave.interleave_abc(xml2abc.convert_file(path))
        if kind == "midi":
            return midi_mtf.midi_to_mtf(path, m3_compatible=True)
        if kind == "abc":
            text = interleave.read_abc_text(path)
            if abc_mode == "as_is" or (abc_mode == "auto" and is_interleaved_abc(text)):
                return text
            if abc_mode == "interleave":
                return interleave.interleave_abc(text)
            return interleave.interleave_abc(abc_normalise.normalise_abc(text))
        if kind in ("mtf", "text"):
            return path.read_text(encoding="utf-8")
    except ConversionError as exc:
        raise RawFileError(path, exc.stage or "convert", exc.reason) from exc
    except UnicodeDecodeError as exc:
        raise RawFileError(path, "read", f"not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise RawFileError(path, "read", describe_exception(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a converter's own crash is this file's failure, not the batch's
        raise RawFileError(path, "convert", describe_exception(exc)) from exc
    raise RawFileError(path, "kind", f"{kind} files have no text form")


def mert_input(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """The MERT features of a ``.npy`` file and a digest of their values and shape (the cache's key
    for the model input). Raises ``RawFileError`` for a file that is not such an array."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RawFileError(path, "read", f"not a readable .npy array of MERT features: {exc}") from exc
    return array, mert_digest(array)


def mert_digest(array: np.ndarray) -> str:
    """The digest of MERT features (values and shape): the same for a ``.npy`` file and the audio it
    was extracted from, so both share one cached CLaMP 3 feature."""
    values = np.ascontiguousarray(array, dtype=np.float32).tobytes()
    return hashlib.sha256(values + str(array.shape).encode()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def discover(input_dir: str | os.PathLike) -> list[Path]:
    """Every file under ``input_dir`` with an extension the tools know or refuse, sorted, relative."""
    return find_files(input_dir, SEEN_EXTENSIONS)
