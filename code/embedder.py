"""Features of raw files and texts: which models a run uses, the content-keyed cache, and ``Embedder``.

The **models** (``choose_models``): the configured checkpoint (the C2 weights, ``CLAMP3_WEIGHTS_PATH``
or ``--weights``) when it exists, otherwise the embedded default's models (``make demo``, where
``demo.layout`` says they are), and the output says which. Sheet music (ABC, MusicXML) goes through
the ABC adapter and MIDI/MTF through the MTF adapter when the adapter folder holds one; text and MERT
features through the base (adapters live on the symbolic side only, so text features are the base's
whatever the adapter). Audio files first become MERT features (``code/audio/``, the official
``--mean_features`` form) with the MERT model of ``MERT_MODEL_PATH``, loaded when the first audio
file comes; without it every audio file fails with the one-line reason and the fix, and the rest go on.

The **cache** (``RAWFILE_CACHE_DIR``) is keyed by content: conversions by the file's SHA-256 and
the converter version; MERT features of audio by the file's SHA-256 and the MERT key (the MERT
model's files, MERT_DTYPE, the audio steps' version); features by the SHA-256 of the model input
and the model key (weights, model sizes, adapter files, the settings that change features), so an
audio file and the ``.npy`` of its MERT features share one feature. A changed file has a new hash and is
converted and embedded again; an unchanged file is never converted or embedded twice, wherever it
lives. Everything in the cache can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lora
import numpy as np
import runconfig
from demo import layout as demo_layout
from features import FeatureExtractor, load_text_tokenizer
from fileio import REPO_ROOT, DropLog, atomic_save_npy, atomic_write_text, file_sha256, repo_path
from formats import AUDIO_EXTENSIONS, FORMAT_OF_KIND, FORMATS, MODALITY_OF_KIND
from modeling import CLaMP3Model, ModelConfig, load_clamp3, resolve_device
from rawfiles import (
    ABC_MODES,
    CONVERTER_VERSION,
    RawFileError,
    kind_of,
    mert_digest,
    mert_input,
    model_input_text,
    sha256_text,
)

# The name of the base among an Embedder's models (the adapted ones are named by their format): text,
# MERT features and every format without an adapter go through it.
BASE = "base"
# Settings that change a feature (beyond weights, sizes and adapter), part of every model key.
FEATURE_SETTINGS = ("PATCH_LENGTH", "MAX_TEXT_LENGTH", "MAX_AUDIO_LENGTH", "TEXT_MODEL_NAME", "EXTRACT_DTYPE")
# Bump when the steps from an audio file to its MERT features change, so cached MERT features are made again.
MERT_STEPS_VERSION = 1
MERT_FILES_PER_BATCH = 16  # audio files decoded and run through MERT together


class ModelsNotFoundError(FileNotFoundError):
    """Neither the configured checkpoint nor the embedded default's models exist."""


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
        for fmt in FORMATS:
            folder = self.adapters.get(fmt)
            lines.append(f"  {fmt.upper()} (sheet music)" if fmt == "abc" else "  MTF (MIDI)")
            lines[-1] += f": adapter {folder}" if folder else ": base model, no adapter"
        return lines + [f"  note: {reason}" for reason in self.reasons]


