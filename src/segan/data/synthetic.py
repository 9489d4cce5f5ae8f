"""An offline VoiceBank-DEMAND look-alike: espeak-ng speech mixed with generated noise.

``generate_synthetic`` writes the same folder layout, file naming and SNR protocol as
VoiceBank-DEMAND (Valentini-Botinhao et al. 2016), so the whole pipeline can be run and
tested without downloading anything:

* 8 training voices (4 accents x male/female variants) and 2 test voices whose accents and
  variants never occur in training (unseen speakers, as in the real test set);
* 4 training noise types and 4 *different* test noise types (:mod:`segan.data.noise`);
* training SNRs 15/10/5/0 dB and test SNRs 17.5/12.5/7.5/2.5 dB (``cfg.*_snrs``), measured
  on the P.56 active speech level against the mean noise power;
* the clean speech carries a white recording noise floor 45-55 dB below its active level
  (:data:`FLOOR_DB`), as real recordings do;
* if a mixture would exceed 0.99 full scale, clean and noisy are scaled down together.

Every random choice comes from a generator seeded by ``(seed, split, utterance index)``,
and espeak output is a pure function of its inputs (see :mod:`segan.data.espeak`), so the
same config gives byte-identical files for any ``cfg.workers``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import io
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..audio import resample
from ..config import SyntheticConfig
from ..fsutil import atomic_dir, write_json, write_text
from . import espeak
from .layout import SPLITS, LogEntry, clean_dir, format_log, log_path, manifest_path, noisy_dir
from .noise import TEST_NOISES, TRAIN_NOISES, SpeechSource, active_level, make_noise, mix_at_snr

logger = logging.getLogger(__name__)

# Bump when a change alters the generated audio or metadata for the same config.
GENERATOR_VERSION = "3"  # 2: no white training noise; 3: recording noise floor in clean

# (speaker id, espeak accent, espeak variant). Test accents and variants never occur in
# training; test-side babble talkers ("cafe") are a third, test-only group.
TRAIN_VOICES: tuple[tuple[str, str, str], ...] = (
    ("s01", "en-us", "m1"), ("s02", "en-us", "f1"),
    ("s03", "en", "m2"), ("s04", "en", "f2"),
    ("s05", "en-gb-scotland", "m3"), ("s06", "en-gb-scotland", "f3"),
    ("s07", "en-gb-x-gbclan", "m4"), ("s08", "en-gb-x-gbclan", "f4"),
)
TEST_VOICES: tuple[tuple[str, str, str], ...] = (("t01", "en-029", "m6"), ("t02", "en-gb-x-rp", "f5"))
TEST_BABBLE_VOICES: tuple[tuple[str, str, str], ...] = (
    ("b01", "en-us-nyc", "m5"), ("b02", "en-gb-x-gbcwmd", "m7"),
    ("b03", "en-us-nyc", "steph"), ("b04", "en-gb-x-gbcwmd", "linda"),
)
NOISES = {"train": TRAIN_NOISES, "test": TEST_NOISES}
_SPLIT_CODE = {"train": 0, "test": 1}
_ROLE_CODE = {"train": 0, "test": 1, "test_babble": 2}
# Streams of the per-utterance seed sequence, so adding a draw in one never shifts another.
_STREAM_SPEAKER, _STREAM_PLAN, _STREAM_ASSIGN, _STREAM_RENDER, _STREAM_POOL = 1, 2, 3, 4, 5
POOL_PER_VOICE = 4  # background utterances per babble voice

PAD_S = (0.1, 0.3)  # leading/trailing silence added to each utterance
LEVEL_DB = (-30.0, -22.0)  # clean active speech level, dB re full scale (before any peak rescale)
# Recording noise floor of the clean speech, dB re its active level (white: microphone and
# preamp self-noise). espeak writes exact digital zeros between and around words; no real
# recording has them, and they break the composite measures: LPC of an all-zero reference
# frame is degenerate, so LLR scored ~13-18 per silent frame (14% of the frames) and those
# frames, not the speech, decided CSIG and COVL.
FLOOR_DB = (-55.0, -45.0)


class SyntheticDataError(RuntimeError):
    """The synthetic corpus could not be generated."""


# ----------------------------------------------------------------------------- sentences
_NAMES = ["Anna", "Peter", "Maria", "Tom", "Grace", "David", "Lucy", "James", "Helen", "Oliver",
          "Sarah", "Daniel", "Emma", "Robert", "Alice", "Martin"]
_ADJ = ["small", "old", "bright", "heavy", "quiet", "green", "broken", "warm", "narrow", "yellow",
        "strange", "clean", "empty", "wooden", "golden", "tired", "busy", "cold", "simple", "lovely"]
_NOUNS = ["dog", "window", "garden", "letter", "kitchen", "river", "basket", "bottle", "lamp", "road",
          "teacher", "table", "horse", "boat", "picture", "bridge", "market", "engine", "candle",
          "pocket", "village", "station", "blanket", "ladder", "mirror", "parcel", "ticket", "violin"]
_PLACES = ["park", "old house", "harbour", "station", "library", "hill", "school", "corner shop",
           "farm", "museum", "beach", "town hall"]
_VERBS = [("open", "opened"), ("carry", "carried"), ("paint", "painted"), ("clean", "cleaned"),
          ("follow", "followed"), ("move", "moved"), ("find", "found"), ("bring", "brought"),
          ("sell", "sold"), ("fix", "fixed"), ("watch", "watched"), ("borrow", "borrowed"),
          ("lose", "lost"), ("check", "checked")]
_PREP = ["near", "behind", "across", "outside", "beside", "inside", "under", "past"]
_TIMES = ["this morning", "last night", "on Sunday", "after lunch", "yesterday", "at noon",
          "before dinner", "every week", "in the spring", "today"]
_TIMES2 = ["noon", "dinner", "the weekend", "Friday", "the meeting", "dark", "the rain starts", "lunch"]
_NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]
_TEMPLATES = [
    "The {adj} {noun} {past} {prep} the {place}.",
    "{name} {past} the {adj} {noun} {time}.",
    "Did {name} {verb} the {noun} {prep} the {place}?",
    "We should {verb} the {adj} {noun} before {time2}.",
    "Please {verb} the {noun} {prep} the {place}.",
    "There are {number} {adj} {noun}s {prep} the {place}.",
    "{name} said the {noun} was {adj} {time}.",
    "I think {name} {past} the {noun}, but {name2} is not sure.",
    "After {time2}, the {adj} {noun} was {prep} the {place} again.",
    "Why would {name} {verb} the {adj} {noun} {time}?",
]


def make_sentence(rng: np.random.Generator) -> str:
    """A random, grammatical English sentence of about 6-12 words (2-4 s of speech)."""
    def pick(items: list) -> object:
        return items[int(rng.integers(len(items)))]
    verb, past = pick(_VERBS)
    name = pick(_NAMES)
    return str(pick(_TEMPLATES)).format(
        adj=pick(_ADJ), noun=pick(_NOUNS), place=pick(_PLACES), verb=verb, past=past, prep=pick(_PREP),
        time=pick(_TIMES), time2=pick(_TIMES2),
        name=name, name2=pick([n for n in _NAMES if n != name]), number=pick(_NUMBERS))


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Speaker:
    """An espeak voice with its own pitch, pitch range and speaking rate."""

    id: str
    accent: str
    variant: str
    pitch: int  # espeak 0-100 (50 = the voice's default)
    pitch_range: int  # espeak 0-100 (intonation; 50 = default)
    rate_wpm: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"


@dataclass(frozen=True)
class _Job:
    split: str
    name: str
    speaker: Speaker
    text: str
    rate_wpm: int
    noise: str
    snr: float
    entropy: tuple[int, ...]
    talkers: tuple[Speaker, ...]  # voices the babble/speech-shaped noise is made from
    talker_role: str  # "train" or "test_babble": seeds the talker pool
    sample_rate: int
    root: str


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(list(entropy))


def _speakers(seed: int, role: str, table: tuple[tuple[str, str, str], ...]) -> tuple[Speaker, ...]:
    out = []
    for k, (sid, accent, variant) in enumerate(table):
        rng = _rng(seed, _STREAM_SPEAKER, _ROLE_CODE[role], k)
        out.append(Speaker(sid, accent, variant, pitch=int(rng.integers(30, 71)),
                           pitch_range=int(rng.integers(35, 81)), rate_wpm=int(rng.integers(145, 196))))
    return tuple(out)


def speakers(seed: int) -> dict[str, tuple[Speaker, ...]]:
    """Speakers per role: ``train``, ``test`` and ``test_babble`` (cafe background talkers)."""
    return {"train": _speakers(seed, "train", TRAIN_VOICES), "test": _speakers(seed, "test", TEST_VOICES),
            "test_babble": _speakers(seed, "test_babble", TEST_BABBLE_VOICES)}


def _assignments(seed: int, split: str, count: int, noises: tuple[str, ...], snrs: list[float]
                 ) -> list[tuple[str, float]]:
    """Every (noise, SNR) pair equally often (up to rounding), in a seeded random order."""
    pairs = [(n, float(s)) for s in snrs for n in noises]
    cycled = [pairs[i % len(pairs)] for i in range(count)]
    order = _rng(seed, _STREAM_ASSIGN, _SPLIT_CODE[split]).permutation(count)
    return [cycled[i] for i in order]


def _plan(cfg: SyntheticConfig, root: Path) -> list[_Job]:
    roles = speakers(cfg.seed)
    jobs = []
    for split, count, snrs in (("train", cfg.train_utterances, cfg.train_snrs),
                               ("test", cfg.test_utterances, cfg.test_snrs)):
        voices = roles[split]
        role = "train" if split == "train" else "test_babble"
        talkers = roles[role]
        for i, (noise, snr) in enumerate(_assignments(cfg.seed, split, count, NOISES[split], snrs)):
            speaker = voices[i % len(voices)]
            rng = _rng(cfg.seed, _STREAM_PLAN, _SPLIT_CODE[split], i)
            rate = int(np.clip(speaker.rate_wpm + rng.integers(-10, 11), *espeak.RATE_RANGE))
            jobs.append(_Job(split, f"{speaker.id}_{i // len(voices) + 1:03d}", speaker, make_sentence(rng), rate,
                             noise, snr, (cfg.seed, _STREAM_RENDER, _SPLIT_CODE[split], i), talkers, role,
                             cfg.sample_rate, str(root)))
    return jobs


# ----------------------------------------------------------------------------- render (in workers)
def _speak(text: str, speaker: Speaker, rate_wpm: int, seed: int, sample_rate: int) -> np.ndarray:
    audio, native = espeak.synthesize(text, speaker.voice, rate_wpm=rate_wpm, pitch=speaker.pitch,
                                      pitch_range=speaker.pitch_range, seed=seed)
    return resample(audio, native, sample_rate)


@functools.lru_cache(maxsize=4)
def _talker_pool(talkers: tuple[Speaker, ...], role: str, seed: int, sample_rate: int) -> tuple[np.ndarray, ...]:
    """The background utterances babble noise is cut from: a fixed, seeded set per role.

    Synthesizing fresh sentences for every babble mixture would triple the build time; a
    pool (like a recorded noise file reused across utterances) is built once per worker
    process. It depends only on its arguments, so every worker builds the same pool.
    """
    pool = []
    for k, spk in enumerate(talkers):
        for j in range(POOL_PER_VOICE):
            rng = _rng(seed, _STREAM_POOL, _ROLE_CODE[role], k, j)
            pool.append(_speak(make_sentence(rng), spk, spk.rate_wpm, int(rng.integers(2 ** 31)), sample_rate))
    return tuple(pool)


def _talker_source(job: _Job) -> SpeechSource:
    def speak(rng: np.random.Generator) -> np.ndarray:
        pool = _talker_pool(job.talkers, job.talker_role, job.entropy[0], job.sample_rate)
        return pool[int(rng.integers(len(pool)))]
    return speak


def _pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    """16-bit PCM wav. Encoded in memory: soundfile's close() fsyncs every file, which
    dominates the build time, and the whole corpus folder is renamed into place atomically
    anyway (see :func:`generate_synthetic`)."""
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    path.write_bytes(buf.getvalue())


def _render(job: _Job) -> dict:
    """Synthesize, level, pad and mix one utterance; write its clean and noisy wavs."""
    try:
        voice_rng, level_rng, noise_rng, floor_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(list(job.entropy)).spawn(4))
        rate = job.sample_rate
        speech = _speak(job.text, job.speaker, job.rate_wpm, int(voice_rng.integers(2 ** 31)), rate)
        speech = speech.astype(np.float64)
        level = active_level(speech, rate)
        if level <= 0:
            raise SyntheticDataError("espeak produced silence")
        speech *= np.sqrt(10 ** (level_rng.uniform(*LEVEL_DB) / 10) / level)
        lead, trail = (int(level_rng.uniform(*PAD_S) * rate) for _ in range(2))
        clean = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
        floor_gain = np.sqrt(10 ** (floor_rng.uniform(*FLOOR_DB) / 10) * active_level(clean, rate))
        clean += floor_gain * floor_rng.standard_normal(len(clean))
        noise = make_noise(job.noise, len(clean), rate, noise_rng, _talker_source(job))
        mix = mix_at_snr(clean, noise, job.snr, rate)
        root = Path(job.root)
        _write_wav(clean_dir(root, job.split) / f"{job.name}.wav", _pcm16(mix.clean), rate)
        _write_wav(noisy_dir(root, job.split) / f"{job.name}.wav", _pcm16(mix.noisy), rate)
    except Exception as exc:
        raise SyntheticDataError(f"{job.split} utterance {job.name} ({job.speaker.voice}, noise {job.noise}, "
                                 f"text {job.text!r}): {type(exc).__name__}: {exc}") from exc
    return {"name": job.name, "split": job.split, "samples": len(clean), "rescaled": mix.scale < 1.0}


def _run(jobs: list[_Job], workers: int, progress: bool) -> Iterator[dict]:
    bar = tqdm(total=len(jobs), desc="synthetic corpus", unit="utt", disable=None if progress else True)
    with bar:
        if workers <= 1 or len(jobs) < 2:
            for job in jobs:
                yield _render(job)
                bar.update()
            return
        # spawn: workers start clean even if the caller has threads (torch, MLflow) running.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx)
        try:
            for result in pool.map(_render, jobs, chunksize=chunk):
                yield result
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # fail fast: drop the queued utterances
            raise
        pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- corpus
def _check_voices(roles: dict[str, tuple[Speaker, ...]]) -> dict[str, str]:
    """Resolve every voice up front (fail before any work); return voice -> espeak identifier."""
    resolved = {}
    for group in roles.values():
        for spk in group:
            try:
                resolved[spk.voice] = espeak.resolve_voice(spk.voice).identifier
            except espeak.EspeakError as exc:
                raise SyntheticDataError(f"speaker {spk.id}: {exc}") from None
    train = {s.accent for s in roles["train"]} | {s.variant for s in roles["train"]}
    test = {s.accent for k in ("test", "test_babble") for s in roles[k]} | \
        {s.variant for k in ("test", "test_babble") for s in roles[k]}
    if train & test:  # pragma: no cover - guards edits of the voice tables
        raise SyntheticDataError(f"test voices share accents/variants with training: {sorted(train & test)}")
    return resolved


def _split_summary(split: str, results: list[dict], rate: int, snrs: list[float],
                   roles: dict[str, tuple[Speaker, ...]], resolved: dict[str, str]) -> dict:
    secs = np.array([r["samples"] / rate for r in results])
    talkers = roles["train"] if split == "train" else roles["test_babble"]

    def describe(spk: Speaker) -> dict:
        return {"speaker": spk.id, "voice": spk.voice, "espeak_voice": resolved[spk.voice], "accent": spk.accent,
                "variant": spk.variant, "pitch": spk.pitch, "pitch_range": spk.pitch_range, "rate_wpm": spk.rate_wpm}
    return {
        "count": len(results),
        "duration_s": round(float(secs.sum()), 3),
        "utterance_s": {"min": round(float(secs.min()), 3), "mean": round(float(secs.mean()), 3),
                        "max": round(float(secs.max()), 3)},
        "voices": [describe(s) for s in roles[split]],
        "babble_voices": [describe(s) for s in talkers],
        "noise_types": list(NOISES[split]),
        "snrs": [float(s) for s in snrs],
        "peak_rescaled": sum(r["rescaled"] for r in results),
    }


def _manifest(cfg: SyntheticConfig, results: dict[str, list[dict]], roles: dict[str, tuple[Speaker, ...]],
              resolved: dict[str, str]) -> dict:
    snrs = {"train": cfg.train_snrs, "test": cfg.test_snrs}
    splits = {s: _split_summary(s, results[s], cfg.sample_rate, snrs[s], roles, resolved) for s in SPLITS}
    return {
        "source": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "sample_rate": cfg.sample_rate,
        # workers is left out: it has no effect on the files, and the manifest is one of them
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"},
        "espeak": {"version": espeak.version(), "native_rate": espeak.native_rate(),
                   "espeakng_loader": importlib.metadata.version("espeakng-loader")},
        "snr_definition": "P.56 active speech level of clean / mean power of (noisy - clean), in dB",
        "counts": {s: splits[s]["count"] for s in SPLITS},
        "durations_s": {s: splits[s]["duration_s"] for s in SPLITS},
        "splits": splits,
    }


def generate_synthetic(cfg: SyntheticConfig, out_dir: Path, progress: bool = True) -> dict:
    """Write the synthetic corpus to ``out_dir`` (VoiceBank-DEMAND layout); return its manifest.

    The folder is built beside ``out_dir`` and renamed into place at the end, so an
    interrupted run never leaves a partial corpus (an existing ``out_dir`` is replaced).
    """
    out_dir = Path(out_dir)
    for name in ("train_snrs", "test_snrs"):
        values = getattr(cfg, name)
        if not values or not all(np.isfinite(v) for v in values):
            raise SyntheticDataError(f"data.synthetic.{name}: expected a non-empty list of finite dB values, "
                                     f"got {values}")
    started = time.perf_counter()
    roles = speakers(cfg.seed)
    resolved = _check_voices(roles)
    try:
        with atomic_dir(out_dir) as tmp:
            for split in SPLITS:
                clean_dir(tmp, split).mkdir()
                noisy_dir(tmp, split).mkdir()
            jobs = _plan(cfg, tmp)
            results = {split: [] for split in SPLITS}
            for result in _run(jobs, cfg.workers, progress):
                results[result["split"]].append(result)
            for split in SPLITS:
                entries = sorted((LogEntry(j.name, j.noise, j.snr) for j in jobs if j.split == split),
                                 key=lambda e: e.utterance)
                write_text(log_path(tmp, split), format_log(entries))
            manifest = _manifest(cfg, results, roles, resolved)
            write_json(manifest_path(tmp), manifest)
    finally:
        _talker_pool.cache_clear()  # only needed during a build (workers=1 fills it here)
    logger.info("synthetic corpus: %d train + %d test utterances (%.1f + %.1f min) in %.1f s -> %s",
                manifest["counts"]["train"], manifest["counts"]["test"], manifest["durations_s"]["train"] / 60,
                manifest["durations_s"]["test"] / 60, time.perf_counter() - started, out_dir)
    return manifest
