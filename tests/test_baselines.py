"""segan.baselines: the Wiener filter and spectral gating really reduce white noise on a
speech-like signal, keep the length, and the Wiener STFT reconstructs perfectly."""

from __future__ import annotations

import numpy as np
import pytest

from segan import baselines
from segan.metrics import ssnr
from speechlike import add_white_noise, speech_like

RATE = 16000


def snr_db(clean: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(clean ** 2) / np.sum((clean - estimate) ** 2)))


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return speech_like(3.0, RATE, seed=0)


@pytest.mark.parametrize("snr", [0.0, 5.0, 10.0])
def test_wiener_improves_snr_and_segsnr(clean: np.ndarray, snr: float) -> None:
    noisy = add_white_noise(clean, snr, seed=22)
    enhanced = baselines.wiener(noisy, RATE)
    assert enhanced.dtype == np.float32 and enhanced.shape == noisy.shape
    assert np.all(np.isfinite(enhanced))
    assert snr_db(clean, enhanced) > snr_db(clean, noisy) + 3.0
    assert ssnr(clean, enhanced) > ssnr(clean, noisy) + 2.0


def test_spectral_gating_improves_snr_and_segsnr(clean: np.ndarray) -> None:
    # at 0 dB; on this dense speech-like signal noisereduce's non-stationary gate gains
    # less as the SNR rises (at 10 dB it lowers the SNR), so a low SNR is the fair check
    noisy = add_white_noise(clean, 0.0, seed=23)
    enhanced = baselines.spectral_gating(noisy, RATE, prop_decrease=0.7)
    assert enhanced.dtype == np.float32 and enhanced.shape == noisy.shape
    assert np.all(np.isfinite(enhanced))
    assert snr_db(clean, enhanced) > snr_db(clean, noisy) + 2.0
    assert ssnr(clean, enhanced) > ssnr(clean, noisy) + 1.0


@pytest.mark.parametrize("length", [100, 511, 512, 4097, 16000])
def test_wiener_unit_gain_reconstructs_input(length: int) -> None:
    x = np.random.default_rng(length).normal(0, 0.1, length)
    y = baselines.wiener(x, RATE, gain_floor=1.0)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_wiener_other_rates_keep_length(rate: int) -> None:
    x = add_white_noise(speech_like(1.0, rate, seed=2), 5.0, seed=3)
    y = baselines.wiener(x, rate)
    assert y.shape == x.shape and np.all(np.isfinite(y))


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="mono 1-D"):
        baselines.wiener(np.zeros((10, 2)), RATE)
    with pytest.raises(ValueError, match="empty"):
        baselines.spectral_gating(np.array([]), RATE)
    with pytest.raises(ValueError, match="NaN"):
        baselines.wiener(np.array([0.0, np.nan]), RATE)
    with pytest.raises(ValueError, match="prop_decrease"):
        baselines.spectral_gating(np.zeros(1000), RATE, prop_decrease=1.5)
    with pytest.raises(ValueError, match="gain_floor"):
        baselines.wiener(np.zeros(1000), RATE, gain_floor=2.0)