def choose_models(cfg: dict[str, Any], weights: str | os.PathLike | None = None,
                  model_config: str | os.PathLike | None = None, no_adapter: bool = False,
                  demo_fallback: bool | None = None,
                  demo_roots: Sequence[Path] = demo_layout.FALLBACK_ROOTS) -> ModelChoice:
    """The configured checkpoint (``weights`` as typed, else ``CLAMP3_WEIGHTS_PATH``) if it exists;
    otherwise, with ``RAWFILE_DEMO_FALLBACK``, the embedded default's models; else
    ``ModelsNotFoundError`` saying how to get either."""
    reasons: list[str] = []
    typed = Path(weights).absolute() if weights else None
    configured = typed or repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
    demo_fallback = cfg["RAWFILE_DEMO_FALLBACK"] if demo_fallback is None else demo_fallback
    source = "checkpoint"
    if not configured.is_file():
        roots = [Path(root) for root in demo_roots if demo_layout.is_built(Path(root))]
        if typed is not None or not demo_fallback or not roots:
            hint = ("run `make demo` for the embedded default's models, or download the C2 checkpoint (README)"
                    if typed is None else "check the path given with --weights")
            raise ModelsNotFoundError(f"weights not found: {configured}; {hint}")
        shown = configured.relative_to(REPO_ROOT) if configured.is_relative_to(REPO_ROOT) else configured
        reasons.append(f"no checkpoint at CLAMP3_WEIGHTS_PATH ({shown}), so the embedded default's models "
                       f"({roots[0]}) are used")
        cfg = demo_layout.model_settings(cfg, roots[0])
        configured = repo_path(cfg["CLAMP3_WEIGHTS_PATH"])
        source = "demo"
        if not no_adapter and demo_layout.joint_adapters_built(roots[0]) and \
                repo_path(cfg["LORA_ABC_ADAPTER_DIR"]) == roots[0] / demo_layout.JOINT_ADAPTER_DIRS["abc"]:
            reasons.append("the demo's joint adapters (sheet music and MIDI aligned with each other, "
                           "python -m demo --joint) are used")
    sizes = ModelConfig.resolve(cfg, runconfig.model_config_path(None if source == "demo" else model_config, cfg))
    adapters: dict[str, Path | None] = {}
    for fmt in FORMATS:
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
    model_key: str  # for audio, the CLaMP 3 key and the MERT key
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
        self._models: dict[str, CLaMP3Model] = {}
        self._extractors: dict[str, FeatureExtractor] = {}
        self._tokenizer: Any = None
        self._model_keys: dict[str, str] = {}
        self._mert: Any = None
        self._mert_error: Exception | None = None
        self._mert_key: str | None = None

    # -------------------------------------------------------------- models
    def adapter_of(self, fmt: str | None) -> Path | None:
        """The adapter folder a format goes through (None: the base; text and audio always)."""
        return self.choice.adapters.get(fmt) if fmt else None

    def _slot(self, fmt: str | None) -> str:
        """Which model serves ``fmt``: the format's own when it has an adapter, else ``BASE``."""
        return fmt if self.adapter_of(fmt) else BASE

    def _load_base(self) -> CLaMP3Model:
        if self._base is None:
            self._base = load_clamp3(self.choice.model_config, self.choice.weights, device=self.device,
                                     attn_implementation=self.cfg["ATTN_IMPLEMENTATION"])
        return self._base

    def model(self, fmt: str | None) -> CLaMP3Model:
        """The model a format goes through (``BASE`` or None: the base, which text and audio always use)."""
        slot = self._slot(fmt)
        if slot not in self._models:
            base = self._load_base()
            self._models[slot] = base if slot == BASE else lora.with_adapter(base, self.adapter_of(fmt))
        return self._models[slot]

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_text_tokenizer(self.cfg["TEXT_MODEL_NAME"])
        return self._tokenizer

    def check_models(self, text: bool = False) -> None:
        """Load the base weights now, and the text tokenizer when ``text``, so a missing or mismatched
        one fails (``RuntimeError``/``ValueError`` with the fix) before any file is converted or embedded."""
        self._load_base()
        if text:
            self.tokenizer()

    def mert(self) -> Any:
        """The ``audio.mert_features.MertExtractor`` of ``MERT_MODEL_PATH`` on this device, loaded once;
        ``audio.mert_model.MertModelError`` (one line, with the fix) when it is missing or does not fit
        the audio tower, raised again for every later audio file without trying again."""
        if self._mert is None and self._mert_error is None:
            from audio.mert_features import MertExtractor
            from audio.mert_model import MertModelError

            try:
                mert = MertExtractor.load(self.cfg["MERT_MODEL_PATH"], device=self.device,
                                          dtype=self.cfg["MERT_DTYPE"],
                                          windows_per_batch=self.cfg["MERT_WINDOWS_PER_BATCH"])
                width = int(self.choice.model_config.audio["hidden_size"])
                if mert.width != width:
                    demo = ("; the embedded default's models (make demo) have no trained audio tower: audio needs "
                            "the official C2 checkpoint" if self.choice.source == "demo" else "")
                    raise MertModelError(f"the MERT model in {mert.folder} gives {mert.width}-wide features but the "
                                         f"CLaMP 3 audio tower reads {width}-wide ones (MERT-v1-95M: 768){demo}")
                self._mert = mert
            except (MertModelError, ValueError) as exc:
                self._mert_error = exc
        if self._mert_error is not None:
            raise self._mert_error
        return self._mert

    def mert_key(self) -> str:
        """A digest of what makes the MERT features of an audio file: the MERT model's files, MERT_DTYPE
        and the audio steps' version."""
        if self._mert_key is None:
            from audio.mert_model import mert_files, resolve_mert_folder

            # The files decide it, not the loaded model: a key costs no model load (the search index asks
            # for it on every search), and no download (allow_download=False).
            folder = (self._mert.folder if self._mert is not None
                      else resolve_mert_folder(self.cfg["MERT_MODEL_PATH"], allow_download=False))
            facts = {"files": {f.name: self.fingerprints.sha256(f) for f in mert_files(folder) if f.is_file()},
                     "dtype": self.cfg["MERT_DTYPE"], "steps": MERT_STEPS_VERSION}
            self._mert_key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode("utf-8")).hexdigest()[:20]
        return self._mert_key

    def _mert_path(self, sha: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "mert" / self.mert_key() / sha[:2] / f"{sha}.npy"

    def audio_inputs(self, paths: Sequence[Path]) -> list[tuple[str, np.ndarray] | RawFileError]:
        """(file SHA-256, MERT features ``(1, windows, width)``) of each audio file, or why it has none;
        from the cache where made before, the rest decoded and run through MERT together. A file under
        1 s (no window) and a file that does not decode are remembered, like failed conversions."""
        results: list[tuple[str, np.ndarray] | RawFileError | None] = [None] * len(paths)
        try:
            mert = self.mert()
        except Exception as exc:  # noqa: BLE001 - MertModelError/ValueError: every audio file fails with it
            return [RawFileError(path, "mert", f"needs the MERT model: {exc}") for path in paths]
        # A few files' waveforms at a time: a chunk of long recordings would not fit in memory at once.
        for first in range(0, len(paths), MERT_FILES_PER_BATCH):
            batch = range(first, min(first + MERT_FILES_PER_BATCH, len(paths)))
            self._audio_batch(mert, paths, batch, results)
        return results  # type: ignore[return-value] - every item is set

    def _audio_batch(self, mert: Any, paths: Sequence[Path], batch: range,
                     results: list[tuple[str, np.ndarray] | RawFileError | None]) -> None:
        from audio.decode import AudioDecodeError
        from audio.mert_features import mean_features
        from audio.windows import TooShortError

        todo: list[tuple[int, str, np.ndarray, Path | None]] = []
        for index in batch:
            path = paths[index]
            try:
                sha = file_sha256(path)
            except OSError as exc:
                results[index] = RawFileError(path, "read", f"cannot read: {exc.strerror or exc}")
                continue
            cached = self._mert_path(sha)
            failed = cached.with_name(cached.name + ".error.json") if cached else None
            if cached is not None and cached.is_file():
                try:
                    results[index] = (sha, np.load(cached, allow_pickle=False))
                    continue
                except (OSError, ValueError):
                    pass  # a damaged entry is made again
            if failed is not None and failed.is_file():
                record = json.loads(failed.read_text(encoding="utf-8"))
                results[index] = RawFileError(path, record["stage"], record["reason"] + " (remembered from an earlier run)")
                continue
            try:
                todo.append((index, sha, mert.waveform(path), cached))
            except AudioDecodeError as exc:
                results[index] = self._remember(failed, RawFileError(path, "decode", str(exc)))
            except OSError as exc:  # may pass (a file being written, permissions): not remembered
                results[index] = RawFileError(path, "read", f"cannot read: {exc.strerror or exc}")
        try:
            features: list[Any] = mert.features([waveform for _, _, waveform, _ in todo]) if todo else []
        except Exception:  # noqa: BLE001 - one at a time, so the culprit is named and the rest kept
            features = []
            for _, _, waveform, _ in todo:
                try:
                    features.append(mert.features([waveform])[0])
                except Exception as exc:  # noqa: BLE001
                    features.append(RuntimeError(f"{type(exc).__name__}: {exc}"))
        for (index, sha, _, cached), result in zip(todo, features, strict=True):
            if isinstance(result, RuntimeError):
                results[index] = RawFileError(paths[index], "model", str(result))
                continue
            if isinstance(result, TooShortError):
                failed = cached.with_name(cached.name + ".error.json") if cached else None
                results[index] = self._remember(failed, RawFileError(paths[index], "mert", str(result)))
                continue
            array = mean_features(result)
            if cached is not None:
                atomic_save_npy(cached, array)
            results[index] = (sha, array)

    @staticmethod
    def _remember(failed: Path | None, error: RawFileError) -> RawFileError:
        if failed is not None:
            atomic_write_text(failed, json.dumps({"stage": error.stage, "reason": error.reason}) + "\n")
        return error

    def extractor(self, fmt: str | None, needs_tokenizer: bool = False) -> FeatureExtractor:
        slot = self._slot(fmt)
        if slot not in self._extractors:
            self._extractors[slot] = FeatureExtractor.from_config(self.model(fmt), self.cfg, device=self.device)
        extractor = self._extractors[slot]
        if needs_tokenizer and extractor.tokenizer is None:
            extractor.tokenizer = self.tokenizer()
        return extractor

    def model_key(self, fmt: str | None) -> str:
        """A digest of everything that makes a feature: weights, sizes, the adapter (or none) and the
        feature settings. Text and audio always use the base, whose key is ``model_key(BASE)``."""
        slot = self._slot(fmt)
        if slot not in self._model_keys:
            facts = {"weights": self.fingerprints.sha256(self.choice.weights),
                     "model_config": self.choice.model_config.to_dict(),
                     "adapter": folder_sha256(self.adapter_of(fmt)) if slot != BASE else None,
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
    def _prepare(self, path: Path, get_global: bool,
                 audio: tuple[str, np.ndarray] | RawFileError | None = None) -> tuple[Embedded, Any, str]:
        """(the entry of one file, a cache hit or still to embed; its model input, None for a hit; its
        cache file, "" without a cache); raises RawFileError. ``audio``: an audio file's
        ``audio_inputs`` result."""
        kind = kind_of(path)
        if isinstance(audio, RawFileError):
            raise audio
        try:
            sha = audio[0] if audio is not None else file_sha256(path)
        except OSError as exc:
            raise RawFileError(path, "read", f"cannot read: {exc.strerror or exc}") from exc
        fmt = FORMAT_OF_KIND.get(kind)
        modality = MODALITY_OF_KIND[kind]
        model_input: Any
        if audio is not None:
            model_input, input_sha = audio[1], mert_digest(audio[1])
        elif modality == "audio":
            model_input, input_sha = mert_input(path)
        else:
            text = self.converted_text(path, sha, kind)
            if not text.strip():
                raise RawFileError(path, "read", "empty file" if kind in ("mtf", "text") else "conversion is empty")
            model_input, input_sha = text, sha256_text(text)
        key = self.model_key(fmt)
        cache_file = self._feature_path(key, modality, input_sha, get_global)
        # An audio file's feature depends on the MERT model too: its entry says so (a manifest then
        # sees a changed MERT model), while the cached feature is the one of its MERT features.
        entry_key = f"{key}+mert-{self.mert_key()}" if audio is not None else key
        if cache_file is not None and cache_file.is_file():
            try:
                feature = np.load(cache_file, allow_pickle=False)
                hit = Embedded(path, sha, kind, fmt, modality, entry_key, input_sha, feature, cached=True)
                return hit, None, str(cache_file)
            except (OSError, ValueError):
                pass  # a damaged cache entry is embedded again and overwritten
        pending = Embedded(path, sha, kind, fmt, modality, entry_key, input_sha, np.zeros(0, np.float32),
                           cached=False)
        return pending, model_input, str(cache_file) if cache_file else ""

    def _model_inputs(self, extractor: Any, modality: str, raw: Any) -> Any:
        if modality == "audio":
            return extractor.audio_input(raw)
        if modality == "text":
            return extractor.text_input(raw)
        return extractor.symbolic_input(raw)

    def embed_files(self, paths: Sequence[str | os.PathLike], get_global: bool = True,
                    drops: DropLog | None = None, progress: Callable[[int], None] | None = None,
                    batch_files: int | None = None) -> list[Embedded | RawFileError]:
        """Features of ``paths`` in order; where a file failed, its ``RawFileError`` (the file, stage and
        reason, also recorded in ``drops``), and the rest go on. Files are read, converted and batched
        ``batch_files`` at a time (default ``EXTRACT_FILES_PER_CHUNK``)."""
        batch_files = batch_files or int(self.cfg["EXTRACT_FILES_PER_CHUNK"])
        results: list[Embedded | RawFileError | None] = [None] * len(paths)
        if any(Path(path).suffix.lower() == ".txt" for path in paths):
            self.tokenizer()  # a missing tokenizer fails before the first file, not after the music

        def fail(index: int, stage: str, reason: str) -> None:
            results[index] = RawFileError(paths[index], stage, reason)
            self.summary.failed += 1
            if drops is not None:
                drops.fail(paths[index], stage, reason)
            if progress:
                progress(1)

        for start in range(0, len(paths), batch_files):
            groups: dict[tuple[str | None, str], list[tuple[int, Embedded, Any, str]]] = {}
            chunk = range(start, min(start + batch_files, len(paths)))
            audio_files = [index for index in chunk if Path(paths[index]).suffix.lower() in AUDIO_EXTENSIONS]
            audio = dict(zip(audio_files, self.audio_inputs([Path(paths[i]) for i in audio_files]), strict=True))
            for index in chunk:
                path = Path(paths[index])
                try:
                    entry, raw, cache_file = self._prepare(path, get_global, audio.get(index))
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
        return results  # every item is set: an entry or the reason it failed

    def _embed_group(self, fmt: str | None, modality: str, items: list[tuple[int, Embedded, Any, str]],
                     get_global: bool, results: list[Embedded | RawFileError | None],
                     fail: Callable[[int, str, str], None]) -> None:
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
        extractor = self.extractor(BASE, needs_tokenizer=True)
        inputs = [extractor.text_input(text) for text in texts]
        return np.concatenate(extractor.extract("text", inputs, get_global=True)).astype(np.float32)


