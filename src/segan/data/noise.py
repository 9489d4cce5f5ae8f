"""Generated noises for the synthetic corpus, a P.56-style active speech level and SNR mixing.

Training and test noises are disjoint *kinds*, as in VoiceBank-DEMAND (where the test set's
DEMAND environments never occur in training), so the test score measures generalization:

* train: ``pink``, ``speech_shaped``, ``babble``, ``hum``
* test:  ``car``, ``machine``, ``cafe``, ``street``

There is no white noise, as in VoiceBank-DEMAND's training set (speech-shaped noise, babble and
environment recordings): at 0-15 dB SNR white noise buries everything above 4 kHz, a model
trained on it learns to suppress that band whatever the input, and on test noises that leave
the band clean this costs more (CSIG, PESQ) than the low-frequency noise removal gains.

Every generator is a pure function of ``(n, rate, rng[, speech])`` and returns float32 with
unit RMS; :func:`mix_at_snr` sets the level. ``speech`` (for babble, speech-shaped and cafe
noise) is a callable that returns one utterance at ``rate`` per call, drawing whatever it
needs from the generator it is given, so the result stays reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage, signal

SpeechSource = Callable[[np.random.Generator], np.ndarray]
"""Returns one speech utterance (float32, at the noise's sample rate) using the given RNG."""

TRAIN_NOISES: tuple[str, ...] = ("pink", "speech_shaped", "babble", "hum")
TEST_NOISES: tuple[str, ...] = ("car", "machine", "cafe", "street")
SPEECH_NOISES = frozenset({"speech_shaped", "babble", "cafe"})  # need a SpeechSource
MIN_SAMPLES = 16


# ----------------------------------------------------------------------------- helpers
def _unit_rms(x: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if not np.isfinite(rms) or rms <= 0:
        raise ValueError("noise generator produced silence or non-finite samples")
    return (x / rms).astype(np.float32)


def _shaped(n: int, rate: int, rng: np.random.Generator, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """White Gaussian noise filtered in the frequency domain by ``gain(freqs_hz)``."""
    m = sp_fft.next_fast_len(n, real=True)  # arbitrary n can be a slow (prime) FFT size
    spec = sp_fft.rfft(rng.standard_normal(m))
    spec *= gain(sp_fft.rfftfreq(m, 1.0 / rate))
    return sp_fft.irfft(spec, m)[:n]


def _colored(n: int, rate: int, rng: np.random.Generator, exponent: float, floor_hz: float = 20.0) -> np.ndarray:
    """Power spectrum ~ 1/f**exponent (1 = pink, 2 = brown), flat below ``floor_hz``, no DC."""
    def gain(f: np.ndarray) -> np.ndarray:
        g = np.maximum(f, floor_hz) ** (-exponent / 2)
        g[0] = 0.0
        return g
    return _shaped(n, rate, rng, gain)


def _smooth_random(n: int, rate: int, rng: np.random.Generator, hz: float) -> np.ndarray:
    """A smooth random curve (about N(0, 1)) changing at roughly ``hz``: cosine-interpolated knots."""
    step = max(1, int(rate / hz))
    knots = rng.standard_normal(n // step + 2)
    pos = np.arange(n) / step
    i = pos.astype(np.int64)
    t = (1 - np.cos(np.pi * (pos - i))) / 2
    return knots[i] * (1 - t) + knots[i + 1] * t


def _harmonics(freq: np.ndarray, rate: int, rng: np.random.Generator, count: int, tilt: float) -> np.ndarray:
    """Sum of harmonics k*freq(t) (k = 1..count, amplitude ~ k**-tilt, random phases); aliasing-safe."""
    phase = 2 * np.pi * np.cumsum(freq) / rate
    out = np.zeros(len(freq))
    nyquist = 0.45 * rate
    for k in range(1, count + 1):
        if k * float(freq.max()) >= nyquist:
            break
        out += rng.uniform(0.5, 1.0) * k ** -tilt * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _band(x: np.ndarray, rate: int, lo: float, hi: float, order: int = 4) -> np.ndarray:
    nyq = rate / 2
    hi = min(hi, 0.95 * nyq)
    lo = min(lo, 0.5 * hi)
    sos = signal.butter(order, [lo / nyq, hi / nyq], btype="bandpass", output="sos")
    return signal.sosfilt(sos, x)


def _lowpass(x: np.ndarray, rate: int, cutoff: float, order: int = 4) -> np.ndarray:
    sos = signal.butter(order, min(cutoff, 0.95 * rate / 2) / (rate / 2), output="sos")
    return signal.sosfilt(sos, x)


def _need(speech: SpeechSource | None, kind: str) -> SpeechSource:
    if speech is None:
        raise ValueError(f"noise {kind!r} is made from speech: pass a speech source")
    return speech


def _talker_track(n: int, rate: int, rng: np.random.Generator, speech: SpeechSource) -> np.ndarray:
    """One background talker: utterances back to back (short gaps), starting mid-utterance."""
    parts, total = [], 0
    while total < n + rate:  # one spare second so the random start still covers n
        utt = speech(rng).astype(np.float64)
        level = active_level(utt, rate)
        if level > 0:
            utt = utt / np.sqrt(level)
        gap = np.zeros(int(rng.uniform(0.05, 0.4) * rate))
        parts += [utt, gap]
        total += len(utt) + len(gap)
    track = np.concatenate(parts)
    start = int(rng.integers(0, len(track) - n + 1))
    return track[start:start + n]


def _transients(n: int, rate: int, rng: np.random.Generator, per_second: float,
                make: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Events from ``make`` placed at Poisson-random times."""
    out = np.zeros(n)
    count = rng.poisson(per_second * n / rate)
    for start in np.sort(rng.integers(0, n, size=count)):
        ev = make(rng)[: n - start]
        out[start:start + len(ev)] += ev
    return out


# ----------------------------------------------------------------------------- train noises
def pink(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    return _unit_rms(_colored(n, rate, rng, 1.0))


def speech_shaped(n: int, rate: int, rng: np.random.Generator, speech: SpeechSource) -> np.ndarray:
    """Stationary noise with the long-term average spectrum of a few utterances."""
    talk = np.concatenate([speech(rng) for _ in range(3)]).astype(np.float64)
    freqs, psd = signal.welch(talk, rate, nperseg=min(1024, len(talk)))
    return _unit_rms(_shaped(n, rate, rng, lambda f: np.sqrt(np.interp(f, freqs, psd))))


def babble(n: int, rate: int, rng: np.random.Generator, speech: SpeechSource) -> np.ndarray:
    """4-7 simultaneous talkers at equal active level."""
    talkers = int(rng.integers(4, 8))
    return _unit_rms(sum(_talker_track(n, rate, rng, speech) for _ in range(talkers)))


def hum(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: 50 or 60 Hz (slightly off) with harmonics, slow wobble and a little hiss."""
    f0 = float(rng.choice([50.0, 60.0])) * (1 + rng.uniform(-0.004, 0.004))
    freq = f0 * (1 + 0.001 * _smooth_random(n, rate, rng, 0.5))
    tone = _harmonics(freq, rate, rng, count=int(rng.integers(6, 16)), tilt=rng.uniform(0.3, 1.0))
    tone = tone / np.sqrt(np.mean(tone ** 2))
    tone *= 1 + 0.05 * _smooth_random(n, rate, rng, 2.0)
    return _unit_rms(tone + 10 ** (rng.uniform(-35, -25) / 20) * rng.standard_normal(n))


# ----------------------------------------------------------------------------- test noises
def car(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Cabin noise: brown road noise plus engine firing harmonics following a slowly varying rpm."""
    road = _lowpass(_colored(n, rate, rng, 2.0), rate, rng.uniform(400, 1200))
    rpm = rng.uniform(1200, 3000) * (1 + 0.12 * _smooth_random(n, rate, rng, 0.3))
    firing = rpm / 60 * 2  # four-stroke, four cylinders: two firings per revolution
    engine = _harmonics(firing, rate, rng, count=8, tilt=1.2)
    road, engine = road / np.std(road), engine / np.std(engine)
    return _unit_rms(road + 10 ** (rng.uniform(-9, -3) / 20) * engine)


def machine(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A machine cycling at 1-6 Hz: pulsing harmonic drone plus a pulsing band of noise."""
    f0 = rng.uniform(80, 400)
    drone = _harmonics(np.full(n, f0), rate, rng, count=10, tilt=rng.uniform(0.5, 1.2))
    t = np.arange(n) / rate
    cycle = rng.uniform(1.0, 6.0)
    pulse = (0.5 + 0.5 * np.cos(2 * np.pi * cycle * t + rng.uniform(0, 2 * np.pi))) ** rng.uniform(1, 4)
    lo = rng.uniform(800, 2500)
    band = _band(rng.standard_normal(n), rate, lo, lo * rng.uniform(1.5, 3.0))
    drone, band = drone / np.std(drone), band / np.std(band)
    return _unit_rms((0.3 + 0.7 * pulse) * drone + 10 ** (rng.uniform(-8, 0) / 20) * pulse * band)


def _clatter(rate: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Cutlery/crockery hits: a few damped high resonances."""
    def make(rng: np.random.Generator) -> np.ndarray:
        m = int(rng.uniform(0.05, 0.25) * rate)
        t = np.arange(m) / rate
        ev = np.zeros(m)
        for _ in range(int(rng.integers(2, 5))):
            f = rng.uniform(1500, min(7000, 0.45 * rate))
            ev += np.exp(-t / rng.uniform(0.01, 0.06)) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        return ev * rng.uniform(0.5, 3.0)
    return make


def cafe(n: int, rate: int, rng: np.random.Generator, speech: SpeechSource) -> np.ndarray:
    """Busy cafe: distant babble of many talkers, clatter transients and a pink background."""
    talkers = int(rng.integers(6, 11))
    crowd = _lowpass(sum(_talker_track(n, rate, rng, speech) for _ in range(talkers)), rate, 3500)
    crowd /= np.std(crowd)
    clatter = _transients(n, rate, rng, rng.uniform(0.5, 2.5), _clatter(rate))
    room = _colored(n, rate, rng, 1.0)
    return _unit_rms(crowd + 0.3 * clatter + 0.2 * room / np.std(room))


def _horn_or_step(rate: int) -> Callable[[np.random.Generator], np.ndarray]:
    """A car horn (two detuned harmonic tones) or a footstep/door thump."""
    def make(rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.3:
            m = int(rng.uniform(0.2, 0.7) * rate)
            env = np.minimum(1, np.minimum(np.arange(m), m - np.arange(m)) / (0.02 * rate))
            f = rng.uniform(350, 500)
            tones = sum(_harmonics(np.full(m, f * r), rate, rng, count=5, tilt=0.8) for r in (1.0, 1.26))
            return rng.uniform(1.0, 3.0) * env * tones / np.std(tones)
        m = int(0.08 * rate)
        thump = _lowpass(rng.standard_normal(m), rate, rng.uniform(300, 900)) * np.exp(-np.arange(m) / (0.015 * rate))
        return rng.uniform(1.0, 4.0) * thump / (np.std(thump) + 1e-12)
    return make


def street(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Traffic: low-frequency rumble whose level swells as cars pass, plus horns and thumps."""
    brown, pink_ = _colored(n, rate, rng, 2.0), _colored(n, rate, rng, 1.0)
    rumble = _lowpass(brown / np.std(brown) + 0.5 * pink_ / np.std(pink_), rate, rng.uniform(1500, 3000))
    rumble /= np.std(rumble)
    swell = np.exp(0.6 * _smooth_random(n, rate, rng, rng.uniform(0.15, 0.5)))
    events = _transients(n, rate, rng, rng.uniform(0.2, 1.0), _horn_or_step(rate))
    return _unit_rms(swell * rumble + 0.5 * events)


GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "pink": pink, "speech_shaped": speech_shaped, "babble": babble, "hum": hum,
    "car": car, "machine": machine, "cafe": cafe, "street": street,
}


def make_noise(kind: str, n: int, rate: int, rng: np.random.Generator,
               speech: SpeechSource | None = None) -> np.ndarray:
    """``n`` samples of noise ``kind`` at ``rate`` Hz, float32 with unit RMS."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown noise type {kind!r}: expected one of {sorted(GENERATORS)}")
    if n < MIN_SAMPLES:
        raise ValueError(f"noise {kind!r}: length must be at least {MIN_SAMPLES} samples, got {n}")
    if kind in SPEECH_NOISES:
        return GENERATORS[kind](n, rate, rng, _need(speech, kind))
    return GENERATORS[kind](n, rate, rng)


# ----------------------------------------------------------------------------- level and mixing
def active_level(x: np.ndarray, rate: int, margin_db: float = 15.9, hangover_s: float = 0.2,
                 time_constant_s: float = 0.03) -> float:
    """Active speech level (mean power over active samples) after ITU-T P.56 method B.

    The envelope is |x| smoothed twice with a 30 ms time constant; a sample is active when
    the envelope exceeds a threshold or did so within the last 200 ms. Thresholds are tried
    in 6 dB steps from -90 dBFS; the level is where "active power minus threshold" falls to
    the 15.9 dB margin (interpolated in dB). Returns 0.0 for silence.
    """
    x = np.asarray(x, dtype=np.float64)
    energy = float(np.sum(x * x))
    if energy <= 0:
        return 0.0
    g = np.exp(-1.0 / (rate * time_constant_s))
    env = signal.lfilter([1 - g], [1, -g], signal.lfilter([1 - g], [1, -g], np.abs(x)))
    hang = int(np.ceil(rate * hangover_s))
    # A sample is active at threshold c if the envelope reached c within the last `hang`
    # samples, i.e. if the running max over that trailing window is >= c: compute it once
    # and count every threshold with one sorted search.
    held = ndimage.maximum_filter1d(env, size=hang + 1, origin=hang // 2, mode="constant", cval=0.0)
    held.sort()
    prev_a = prev_c = None
    for c in 2.0 ** np.arange(-15, 1):  # 16-bit style thresholds, relative to full scale
        count = len(held) - int(np.searchsorted(held, c, side="left"))
        if count == 0:
            break
        a_db, c_db = 10 * np.log10(energy / count), 20 * np.log10(c)
        if a_db - c_db <= margin_db:
            if prev_a is None:
                return float(10 ** (a_db / 10))
            # interpolate between the previous threshold (delta > margin) and this one
            d0, d1 = prev_a - prev_c, a_db - c_db
            t = (d0 - margin_db) / (d0 - d1)
            return float(10 ** ((prev_a + t * (a_db - prev_a)) / 10))
        prev_a, prev_c = a_db, c_db
    # speech so loud/short that the margin is never met: fall back to the last active power
    return float(10 ** (prev_a / 10)) if prev_a is not None else float(np.mean(x * x))


def snr_db(clean: np.ndarray, noise: np.ndarray, rate: int) -> float:
    """SNR as in VoiceBank-DEMAND: P.56 active level of the speech over the mean noise power."""
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    return float(10 * np.log10(active_level(clean, rate) / p_noise))


@dataclass(frozen=True)
class Mixture:
    clean: np.ndarray  # float32, possibly scaled down to keep the noisy peak under the limit
    noisy: np.ndarray  # float32 = clean + noise_gain * noise * scale
    noise_gain: float  # applied to the unit-RMS noise before any peak rescaling
    scale: float  # common factor applied to clean and noisy (1.0 = none)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr: float, rate: int, peak: float = 0.99) -> Mixture:
    """Add ``noise`` to ``clean`` at ``snr`` dB (active speech level vs mean noise power).

    If the mixture would peak above ``peak``, clean and noisy are scaled down together, so
    nothing clips and the SNR is unchanged.
    """
    if len(clean) != len(noise):
        raise ValueError(f"mix_at_snr: clean has {len(clean)} samples but noise has {len(noise)}")
    level = active_level(clean, rate)
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if level <= 0 or p_noise <= 0:
        raise ValueError("mix_at_snr: clean speech or noise is silent; cannot set an SNR")
    gain = float(np.sqrt(level / (p_noise * 10 ** (snr / 10))))
    clean64 = clean.astype(np.float64)
    noisy = clean64 + gain * noise.astype(np.float64)
    top = float(max(np.max(np.abs(noisy)), np.max(np.abs(clean64))))
    scale = peak / top if top > peak else 1.0
    return Mixture((clean64 * scale).astype(np.float32), (noisy * scale).astype(np.float32), gain, scale)
