"""The prepare stage and the training dataset, on real (tiny) wav corpora written here."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from segan.audio import resample
from segan.config import ConfigError, PrepareConfig
from segan.data import layout
from segan.data.dataset import PreparedCorpusError, WindowDataset, load_test_manifest, read_prepared_manifest
from segan.data.prepare import PrepareError, prepare_corpus, window_starts

RATE = 16000
WINDOW, HOP = 1024, 512
CFG = PrepareConfig(sample_rate=RATE, window=WINDOW, hop=HOP, workers=1)

# train utterance -> (source rate, channels, frames at the source rate)
TRAIN = {
    "p1_001": (48000, 1, 9000),   # 3000 samples at 16 kHz: 4 regular windows + 1 end-aligned
    "p1_002": (16000, 2, 2048),   # stereo; exactly 3 windows, no end-aligned one
    "p1_003": (16000, 1, 500),    # shorter than a window: zero-padded to one window
    "p1_004": (16000, 1, 4000),   # 6 regular + 1 end-aligned
}
TEST = {"p2_001": (48000, 1, 12000), "p2_002": (16000, 1, 2500)}
EXPECTED_LENGTHS = {"p1_001": 3000, "p1_002": 2048, "p1_003": 500, "p1_004": 4000}
EXPECTED_WINDOWS = {"p1_001": 5, "p1_002": 3, "p1_003": 1, "p1_004": 7}
RAW_MANIFEST = {"source": "synthetic", "seed": 7}


def _signal(rng: np.random.Generator, frames: int, channels: int, rate: int) -> np.ndarray:
    t = np.arange(frames) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] + 0.05 * rng.standard_normal((frames, channels))
    return (x[:, 0] if channels == 1 else x).astype(np.float32)


def _write(path: Path, x: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, rate, subtype="FLOAT")


def _expected_mono(x: np.ndarray, rate: int) -> np.ndarray:
    """What prepare should store for a source signal: mono mix, then soxr VHQ to 16 kHz."""
    mono = x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)
    return resample(mono, rate, RATE)


def make_corpus(root: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Write the raw layout; return the expected 16 kHz mono clean/noisy per utterance."""
    rng = np.random.default_rng(seed)
    expected: dict[str, dict[str, np.ndarray]] = {}
    for split, utts in (("train", TRAIN), ("test", TEST)):
        for utt, (rate, channels, frames) in utts.items():
            clean = _signal(rng, frames, channels, rate)
            noisy = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
            _write(layout.clean_dir(root, split) / f"{utt}.wav", clean, rate)
            _write(layout.noisy_dir(root, split) / f"{utt}.wav", noisy, rate)
            expected[utt] = {"clean": _expected_mono(clean, rate), "noisy": _expected_mono(noisy, rate)}
    entries = [layout.LogEntry("p1_001", "cafe", 5.0), layout.LogEntry("p1_002", "bus", 0.0),
               layout.LogEntry("p1_003", "street", None)]  # p1_004 not in the log
    layout.log_path(root, "train").write_text(layout.format_log(entries))
    layout.log_path(root, "test").write_text(layout.format_log([layout.LogEntry("p2_001", "babble", 2.5)]))
    layout.manifest_path(root).write_text(json.dumps(RAW_MANIFEST))
    return expected


def reference_starts(length: int, window: int, hop: int) -> list[int]:
    """The window rule, written independently of the implementation."""
    padded = max(length, window)
    starts, s = [], 0
    while s + window <= padded:
        starts.append(s)
        s += hop
    if starts[-1] + window < padded:
        starts.append(padded - window)
    return starts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    base = tmp_path_factory.mktemp("prep")
    expected = make_corpus(base / "raw")
    summary = prepare_corpus(base / "raw", base / "out", CFG, progress=False)
    return base / "out", expected, summary


# ----------------------------------------------------------------------------- window rule
@pytest.mark.parametrize("length,window,hop,starts", [
    (3000, 1024, 512, [0, 512, 1024, 1536, 1976]),
    (2048, 1024, 512, [0, 512, 1024]),
    (500, 1024, 512, [0]),
    (1024, 1024, 512, [0]),
    (1025, 1024, 1024, [0, 1]),
    (5000, 1024, 1024, [0, 1024, 2048, 3072, 3976]),
    (3000, 1024, 300, [0, 300, 600, 900, 1200, 1500, 1800, 1976]),
])
def test_window_starts(length: int, window: int, hop: int, starts: list[int]) -> None:
    got = window_starts(length, window, hop)
    assert got.dtype == np.int64
    assert got.tolist() == starts == reference_starts(length, window, hop)


