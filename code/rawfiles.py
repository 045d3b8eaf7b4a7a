"""Raw files to CLaMP 3 features, for the raw-file tools (``clamp3_embd.py``, ``clamp3_search.py``,
``clamp3_score.py``, ``clamp3_eval.py``) and classification.

Each file's **kind** comes from its extension (``KIND_OF_EXTENSION``): ``.txt`` text; ``.abc`` ABC;
``.xml``/``.mxl``/``.musicxml`` MusicXML; ``.mid``/``.midi`` MIDI; ``.mtf`` MTF; ``.npy`` MERT
features. MusicXML goes through the project's converters to interleaved ABC (xml2abc, then
interleaving, as the official pipeline does), MIDI to MTF with ``--m3_compatible``. An ``.abc`` file
that is already interleaved (body lines start with ``[V:``, what this project's converters write) is
read as it is; plain ABC is normalised first (ABC → MusicXML → ABC → interleaved, see
``preprocess.abc_normalise``), so it reaches the model in the layout the model was trained on.
Audio files are refused with the step this project does not run (MERT features), images with the
caption route.

The **models** (``choose_models``): the configured checkpoint (the C2 weights, ``CLAMP3_WEIGHTS_PATH``
or ``--weights``) when it exists, otherwise the embedded default's models (``make demo``), and the
output says which. Sheet music (ABC, MusicXML) goes through the ABC adapter and MIDI/MTF through the
MTF adapter when the adapter folder holds one; text and MERT features through the base (adapters
live on the symbolic side only, so text features are the base's whatever the adapter).

The **cache** (``RAWFILE_CACHE_DIR``) is keyed by content: conversions by the file's SHA-256 and
the converter version; features by the SHA-256 of the model input and the model key (weights,
model sizes, adapter files, the settings that change features). A changed file has a new hash and is
converted and embedded again; an unchanged file is never converted or embedded twice, wherever it
lives. Everything in the cache can be deleted at any time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import runconfig
from fileio import (
    REPO_ROOT,
    DropLog,
    atomic_save_npy,
    atomic_write_text,
    file_sha256,
    find_files,
    repo_path,
    with_extension,
)
from modeling import CLaMP3Model, ModelConfig, load_clamp3, resolve_device

KIND_OF_EXTENSION = {".txt": "text", ".abc": "abc", ".xml": "musicxml", ".mxl": "musicxml", ".musicxml": "musicxml",
                     ".mid": "midi", ".midi": "midi", ".mtf": "mtf", ".npy": "mert"}
FORMAT_OF_KIND = {"abc": "abc", "musicxml": "abc", "midi": "mtf", "mtf": "mtf"}  # symbolic kinds only
MODALITY_OF_KIND = {"text": "text", "mert": "audio", **{kind: "symbolic" for kind in FORMAT_OF_KIND}}
MUSIC_KINDS = frozenset(FORMAT_OF_KIND)
AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".aif", ".aiff", ".opus"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
# Every extension a folder walk looks at: the supported ones, and those refused with a reason.
SEEN_EXTENSIONS = tuple(sorted(set(KIND_OF_EXTENSION) | AUDIO_EXTENSIONS | IMAGE_EXTENSIONS))
# Bump when a conversion's output changes, so cached conversions are made again.
CONVERTER_VERSION = 1
ABC_MODES = ("auto", "as_is", "interleave", "normalise")
DEMO_CONFIG = REPO_ROOT / "configs" / "demo_eval.py"
DEMO_ROOTS = (REPO_ROOT / "data" / "demo", REPO_ROOT / "data" / "demo-quick")  # the full demo's models first
# Settings that change a feature (beyond weights, sizes and adapter), part of every model key.
FEATURE_SETTINGS = ("PATCH_LENGTH", "MAX_TEXT_LENGTH", "MAX_AUDIO_LENGTH", "TEXT_MODEL_NAME", "EXTRACT_DTYPE")


class RawFileError(ValueError):
    """A file the raw-file tools cannot turn into a feature: the file, the stage and the reason."""

    def __init__(self, path: str | os.PathLike, stage: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.stage, self.reason = str(path), stage, reason


class ModelsNotFoundError(FileNotFoundError):
    """Neither the configured checkpoint nor the embedded default's models exist."""


