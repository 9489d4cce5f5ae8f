"""Plain frame-by-frame reference port of Loizou's ``composite.m`` (Hu & Loizou 2008).

Deliberately written as loops that mirror the MATLAB source line by line (1-based
MATLAB indices translated to 0-based Python), so it can serve as the oracle for the
vectorized implementation in :mod:`segan.metrics` (tests) and as the speed baseline
(``bench/metrics.py``). It is *not* scale-normalized: like the MATLAB original it
expects float audio in [-1, 1] (``wavread`` output); the caller adds ``eps``.

Per-frame functions return one value per frame; the caller applies the 95 % trimmed
mean (WSS, LLR) or the plain mean (segSNR) exactly as ``composite.m`` does.
"""

from __future__ import annotations

import math

import numpy as np

EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps

CENT_FREQ = [50.0000, 120.000, 190.000, 260.000, 330.000, 400.000, 470.000, 540.000, 617.372,
             703.378, 798.717, 904.128, 1020.38, 1148.30, 1288.72, 1442.54, 1610.70, 1794.16,
             1993.93, 2211.08, 2446.71, 2701.97, 2978.04, 3276.17, 3597.63]
BANDWIDTH = [70.0000, 70.0000, 70.0000, 70.0000, 70.0000, 70.0000, 70.0000, 77.3724, 86.0056,
             95.3398, 105.411, 116.256, 127.914, 140.423, 153.823, 168.154, 183.457, 199.776,
             217.153, 235.631, 255.255, 276.072, 298.126, 321.465, 346.136]


def matlab_round(x: float) -> int:
    """MATLAB's round: halves away from zero (Python's round() goes to even)."""
    return int(math.floor(x + 0.5))


def _framing(length: int, rate: int) -> tuple[int, int, int, np.ndarray]:
    winlength = matlab_round(30 * rate / 1000)
    skiprate = winlength // 4
    num_frames = math.floor(length / skiprate - (winlength / skiprate))  # MATLAB 1:num_frames
    window = np.array([0.5 * (1 - math.cos(2 * math.pi * n / (winlength + 1)))
                       for n in range(1, winlength + 1)])
    return winlength, skiprate, num_frames, window


def wss_frames(clean: np.ndarray, processed: np.ndarray, rate: int) -> np.ndarray:
    winlength, skiprate, num_frames, window = _framing(len(clean), rate)
    max_freq = rate / 2
    num_crit = 25
    n_fft = 2 ** math.ceil(math.log2(2 * winlength))
    n_fftby2 = n_fft // 2
    kmax, klocmax = 20.0, 1.0
    bw_min = BANDWIDTH[0]
    min_factor = math.exp(-30.0 / (2.0 * 2.303))

    crit_filter = np.zeros((num_crit, n_fftby2))
    for i in range(num_crit):
        f0 = (CENT_FREQ[i] / max_freq) * n_fftby2
        bw = (BANDWIDTH[i] / max_freq) * n_fftby2
        norm_factor = math.log(bw_min) - math.log(BANDWIDTH[i])
        for j in range(n_fftby2):
            value = math.exp(-11 * (((j - math.floor(f0)) / bw) ** 2) + norm_factor)
            crit_filter[i, j] = value if value > min_factor else 0.0

    distortion = np.zeros(num_frames)
    start = 0
    for frame_count in range(num_frames):
        clean_frame = clean[start:start + winlength] * window
        processed_frame = processed[start:start + winlength] * window
        clean_spec = np.abs(np.fft.fft(clean_frame, n_fft)) ** 2
        processed_spec = np.abs(np.fft.fft(processed_frame, n_fft)) ** 2

        clean_energy = np.zeros(num_crit)
        processed_energy = np.zeros(num_crit)
        for i in range(num_crit):
            clean_energy[i] = np.sum(clean_spec[:n_fftby2] * crit_filter[i])
            processed_energy[i] = np.sum(processed_spec[:n_fftby2] * crit_filter[i])
        clean_energy = 10 * np.log10(np.maximum(clean_energy, 1e-10))
        processed_energy = 10 * np.log10(np.maximum(processed_energy, 1e-10))

        clean_slope = clean_energy[1:] - clean_energy[:-1]
        processed_slope = processed_energy[1:] - processed_energy[:-1]

        clean_loc_peak = np.zeros(num_crit - 1)
        processed_loc_peak = np.zeros(num_crit - 1)
        for i in range(num_crit - 1):
            for slope, energy, loc_peak in ((clean_slope, clean_energy, clean_loc_peak),
                                            (processed_slope, processed_energy, processed_loc_peak)):
                if slope[i] > 0:  # search to the right (MATLAB: n < num_crit)
                    n = i
                    while n < num_crit - 1 and slope[n] > 0:
                        n += 1
                    loc_peak[i] = energy[n - 1]  # composite.m's energy(n-1), kept as is
                else:  # search to the left (MATLAB: n > 0)
                    n = i
                    while n >= 0 and slope[n] <= 0:
                        n -= 1
                    loc_peak[i] = energy[n + 1]

        db_max_clean = np.max(clean_energy)
        db_max_processed = np.max(processed_energy)
        w_clean = (kmax / (kmax + db_max_clean - clean_energy[:-1])) \
            * (klocmax / (klocmax + clean_loc_peak - clean_energy[:-1]))
        w_processed = (kmax / (kmax + db_max_processed - processed_energy[:-1])) \
            * (klocmax / (klocmax + processed_loc_peak - processed_energy[:-1]))
        w = (w_clean + w_processed) / 2.0
        distortion[frame_count] = np.sum(w * (clean_slope - processed_slope) ** 2) / np.sum(w)
        start += skiprate
    return distortion