# ----------------------------------------------------------------------------- outputs
def test_manifest_contents(prepared: tuple[Path, dict, dict]) -> None:
    out, _, summary = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == summary == read_prepared_manifest(out)
    assert (manifest["sample_rate"], manifest["window"], manifest["hop"]) == (RATE, WINDOW, HOP)
    counts = manifest["counts"]
    assert counts["train_utterances"] == 4 and counts["test_utterances"] == 2
    assert counts["train_windows"] == sum(EXPECTED_WINDOWS.values()) == 16
    assert counts["train_samples"] == sum(EXPECTED_LENGTHS.values())
    assert manifest["hours"]["train"] == pytest.approx(sum(EXPECTED_LENGTHS.values()) / RATE / 3600, abs=1e-6)
    assert manifest["hours"]["test"] == pytest.approx((4000 + 2500) / RATE / 3600, abs=1e-6)
    assert manifest["skipped"] == []
    assert manifest["source"] == "synthetic"
    raw_manifest = out.parent / "raw" / "manifest.json"
    assert manifest["source_manifest_sha256"] == hashlib.sha256(raw_manifest.read_bytes()).hexdigest()


def test_train_storage_and_windows(prepared: tuple[Path, dict, dict]) -> None:
    out, expected, _ = prepared
    clean = np.load(out / "train_clean.npy", mmap_mode="r")
    noisy = np.load(out / "train_noisy.npy", mmap_mode="r")
    starts = np.load(out / "train_windows.npy", mmap_mode="r")
    assert clean.dtype == noisy.dtype == np.float32 and clean.ndim == 1 and clean.shape == noisy.shape
    assert starts.dtype == np.int64
    # stored once, each utterance padded to at least one window: no duplication from overlap
    assert len(clean) == sum(max(n, WINDOW) for n in EXPECTED_LENGTHS.values())

    utts = pd.read_csv(out / "train_utterances.csv", dtype={"utterance": str, "noise": str},
                       keep_default_na=False)
    assert list(utts.columns) == ["utterance", "offset", "length", "noise", "snr", "n_windows"]
    assert utts["utterance"].tolist() == sorted(TRAIN)
    assert dict(zip(utts["utterance"], utts["length"])) == EXPECTED_LENGTHS
    assert dict(zip(utts["utterance"], utts["n_windows"])) == EXPECTED_WINDOWS
    assert dict(zip(utts["utterance"], utts["noise"])) == {
        "p1_001": "cafe", "p1_002": "bus", "p1_003": "street", "p1_004": "unknown"}
    assert utts["snr"].astype(str).tolist() == ["5.0", "0.0", "", ""]

    expected_starts: list[int] = []
    offset = 0
    for row in utts.itertuples():
        assert row.offset == offset
        ref = expected[row.utterance]
        n = row.length
        # the stored segment is the resampled mono source, then zeros up to one window
        np.testing.assert_array_equal(clean[offset:offset + n], ref["clean"][:n])
        np.testing.assert_array_equal(noisy[offset:offset + n], ref["noisy"][:n])
        assert not np.any(clean[offset + n:offset + max(n, WINDOW)])
        expected_starts += [offset + s for s in reference_starts(n, WINDOW, HOP)]
        offset += max(n, WINDOW)
    assert starts.tolist() == expected_starts


def test_windows_overlap_by_hop(prepared: tuple[Path, dict, dict]) -> None:
    out, expected, _ = prepared
    ds = WindowDataset(out)
    # p1_004 is the last utterance (offset 6072): windows 9..15, hop apart except the last
    utts = pd.read_csv(out / "train_utterances.csv", dtype={"utterance": str})
    row = utts[utts["utterance"] == "p1_004"].iloc[0]
    first = int(utts["n_windows"][:-1].sum())
    src = expected["p1_004"]["clean"]
    for k in range(row["n_windows"] - 2):
        a, b = ds.starts[first + k], ds.starts[first + k + 1]
        assert b - a == HOP
        c_a, _ = ds[first + k]
        c_b, _ = ds[first + k + 1]
        torch.testing.assert_close(c_a[0, HOP:], c_b[0, :WINDOW - HOP], rtol=0, atol=0)
        np.testing.assert_array_equal(c_b[0].numpy(), src[(k + 1) * HOP:(k + 1) * HOP + WINDOW])
    last_clean, last_noisy = ds[first + row["n_windows"] - 1]
    np.testing.assert_array_equal(last_clean[0].numpy(), src[-WINDOW:])  # aligned to the end
    np.testing.assert_array_equal(last_noisy[0].numpy(), expected["p1_004"]["noisy"][-WINDOW:])