# ---------------------------------------------------------------------------- kinds and conversion
def kind_of(path: str | os.PathLike) -> str:
    """The kind of a file from its extension; audio, images and unknown types raise ``RawFileError``."""
    suffix = Path(path).suffix.lower()
    if suffix in KIND_OF_EXTENSION:
        return KIND_OF_EXTENSION[suffix]
    if suffix in AUDIO_EXTENSIONS:
        raise RawFileError(path, "kind", f"audio ({suffix}) needs MERT features first, a step this project does "
                           "not run: extract them with the official CLaMP 3 repository's "
                           "preprocessing/audio/extract_mert.py and pass the .npy files")
    if suffix in IMAGE_EXTENSIONS:
        raise RawFileError(path, "kind", f"an image ({suffix}) is searched through its caption: pass a caption "
                           "text file or --caption \"...\" (clamp3_search.py --help, 'Image to music')")
    raise RawFileError(path, "kind", f"unsupported file type {suffix or '(no extension)'!r}; supported: "
                       + " ".join(sorted(KIND_OF_EXTENSION)))


def format_of(path: str | os.PathLike) -> str | None:
    """``abc`` for sheet music, ``mtf`` for MIDI/MTF, None for text and MERT features."""
    return FORMAT_OF_KIND.get(kind_of(path))


def is_interleaved_abc(text: str) -> bool:
    """Interleaved ABC writes every body line as ``[V:n]...``; plain ABC never starts a line so."""
    return any(line.startswith("[V:") for line in text.splitlines())


def model_input_text(path: str | os.PathLike, kind: str | None = None, abc_mode: str = "auto") -> str:
    """The text the model reads for one symbolic or text file (no cache): interleaved ABC, MTF or
    the caption. Raises ``RawFileError`` naming the stage that failed."""
    from preprocess.errors import ConversionError, describe_exception

    path = Path(path)
    kind = kind or kind_of(path)
    if abc_mode not in ABC_MODES:
        raise ValueError(f"abc_mode must be one of {ABC_MODES}, not {abc_mode!r}")
    try:
        if kind == "musicxml":
            from preprocess import interleave, xml2abc

            return interleave.interleave_abc(xml2abc.convert_file(path))
        if kind == "midi":
            from preprocess import midi_mtf

            return midi_mtf.midi_to_mtf(path, m3_compatible=True)
        if kind == "abc":
            from preprocess import abc_normalise, interleave

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


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- which models
@dataclass
class ModelChoice:
    """The models a raw-file run uses: where they come from, the configuration to build them, and
    the adapter folder per format (None: the base for that format)."""

    source: str  # "checkpoint" or "demo"
    weights: Path
    cfg: dict[str, Any]
    model_config: ModelConfig
    adapters: dict[str, Path | None]
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """Lines saying which models and adapters a run uses, and why."""
        origin = ("the configured checkpoint" if self.source == "checkpoint"
                  else "the embedded default's models (make demo)")
        lines = [f"models: {origin}: {self.weights}"]
        for fmt in ("abc", "mtf"):
            folder = self.adapters.get(fmt)
            lines.append(f"  {fmt.upper()} (sheet music)" if fmt == "abc" else "  MTF (MIDI)")
            lines[-1] += f": adapter {folder}" if folder else ": base model, no adapter"
        return lines + [f"  note: {reason}" for reason in self.reasons]


