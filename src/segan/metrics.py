"""Objective speech-enhancement metrics as reported in the SEGAN paper.

PESQ (ITU-T P.862.2 wide-band, ``pesq`` package), STOI / ESTOI (``pystoi``), the
composite measures CSIG / CBAK / COVL of Hu & Loizou (2008) and segmental SNR, both
ported from Loizou's ``composite.m``. Inputs are mono float arrays at 16 kHz unless a
``rate`` is given.

The composite port is vectorized (frames as strided views, batched FFTs, batched
autocorrelation, Levinson-Durbin across all frames at once) and checked against a
plain frame-by-frame port (``tests/reference_composite.py``) to 1e-6.

Scale invariance: ``composite.m`` floors critical-band energies at a fixed 1e-10
(-100 dB) and adds a fixed ``eps``, so its WSS depends on whether audio arrives as
floats in [-1, 1] or as int16 counts (a widely copied Python port divides frames by
32768 and so inflates CSIG/CBAK/COVL by ~0.1 for float input). Here both signals are
first scaled by the same factor, 1 / max|clean|; the floor and ``eps`` therefore sit at
fixed levels below the clean peak and any common scale gives identical results. For
a float reference peaking at full scale the numbers are exactly composite.m's.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .audio import resample

log = logging.getLogger(__name__)

RATE = 16000
METRIC_NAMES = ("pesq", "stoi", "estoi", "csig", "cbak", "covl", "ssnr")
EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps, as composite.m uses it
TRIM = 0.95  # composite.m's alpha: WSS and LLR average the lowest 95 % of frames
SEGSNR_RANGE = (-10.0, 35.0)
WSS_FLOOR = 1e-10  # band energy floor before dB (relative to the scaled signal)
KMAX, KLOCMAX = 20.0, 1.0  # Klatt's weighting constants

# composite.m's critical-band table (Hz): centre frequency and bandwidth per band
CENT_FREQ = np.array([
    50.0000, 120.000, 190.000, 260.000, 330.000, 400.000, 470.000, 540.000, 617.372, 703.378,
    798.717, 904.128, 1020.38, 1148.30, 1288.72, 1442.54, 1610.70, 1794.16, 1993.93, 2211.08,
    2446.71, 2701.97, 2978.04, 3276.17, 3597.63])
BANDWIDTH = np.array([
    70.0000, 70.0000, 70.0000, 70.0000, 70.0000, 70.0000, 70.0000, 77.3724, 86.0056, 95.3398,
    105.411, 116.256, 127.914, 140.423, 153.823, 168.154, 183.457, 199.776, 217.153, 235.631,
    255.255, 276.072, 298.126, 321.465, 346.136])


class MetricError(ValueError):
    """A metric that is undefined for this input (silence, too short, ...)."""

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(f"{metric}: {reason}")
        self.metric = metric
        self.reason = reason


# ----------------------------------------------------------------------------- input
def _as_signal(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a mono 1-D array, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name}: empty signal")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or Inf samples")
    return x


def _pair(clean: np.ndarray, degraded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 copies truncated to the shorter length."""
    clean, degraded = _as_signal(clean, "clean"), _as_signal(degraded, "degraded")
    n = min(len(clean), len(degraded))
    return clean[:n], degraded[:n]


