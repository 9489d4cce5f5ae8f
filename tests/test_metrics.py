"""segan.metrics: the vectorized composite port against a plain reference port, known
facts about PESQ/STOI/composite values, scale invariance, failure handling, and the
``segan metrics`` command (run for real through click's CliRunner)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import reference_composite as ref
from segan import metrics
from segan.audio import resample, write_audio
from segan.cli_metrics import metrics_command
from speechlike import add_white_noise, speech_like

RATE = 16000


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return speech_like(3.0, RATE, seed=0)


def _lowpassed(x: np.ndarray) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(6, 2000, fs=RATE, output="sos"), x)


def _signal_pairs() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    x = speech_like(1.2, RATE, seed=3)
    x8 = speech_like(1.2, 8000, seed=4)
    noise = np.random.default_rng(9).normal(0, 0.1, len(x))
    return {
        "white_20dB": (x, add_white_noise(x, 20, seed=5), RATE),
        "white_0dB": (x, add_white_noise(x, 0, seed=6), RATE),
        "lowpassed_delayed": (x, np.roll(_lowpassed(x), 37), RATE),
        "noise_vs_speech": (x, noise, RATE),
        "odd_length": (x[:17_333], add_white_noise(x, 5, seed=7)[:17_333], RATE),
        "8kHz_lpc10": (x8, add_white_noise(x8, 10, seed=8), 8000),
    }


# ----------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("case", list(_signal_pairs()))
def test_vectorized_frames_match_plain_reference(case: str) -> None:
    c, d, rate = _signal_pairs()[case]
    c, d = c + ref.EPS, d + ref.EPS
    for fast, slow in ((metrics.wss_frames, ref.wss_frames), (metrics.llr_frames, ref.llr_frames),
                       (metrics.segsnr_frames, ref.segsnr_frames)):
        got, want = fast(c, d, rate), slow(c, d, rate)
        assert got.shape == want.shape and len(got) > 10
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{fast.__name__} on {case}")


@pytest.mark.parametrize("case", ["white_20dB", "lowpassed_delayed", "8kHz_lpc10"])
def test_aggregates_match_reference_for_full_scale_float(case: str) -> None:
    # for a float reference peaking at exactly 1.0 the scale normalization is the identity,
    # so the results must be composite.m's own
    c, d, rate = _signal_pairs()[case]
    peak = np.max(np.abs(c))
    got = metrics.composite_measures(c / peak, d / peak, rate)
    want = ref.composite_measures(c / peak, d / peak, rate)
    for key in ("wss", "llr", "ssnr"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_framing_follows_composite_m() -> None:
    fr = metrics.framing(48000, RATE)
    assert (fr.win, fr.hop) == (480, 120)
    assert fr.count == 48000 // 120 - 4  # one fewer than the frames that would fit
    n = np.arange(1, 481)
    np.testing.assert_allclose(fr.window, 0.5 * (1 - np.cos(2 * np.pi * n / 481)))
    filt, n_fft = metrics._crit_filter(RATE)
    assert n_fft == 1024 and filt.shape == (25, 512)
    assert metrics.framing(44100, 44100).win == 1323 and metrics.framing(8000, 8000).win == 240
    assert metrics.matlab_round(28.5) == 29 and metrics.matlab_round(9.5) == 10  # not banker's


def test_too_short_for_one_frame_raises_metric_error() -> None:
    x = np.random.default_rng(0).normal(size=599)  # needs win + hop = 600 samples
    with pytest.raises(metrics.MetricError, match="too short"):
        metrics.composite_measures(x, x)


# ----------------------------------------------------------------------------- scale
@pytest.mark.parametrize("scale", [32768.0, 1 / 32768, 1e-3])
def test_composite_is_scale_invariant_float_vs_int16_scaled(clean: np.ndarray, scale: float) -> None:
    # 32768: int16-scaled values; 1/32768: what a port dividing float frames by 32768 sees;
    # 1e-3: a very quiet float recording
    degraded = add_white_noise(clean, 10)
    as_float = metrics.composite(clean, degraded)
    scaled = metrics.composite(clean * scale, degraded * scale)
    for key in ("csig", "cbak", "covl", "wss", "llr", "ssnr", "pesq"):
        assert scaled[key] == pytest.approx(as_float[key], abs=1e-6), key


def test_int16_arrays_give_the_same_values_as_their_float_version(clean: np.ndarray) -> None:
    degraded = add_white_noise(clean, 5)
    ci = np.round(clean * 32767).astype(np.int16)
    di = np.round(degraded / np.max(np.abs(degraded)) * 32767).astype(np.int16)
    got = metrics.composite_measures(ci, di)
    want = metrics.composite_measures(ci / 32768.0, di / 32768.0)
    for key in got:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_fixed_floor_port_is_scale_dependent_which_we_avoid(clean: np.ndarray) -> None:
    """The bug class: composite.m's fixed 1e-10 band floor on frames scaled by 1/32768
    (what a widely copied port does to float input) lowers WSS and inflates the composites."""
    degraded = add_white_noise(clean, 10)
    faithful = ref.composite_measures(clean, degraded, RATE)["wss"]
    shrunk = ref.composite_measures(clean / 32768, degraded / 32768, RATE)["wss"]
    assert faithful - shrunk > 5.0  # the reference really is scale dependent
    assert metrics.wss(clean / 32768, degraded / 32768) == pytest.approx(metrics.wss(clean, degraded), abs=1e-6)


# ----------------------------------------------------------------------------- known facts
def test_identical_signals(clean: np.ndarray) -> None:
    result = metrics.score(clean, clean)
    assert result["pesq"] == pytest.approx(4.644, abs=0.01)
    assert result["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert result["estoi"] == pytest.approx(1.0, abs=1e-6)
    assert result["csig"] == result["cbak"] == result["covl"] == 5.0
    assert result["ssnr"] == 35.0
    assert result["pesq_error"] is None
    measures = metrics.composite_measures(clean, clean)
    assert measures["wss"] == 0.0 and measures["llr"] == pytest.approx(0.0, abs=1e-12)


def test_composite_formula_hand_computed() -> None:
    # CSIG = 3.093 - 1.029*0.8 + 0.603*2.5 - 0.009*40        = 3.4173
    # CBAK = 1.634 + 0.478*2.5 - 0.007*40 + 0.063*5          = 2.864
    # COVL = 1.594 + 0.805*2.5 - 0.512*0.8 - 0.007*40        = 2.9169
    assert metrics.composite_from_measures(pesq=2.5, llr=0.8, wss=40.0, segsnr=5.0) == pytest.approx(
        (3.4173, 2.864, 2.9169), abs=1e-9)
    # CSIG = 3.093 - 1.029*0.3 + 0.603*3.2 - 0.009*25 = 4.4889; CBAK = 1.634 + 1.5296 - 0.175 - 0.126 = 2.8626
    # COVL = 1.594 + 2.576 - 0.1536 - 0.175 = 3.8414
    assert metrics.composite_from_measures(3.2, 0.3, 25.0, -2.0) == pytest.approx((4.4889, 2.8626, 3.8414), abs=1e-9)
    # clipping to [1, 5] at both ends
    assert metrics.composite_from_measures(1.0, 2.0, 100.0, -10.0) == (1.0, 1.0, 1.0)
    assert metrics.composite_from_measures(4.64, 0.0, 0.0, 35.0) == (5.0, 5.0, 5.0)


def test_trimmed_mean_keeps_lowest_95_percent() -> None:
    values = np.arange(40.0)[::-1]  # round(40 * 0.95) = 38 lowest: 0..37
    assert metrics.trimmed_mean(values) == pytest.approx(np.mean(np.arange(38.0)))


def test_metrics_fall_monotonically_with_snr(clean: np.ndarray) -> None:
    rows = [metrics.score(clean, add_white_noise(clean, snr, seed=11)) for snr in (30, 20, 10, 0)]
    for key in metrics.METRIC_NAMES:
        values = [row[key] for row in rows]
        assert all(a > b for a, b in zip(values, values[1:])), f"{key} not decreasing: {values}"
    assert rows[0]["stoi"] > 0.95 and rows[-1]["ssnr"] < 0


# ----------------------------------------------------------------------------- failures and input
def test_pesq_failures_are_recorded_not_raised(clean: np.ndarray) -> None:
    silent = metrics.score(np.zeros(RATE), np.zeros(RATE))
    assert math.isnan(silent["pesq"]) and "silent" in silent["pesq_error"]
    assert all(math.isnan(silent[k]) for k in ("csig", "cbak", "covl", "stoi", "estoi"))

    short = metrics.score(clean[8000:11000], clean[8000:11000])  # 0.19 s
    assert math.isnan(short["pesq"]) and "BufferTooShort" in short["pesq_error"]
    assert math.isnan(short["csig"]) and math.isnan(short["stoi"])
    assert short["ssnr"] == 35.0  # segSNR is still defined

    tiny = metrics.score(clean[:100], clean[:100])
    assert all(math.isnan(tiny[k]) for k in metrics.METRIC_NAMES) and tiny["pesq_error"]

    with pytest.raises(metrics.MetricError, match="pesq: silent clean"):
        metrics.pesq_wb(np.zeros(RATE), np.zeros(RATE))
    muted = metrics.score(clean, np.zeros_like(clean))  # a system that outputs silence
    assert "silent degraded" in muted["pesq_error"] and math.isnan(muted["covl"])
    assert muted["stoi"] < 0.05 and muted["ssnr"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(metrics.MetricError, match="too short"):
        metrics.stoi(clean[:3000], clean[:3000], RATE)


def test_score_resamples_and_truncates(clean: np.ndarray) -> None:
    degraded = add_white_noise(clean, 10, seed=2)
    at_16k = metrics.score(clean, degraded)
    c44, d44 = resample(clean, RATE, 44100), resample(degraded, RATE, 44100)
    at_44k = metrics.score(c44, np.concatenate([d44, np.zeros(5000, np.float32)]), rate=44100)
    for key, tol in (("pesq", 0.05), ("stoi", 0.005), ("csig", 0.1), ("cbak", 0.1), ("covl", 0.1), ("ssnr", 0.5)):
        assert at_44k[key] == pytest.approx(at_16k[key], abs=tol), key


def test_invalid_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="mono 1-D"):
        metrics.score(np.zeros((100, 2)), np.zeros(100))
    with pytest.raises(ValueError, match="degraded: contains NaN"):
        metrics.score(np.ones(1000), np.full(1000, np.nan))
    with pytest.raises(ValueError, match="clean: empty"):
        metrics.score(np.array([]), np.ones(10))


# ----------------------------------------------------------------------------- CLI
def test_metrics_command_on_real_files(tmp_path, clean: np.ndarray) -> None:
    clean_44k = resample(clean, RATE, 44100)
    stereo_44k = np.stack([clean_44k, clean_44k], axis=1)  # mixed down to mono by the command
    write_audio(tmp_path / "clean.wav", stereo_44k, 44100)
    write_audio(tmp_path / "noisy.wav", add_white_noise(clean, 10).astype(np.float32), RATE)
    runner = CliRunner()

    result = runner.invoke(metrics_command, [str(tmp_path / "clean.wav"), str(tmp_path / "noisy.wav"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert set(metrics.METRIC_NAMES) <= set(payload) and payload["pesq_error"] is None
    direct = metrics.score(clean, add_white_noise(clean, 10))
    assert payload["pesq"] == pytest.approx(direct["pesq"], abs=0.1)
    assert payload["stoi"] == pytest.approx(direct["stoi"], abs=0.01)
    assert 1 <= payload["covl"] <= 5

    table = runner.invoke(metrics_command, [str(tmp_path / "clean.wav"), str(tmp_path / "noisy.wav")])
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(metrics.METRIC_NAMES)
    value_ends = {line.index(" " + line.split()[1]) + 1 + len(line.split()[1]) for line in lines}
    assert len(value_ends) == 1  # values right-aligned in one column


def test_metrics_command_names_an_unreadable_file(tmp_path, clean: np.ndarray) -> None:
    write_audio(tmp_path / "clean.wav", clean.astype(np.float32), RATE)
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    runner = CliRunner()
    result = runner.invoke(metrics_command, [str(tmp_path / "clean.wav"), str(tmp_path / "broken.wav")])
    assert result.exit_code == 2
    assert "broken.wav" in result.output and "DEGRADED" in result.output
    missing = runner.invoke(metrics_command, [str(tmp_path / "nope.wav"), str(tmp_path / "clean.wav")])
    assert missing.exit_code == 2 and "nope.wav" in missing.output and "CLEAN" in missing.output