def _demo_config(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """``cfg`` with the demo's model settings (``configs/demo_eval.py``, its paths moved to ``root``)
    for every key the user left at its default."""
    defaults = runconfig.default_config()
    demo = runconfig.load_config_file(DEMO_CONFIG)
    result = dict(cfg)
    for key, value in demo.items():
        if key in defaults and cfg.get(key) == defaults[key]:
            if isinstance(value, str) and value.startswith("data/demo/"):
                value = str(root / value.removeprefix("data/demo/"))
            result[key] = value
    return result


def choose_models(cfg: dict[str, Any], weights: str | os.PathLike | None = None,
                  model_config: str | os.PathLike | None = None, no_adapter: bool = False,
                  demo_fallback: bool | None = None, demo_roots: Sequence[Path] = DEMO_ROOTS) -> ModelChoice:
    """The configured checkpoint (``weights`` as typed, else ``CLAMP3_WEIGHTS_PATH``) if it exists;
    otherwise, with ``RAWFILE_DEMO_FALLBACK``, the embedded default's models; else
    ``ModelsNotFoundError`` saying how to get either."""
    reasons: list[str] = []
    typed = Path(weights).absolute() if weights else None
    configured = typed or repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
    demo_fallback = cfg["RAWFILE_DEMO_FALLBACK"] if demo_fallback is None else demo_fallback
    source = "checkpoint"
    if not configured.is_file():
        roots = [Path(root) for root in demo_roots if (Path(root) / "base_abc.pth").is_file()]
        if typed is not None or not demo_fallback or not roots:
            hint = ("run `make demo` for the embedded default's models, or download the C2 checkpoint (README)"
                    if typed is None else "check the path given with --weights")
            raise ModelsNotFoundError(f"weights not found: {configured}; {hint}")
        shown = configured.relative_to(REPO_ROOT) if configured.is_relative_to(REPO_ROOT) else configured
        reasons.append(f"no checkpoint at CLAMP3_WEIGHTS_PATH ({shown}), so the embedded default's models "
                       f"({roots[0]}) are used")
        cfg = _demo_config(cfg, roots[0])
        configured = repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
        source = "demo"
    sizes = ModelConfig.resolve(cfg, runconfig.model_config_path(None if source == "demo" else model_config, cfg))
    adapters: dict[str, Path | None] = {}
    for fmt in ("abc", "mtf"):
        folder = repo_path(cfg[f"LORA_{fmt.upper()}_ADAPTER_DIR"])
        if no_adapter:
            adapters[fmt] = None
        elif (folder / "adapter_config.json").is_file():
            adapters[fmt] = folder
        else:
            adapters[fmt] = None
            reasons.append(f"no {fmt.upper()} adapter in {folder}: {fmt.upper()} files use the base model")
    if no_adapter:
        reasons.append("--no_adapter: every format uses the base model")
    return ModelChoice(source, configured, cfg, sizes, adapters, reasons)


# ---------------------------------------------------------------------------- fingerprints
class Fingerprints:
    """SHA-256 of large files (checkpoints), remembered by path, size and mtime so a 1.8 GB checkpoint
    is hashed once, not on every run."""

    def __init__(self, path: Path | None):
        self.path = path
        self.known: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                self.known = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.known = {}  # a damaged memo costs one re-hash, never a wrong key

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.known.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        digest = file_sha256(file)
        self.known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.known, indent=1, sort_keys=True) + "\n")
        return digest


