"""The offline synthetic corpus: espeak binding, noises, SNR mixing and the generated layout.

Everything here runs real espeak-ng synthesis (the library ships in espeakng-loader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from segan.audio import active_speech_level, resample
from segan.config import SyntheticConfig
from segan.data import espeak, noise, synthetic
from segan.data.layout import SPLITS, clean_dir, log_path, manifest_path, noisy_dir, read_log

RATE = 16000
SMALL = dict(train_utterances=12, test_utterances=4, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "raw"
    manifest = synthetic.generate_synthetic(SyntheticConfig(workers=1, **SMALL), root, progress=False)
    return root, manifest


# ----------------------------------------------------------------------------- espeak
def test_espeak_is_byte_identical_for_the_same_call():
    text = "The quick brown fox jumps over the lazy dog."
    first, rate = espeak.synthesize(text, "en-us+f2", rate_wpm=160, pitch=40, seed=3)
    espeak.synthesize("Something else entirely, to disturb any state.", "en+m3", rate_wpm=220, pitch=80)
    second, rate2 = espeak.synthesize(text, "en-us+f2", rate_wpm=160, pitch=40, seed=3)
    assert rate == rate2 == espeak.native_rate() == 22050
    assert first.dtype == np.float32 and first.ndim == 1
    assert 1.0 < len(first) / rate < 5.0 and 0.05 < np.abs(first).max() <= 1.0
    assert first.tobytes() == second.tobytes()
    other, _ = espeak.synthesize(text, "en-us+m1", rate_wpm=160, pitch=40, seed=3)
    assert other.tobytes() != first.tobytes()


def test_espeak_rejects_unknown_voices_and_bad_parameters():
    with pytest.raises(espeak.EspeakError, match="not found"):
        espeak.resolve_voice("xx-nowhere")
    with pytest.raises(espeak.EspeakError, match="variant 'nosuchvariant' not found"):
        espeak.resolve_voice("en-us+nosuchvariant")  # espeak itself would silently ignore it
    with pytest.raises(espeak.EspeakError, match="rate_wpm"):
        espeak.synthesize("hello", "en-us", rate_wpm=10)
    with pytest.raises(espeak.EspeakError, match="empty"):
        espeak.synthesize("   ", "en-us")


def test_espeak_reports_broken_data_clearly_and_recovers(monkeypatch, tmp_path):
    real = espeak._paths
    monkeypatch.setattr(espeak, "_paths", lambda: (real()[0], tmp_path))  # an empty data folder
    with pytest.raises(espeak.EspeakError, match="initialize failed"):
        espeak.synthesize("hello", "en-us")
    monkeypatch.setattr(espeak, "_paths", real)
    audio, _ = espeak.synthesize("hello", "en-us")  # the failed load was unloaded cleanly
    assert audio.size > 0


def test_corpus_voices_exist_in_the_bundled_data():
    for table in (synthetic.TRAIN_VOICES, synthetic.TEST_VOICES, synthetic.TEST_BABBLE_VOICES):
        for _, accent, variant in table:
            assert accent in espeak.list_languages()
            assert variant in espeak.list_variants()
            info = espeak.resolve_voice(f"{accent}+{variant}")
            assert info.identifier.endswith(f"+{variant}")


# ----------------------------------------------------------------------------- level, noise, mixing
def _p56_reference(x: np.ndarray, rate: int) -> float:
    """ITU-T P.56 method B, sample by sample as the standard describes it (slow, small inputs)."""
    g, hang_max = np.exp(-1 / (rate * 0.03)), int(np.ceil(rate * 0.2))
    thresholds = 2.0 ** np.arange(-15, 1)
    active, hang = np.zeros(16, int), np.full(16, hang_max)
    p = q = 0.0
    for v in x:
        p = g * p + (1 - g) * abs(v)
        q = g * q + (1 - g) * p
        for j, c in enumerate(thresholds):
            if q >= c:
                active[j] += 1
                hang[j] = 0
            elif hang[j] < hang_max:
                active[j] += 1
                hang[j] += 1
    energy, prev = float(np.sum(x * x)), None
    for j, c in enumerate(thresholds):
        a_db, c_db = 10 * np.log10(energy / active[j]), 20 * np.log10(c)
        if a_db - c_db <= 15.9:
            d0, d1 = prev[0] - prev[1], a_db - c_db
            return 10 ** ((prev[0] + (d0 - 15.9) / (d0 - d1) * (a_db - prev[0])) / 10)
        prev = (a_db, c_db)
    raise AssertionError("margin never reached")


def test_active_level_matches_a_sample_by_sample_p56():
    rng = np.random.default_rng(0)
    rate = 8000
    x = np.concatenate([np.zeros(2000), 0.1 * rng.standard_normal(3000) * np.hanning(3000),
                        np.zeros(4000), 0.02 * rng.standard_normal(2000), np.zeros(1501)])
    assert noise.active_level(x, rate) == pytest.approx(_p56_reference(x, rate), rel=1e-9)
    # pauses do not dilute the level (unlike plain RMS)
    assert noise.active_level(x, rate) > 1.5 * np.mean(x ** 2)
    assert noise.active_level(np.zeros(100), rate) == 0.0


def test_mix_at_snr_hits_the_snr_and_rescales_loud_mixtures_without_clipping():
    rng = np.random.default_rng(1)
    t = np.arange(RATE * 2) / RATE
    clean = 0.9 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)  # loud, with pauses
    n = rng.standard_normal(len(clean))
    mix = noise.mix_at_snr(clean, n, 0.0, RATE)
    assert mix.scale < 1.0
    assert np.abs(mix.noisy).max() <= 0.99 + 1e-6 and np.abs(mix.clean).max() <= 0.99 + 1e-6
    # the rescale keeps the true power ratio; P.56's fixed thresholds make the *measured*
    # level very slightly level-dependent (~0.005 dB here)
    assert noise.snr_db(mix.clean, mix.noisy - mix.clean, RATE) == pytest.approx(0.0, abs=0.02)
    quiet = noise.mix_at_snr(0.01 * clean, n, 10.0, RATE)
    assert quiet.scale == 1.0
    assert noise.snr_db(quiet.clean, quiet.noisy - quiet.clean, RATE) == pytest.approx(10.0, abs=1e-3)
    with pytest.raises(ValueError, match="samples"):
        noise.mix_at_snr(clean, n[:-1], 0.0, RATE)


def _speech_source(rng: np.random.Generator) -> np.ndarray:
    text = synthetic.make_sentence(rng)
    audio, native = espeak.synthesize(text, "en-us+m1", seed=int(rng.integers(1000)))
    return resample(audio, native, RATE)


@pytest.mark.parametrize("kind", sorted(noise.GENERATORS))
def test_noises_are_seeded_finite_and_unit_rms(kind):
    n = RATE // 2
    a = noise.make_noise(kind, n, RATE, np.random.default_rng(5), _speech_source)
    b = noise.make_noise(kind, n, RATE, np.random.default_rng(5), _speech_source)
    c = noise.make_noise(kind, n, RATE, np.random.default_rng(6), _speech_source)
    assert a.dtype == np.float32 and a.shape == (n,)
    assert np.all(np.isfinite(a))
    assert np.sqrt(np.mean(a.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_noise_sets_are_disjoint_and_speech_noises_need_speech():
    assert not set(noise.TRAIN_NOISES) & set(noise.TEST_NOISES)
    assert set(noise.TRAIN_NOISES) | set(noise.TEST_NOISES) == set(noise.GENERATORS)
    with pytest.raises(ValueError, match="speech source"):
        noise.make_noise("babble", 100, RATE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown noise type 'rain'"):
        noise.make_noise("rain", 100, RATE, np.random.default_rng(0))


def test_sentences_are_seeded_and_varied():
    sents = [synthetic.make_sentence(np.random.default_rng([1, i])) for i in range(60)]
    assert sents == [synthetic.make_sentence(np.random.default_rng([1, i])) for i in range(60)]
    assert len(set(sents)) >= 55
    assert all(5 <= len(s.split()) <= 14 and s[-1] in ".?" for s in sents)


# ----------------------------------------------------------------------------- the corpus
def test_layout_logs_and_wav_format(corpus):
    root, manifest = corpus
    assert sorted(p.name for p in root.iterdir()) == sorted([
        "clean_trainset_wav", "noisy_trainset_wav", "clean_testset_wav", "noisy_testset_wav",
        "log_trainset.txt", "log_testset.txt", "manifest.json"])
    expected = {"train": (12, r"s0[1-8]_\d{3}"), "test": (4, r"t0[12]_\d{3}")}
    for split in SPLITS:
        count, pattern = expected[split]
        names = sorted(p.stem for p in clean_dir(root, split).glob("*.wav"))
        assert names == sorted(p.stem for p in noisy_dir(root, split).glob("*.wav"))
        assert len(names) == count and all(re.fullmatch(pattern, n) for n in names)
        log = read_log(log_path(root, split))
        assert sorted(log) == names
        assert log_path(root, split).read_text().splitlines()[0].count(" ") == 2
        for name in names:
            info_c = sf.info(str(clean_dir(root, split) / f"{name}.wav"))
            info_n = sf.info(str(noisy_dir(root, split) / f"{name}.wav"))
            assert (info_c.samplerate, info_c.channels, info_c.subtype) == (RATE, 1, "PCM_16")
            assert (info_n.samplerate, info_n.frames) == (RATE, info_c.frames)
            assert 1.5 < info_c.duration < 7.0
    assert json.loads(manifest_path(root).read_text()) == manifest
    assert manifest["source"] == "synthetic" and manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert manifest["seed"] == 7 and manifest["counts"] == {"train": 12, "test": 4}
    assert manifest["splits"]["train"]["snrs"] == [15.0, 10.0, 5.0, 0.0]
    assert manifest["splits"]["test"]["snrs"] == [17.5, 12.5, 7.5, 2.5]
    assert len(manifest["splits"]["train"]["voices"]) >= 8 and len(manifest["splits"]["test"]["voices"]) == 2
    for voice in manifest["splits"]["train"]["voices"]:
        assert {"pitch", "rate_wpm", "pitch_range", "voice", "speaker"} <= set(voice)
    total = sum(sf.info(str(p)).duration for p in clean_dir(root, "train").glob("*.wav"))
    assert manifest["durations_s"]["train"] == pytest.approx(total, abs=0.01)


def test_train_and_test_are_disjoint(corpus):
    root, manifest = corpus
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    test_voices = test["voices"] + test["babble_voices"]
    assert not {v["accent"] for v in train["voices"]} & {v["accent"] for v in test_voices}
    assert not {v["variant"] for v in train["voices"]} & {v["variant"] for v in test_voices}
    assert not {v["speaker"] for v in train["voices"]} & {v["speaker"] for v in test["voices"]}
    assert not set(train["noise_types"]) & set(test["noise_types"])
    train_log, test_log = read_log(log_path(root, "train")), read_log(log_path(root, "test"))
    assert {e.noise for e in train_log.values()} <= set(noise.TRAIN_NOISES)
    assert {e.noise for e in test_log.values()} <= set(noise.TEST_NOISES)
    assert {e.snr for e in train_log.values()} <= {15.0, 10.0, 5.0, 0.0}
    assert {e.snr for e in test_log.values()} <= {17.5, 12.5, 7.5, 2.5}
    assert len({e.noise for e in train_log.values()}) == len(noise.TRAIN_NOISES)  # 12 >= 5: all used


def test_snr_on_active_speech_and_no_clipping(corpus):
    root, _ = corpus
    for split in SPLITS:
        for name, entry in read_log(log_path(root, split)).items():
            clean, rate = sf.read(str(clean_dir(root, split) / f"{name}.wav"), dtype="float64")
            noisy, _ = sf.read(str(noisy_dir(root, split) / f"{name}.wav"), dtype="float64")
            residual = noisy - clean
            assert noise.snr_db(clean, residual, rate) == pytest.approx(entry.snr, abs=0.5), name
            # an independent (frame-energy) active level agrees to within its own looseness
            simple = 10 * np.log10(active_speech_level(clean, rate) / np.mean(residual ** 2))
            assert simple == pytest.approx(entry.snr, abs=1.5), name
            assert np.abs(noisy).max() <= 0.99 + 1 / 32768 and np.abs(clean).max() <= 0.99 + 1 / 32768
            # leading silence carries the recording floor, 45-55 dB below the active speech level
            floor_db = 10 * np.log10(np.mean(clean[: int(0.1 * rate)] ** 2) / noise.active_level(clean, rate))
            assert -56.0 < floor_db < -44.0, (name, floor_db)


def test_rebuild_is_byte_identical_and_replaces_the_folder(corpus, tmp_path):
    root, _ = corpus
    again = tmp_path / "raw"
    again.mkdir()
    (again / "stale.txt").write_text("from an older build")
    synthetic.generate_synthetic(SyntheticConfig(workers=1, **SMALL), again, progress=False)
    assert _files(again) == _files(root)
    other = synthetic.generate_synthetic(SyntheticConfig(workers=1, **{**SMALL, "seed": 8}), tmp_path / "b",
                                         progress=False)
    assert other["seed"] == 8
    assert (tmp_path / "b" / "clean_trainset_wav" / "s01_001.wav").read_bytes() != \
        (root / "clean_trainset_wav" / "s01_001.wav").read_bytes()


@pytest.mark.slow
def test_worker_count_does_not_change_a_byte(corpus, tmp_path):
    root, _ = corpus
    synthetic.generate_synthetic(SyntheticConfig(workers=2, **SMALL), tmp_path / "raw", progress=False)
    assert _files(tmp_path / "raw") == _files(root)


def test_a_failed_build_leaves_no_partial_corpus(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("previous corpus")
    real, calls = synthetic._render, []

    def failing(job):
        calls.append(job.name)
        if len(calls) == 3:
            raise synthetic.SyntheticDataError("simulated crash")
        return real(job)

    monkeypatch.setattr(synthetic, "_render", failing)
    with pytest.raises(synthetic.SyntheticDataError, match="simulated crash"):
        synthetic.generate_synthetic(SyntheticConfig(workers=1, **SMALL), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_config_is_rejected_before_any_work(tmp_path):
    with pytest.raises(synthetic.SyntheticDataError, match="data.synthetic.test_snrs"):
        synthetic.generate_synthetic(SyntheticConfig(test_snrs=[]), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_other_sample_rates_and_custom_snrs(tmp_path):
    cfg = SyntheticConfig(train_utterances=3, test_utterances=2, sample_rate=8000, train_snrs=[-5.0],
                          test_snrs=[20.0], workers=1)
    manifest = synthetic.generate_synthetic(cfg, tmp_path / "raw", progress=False)
    assert manifest["sample_rate"] == 8000 and manifest["splits"]["train"]["snrs"] == [-5.0]
    for split, snr in (("train", -5.0), ("test", 20.0)):
        for name, entry in read_log(log_path(tmp_path / "raw", split)).items():
            assert entry.snr == snr
            clean, rate = sf.read(str(clean_dir(tmp_path / "raw", split) / f"{name}.wav"), dtype="float64")
            noisy, _ = sf.read(str(noisy_dir(tmp_path / "raw", split) / f"{name}.wav"), dtype="float64")
            assert rate == 8000
            assert noise.snr_db(clean, noisy - clean, rate) == pytest.approx(snr, abs=0.5)
