"""Two classical (non-learned) speech-enhancement baselines to compare SEGAN against.

* :func:`wiener`: STFT Wiener filter with the Ephraim-Malah decision-directed a priori
  SNR estimate; the noise PSD comes from the quietest frames of the utterance itself.
* :func:`spectral_gating`: noisereduce's non-stationary spectral gating.

Both take a mono float signal and return float32 of the same length.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.signal import istft, stft

log = logging.getLogger(__name__)


def _as_mono(noisy: np.ndarray, rate: int) -> np.ndarray:
    x = np.asarray(noisy)
    if x.ndim != 1:
        raise ValueError(f"noisy: expected a mono 1-D array, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("noisy: empty signal")
    if rate <= 0:
        raise ValueError(f"rate: expected a positive sample rate, got {rate}")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError("noisy: contains NaN or Inf samples")
    return x


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad ``y`` to ``n`` samples, as float32."""
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(y))] = y[:n]
    return out


def wiener(noisy: np.ndarray, rate: int, *, frame_ms: float = 32.0, overlap: float = 0.75,
           alpha: float = 0.98, noise_fraction: float = 0.1, gain_floor: float = 0.1,
           xi_min_db: float = -25.0) -> np.ndarray:
    """Wiener-filter ``noisy`` (mono, any rate); float32 output of the same length.

    Per STFT frame l and bin k (Hann window, ``frame_ms`` long, ``overlap`` fraction):
    a posteriori SNR gamma = |Y|^2 / N, a priori SNR by decision direction
    xi = alpha |S_prev|^2 / N + (1 - alpha) max(gamma - 1, 0) (floored at ``xi_min_db``),
    gain G = max(xi / (1 + xi), gain_floor), S = G Y. N is the mean power spectrum of
    the ``noise_fraction`` lowest-energy frames. Weighted overlap-add inverts the STFT
    exactly, so ``gain_floor=1`` returns the input unchanged.
    """
    x = _as_mono(noisy, rate)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap}")
    if not 0.0 < noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction: expected a fraction in (0, 1], got {noise_fraction}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1), got {alpha}")
    if not 0.0 <= gain_floor <= 1.0:
        raise ValueError(f"gain_floor: expected a value in [0, 1], got {gain_floor}")

    nperseg = max(16, int(round(frame_ms * rate / 1000)))
    noverlap = int(round(nperseg * overlap))
    padded = np.pad(x, (0, max(0, nperseg - len(x))))  # scipy needs at least one full frame
    _, _, spec = stft(padded, fs=rate, window="hann", nperseg=nperseg, noverlap=noverlap)
    power = np.abs(spec) ** 2  # (bins, frames)

    # noise PSD: the quietest frames are taken as noise-only (speech pauses)
    frame_energy = power.sum(axis=0)
    n_quiet = max(1, int(np.ceil(noise_fraction * power.shape[1])))
    quiet = np.argsort(frame_energy)[:n_quiet]
    noise_psd = np.maximum(power[:, quiet].mean(axis=1), np.finfo(np.float64).tiny)

    xi_min = 10 ** (xi_min_db / 10)
    gamma = power / noise_psd[:, None]
    gain = np.empty_like(gamma)
    prev_clean = None  # |S(l-1)|^2 / N
    for frame in range(gamma.shape[1]):  # sequential: each xi uses the previous estimate
        ml = np.maximum(gamma[:, frame] - 1.0, 0.0)
        xi = ml if prev_clean is None else alpha * prev_clean + (1 - alpha) * ml
        xi = np.maximum(xi, xi_min)
        g = np.maximum(xi / (1.0 + xi), gain_floor)
        gain[:, frame] = g
        prev_clean = g * g * gamma[:, frame]

    _, y = istft(spec * gain, fs=rate, window="hann", nperseg=nperseg, noverlap=noverlap)
    return _fit_length(y, len(x))


def spectral_gating(noisy: np.ndarray, rate: int, prop_decrease: float = 0.7) -> np.ndarray:
    """noisereduce's non-stationary spectral gating; float32 output of the same length."""
    import noisereduce

    x = _as_mono(noisy, rate)
    if not 0.0 <= prop_decrease <= 1.0:
        raise ValueError(f"prop_decrease: expected a value in [0, 1], got {prop_decrease}")
    y = noisereduce.reduce_noise(y=x.astype(np.float32), sr=rate, prop_decrease=prop_decrease)
    return _fit_length(np.asarray(y), len(x))