def folder_sha256(folder: Path) -> str:
    """One digest of every file of a folder (an adapter), names included."""
    digest = hashlib.sha256()
    for rel in sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()):
        digest.update(rel.encode("utf-8") + b"\0" + file_sha256(folder / rel).encode("ascii") + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------- embedding
@dataclass
class Embedded:
    """One file's feature, with what produced it."""

    path: Path
    sha256: str  # of the file's bytes
    kind: str
    format: str | None
    modality: str
    model_key: str
    input_sha256: str  # of the model input (the converted text, or the MERT array)
    feature: np.ndarray  # (1, D) global or (1, N, hidden)
    cached: bool


@dataclass
class EmbedSummary:
    embedded: int = 0
    cached: int = 0
    failed: int = 0

    def line(self) -> str:
        return f"{self.embedded} embedded, {self.cached} from the cache, {self.failed} failed"


class Embedder:
    """Features of raw files and texts with the chosen models, through the cache.

    The base model is loaded once; a format with an adapter gets its own copy of the symbolic side
    with the adapter loaded (the text and audio towers are shared, not copied), so sheet music and
    MIDI each go through their own adapter in one run."""

    def __init__(self, choice: ModelChoice, cache_dir: str | os.PathLike | None = None,
                 abc_mode: str = "auto", device: str | None = None):
        if abc_mode not in ABC_MODES:
            raise ValueError(f"abc_mode must be one of {ABC_MODES}, not {abc_mode!r}")
        self.choice = choice
        self.cfg = choice.cfg
        self.abc_mode = abc_mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = resolve_device(device or self.cfg["EXTRACT_DEVICE"])
        self.fingerprints = Fingerprints(self.cache_dir / "fingerprints.json" if self.cache_dir else None)
        self.summary = EmbedSummary()
        self._base: CLaMP3Model | None = None
        self._models: dict[str | None, CLaMP3Model] = {}
        self._extractors: dict[str | None, Any] = {}
        self._tokenizer: Any = None
        self._model_keys: dict[str | None, str] = {}

    # -------------------------------------------------------------- models
    def adapter_of(self, fmt: str | None) -> Path | None:
        """The adapter folder a format goes through (None: the base; text and audio always)."""
        return self.choice.adapters.get(fmt) if fmt else None

    def _slot(self, fmt: str | None) -> str | None:
        """Which model serves ``fmt``: the format's own when it has an adapter, else the base (None)."""
        return fmt if self.adapter_of(fmt) else None

    def _load_base(self) -> CLaMP3Model:
        if self._base is None:
            self._base = load_clamp3(self.choice.model_config, self.choice.weights, device=self.device,
                                     attn_implementation=self.cfg["ATTN_IMPLEMENTATION"])
        return self._base

    def model(self, fmt: str | None) -> CLaMP3Model:
        """The model for a format (None: text and audio, always the base)."""
        slot = self._slot(fmt)
        if slot not in self._models:
            base = self._load_base()
            if slot is None:
                self._models[None] = base
            else:
                import lora

                # PEFT injects into the model it is given: a copy of everything but the frozen towers.
                shared = {id(module): module for module in
                          (base.text_model, base.text_proj, base.audio_model, base.audio_proj)}
                peft_model = lora.load_adapter(copy.deepcopy(base, memo=shared), self.adapter_of(fmt))
                self._models[slot] = peft_model.get_base_model().eval()
        return self._models[slot]

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from features import load_text_tokenizer

            self._tokenizer = load_text_tokenizer(self.cfg["TEXT_MODEL_NAME"])
        return self._tokenizer

    def check_models(self, text: bool = False) -> None:
        """Load the base weights now, and the text tokenizer when ``text``, so a missing or mismatched
        one fails (``RuntimeError``/``ValueError`` with the fix) before any file is converted or embedded."""
        self._load_base()
        if text:
            self.tokenizer()

    def extractor(self, fmt: str | None, needs_tokenizer: bool = False) -> Any:
        from features import FeatureExtractor

        slot = self._slot(fmt)
        if slot not in self._extractors:
            self._extractors[slot] = FeatureExtractor.from_config(self.model(fmt), self.cfg, device=self.device)
        extractor = self._extractors[slot]
        if needs_tokenizer and extractor.tokenizer is None:
            extractor.tokenizer = self.tokenizer()
        return extractor

    def model_key(self, fmt: str | None) -> str:
        """A digest of everything that makes a feature: weights, sizes, the adapter (or none) and the
        feature settings. Text and audio always use the base, whose key is ``model_key(None)``."""
        slot = self._slot(fmt)
        if slot not in self._model_keys:
            facts = {"weights": self.fingerprints.sha256(self.choice.weights),
                     "model_config": self.choice.model_config.to_dict(),
                     "adapter": folder_sha256(self.adapter_of(fmt)) if slot else None,
                     "settings": {key: self.cfg[key] for key in FEATURE_SETTINGS}}
            blob = json.dumps(facts, sort_keys=True).encode("utf-8")
            self._model_keys[slot] = hashlib.sha256(blob).hexdigest()[:20]
        return self._model_keys[slot]


    # -------------------------------------------------------------- cache
    def _conversion_path(self, sha: str, kind: str) -> Path | None:
        if self.cache_dir is None:
            return None
        mode = f"-{self.abc_mode}" if kind == "abc" else ""
        return self.cache_dir / "conversions" / sha[:2] / f"{sha}.{kind}{mode}-v{CONVERTER_VERSION}.txt"

    def _feature_path(self, model_key: str, modality: str, input_sha: str, get_global: bool) -> Path | None:
        if self.cache_dir is None:
            return None
        level = "global" if get_global else "patches"
        return self.cache_dir / "features" / model_key / level / input_sha[:2] / f"{input_sha}.{modality}.npy"

    def converted_text(self, path: Path, sha: str, kind: str) -> str:
        """The model input of a symbolic or text file, from the cache when converted before. A failed
        conversion is remembered too, so a re-run reports it without converting again."""
        if kind in ("mtf", "text"):
            return model_input_text(path, kind, self.abc_mode)
        cached = self._conversion_path(sha, kind)
        failed = cached.with_name(cached.name + ".error.json") if cached else None
        if cached is not None and cached.is_file():
            return cached.read_text(encoding="utf-8")
        if failed is not None and failed.is_file():
            record = json.loads(failed.read_text(encoding="utf-8"))
            raise RawFileError(path, record["stage"], record["reason"] + " (remembered from an earlier run)")
        try:
            text = model_input_text(path, kind, self.abc_mode)
        except RawFileError as exc:
            if failed is not None:
                atomic_write_text(failed, json.dumps({"stage": exc.stage, "reason": exc.reason}) + "\n")
            raise
        if cached is not None:
            atomic_write_text(cached, text)
        return text

    # -------------------------------------------------------------- files
    def _prepare(self, path: Path, get_global: bool) -> tuple[Embedded | None, Any, str]:
        """(cache hit or None, model input, cache file) of one file; raises RawFileError."""
        kind = kind_of(path)
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise RawFileError(path, "read", f"cannot read: {exc.strerror or exc}") from exc
        fmt = FORMAT_OF_KIND.get(kind)
        modality = MODALITY_OF_KIND[kind]
        if modality == "audio":
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise RawFileError(path, "read", f"not a readable .npy array of MERT features: {exc}") from exc
            model_input: Any = array
            input_sha = hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()
                                       + str(array.shape).encode()).hexdigest()
        else:
            text = self.converted_text(path, sha, kind)
            if not text.strip():
                raise RawFileError(path, "read", "empty file" if kind in ("mtf", "text") else "conversion is empty")
            model_input, input_sha = text, sha256_text(text)
        key = self.model_key(fmt)
        cache_file = self._feature_path(key, modality, input_sha, get_global)
        if cache_file is not None and cache_file.is_file():
            try:
                feature = np.load(cache_file, allow_pickle=False)
                hit = Embedded(path, sha, kind, fmt, modality, key, input_sha, feature, cached=True)
                return hit, None, str(cache_file)
            except (OSError, ValueError):
                pass  # a damaged cache entry is embedded again and overwritten
        pending = Embedded(path, sha, kind, fmt, modality, key, input_sha, np.zeros(0, np.float32), cached=False)
        return pending, model_input, str(cache_file) if cache_file else ""

    def _model_inputs(self, extractor: Any, modality: str, raw: Any) -> Any:
        if modality == "audio":
            return extractor.audio_input(raw)
        if modality == "text":
            return extractor.text_input(raw)
        return extractor.symbolic_input(raw)

    def embed_files(self, paths: Sequence[str | os.PathLike], get_global: bool = True,
                    drops: DropLog | None = None, progress: Callable[[int], None] | None = None,
                    batch_files: int | None = None) -> list[Embedded | None]:
        """Features of ``paths`` in order (None where a file failed: recorded in ``drops`` with the
        file, stage and reason, and the rest go on). Files are read, converted and batched
        ``batch_files`` at a time (default ``EXTRACT_FILES_PER_CHUNK``)."""
        batch_files = batch_files or int(self.cfg["EXTRACT_FILES_PER_CHUNK"])
        results: list[Embedded | None] = [None] * len(paths)
        if any(Path(path).suffix.lower() == ".txt" for path in paths):
            self.tokenizer()  # a missing tokenizer fails before the first file, not after the music

        def fail(index: int, stage: str, reason: str) -> None:
            self.summary.failed += 1
            if drops is not None:
                drops.fail(paths[index], stage, reason)
            if progress:
                progress(1)

        for start in range(0, len(paths), batch_files):
            groups: dict[tuple[str | None, str], list[tuple[int, Embedded, Any, str]]] = {}
            for index in range(start, min(start + batch_files, len(paths))):
                path = Path(paths[index])
                try:
                    entry, raw, cache_file = self._prepare(path, get_global)
                except RawFileError as exc:
                    fail(index, exc.stage, exc.reason)
                    continue
                if entry.cached:
                    results[index] = entry
                    self.summary.cached += 1
                    if progress:
                        progress(1)
                    continue
                groups.setdefault((entry.format, entry.modality), []).append((index, entry, raw, cache_file))
            for (fmt, modality), items in groups.items():
                done = self.summary.embedded
                self._embed_group(fmt, modality, items, get_global, results, fail)
                if progress:
                    progress(self.summary.embedded - done)
        return results

    def _embed_group(self, fmt: str | None, modality: str, items: list[tuple[int, Embedded, Any, str]],
                     get_global: bool, results: list[Embedded | None], fail: Callable[[int, str, str], None]) -> None:
        extractor = self.extractor(fmt, needs_tokenizer=modality == "text")
        ready: list[tuple[int, Embedded, Any, str]] = []
        for index, entry, raw, cache_file in items:
            try:
                ready.append((index, entry, self._model_inputs(extractor, modality, raw), cache_file))
            except Exception as exc:  # noqa: BLE001 - one unreadable input must not stop the batch
                fail(index, "read", f"{type(exc).__name__}: {exc}")
        try:
            features = extractor.extract(modality, [tensor for _, _, tensor, _ in ready], get_global=get_global)
        except Exception:  # noqa: BLE001 - one at a time, so the culprit is named and the rest kept
            features = []
            for index, _, tensor, _ in ready:
                try:
                    features.append(extractor.extract(modality, [tensor], get_global=get_global)[0])
                except Exception as exc:  # noqa: BLE001
                    fail(index, "model", f"{type(exc).__name__}: {exc}")
                    features.append(None)
        for (index, entry, _, cache_file), feature in zip(ready, features, strict=True):
            if feature is None:
                continue
            entry.feature = feature
            if cache_file:
                atomic_save_npy(cache_file, feature)
            results[index] = entry
            self.summary.embedded += 1

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Global features ``(len(texts), D)`` of text strings (queries, label prompts), not cached:
        a query is typed once and embedding it takes milliseconds."""
        extractor = self.extractor(None, needs_tokenizer=True)
        inputs = [extractor.text_input(text) for text in texts]
        return np.concatenate(extractor.extract("text", inputs, get_global=True)).astype(np.float32)


# ---------------------------------------------------------------------------- folders
@dataclass
class FolderSummary:
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0

    def line(self) -> str:
        return (f"{self.written} written, {self.unchanged} unchanged, {self.removed} removed (their inputs are "
                f"gone), {self.failed} failed")


def manifest_path(output_dir: str | os.PathLike) -> Path:
    """Beside the feature folder, as the extraction config is: the folder itself holds only ``.npy``."""
    folder = Path(os.path.abspath(output_dir))
    return folder.with_name(folder.name + ".embd_manifest.json")


def discover(input_dir: str | os.PathLike) -> list[Path]:
    """Every file under ``input_dir`` with an extension the tools know or refuse, sorted, relative."""
    return find_files(input_dir, SEEN_EXTENSIONS)


def _folder_plan(input_dir: Path, output_dir: Path) -> tuple[dict, list[Path], list[tuple[Path, str, Path]], list[int]]:
    """(previous manifest outputs, inputs in order, name clashes, inputs' bytes) of an ``embed_folder`` run."""
    manifest_file = manifest_path(output_dir)
    try:
        previous = json.loads(manifest_file.read_text(encoding="utf-8"))["outputs"] if manifest_file.is_file() else {}
    except (OSError, ValueError, KeyError):
        previous = {}
    claimed: dict[str, Path] = {}
    inputs: list[Path] = []
    clashes: list[tuple[Path, str, Path]] = []
    sizes: list[int] = []
    for rel in discover(input_dir):
        out_rel = with_extension(rel, ".npy").as_posix()
        if out_rel in claimed:
            clashes.append((rel, out_rel, claimed[out_rel]))
            continue
        claimed[out_rel] = rel
        inputs.append(rel)
        try:
            sizes.append((input_dir / rel).stat().st_size)
        except OSError:
            sizes.append(0)  # reading it fails later, and is logged then
    return previous, inputs, clashes, sizes


def embed_folder(embedder: Embedder, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 get_global: bool, drops: DropLog | None = None,
                 progress: Callable[[int], None] | None = None,
                 planned: Callable[[int], None] | None = None) -> FolderSummary:
    """One ``.npy`` per input file at the mirrored path under ``output_dir`` (``name.ext`` →
    ``name.npy``), written only when missing or when the input or model changed; outputs this tool
    wrote for inputs that are gone are deleted. The manifest beside the folder records what each
    output was made from. ``planned`` is told how many files this process embeds (a bar's total).

    With a process group (``clamp3_embd.py`` under torchrun), rank 0 plans the run (the previous
    manifest, the inputs, the name clashes), each rank embeds and writes whole chunks of
    ``EXTRACT_FILES_PER_CHUNK`` inputs (``extraction.split_chunks``, balanced by bytes; each input
    on exactly one rank), and once every rank is done rank 0 deletes stale outputs and writes the
    manifest; every rank returns the summary of all. Every rank must call it. Without a process
    group, one rank takes every chunk in order, as it always did."""
    from extraction import RankShare, chunk_ranges, chunk_weights, split_chunks

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    share = RankShare()
    try:
        previous, inputs, clashes, sizes = share.from_main(lambda: _folder_plan(input_dir, output_dir))
        summary = FolderSummary()
        if share.is_main:
            for rel, out_rel, other in clashes:
                summary.failed += 1
                if drops is not None:
                    drops.fail(input_dir / rel, "name", f"its output {out_rel} is already made from {other}")
        batch_files = int(embedder.cfg["EXTRACT_FILES_PER_CHUNK"])
        spans = chunk_ranges(len(inputs), batch_files)
        assigned = split_chunks(chunk_weights(sizes, batch_files), share.world_size)[share.rank]
        if planned is not None:
            planned(sum(len(spans[index]) for index in assigned))
        before = embedder.summary.failed
        mine: dict[str, dict[str, Any]] = {}
        for index in assigned:
            chunk = [inputs[i] for i in spans[index]]
            results = embedder.embed_files([input_dir / rel for rel in chunk], get_global=get_global, drops=drops,
                                           progress=progress, batch_files=batch_files)
            for rel, result in zip(chunk, results, strict=True):
                if result is None:
                    continue
                out_rel = with_extension(rel, ".npy").as_posix()
                record = {"input": rel.as_posix(), "sha256": result.sha256, "kind": result.kind,
                          "format": result.format, "model_key": result.model_key, "get_global": get_global,
                          "adapter": str(embedder.adapter_of(result.format) or "") or None}
                target = output_dir / out_rel
                if previous.get(out_rel) == record and target.is_file():
                    summary.unchanged += 1
                else:
                    atomic_save_npy(target, result.feature)
                    summary.written += 1
                mine[out_rel] = record
        summary.failed += embedder.summary.failed - before
        everyone = share.gather((mine, summary))
    finally:
        share.close()
    total = FolderSummary()
    done: dict[str, dict[str, Any]] = {}
    for records, part in everyone:
        done.update(records)
        total.written += part.written
        total.unchanged += part.unchanged
        total.failed += part.failed
    # The manifest lists outputs in input order, whichever rank made them.
    outputs = {out_rel: done[out_rel] for out_rel in (with_extension(rel, ".npy").as_posix() for rel in inputs)
               if out_rel in done}

    def finish() -> int:
        removed = 0
        # Inputs that are gone, and inputs that failed this time: an old feature of either is stale.
        for out_rel in sorted(set(previous) - set(outputs)):
            stale = output_dir / out_rel
            if stale.is_file():
                stale.unlink()
                removed += 1
        document = {"input_dir": str(input_dir.resolve()), "get_global": get_global,
                    "models": embedder.choice.describe(), "outputs": outputs}
        atomic_write_text(manifest_path(output_dir), json.dumps(document, indent=1) + "\n")
        return removed

    total.removed = share.from_main(finish)
    return total


def folder_cache_dir(cache_dir: str | os.PathLike, input_dir: str | os.PathLike, get_global: bool) -> Path:
    """Where the raw-file tools keep the feature folder of an input folder (one per folder and level)."""
    resolved = Path(os.path.abspath(input_dir))
    digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:12]
    level = "global" if get_global else "patches"
    return Path(cache_dir) / "folders" / f"{resolved.name or 'root'}-{digest}-{level}"


