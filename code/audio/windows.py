"""From a 24 kHz waveform to the windows MERT reads (numpy only): mono, whole-file normalisation,
5-second windows with a last window under 1 s dropped, as the official extraction does."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 24000  # MERT's rate
WINDOW_SAMPLES = 5 * SAMPLE_RATE  # 5 s windows, no overlap
MIN_LAST_WINDOW_SAMPLES = 1 * SAMPLE_RATE  # a shorter last window is dropped (one of exactly 1 s is kept)
NORM_EPSILON = 1e-7  # Wav2Vec2FeatureExtractor's: (x - mean) / sqrt(var + 1e-7)


class TooShortError(ValueError):
    """Audio with no window left: shorter than 1 s at 24 kHz. The official script writes no output
    for it (and exits 0); here it is reported with its length."""

    def __init__(self, samples: int):
        self.samples = samples
        super().__init__(f"too short for MERT: {samples / SAMPLE_RATE:.2f} s ({samples} samples at 24 kHz); "
                         f"MERT features need at least 1 s of audio (the official extraction writes nothing "
                         f"for it either)")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``(channels, n)`` -> ``(1, n)``: channels averaged (before resampling, as official)."""
    if samples.ndim != 2:
        raise ValueError(f"expected (channels, samples), got shape {samples.shape}")
    if samples.shape[0] == 1:
        return samples
    return samples.mean(axis=0, keepdims=True, dtype=np.float32)


def normalise(waveform: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance over the whole file, in float32 with the population variance;
    digital silence becomes zeros."""
    x = np.asarray(waveform, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + NORM_EPSILON)).astype(np.float32)


def window_bounds(samples: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each window of a ``samples``-long waveform; ``TooShortError`` when none is left."""
    bounds = [(start, min(start + WINDOW_SAMPLES, samples)) for start in range(0, samples, WINDOW_SAMPLES)]
    if bounds and bounds[-1][1] - bounds[-1][0] < MIN_LAST_WINDOW_SAMPLES:
        bounds.pop()
    if not bounds:
        raise TooShortError(samples)
    return bounds
