"""`segan enhance`: windowing without seams, any rate/channels/length, safe file handling.

Real files, a real tiny SEGAN generator (random weights) and a real identity runner; no mocks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from segan.cli_enhance import enhance_command
from segan.config import ModelConfig
from segan.enhance import (EnhanceError, IdentityRunner, crossfade_weights, enhance_files, enhance_signal,
                           hop_for, plan_jobs, safe_output_path)
from segan.loading import ModelLoadError, load_enhancer
from segan.model import build_models, save_generator

WINDOW = 1024
TINY = ModelConfig(g_channels=[4, 8, 8, 16], d_channels=[4, 8, 8, 16])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    generator, _ = build_models(TINY, WINDOW)
    path = tmp_path_factory.mktemp("model") / "generator.pt"
    save_generator(path, generator, TINY, {"sample_rate": 16000, "window": WINDOW, "preemphasis": 0.95,
                                           "mlflow_run_id": None})
    return path


@pytest.fixture(scope="module")
def runner(checkpoint):
    return load_enhancer(str(checkpoint))


def tone(seconds: float, rate: int, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """Band-limited test signal (tones well below 4 kHz) so resampling round trips are clean."""
    t = np.arange(int(round(seconds * rate))) / rate
    cols = [amp * np.sin(2 * np.pi * (220 + 110 * c) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t))
            for c in range(channels)]
    x = np.stack(cols, axis=1).astype(np.float32)
    return x[:, 0] if channels == 1 else x


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- windowing
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_no_seam_with_identity_model(overlap):
    """Cross-fade + normalisation by the summed weights: identity in -> identical out, across
    every window edge, for any overlap, batch size and input block size."""
    runner = IdentityRunner(16000, WINDOW)
    x = np.random.default_rng(1).uniform(-0.9, 0.9, 10 * WINDOW + 333).astype(np.float32)
    for batch_size, block in ((1, 777), (16, 1 << 16)):
        y = enhance_signal(x, 16000, runner, overlap=overlap, batch_size=batch_size, block_frames=block)
        assert y.shape == x.shape
        hop = hop_for(WINDOW, overlap)
        edges = np.concatenate([np.arange(hop, len(x), hop), np.arange(WINDOW, len(x), hop)])
        near = np.unique(np.clip(edges[:, None] + np.arange(-3, 4), 0, len(x) - 1))
        assert np.max(np.abs(y[near] - x[near])) < 1e-5
        assert np.max(np.abs(y - x)) < 1e-5


def test_crossfade_sums_to_one_at_half_overlap():
    w = crossfade_weights(WINDOW)
    assert np.all(w > 0)
    np.testing.assert_allclose(w[:WINDOW // 2] + w[WINDOW // 2:], 1.0, atol=1e-12)


@pytest.mark.parametrize("length", [1, 100, WINDOW - 1, WINDOW, WINDOW + 1, 5 * WINDOW + 7])
def test_exact_length_any_size(length):
    x = np.random.default_rng(length).uniform(-0.5, 0.5, (length, 2)).astype(np.float32)
    y = enhance_signal(x, 16000, IdentityRunner(16000, WINDOW))
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-5)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_round_trip_with_identity(rate):
    x = tone(1.3, rate, channels=2)
    y = enhance_signal(x, rate, IdentityRunner(16000, WINDOW))
    assert y.shape == x.shape
    inner = slice(rate // 20, -rate // 20)  # soxr's filter edge effects at the very ends
    assert np.max(np.abs(y[inner] - x[inner])) < 2e-3


def test_model_output_reproducible_and_batch_independent(runner):
    x = tone(0.5, 16000) + 0.05 * np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    a = enhance_signal(x, 16000, runner, batch_size=1, seed=3)
    b = enhance_signal(x, 16000, runner, batch_size=5, seed=3, block_frames=1000)
    c = enhance_signal(x, 16000, runner, batch_size=5, seed=4)
    assert a.shape == x.shape and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.max(np.abs(a - c)) > 1e-6, "z must depend on the seed"
    assert np.max(np.abs(a - x)) > 1e-3, "a random generator is not the identity"


def test_bad_arguments():
    r = IdentityRunner(16000, WINDOW)
    with pytest.raises(ValueError, match="overlap"):
        enhance_signal(np.zeros(10, np.float32), 16000, r, overlap=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        enhance_signal(np.zeros(0, np.float32), 16000, r)
    with pytest.raises(ValueError, match="NaN"):
        enhance_signal(np.array([0.0, np.nan], np.float32), 16000, r)


# ----------------------------------------------------------------------------- files
def make_inputs(root: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (rate, channels, frames) for a mix of rates, channel counts, lengths, formats."""
    specs = {
        "r8k.wav": (8000, 1, 12000),
        "r16k_stereo.wav": (16000, 2, 5 * WINDOW + 100),       # several windows, stereo
        "r44k.flac": (44100, 1, 30000),
        "r48k_stereo.wav": (48000, 2, 40000),
        "short.wav": (16000, 1, 300),                          # shorter than one window
        "sub/silent.wav": (16000, 1, 4000),                    # silent, in a sub-folder
    }
    for name, (rate, ch, frames) in specs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.zeros((frames, ch), np.float32) if "silent" in name else tone(frames / rate, rate, ch)
        sf.write(path, data.reshape(frames, ch)[:frames], rate)
    return specs


