"""segan.data.folder: importing the user's clean/noisy folders into the common layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from segan.config import FolderConfig
from segan.data import layout
from segan.data.folder import DataError, Pair, holdout_split, import_folder


def _tone(seconds: float, rate: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (0.2 * rng.standard_normal((int(round(seconds * rate)), channels))).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def _write(path: Path, data: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _good_tree(root: Path) -> tuple[Path, Path]:
    clean, noisy = root / "clean", root / "noisy"
    for i, key in enumerate(["a", "b", "spk1/c", "spk1/d", "spk2/deep/e"]):
        _write(clean / f"{key}.wav", _tone(0.1, 16000, i), 16000)
        # partners differ in format, sample rate and channel count; durations match
        _write(noisy / f"{key}.flac", _tone(0.1, 8000, 10 + i, channels=2), 8000)
    (clean / "README.txt").write_text("not audio, ignored")
    (noisy / ".hidden.wav").write_bytes(b"hidden files are ignored")
    return clean, noisy


def test_good_folder_pair_with_holdout(tmp_path):
    clean, noisy = _good_tree(tmp_path / "in")
    out = tmp_path / "raw"
    manifest = import_folder(FolderConfig(str(clean), str(noisy), test_fraction=0.4), out, progress=False)

    all_names = ["a.wav", "b.wav", "spk1__c.wav", "spk1__d.wav", "spk2__deep__e.wav"]
    train, test = _names(layout.clean_dir(out, "train")), _names(layout.clean_dir(out, "test"))
    assert len(test) == 2 and sorted(train + test) == all_names
    assert _names(layout.noisy_dir(out, "train")) == train and _names(layout.noisy_dir(out, "test")) == test

    data, rate = sf.read(str(layout.noisy_dir(out, "test") / test[0]))
    assert rate == 8000 and data.ndim == 1  # own rate kept, mixed down to mono
    assert sf.info(str(layout.clean_dir(out, "train") / train[0])).subtype == "PCM_16"
    original, _ = sf.read(str(clean / "a.wav"), dtype="float32")
    copied = layout.clean_dir(out, "train" if "a.wav" in train else "test") / "a.wav"
    np.testing.assert_allclose(sf.read(str(copied), dtype="float32")[0], original, atol=1 / 32768)

    logs = layout.read_log(layout.log_path(out, "test"))
    assert sorted(logs) == [n.removesuffix(".wav") for n in test]
    assert all(e.noise == "unknown" and e.snr is None for e in logs.values())

    assert json.loads(layout.manifest_path(out).read_text()) == manifest
    assert manifest["source"] == "folder" and manifest["counts"] == {"train": 3, "test": 2}
    assert manifest["sample_rates"] == [8000, 16000]

    # Deterministic: a second import gives the same split.
    import_folder(FolderConfig(str(clean), str(noisy), test_fraction=0.4), tmp_path / "raw2", progress=False)
    assert _names(layout.clean_dir(tmp_path / "raw2", "test")) == test


def test_explicit_test_folders(tmp_path):
    clean, noisy = _good_tree(tmp_path / "in")
    tclean, tnoisy = tmp_path / "tc", tmp_path / "tn"
    _write(tclean / "t1.ogg", _tone(0.2, 22050, 1), 22050)
    _write(tnoisy / "t1.wav", _tone(0.2, 44100, 2), 44100, subtype="FLOAT")
    cfg = FolderConfig(str(clean), str(noisy), test_clean_dir=str(tclean), test_noisy_dir=str(tnoisy))
    manifest = import_folder(cfg, tmp_path / "raw", progress=False)
    assert manifest["counts"] == {"train": 5, "test": 1}
    assert _names(layout.noisy_dir(tmp_path / "raw", "test")) == ["t1.wav"]
    assert sf.info(str(layout.clean_dir(tmp_path / "raw", "test") / "t1.wav")).samplerate == 22050


def test_broken_folder_lists_every_problem_once(tmp_path):
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    _write(clean / "ok.wav", _tone(0.1, 16000), 16000)
    _write(noisy / "ok.wav", _tone(0.1, 16000, 1), 16000)
    _write(clean / "lonely_clean.wav", _tone(0.1, 16000), 16000)
    _write(noisy / "sub/lonely_noisy.flac", _tone(0.1, 16000), 16000)
    _write(clean / "corrupt.wav", _tone(0.1, 16000), 16000)
    (noisy / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage that is not a wav file" * 3)
    (clean / "empty.wav").write_bytes(b"")
    _write(noisy / "empty.wav", _tone(0.1, 16000), 16000)
    nan = _tone(0.1, 16000)
    nan[100] = np.nan
    _write(clean / "nan.wav", nan, 16000, subtype="FLOAT")
    _write(noisy / "nan.wav", _tone(0.1, 16000), 16000)
    _write(clean / "long.wav", _tone(0.100, 16000), 16000)
    _write(noisy / "long.wav", _tone(0.105, 16000), 16000)
    _write(clean / "fine_rate.wav", _tone(0.1, 16000), 16000)  # 0.1 s at 16 kHz vs 0.1005 s at 8 kHz
    _write(noisy / "fine_rate.wav", _tone(0.1005, 8000), 8000)  # within the 1 ms tolerance: fine

    out = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        import_folder(FolderConfig(str(clean), str(noisy)), out, progress=False)
    err = info.value
    msg = str(err)
    assert isinstance(err, ValueError)
    expected = {
        "lonely_clean.wav": "without a noisy partner",
        "lonely_noisy.flac": "without a clean partner",
        "corrupt.wav": "cannot read audio",
        "empty.wav": "empty",
        "nan.wav": "NaN",
        "long.wav": "lasts",
    }
    assert len(err.problems) == len(expected), msg
    for name, what in expected.items():
        assert any(name in p and what in p for p in err.problems), (name, msg)
    assert "fine_rate" not in msg and "ok.wav" not in msg
    assert msg.startswith("cannot import") and "6 problem(s)" in msg
    assert not out.exists()


def test_failed_import_keeps_previous_output(tmp_path):
    clean, noisy = _good_tree(tmp_path / "in")
    out = tmp_path / "raw"
    import_folder(FolderConfig(str(clean), str(noisy)), out, progress=False)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    (noisy / "a.flac").unlink()
    with pytest.raises(DataError, match="a.wav: clean file without a noisy partner"):
        import_folder(FolderConfig(str(clean), str(noisy)), out, progress=False)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_empty_test_split_is_refused(tmp_path):
    clean, noisy = _good_tree(tmp_path / "in")
    with pytest.raises(DataError, match="no test pairs: set data.folder.test_fraction > 0"):
        import_folder(FolderConfig(str(clean), str(noisy), test_fraction=0.0), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_missing_folders_and_duplicate_names(tmp_path):
    with pytest.raises(DataError) as info:
        import_folder(FolderConfig(str(tmp_path / "nope_c"), str(tmp_path / "nope_n")), tmp_path / "raw",
                      progress=False)
    assert "nope_c: folder not found" in str(info.value) and "nope_n: folder not found" in str(info.value)

    clean, noisy = tmp_path / "c", tmp_path / "n"
    _write(clean / "x.wav", _tone(0.1, 16000), 16000)
    _write(clean / "x.flac", _tone(0.1, 16000), 16000)
    _write(noisy / "x.wav", _tone(0.1, 16000), 16000)
    with pytest.raises(DataError, match="only the extension differs"):
        import_folder(FolderConfig(str(clean), str(noisy)), tmp_path / "raw", progress=False)


def test_holdout_split_is_stable_and_keeps_both_sides():
    pairs = [Pair(f"u{i}", Path(f"c/u{i}.wav"), Path(f"n/u{i}.wav")) for i in range(20)]
    train, test = holdout_split(pairs, 0.1)
    assert len(test) == 2 and len(train) == 18
    assert holdout_split(list(reversed(pairs)), 0.1) == (train, test)  # order of discovery is irrelevant
    assert holdout_split(pairs[:2], 0.01)[1] != [] and holdout_split(pairs[:2], 0.9)[0] != []
    assert holdout_split(pairs, 0.0) == (sorted(pairs, key=lambda p: p.key), [])