def lpcoeff(frame: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Autocorrelation lags, reflection coefficients and [1, -a] as composite.m's lpcoeff."""
    winlength = len(frame)
    r = np.zeros(order + 1)
    for k in range(order + 1):
        r[k] = np.sum(frame[:winlength - k] * frame[k:winlength])
    a = np.ones(order)
    e = np.zeros(order + 1)
    rcoeff = np.zeros(order)
    e[0] = r[0]
    for i in range(order):
        a_past = a[:i].copy()
        sum_term = sum(a_past[m] * r[i - m] for m in range(i))  # a_past(1:i-1).*R(i:-1:2)
        rcoeff[i] = (r[i + 1] - sum_term) / e[i]
        a[i] = rcoeff[i]
        for m in range(i):
            a[m] = a_past[m] - rcoeff[i] * a_past[i - 1 - m]
        e[i + 1] = (1 - rcoeff[i] * rcoeff[i]) * e[i]
    return r, rcoeff, np.concatenate([[1.0], -a])


def llr_frames(clean: np.ndarray, processed: np.ndarray, rate: int) -> np.ndarray:
    winlength, skiprate, num_frames, window = _framing(len(clean), rate)
    order = 10 if rate < 10000 else 16
    distortion = np.zeros(num_frames)
    start = 0
    for frame_count in range(num_frames):
        clean_frame = clean[start:start + winlength] * window
        processed_frame = processed[start:start + winlength] * window
        r_clean, _, a_clean = lpcoeff(clean_frame, order)
        _, _, a_processed = lpcoeff(processed_frame, order)
        toeplitz = np.array([[r_clean[abs(i - j)] for j in range(order + 1)] for i in range(order + 1)])
        numerator = a_processed @ toeplitz @ a_processed
        denominator = a_clean @ toeplitz @ a_clean
        distortion[frame_count] = math.log(numerator / denominator)
        start += skiprate
    return distortion


def segsnr_frames(clean: np.ndarray, processed: np.ndarray, rate: int) -> np.ndarray:
    winlength, skiprate, num_frames, window = _framing(len(clean), rate)
    out = np.zeros(num_frames)
    start = 0
    for frame_count in range(num_frames):
        clean_frame = clean[start:start + winlength] * window
        processed_frame = processed[start:start + winlength] * window
        signal_energy = np.sum(clean_frame ** 2)
        noise_energy = np.sum((clean_frame - processed_frame) ** 2)
        value = 10 * math.log10(signal_energy / (noise_energy + EPS) + EPS)
        out[frame_count] = min(max(value, -10.0), 35.0)
        start += skiprate
    return out


def trimmed_mean(values: np.ndarray, alpha: float = 0.95) -> float:
    """composite.m: mean of the lowest round(alpha * n) values after sorting."""
    values = np.sort(values)
    return float(np.mean(values[:matlab_round(len(values) * alpha)]))


def composite_measures(clean: np.ndarray, processed: np.ndarray, rate: int) -> dict[str, float]:
    """WSS, LLR and segSNR exactly as composite.m computes them (adds eps to the data)."""
    n = min(len(clean), len(processed))
    clean = np.asarray(clean[:n], dtype=np.float64) + EPS
    processed = np.asarray(processed[:n], dtype=np.float64) + EPS
    return {
        "wss": trimmed_mean(wss_frames(clean, processed, rate)),
        "llr": trimmed_mean(llr_frames(clean, processed, rate)),
        "ssnr": float(np.mean(segsnr_frames(clean, processed, rate))),
    }
