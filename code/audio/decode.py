"""Audio files to float32 samples at the file's own rate, through FFmpeg's decoders (PyAV).

The official code decodes with ``torchaudio.load`` (FFmpeg through torchcodec): float32 of shape
``(channels, samples)``, 16-bit PCM as integer/32768, 24-bit as integer/2^23, float unchanged, and for
MP3 the encoder delay and padding named in the file's header removed, so the decoded length is the
encoded length. PyAV drives the same FFmpeg demuxers and decoders, which apply that trimming
themselves (skip-samples side data); a decoder that kept the delay would shift every window.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from formats import AUDIO_EXTENSIONS

# AUDIO_EXTENSIONS: the containers this project decodes and tests (tests/test_mert_*.py); FFmpeg reads
# more, but a format is accepted only once its decoding has been checked.
__all__ = ["AUDIO_EXTENSIONS", "AudioDecodeError", "decode_audio"]

# Integer sample formats to float: the full scale of each (FFmpeg's own conversion divides by it).
_FULL_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2.0**31, np.dtype(np.uint8): 128.0}


class AudioDecodeError(ValueError):
    """A file FFmpeg cannot decode, or that holds no audio."""


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: float32 ``(channels, n)`` of the first audio stream, at its own rate.
    Raises ``AudioDecodeError`` naming what is wrong."""
    import av  # PyAV: only audio inputs need it

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream in the file")
            stream = container.streams.audio[0]
            chunks: list[np.ndarray] = []
            channels = 0
            rate = 0
            for frame in container.decode(stream):
                array = frame.to_ndarray()
                channels = len(frame.layout.channels)
                rate = frame.sample_rate
                if not frame.format.is_planar:  # packed: (1, n * channels), interleaved
                    array = array.reshape(-1, channels).T
                chunks.append(_to_float32(array))
    except AudioDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise AudioDecodeError(f"cannot decode as audio: {exc}") from exc
    if not chunks or rate <= 0:
        raise AudioDecodeError("the audio stream holds no samples")
    samples = np.concatenate(chunks, axis=1)
    if samples.shape[1] == 0:
        raise AudioDecodeError("the audio stream holds no samples")
    return np.ascontiguousarray(samples), int(rate)


def _to_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float32:
        return array
    if array.dtype == np.float64:
        return array.astype(np.float32)
    if array.dtype == np.uint8:  # unsigned 8-bit PCM is centred on 128
        return ((array.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    scale = _FULL_SCALE.get(array.dtype)
    if scale is None:
        raise AudioDecodeError(f"unsupported sample type {array.dtype}")
    return (array.astype(np.float32) / np.float32(scale)).astype(np.float32)