def embed_to_cache(embedder: Embedder, input_dir: str | os.PathLike, drops: DropLog | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[Path, FolderSummary]:
    """The global-feature folder of ``input_dir`` in the cache (made or brought up to date), for the
    tools that hand feature folders to ``inference/``."""
    if embedder.cache_dir is None:
        raise ValueError("embed_to_cache needs an Embedder with a cache_dir")
    folder = folder_cache_dir(embedder.cache_dir, input_dir, get_global=True)
    return folder, embed_folder(embedder, input_dir, folder, get_global=True, drops=drops, progress=progress)


# ---------------------------------------------------------------------------- the scripts' shared options
def add_model_arguments(parser: Any, tool: str) -> None:
    """The options every raw-file tool shares (models, adapters, conversion, cache, and the failure
    log ``logs/<tool>_failures.jsonl``)."""
    from fileio import failure_log_path

    parser.add_argument("--error_log", default=str(failure_log_path(tool)),
                        help="JSONL log of files that failed (default: %(default)s)")
    parser.add_argument("--weights", help="CLaMP 3 checkpoint (default: CLAMP3_WEIGHTS_PATH; without it, the "
                        "embedded default's models when `make demo` has built them)")
    parser.add_argument("--model_config", help="JSON model sizes (default: MODEL_CONFIG or official sizes)")
    parser.add_argument("--no_adapter", action="store_true",
                        help="the base model for every format (default: the ABC adapter for sheet music, the MTF "
                        "adapter for MIDI, where LORA_ABC_ADAPTER_DIR / LORA_MTF_ADAPTER_DIR hold one)")
    parser.add_argument("--abc_mode", choices=ABC_MODES, default="auto",
                        help="how .abc files are read: auto (interleaved ABC as it is, plain ABC normalised and "
                        "interleaved), as_is, interleave (no normalisation), normalise (default: %(default)s)")
    parser.add_argument("--cache_dir", help="conversions and features cache (default: RAWFILE_CACHE_DIR)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no model summary")


def open_embedder(args: Any, cfg: dict[str, Any], show: bool | None = None,
                  device: str | None = None) -> Embedder | None:
    """``embedder_from_args`` for a script: the models it will use printed (``show``, default: unless
    ``--quiet``), or the error printed and None (the script exits 2). ``device`` overrides
    EXTRACT_DEVICE (a launched process's own GPU)."""
    import sys

    try:
        embedder = embedder_from_args(args, cfg, device=device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if (not args.quiet) if show is None else show:
        print("\n".join(embedder.choice.describe()), flush=True)
    return embedder


def embedder_from_args(args: Any, cfg: dict[str, Any], device: str | None = None) -> Embedder:
    """The ``Embedder`` the options ask for; raises ``ModelsNotFoundError``/``ValueError`` with the fix."""
    from features import check_dtype

    check_dtype(cfg["EXTRACT_DTYPE"])
    choice = choose_models(cfg, weights=args.weights, model_config=args.model_config, no_adapter=args.no_adapter)
    cache_dir = Path(args.cache_dir) if args.cache_dir else repo_path(choice.cfg["RAWFILE_CACHE_DIR"])
    return Embedder(choice, cache_dir=cache_dir, abc_mode=args.abc_mode, device=device)


def run_feature_tool(tool: str, arguments: Sequence[str], quiet: bool = False) -> int:
    """Run ``inference/<tool>.py`` (the feature-folder tool) on ``arguments`` as its own process, as the
    official raw-file wrappers do; the command is printed so it can be re-run on the cached folders."""
    import subprocess
    import sys

    command = [sys.executable, str(REPO_ROOT / "inference" / f"{tool}.py"), *arguments]
    if not quiet:
        print("$ python " + " ".join(command[1:]), flush=True)
    return subprocess.run(command, check=False).returncode


def run_on_two_folders(tool: str, args: Any, cfg: dict[str, Any], tool_arguments: Sequence[str]) -> int:
    """The raw-file ``clamp3_eval.py`` / ``clamp3_score.py``: both folders embedded into the cache, then
    ``inference/<tool>.py`` on the two feature folders with ``tool_arguments``."""
    import sys

    embedder = open_embedder(args, cfg)
    if embedder is None:
        return 2
    try:
        queries, references = embed_query_and_reference(embedder, tool, args.query_dir, args.reference_dir,
                                                        args.error_log, args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_feature_tool(tool, [str(queries), str(references), *tool_arguments], quiet=args.quiet)


def embed_query_and_reference(embedder: Embedder, tool: str, query_dir: str, reference_dir: str,
                              error_log: str | None, quiet: bool) -> tuple[Path, Path]:
    """Both folders embedded into the cache (global features), failures named and logged."""
    import sys

    from tqdm import tqdm

    def echo(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    folders = []
    for name, folder in (("query", query_dir), ("reference", reference_dir)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{name} directory not found: {folder}")
    # The weights, and the tokenizer when either folder holds text, before anything is embedded.
    embedder.check_models(text=any(rel.suffix.lower() == ".txt" for folder in (query_dir, reference_dir)
                                   for rel in discover(folder)))
    with DropLog(tool, error_log, echo=echo) as drops:
        for name, folder in (("query", query_dir), ("reference", reference_dir)):
            total = len(discover(folder))
            with tqdm(total=total, desc=f"embed {name}", unit="file", disable=quiet, dynamic_ncols=True) as bar:
                features, summary = embed_to_cache(embedder, folder, drops=drops, progress=bar.update)
            if not quiet:
                print(f"{name}: {total} files in {folder}: {summary.line()}; features in {features}", flush=True)
            folders.append(features)
    return folders[0], folders[1]
