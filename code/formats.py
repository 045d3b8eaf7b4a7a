"""The project's vocabulary in one place: formats, raw-file kinds, towers and compared systems.

* **format**: the notation a symbolic piece is written in for the model, ``abc`` (interleaved ABC,
  sheet music) or ``mtf`` (MIDI text). One LoRA adapter per format.
* **kind**: what a raw file is, read from its extension: ``text``, ``abc``, ``musicxml``,
  ``midi``, ``mtf``, ``mert`` (MERT features, ``.npy``), ``audio`` (``.wav``/``.mp3``/``.flac``/``.ogg``,
  which become MERT features first). Each symbolic kind becomes one format before the model reads it.
* **modality**: the tower that encodes a kind: ``text``, ``symbolic`` or ``audio``.
* **system**: what an evaluation compares: the stock weights (``baseline``) against the same
  weights with the format's adapter (``lora``); ``evaluate_lora.py --name NAME`` evaluates another
  pair of adapters as a system of its own, ``joint`` by convention for those of a joint run
  (``--format both`` with ``ALIGN_WEIGHT`` > 0).
"""

from __future__ import annotations

import re

FORMATS = ("abc", "mtf")

KIND_OF_EXTENSION = {".txt": "text", ".abc": "abc", ".xml": "musicxml", ".mxl": "musicxml", ".musicxml": "musicxml",
                     ".mid": "midi", ".midi": "midi", ".mtf": "mtf", ".npy": "mert",
                     ".wav": "audio", ".mp3": "audio", ".flac": "audio", ".ogg": "audio"}
FORMAT_OF_KIND = {"abc": "abc", "musicxml": "abc", "midi": "mtf", "mtf": "mtf"}  # symbolic kinds only
KINDS_OF_FORMAT = {fmt: tuple(kind for kind, of in FORMAT_OF_KIND.items() if of == fmt) for fmt in FORMATS}
MODALITY_OF_KIND = {"text": "text", "mert": "audio", "audio": "audio", **{kind: "symbolic" for kind in FORMAT_OF_KIND}}
MUSIC_KINDS = frozenset(FORMAT_OF_KIND)
# Audio files, read through MERT (code/audio/); the containers whose decoding is tested.
AUDIO_EXTENSIONS = tuple(ext for ext, kind in KIND_OF_EXTENSION.items() if kind == "audio")

BASELINE, LORA = "baseline", "lora"
SYSTEMS = (BASELINE, LORA)
JOINT = "joint"  # the adapters of a joint run, evaluated as a third system (evaluate_lora.py --name joint)
# A system's name is part of its files' names (evaluation_<system>_report.json): lower-case letters,
# digits and "_" after a letter, never "vs" between underscores (the comparison files' separator).
SYSTEM_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_system_name(name: str) -> str:
    """``name`` when it can name a system's files; a ValueError saying why not otherwise."""
    if not SYSTEM_NAME.fullmatch(name) or "_vs_" in f"_{name}_":
        raise ValueError(f"a system name is lower-case letters, digits and '_', starting with a letter, "
                         f"without '_vs_': not {name!r}")
    return name