def matlab_round(x: float) -> int:
    """MATLAB's round (halves away from zero); Python's round() goes to even."""
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------- PESQ / STOI
def pesq_wb(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE) -> float:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO). Other rates are resampled to 16 kHz.

    Raises :class:`MetricError` when PESQ is undefined (silence, no utterance, too short).
    """
    from pesq import PesqError, pesq

    clean, degraded = _pair(clean, degraded)
    if rate != RATE:
        clean, degraded = _pair(resample(clean, rate, RATE), resample(degraded, rate, RATE))
    # an all-zero signal makes the pesq package divide 0/0 and crash; name the cause instead
    for name, signal in (("clean", clean), ("degraded", degraded)):
        if not np.any(signal):
            raise MetricError("pesq", f"silent {name} signal (all samples zero)")
    try:
        return float(pesq(RATE, clean, degraded, "wb"))
    except PesqError as exc:
        detail = exc.args[0] if exc.args else ""
        if isinstance(detail, bytes):  # the C extension reports bytes
            detail = detail.decode("utf-8", "replace")
        raise MetricError("pesq", f"{type(exc).__name__}: {detail}") from None


def stoi(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE, extended: bool = False) -> float:
    """STOI (or ESTOI with ``extended=True``) via pystoi, which resamples to 10 kHz itself.

    Raises :class:`MetricError` when fewer than 30 non-silent 25.6 ms frames remain
    (pystoi would warn and return 1e-5, which is not a score).
    """
    from pystoi import stoi as _stoi

    name = "estoi" if extended else "stoi"
    clean, degraded = _pair(clean, degraded)
    # pystoi needs 30 frames of 256 samples, hop 128, at 10 kHz (under one frame it crashes)
    min_samples = math.ceil((256 + 29 * 128) * rate / 10000)
    if len(clean) < min_samples:
        raise MetricError(name, f"too short: {len(clean)} samples at {rate} Hz, need at least {min_samples}")
    if not np.any(clean):
        raise MetricError(name, "silent clean signal (all samples zero)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(_stoi(clean, degraded, rate, extended=extended))
    for w in caught:
        if "Not enough STFT frames" in str(w.message):
            raise MetricError(name, "too short: fewer than 30 non-silent frames (~0.4 s of speech)")
    if not math.isfinite(value):
        raise MetricError(name, f"undefined for this input (got {value})")
    return value


# ----------------------------------------------------------------------------- framing
@dataclass(frozen=True)
class Framing:
    """composite.m's analysis frames for one signal length."""

    win: int  # round(0.03 fs)
    hop: int  # floor(win / 4)
    count: int  # floor(len/hop - win/hop): composite.m's loop bound (drops the last full frame)
    window: np.ndarray  # 0.5 (1 - cos(2 pi n / (N + 1))), n = 1..N


@functools.lru_cache(maxsize=16)
def _window(win: int) -> np.ndarray:
    n = np.arange(1, win + 1)
    w = 0.5 * (1 - np.cos(2 * np.pi * n / (win + 1)))
    w.flags.writeable = False
    return w


def framing(length: int, rate: int) -> Framing:
    win = matlab_round(30 * rate / 1000)
    hop = win // 4
    # MATLAB's `for k = 1:x` runs floor(x) times; same double arithmetic as composite.m
    count = math.floor(length / hop - (win / hop))
    return Framing(win, hop, count, _window(win))


def _frames(x: np.ndarray, fr: Framing, metric: str) -> np.ndarray:
    """Windowed frames (count, win) of ``x``; a strided view until the window multiply."""
    if fr.count < 1:
        raise MetricError(metric, f"too short: {len(x)} samples, need at least {fr.win + fr.hop}")
    return sliding_window_view(x, fr.win)[:: fr.hop][: fr.count] * fr.window


# ----------------------------------------------------------------------------- WSS
@functools.lru_cache(maxsize=8)
def _crit_filter(rate: int) -> tuple[np.ndarray, int]:
    """composite.m's 25 Gaussian-shaped critical-band filters over the first nfft/2 bins."""
    win = matlab_round(30 * rate / 1000)
    n_fft = 2 ** math.ceil(math.log2(2 * win))  # 2^nextpow2(2*winlength)
    half = n_fft // 2
    max_freq = rate / 2
    f0 = np.floor(CENT_FREQ / max_freq * half)[:, None]
    bw = (BANDWIDTH / max_freq * half)[:, None]
    norm_factor = (np.log(BANDWIDTH[0]) - np.log(BANDWIDTH))[:, None]
    j = np.arange(half)[None, :]
    filt = np.exp(-11 * ((j - f0) / bw) ** 2 + norm_factor)
    min_factor = math.exp(-30.0 / (2.0 * 2.303))  # the filters' -30 dB point
    filt = filt * (filt > min_factor)
    filt.flags.writeable = False
    return filt, n_fft


