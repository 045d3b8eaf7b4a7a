"""``MertExtractor``: audio files to MERT features, the official steps with windows batched.

Per file (``waveform``): decode, average the channels, resample to 24 kHz. Per batch of files
(``features``): each waveform normalised over the whole file and cut into 5 s windows (a last
window under 1 s dropped: a file with no window left gets ``TooShortError``); every window is run
through MERT with all hidden states returned, each hidden state averaged over the window's frames;
a file's windows are concatenated into ``(hidden states, windows, width)`` float32, the official
output without ``--mean_features``; ``mean_features`` averages that over the hidden states,
``(1, windows, width)``, the form CLaMP 3 reads.

The official code runs one window per forward pass, without an attention mask. Windows of exactly
the same length are run together here (every full 5 s window of a folder, and tails that happen to
match): no padding, so no mask is needed and each window's values are those of a batch of one,
within float32 rounding. A window is never padded, as padding would change the first layer's group
norm and every frame after it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from audio.decode import decode_audio
from audio.mert_model import load_mert, resolve_mert_folder
from audio.resample import resample
from audio.windows import SAMPLE_RATE, TooShortError, normalise, to_mono, window_bounds

MERT_DTYPES = ("float32", "bfloat16")


def mean_features(frames: np.ndarray) -> np.ndarray:
    """The official ``--mean_features`` form: ``(hidden states, W, H)`` averaged over the hidden states
    (axis 0, kept), ``(1, W, H)``."""
    return torch.from_numpy(np.ascontiguousarray(frames)).mean(dim=0, keepdim=True).numpy()


def load_waveform(path: str | os.PathLike) -> np.ndarray:
    """The 24 kHz mono float32 samples ``(n,)`` of an audio file, as the official loader gives them."""
    samples, rate = decode_audio(path)
    mono = torch.from_numpy(to_mono(samples))
    return resample(mono, rate, SAMPLE_RATE)[0].numpy()


class MertExtractor:
    """MERT features of waveforms, windows of equal length ``windows_per_batch`` at a time."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", dtype: str = "float32",
                 windows_per_batch: int = 8, folder: Path | None = None):
        if dtype not in MERT_DTYPES:
            raise ValueError(f"MERT_DTYPE must be one of {MERT_DTYPES}, not {dtype!r}")
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.windows_per_batch = max(1, int(windows_per_batch))
        self.folder = folder
        self.hidden_states = int(model.config.num_hidden_layers) + 1
        self.width = int(model.config.hidden_size)

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", dtype: str = "float32",
             windows_per_batch: int = 8, setting: str = "MERT_MODEL_PATH") -> MertExtractor:
        """The MERT model named by a folder or hub id (``mert_model.resolve_mert_folder``), loaded on ``device``."""
        if dtype not in MERT_DTYPES:
            raise ValueError(f"MERT_DTYPE must be one of {MERT_DTYPES}, not {dtype!r}")
        folder = resolve_mert_folder(name_or_path, setting)
        return cls(load_mert(folder, device), device, dtype, windows_per_batch, folder)

    waveform = staticmethod(load_waveform)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    @torch.inference_mode()
    def _run(self, windows: list[np.ndarray]) -> torch.Tensor:
        """``[hidden states, len(windows), H]``: each hidden state averaged over each window's frames."""
        batch = torch.from_numpy(np.stack(windows)).to(self.device)
        with self._autocast():
            output = self.model(batch, output_hidden_states=True)
        stacked = torch.stack([state.float() for state in output.hidden_states])  # [L + 1, B, T, H]
        return stacked.mean(dim=2).cpu()

    def features(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray | TooShortError]:
        """``(hidden states, W, H)`` float32 per waveform (24 kHz mono), or its ``TooShortError``."""
        results: list[np.ndarray | TooShortError | None] = [None] * len(waveforms)
        pending: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # window length -> (file, window, samples)
        counts: dict[int, int] = {}
        for index, waveform in enumerate(waveforms):
            try:
                bounds = window_bounds(len(waveform))
            except TooShortError as exc:
                results[index] = exc
                continue
            normalised = normalise(waveform)
            counts[index] = len(bounds)
            for number, (start, end) in enumerate(bounds):
                pending.setdefault(end - start, []).append((index, number, normalised[start:end]))
        parts: dict[tuple[int, int], torch.Tensor] = {}
        for length in sorted(pending, reverse=True):
            group = pending[length]
            for first in range(0, len(group), self.windows_per_batch):
                chunk = group[first:first + self.windows_per_batch]
                states = self._run([samples for _, _, samples in chunk])
                for row, (index, number, _) in enumerate(chunk):
                    parts[(index, number)] = states[:, row:row + 1]
        for index, count in counts.items():
            results[index] = torch.cat([parts[(index, number)] for number in range(count)], dim=1).numpy()
        return results  # type: ignore[return-value] - every item is set

    def file_features(self, path: str | os.PathLike, mean: bool = False) -> np.ndarray:
        """One file's features (``mean``: the ``--mean_features`` form); raises ``TooShortError``."""
        result = self.features([self.waveform(path)])[0]
        if isinstance(result, TooShortError):
            raise result
        return mean_features(result) if mean else result
