"""Audio I/O and the small DSP pieces every stage shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .fsutil import atomic_path

AUDIO_EXTENSIONS = {f".{ext.lower()}" for ext in sf.available_formats()} | {".oga", ".opus"}


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the problem."""


def read_audio(path: str | Path, *, always_2d: bool = False) -> tuple[np.ndarray, int]:
    """Read any format soundfile knows as float32 in [-1, 1]: (samples[, channels]), rate."""
    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=always_2d)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"{path}: cannot read audio ({exc})") from None
    if data.size == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: contains NaN or Inf samples")
    return data, int(rate)


def to_mono(data: np.ndarray) -> np.ndarray:
    return data if data.ndim == 1 else data.mean(axis=1, dtype=np.float32)


def resample(data: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """High-quality (soxr VHQ) resampling along axis 0; a no-op at equal rates."""
    if rate_in == rate_out:
        return data.astype(np.float32, copy=False)
    return soxr.resample(data, rate_in, rate_out, quality="VHQ").astype(np.float32, copy=False)


def load_mono(path: str | Path, rate: int) -> np.ndarray:
    """Read, mix down to mono and resample to ``rate``."""
    data, sr = read_audio(path)
    return resample(to_mono(data), sr, rate)


def write_audio(path: str | Path, data: np.ndarray, rate: int, subtype: str | None = None) -> None:
    """Write atomically (temp file then rename). Format from the extension; wav defaults to PCM_16."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".") or "wav"
    with atomic_path(path, suffix=f".{ext}") as tmp:
        sf.write(str(tmp), data, rate, subtype=subtype, format=ext.upper() if ext != "oga" else "OGG")


def preemphasis(x: np.ndarray, coef: float) -> np.ndarray:
    """y[n] = x[n] - coef * x[n-1] along the last axis (zero history)."""
    if coef == 0:
        return x
    y = x.copy()
    y[..., 1:] -= coef * x[..., :-1]
    return y


def deemphasis(y: np.ndarray, coef: float) -> np.ndarray:
    """Inverse of :func:`preemphasis`: x[n] = y[n] + coef * x[n-1]."""
    if coef == 0:
        return y
    from scipy.signal import lfilter

    return lfilter([1.0], [1.0, -coef], y, axis=-1).astype(y.dtype, copy=False)


def active_speech_level(x: np.ndarray, rate: int, frame_ms: float = 20.0, threshold_db: float = -40.0) -> float:
    """Mean power of the frames within ``threshold_db`` of the loudest frame.

    A simple energy-based stand-in for ITU-T P.56's active speech level, which is what
    VoiceBank-DEMAND's SNRs are measured on (pauses would otherwise lower the speech power).
    """
    n = max(1, int(rate * frame_ms / 1000))
    frames = x[: len(x) // n * n].reshape(-1, n) if len(x) >= n else x.reshape(1, -1)
    power = np.mean(frames.astype(np.float64) ** 2, axis=1)
    if power.max() <= 0:
        return 0.0
    active = power[power >= power.max() * 10 ** (threshold_db / 10)]
    return float(active.mean())