def test_test_utterances_whole(prepared: tuple[Path, dict, dict]) -> None:
    out, expected, _ = prepared
    df = load_test_manifest(out)
    assert list(df.columns) == ["utterance", "noise", "snr", "seconds", "clean_path", "noisy_path"]
    assert df["utterance"].tolist() == ["p2_001", "p2_002"]
    assert df["noise"].tolist() == ["babble", "unknown"]
    assert df["snr"].iloc[0] == 2.5 and np.isnan(df["snr"].iloc[1])
    assert df["seconds"].tolist() == pytest.approx([4000 / RATE, 2500 / RATE])
    for row in df.itertuples():
        for side, rel in (("clean", row.clean_path), ("noisy", row.noisy_path)):
            assert rel == f"test/{side}/{row.utterance}.wav"
            info = sf.info(str(out / rel))
            assert (info.samplerate, info.channels) == (RATE, 1)
            data, _ = sf.read(str(out / rel), dtype="float32")
            np.testing.assert_array_equal(data, expected[row.utterance][side])


# ----------------------------------------------------------------------------- bad input
def _add_bad_pairs(root: Path) -> None:
    rng = np.random.default_rng(1)
    cdir, ndir = layout.clean_dir(root, "train"), layout.noisy_dir(root, "train")
    good = _signal(rng, 3000, 1, RATE)
    (cdir / "bad_corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
    _write(ndir / "bad_corrupt.wav", good, RATE)
    _write(cdir / "bad_empty.wav", np.zeros(0, np.float32), RATE)
    _write(ndir / "bad_empty.wav", good, RATE)
    nan = good.copy()
    nan[100] = np.nan
    _write(cdir / "bad_nan.wav", nan, RATE)
    _write(ndir / "bad_nan.wav", good, RATE)
    _write(cdir / "bad_silent.wav", np.zeros(3000, np.float32), RATE)
    _write(ndir / "bad_silent.wav", good, RATE)
    _write(cdir / "bad_mismatch.wav", good, RATE)
    _write(ndir / "bad_mismatch.wav", _signal(rng, 3100, 1, RATE), RATE)
    _write(cdir / "bad_orphan.wav", good, RATE)
    _write(cdir / "ok_offby1.wav", good, RATE)  # within the resampling tolerance: trimmed
    _write(ndir / "ok_offby1.wav", _signal(rng, 3001, 1, RATE), RATE)


BAD_REASONS = {
    "bad_corrupt": "cannot read audio",
    "bad_empty": "empty audio",
    "bad_mismatch": "expected equal lengths",
    "bad_nan": "NaN or Inf",
    "bad_orphan": "no noisy file",
    "bad_silent": "silent",
}


@pytest.fixture(scope="module")
def bad_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "raw"
    make_corpus(root)
    _add_bad_pairs(root)
    return root


def test_bad_pairs_skipped_with_reasons(bad_raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="segan.data.prepare"):
        summary = prepare_corpus(bad_raw, tmp_path / "out", CFG, progress=False)
    skipped = {s["utterance"]: s for s in summary["skipped"]}
    assert sorted(skipped) == sorted(BAD_REASONS)
    for utt, reason in BAD_REASONS.items():
        assert skipped[utt]["split"] == "train"
        assert reason in skipped[utt]["reason"], skipped[utt]
        assert any(utt in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert summary["counts"]["skipped"] == len(BAD_REASONS)
    assert summary["counts"]["train_utterances"] == 5  # the 4 good ones and ok_offby1
    utts = pd.read_csv(tmp_path / "out" / "train_utterances.csv", dtype={"utterance": str})
    assert utts["utterance"].tolist() == ["ok_offby1", *sorted(TRAIN)]
    assert utts["length"].iloc[0] == 3000  # trimmed to the shorter side


def test_workers_give_identical_output(bad_raw: Path, tmp_path: Path) -> None:
    a = prepare_corpus(bad_raw, tmp_path / "w1", CFG, progress=False)
    cfg2 = PrepareConfig(sample_rate=RATE, window=WINDOW, hop=HOP, workers=2)
    b = prepare_corpus(bad_raw, tmp_path / "w2", cfg2, progress=False)
    assert a == b
    files1 = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    assert files1 == files2 and len(files1) == 5 + 2 * len(TEST) + 1
    for rel in files1:
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), rel


def test_all_bad_split_is_an_error_and_leaves_old_output(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_corpus(raw)
    out = tmp_path / "out"
    prepare_corpus(raw, out, CFG, progress=False)
    before = (out / "manifest.json").read_bytes()
    for p in layout.clean_dir(raw, "test").iterdir():
        _write(p, np.zeros(4000, np.float32), RATE)  # every test clean file silent
    with pytest.raises(PrepareError, match=r"all 2 test pairs are unusable: p2_001: .*silent"):
        prepare_corpus(raw, out, CFG, progress=False)
    assert (out / "manifest.json").read_bytes() == before  # untouched, not half-rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp dirs left

    with pytest.raises(PrepareError, match="all 2 test pairs"):
        prepare_corpus(raw, tmp_path / "fresh", CFG, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_missing_logs_and_raw_manifest(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_corpus(raw)
    layout.log_path(raw, "test").unlink()
    layout.manifest_path(raw).unlink()
    summary = prepare_corpus(raw, tmp_path / "out", CFG, progress=False)
    assert summary["source"] is None and summary["source_manifest_sha256"] is None
    df = load_test_manifest(tmp_path / "out")
    assert df["noise"].tolist() == ["unknown", "unknown"] and df["snr"].isna().all()

    layout.log_path(raw, "train").write_text("p1_001 cafe loud\n")
    with pytest.raises(PrepareError, match=r"log_trainset.txt:1: SNR 'loud' is not a number"):
        prepare_corpus(raw, tmp_path / "out2", CFG, progress=False)


def test_missing_layout_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="raw corpus folder not found"):
        prepare_corpus(tmp_path / "nope", tmp_path / "out", CFG, progress=False)
    layout.clean_dir(tmp_path, "train").mkdir()
    with pytest.raises(PrepareError, match="noisy_trainset_wav: folder not found"):
        prepare_corpus(tmp_path, tmp_path / "out", CFG, progress=False)
    with pytest.raises(ConfigError, match="prepare.hop"):
        prepare_corpus(tmp_path, tmp_path / "out", PrepareConfig(window=1024, hop=2048), progress=False)
    with pytest.raises(ConfigError, match="prepare.hop"):
        prepare_corpus(tmp_path, tmp_path / "out", PrepareConfig(window=1024, hop=0), progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- dataset
def test_window_dataset_items(prepared: tuple[Path, dict, dict]) -> None:
    out, _, _ = prepared
    ds = WindowDataset(out)
    clean = np.load(out / "train_clean.npy")
    noisy = np.load(out / "train_noisy.npy")
    starts = np.load(out / "train_windows.npy")
    assert len(ds) == 16 and ds.window == WINDOW and ds.sample_rate == RATE
    for i in (0, 4, 5, 8, len(ds) - 1):
        c, x = ds[i]
        assert c.shape == x.shape == (1, WINDOW) and c.dtype == x.dtype == torch.float32
        np.testing.assert_array_equal(c[0].numpy(), clean[starts[i]:starts[i] + WINDOW])
        np.testing.assert_array_equal(x[0].numpy(), noisy[starts[i]:starts[i] + WINDOW])
    torch.testing.assert_close(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]

    ds[0]  # open the maps, then make sure they do not travel in a pickle
    blob = pickle.dumps(ds)
    assert len(blob) < clean.nbytes
    clone = pickle.loads(blob)
    torch.testing.assert_close(clone[3], ds[3])

    batch_clean, batch_noisy = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch_clean.shape == batch_noisy.shape == (4, 1, WINDOW)


def test_incomplete_prepared_dir_errors(prepared: tuple[Path, dict, dict], tmp_path: Path) -> None:
    out, _, _ = prepared
    with pytest.raises(PreparedCorpusError, match="folder not found"):
        WindowDataset(tmp_path / "nothing")
    with pytest.raises(PreparedCorpusError, match="manifest.json: not found"):
        WindowDataset(tmp_path)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "train_clean.npy", "train_windows.npy", "test_manifest.csv"):
        (broken / name).write_bytes((out / name).read_bytes())
    with pytest.raises(PreparedCorpusError, match="train_noisy.npy: not found"):
        WindowDataset(broken)
    with pytest.raises(PreparedCorpusError, match="listed file.* missing"):
        load_test_manifest(broken)

    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(PreparedCorpusError, match="not valid JSON"):
        read_prepared_manifest(broken)