def _band_db(frames: np.ndarray, rate: int) -> np.ndarray:
    filt, n_fft = _crit_filter(rate)
    bins = np.fft.rfft(frames, n_fft, axis=1)[:, : n_fft // 2]
    spec = bins.real ** 2 + bins.imag ** 2  # |X|^2 without abs()'s square root
    return 10 * np.log10(np.maximum(spec @ filt.T, WSS_FLOOR))


def _nearest_peak(energy: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """composite.m's local-peak search for every band of every frame at once.

    Positive slope: walk right while the slope stays positive, stop at the first band n
    whose slope is <= 0 (or the last band) and take energy(n-1) -- composite.m's index,
    kept as is. Otherwise walk left while the slope is <= 0 and take energy(n+1).
    """
    nb = slope.shape[1]
    idx = np.arange(nb)
    stop_right = np.where(slope <= 0, idx, nb)
    stop_right = np.minimum.accumulate(stop_right[:, ::-1], axis=1)[:, ::-1]
    stop_left = np.maximum.accumulate(np.where(slope > 0, idx, -1), axis=1)
    right = np.take_along_axis(energy, stop_right - 1, axis=1)
    left = np.take_along_axis(energy, stop_left + 1, axis=1)
    return np.where(slope > 0, right, left)


def _klatt_weights(energy: np.ndarray, peak: np.ndarray) -> np.ndarray:
    band = energy[:, :-1]
    wmax = KMAX / (KMAX + energy.max(axis=1, keepdims=True) - band)
    wlocmax = KLOCMAX / (KLOCMAX + peak - band)
    return wmax * wlocmax


def wss_frames(clean: np.ndarray, processed: np.ndarray, rate: int = RATE) -> np.ndarray:
    """Per-frame weighted spectral slope distance (composite.m's ``wss``), no scaling."""
    fr = framing(len(clean), rate)
    e_clean = _band_db(_frames(clean, fr, "wss"), rate)
    e_proc = _band_db(_frames(processed, fr, "wss"), rate)
    s_clean = np.diff(e_clean, axis=1)
    s_proc = np.diff(e_proc, axis=1)
    w = (_klatt_weights(e_clean, _nearest_peak(e_clean, s_clean))
         + _klatt_weights(e_proc, _nearest_peak(e_proc, s_proc))) / 2.0
    return np.sum(w * (s_clean - s_proc) ** 2, axis=1) / np.sum(w, axis=1)


# ----------------------------------------------------------------------------- LLR
def _autocorr(frames: np.ndarray, order: int) -> np.ndarray:
    """Lags 0..order of every frame: (count, order + 1)."""
    # np.sum (pairwise summation) rather than einsum: the LPC normal equations can be
    # ill-conditioned (cond ~1e11 for band-limited frames), so keep the rounding of a
    # straightforward per-frame computation
    n = frames.shape[1]
    return np.stack([np.sum(frames[:, : n - k] * frames[:, k:], axis=1) for k in range(order + 1)], axis=1)


def _levinson(r: np.ndarray) -> np.ndarray:
    """composite.m's Levinson-Durbin across frames; returns [1, -a] per frame."""
    count, order = r.shape[0], r.shape[1] - 1
    a = np.ones((count, order))
    err = r[:, 0].copy()
    for i in range(order):
        past = a[:, :i].copy()
        acc = np.einsum("ij,ij->i", past, r[:, i:0:-1]) if i else 0.0
        k = (r[:, i + 1] - acc) / err
        a[:, i] = k
        if i:
            a[:, :i] = past - k[:, None] * past[:, ::-1]
        err = (1 - k * k) * err
    return np.concatenate([np.ones((count, 1)), -a], axis=1)


def llr_frames(clean: np.ndarray, processed: np.ndarray, rate: int = RATE) -> np.ndarray:
    """Per-frame log-likelihood ratio (composite.m's ``llr``): LPC order 16 (10 below 10 kHz)."""
    order = 10 if rate < 10000 else 16
    fr = framing(len(clean), rate)
    r_clean = _autocorr(_frames(clean, fr, "llr"), order)
    a_clean = _levinson(r_clean)
    a_proc = _levinson(_autocorr(_frames(processed, fr, "llr"), order))
    lag = np.abs(np.subtract.outer(np.arange(order + 1), np.arange(order + 1)))
    toeplitz = r_clean[:, lag]  # (count, order+1, order+1)
    numerator = np.einsum("fi,fij,fj->f", a_proc, toeplitz, a_proc)
    denominator = np.einsum("fi,fij,fj->f", a_clean, toeplitz, a_clean)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(numerator / denominator)


# ----------------------------------------------------------------------------- segSNR
def segsnr_frames(clean: np.ndarray, processed: np.ndarray, rate: int = RATE) -> np.ndarray:
    """Per-frame segmental SNR in dB, clipped to [-10, 35] (composite.m's ``snr``)."""
    fr = framing(len(clean), rate)
    c = _frames(clean, fr, "ssnr")
    p = _frames(processed, fr, "ssnr")
    signal = np.einsum("ij,ij->i", c, c)
    noise = np.einsum("ij,ij->i", c - p, c - p)
    return np.clip(10 * np.log10(signal / (noise + EPS) + EPS), *SEGSNR_RANGE)


# ----------------------------------------------------------------------------- aggregation
def trimmed_mean(values: np.ndarray, alpha: float = TRIM) -> float:
    """Mean of the lowest round(alpha * n) values (composite.m's sort + mean)."""
    values = np.sort(values)
    return float(np.mean(values[: matlab_round(len(values) * alpha)]))


def _prepare(clean: np.ndarray, degraded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Truncate, scale both by 1/max|clean| (scale invariance, see module doc), add eps."""
    clean, degraded = _pair(clean, degraded)
    peak = np.max(np.abs(clean)) or np.max(np.abs(degraded)) or 1.0
    return clean / peak + EPS, degraded / peak + EPS


def composite_measures(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE) -> dict[str, float]:
    """The three measures composite.m feeds into its regressions: ``wss`` (95 % trimmed mean),
    ``llr`` (95 % trimmed mean) and ``ssnr`` (plain mean of clipped frames)."""
    clean, degraded = _prepare(clean, degraded)
    return {
        "wss": trimmed_mean(wss_frames(clean, degraded, rate)),
        "llr": trimmed_mean(llr_frames(clean, degraded, rate)),
        "ssnr": float(np.mean(segsnr_frames(clean, degraded, rate))),
    }


def wss(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE) -> float:
    clean, degraded = _prepare(clean, degraded)
    return trimmed_mean(wss_frames(clean, degraded, rate))


def llr(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE) -> float:
    clean, degraded = _prepare(clean, degraded)
    return trimmed_mean(llr_frames(clean, degraded, rate))


def ssnr(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE) -> float:
    """Segmental SNR (dB) as reported in the SEGAN paper: composite.m's segSNR."""
    clean, degraded = _prepare(clean, degraded)
    return float(np.mean(segsnr_frames(clean, degraded, rate)))


def composite_from_measures(pesq: float, llr: float, wss: float, segsnr: float) -> tuple[float, float, float]:
    """Hu & Loizou (2008) regressions, each clipped to [1, 5]: (CSIG, CBAK, COVL)."""
    csig = 3.093 - 1.029 * llr + 0.603 * pesq - 0.009 * wss
    cbak = 1.634 + 0.478 * pesq - 0.007 * wss + 0.063 * segsnr
    covl = 1.594 + 0.805 * pesq - 0.512 * llr - 0.007 * wss
    return tuple(float(np.clip(v, 1.0, 5.0)) for v in (csig, cbak, covl))  # type: ignore[return-value]


def composite(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE,
              pesq: float | None = None) -> dict[str, float]:
    """CSIG, CBAK, COVL plus the measures behind them (pesq, llr, wss, ssnr).

    ``pesq`` defaults to :func:`pesq_wb` (raises :class:`MetricError` where undefined).
    """
    measures = composite_measures(clean, degraded, rate)
    if pesq is None:
        pesq = pesq_wb(clean, degraded, rate)
    csig, cbak, covl = composite_from_measures(pesq, measures["llr"], measures["wss"], measures["ssnr"])
    return {"csig": csig, "cbak": cbak, "covl": covl, "pesq": float(pesq), **measures}


# ----------------------------------------------------------------------------- the suite
def score(clean: np.ndarray, degraded: np.ndarray, rate: int = RATE) -> dict[str, float | str | None]:
    """Every metric of the SEGAN paper for one utterance pair.

    Returns ``pesq, stoi, estoi, csig, cbak, covl, ssnr`` (floats; NaN where undefined)
    and ``pesq_error`` (None, or why PESQ -- and so CSIG/CBAK/COVL -- is missing).
    Resamples to 16 kHz when ``rate`` differs and truncates to the shorter signal.
    Undefined metrics never raise; invalid input (not 1-D, empty, NaN) does.
    """
    clean, degraded = _pair(clean, degraded)
    if rate != RATE:
        clean, degraded = _pair(resample(clean, rate, RATE), resample(degraded, rate, RATE))
    out: dict[str, float | str | None] = {name: math.nan for name in METRIC_NAMES}
    out["pesq_error"] = None

    try:
        out["pesq"] = pesq_wb(clean, degraded, RATE)
    except MetricError as exc:
        out["pesq_error"] = exc.reason
        log.warning("PESQ missing: %s", exc.reason)
    for name, extended in (("stoi", False), ("estoi", True)):
        try:
            out[name] = stoi(clean, degraded, RATE, extended=extended)
        except MetricError as exc:
            log.warning("%s missing: %s", name.upper(), exc.reason)
    try:
        measures = composite_measures(clean, degraded, RATE)
    except MetricError as exc:
        log.warning("composite measures missing: %s", exc.reason)
    else:
        out["ssnr"] = measures["ssnr"]
        if not math.isnan(out["pesq"]):  # type: ignore[arg-type]
            out["csig"], out["cbak"], out["covl"] = composite_from_measures(
                out["pesq"], measures["llr"], measures["wss"], measures["ssnr"])  # type: ignore[arg-type]
    return out