def test_enhance_files_rates_channels_lengths(tmp_path, runner):
    src = tmp_path / "in"
    specs = make_inputs(src)
    hashes = {p: digest(p) for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    summary = enhance_files([src], out, runner, progress=False)
    assert summary.ok, summary.format()
    assert len(summary.written) == len(specs)
    assert summary.audio_seconds == pytest.approx(sum(f / r for r, _, f in specs.values()))
    for name, (rate, ch, frames) in specs.items():
        info_in, info_out = sf.info(str(src / name)), sf.info(str(out / name))
        assert (info_out.samplerate, info_out.channels, info_out.frames) == (rate, ch, frames), name
        assert (info_out.format, info_out.subtype) == (info_in.format, info_in.subtype), name
        data, _ = sf.read(str(out / name))
        assert np.all(np.isfinite(data)) and np.max(np.abs(data)) <= 1.0
    assert {p: digest(p) for p in hashes} == hashes, "inputs must never change"
    # same file + same seed -> same output bytes
    again = enhance_files([src / "r16k_stereo.wav"], tmp_path / "again", runner, progress=False)
    assert again.ok
    np.testing.assert_array_equal(sf.read(str(out / "r16k_stereo.wav"))[0],
                                  sf.read(str(tmp_path / "again" / "r16k_stereo.wav"))[0])


def test_identity_files_equal_input(tmp_path):
    src = tmp_path / "x.wav"
    x = np.random.default_rng(0).uniform(-0.8, 0.8, (3 * WINDOW + 5, 2)).astype(np.float32)
    sf.write(src, x, 16000, subtype="FLOAT")
    summary = enhance_files([src], tmp_path / "out", IdentityRunner(16000, WINDOW), overlap=0.25, progress=False)
    assert summary.ok
    y, rate = sf.read(str(tmp_path / "out" / "x.wav"), dtype="float32")
    assert rate == 16000 and sf.info(str(tmp_path / "out" / "x.wav")).subtype == "FLOAT"
    np.testing.assert_allclose(y, x, atol=1e-5)


def test_bad_files_reported_others_done_exit_nonzero(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "good.wav", tone(0.2, 16000), 16000)
    (src / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    (src / "empty.wav").write_bytes(b"")
    sf.write(src / "zero.wav", np.zeros((0, 1), np.float32), 16000)  # valid header, 0 samples
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio")
    out = tmp_path / "out"
    result = CliRunner().invoke(enhance_command, [str(src), str(notes), "-o", str(out), "--model",
                                                  str(checkpoint), "--device", "cpu", "-q"])
    assert result.exit_code == 1, result.output
    assert (out / "good.wav").is_file()
    for bad in ("corrupt.wav", "empty.wav", "zero.wav"):
        assert not (out / bad).exists()
        assert bad in result.output
    assert "notes.txt" in result.output
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no temp files left behind"


def test_existing_output_kept_unless_overwrite(tmp_path, checkpoint):
    src = tmp_path / "a.wav"
    sf.write(src, tone(0.2, 16000), 16000)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.wav").write_bytes(b"precious")
    args = [str(src), "-o", str(out), "--model", str(checkpoint), "--device", "cpu", "-q"]
    result = CliRunner().invoke(enhance_command, args)
    assert result.exit_code == 0, result.output
    assert (out / "a.wav").read_bytes() == b"precious"
    assert "--overwrite" in result.output
    result = CliRunner().invoke(enhance_command, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert sf.info(str(out / "a.wav")).frames == sf.info(str(src)).frames


def test_outdir_equal_to_input_folder_refused(tmp_path, checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "a.wav", tone(0.2, 16000), 16000)
    before = digest(src / "a.wav")
    result = CliRunner().invoke(enhance_command, [str(src / "a.wav"), "-o", str(src), "--model", str(checkpoint),
                                                  "--overwrite", "-q"])
    assert result.exit_code != 0
    assert "would overwrite input" in result.output
    assert digest(src / "a.wav") == before
    with pytest.raises(EnhanceError, match="would overwrite input"):
        plan_jobs([src], src)


def test_outdir_escape_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for bad in (Path("../evil.wav"), Path("a/../../evil.wav"), Path("/tmp/evil.wav")):
        with pytest.raises(EnhanceError, match="refused"):
            safe_output_path(out, bad)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, out / "link")
    with pytest.raises(EnhanceError, match="outside"):
        safe_output_path(out, Path("link/x.wav"))
    # a folder input whose sub-folder is a link out of OUTDIR: that file is refused, not written
    src = tmp_path / "in"
    (src / "link").mkdir(parents=True)
    sf.write(src / "link" / "x.wav", tone(0.1, 16000), 16000)
    summary = enhance_files([src], out, IdentityRunner(16000, WINDOW), progress=False)
    assert not summary.ok and "outside" in summary.failed[0][1]
    assert not list(outside.iterdir())


def test_outdir_inside_input_folder_skips_previous_outputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "a.wav", tone(0.1, 16000), 16000)
    out = src / "enhanced"
    r = IdentityRunner(16000, WINDOW)
    assert enhance_files([src], out, r, progress=False).ok
    jobs, problems = plan_jobs([src], out)
    assert [j.src.name for j in jobs] == ["a.wav"] and not problems


def test_load_enhancer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model"):
        load_enhancer(tmp_path / "missing.ts")
    bad = tmp_path / "model.xyz"
    bad.write_text("x")
    with pytest.raises(ModelLoadError, match="unknown model type"):
        load_enhancer(bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match="cannot load ONNX"):
        load_enhancer(junk)


def test_cli_help_and_missing_default_model(tmp_path, monkeypatch):
    result = CliRunner().invoke(enhance_command, ["--help"])
    assert result.exit_code == 0
    for word in ("OUTDIR", "--model", "--overlap", "--batch-size", "--seed", "--overwrite", "--device"):
        assert word in result.output
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # a project without an export
    sf.write(tmp_path / "a.wav", tone(0.1, 16000), 16000)
    result = CliRunner().invoke(enhance_command, [str(tmp_path / "a.wav"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "dvc repro export" in result.output
