"""The evaluate stage on a tiny prepared test set with a real (tiny, random) generator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import soundfile as sf
from scipy.io import wavfile
from speechlike import add_white_noise, speech_like

from segan import reports
from segan.config import ModelConfig, params_from_dict
from segan.data.prepare import FORMAT_VERSION
from segan.evaluate import METRICS, SYSTEMS, evaluate, example_indices, log_to_run, mean_ci95
from segan.model import Generator, save_generator

# one xdist worker runs the module, so the shared evaluation fixture is computed once
pytestmark = pytest.mark.xdist_group("evaluate")

RATE = 16000
WINDOW = 2048
CHANNELS = [4, 8, 8, 16]  # depth 4: windows must be multiples of 16

# utterance, noise, snr (None = unknown), how the pair is made
UTTERANCES = [
    ("u1", "white", 5.0, "white"),
    ("u2", "white", 10.0, "white"),
    ("u3", "hum", 5.0, "hum"),
    ("u4", "white", 5.0, "silent"),   # silent clean reference: PESQ undefined for every system
    ("u5", "unknown", None, "short"),  # 0.2 s: too short for PESQ
]


def _pair(kind: str, seed: int, snr: float | None) -> tuple[np.ndarray, np.ndarray]:
    if kind == "short":
        clean = speech_like(1.0, RATE, seed=seed)[int(0.35 * RATE):int(0.55 * RATE)]
        return clean, add_white_noise(clean, 10.0, seed=seed + 100)
    clean = speech_like(1.5, RATE, seed=seed)
    if kind == "silent":
        clean = np.zeros_like(clean)
        return clean, np.random.default_rng(seed).normal(0, 0.01, len(clean))
    if kind == "hum":
        t = np.arange(len(clean)) / RATE
        hum = sum(np.sin(2 * np.pi * 50 * k * t + k) / k for k in range(1, 6))
        gain = np.sqrt(np.mean(clean ** 2) / (np.mean(hum ** 2) * 10 ** (snr / 10)))
        return clean, clean + gain * hum
    return clean, add_white_noise(clean, snr, seed=seed + 100)


def make_prepared(root: Path) -> Path:
    """A prepared corpus folder holding only what evaluation reads (manifest + test split)."""
    rows = []
    for seed, (utt, noise, snr, kind) in enumerate(UTTERANCES, start=1):
        clean, noisy = _pair(kind, seed, snr)
        for side, x in (("clean", clean), ("noisy", noisy)):
            (root / "test" / side).mkdir(parents=True, exist_ok=True)
            wavfile.write(root / "test" / side / f"{utt}.wav", RATE, x.astype(np.float32))
        rows.append({"utterance": utt, "noise": noise, "snr": "" if snr is None else snr,
                     "seconds": len(clean) / RATE, "clean_path": f"test/clean/{utt}.wav",
                     "noisy_path": f"test/noisy/{utt}.wav"})
    pd.DataFrame(rows).to_csv(root / "test_manifest.csv", index=False)
    (root / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "sample_rate": RATE, "window": WINDOW, "hop": WINDOW // 2,
        "counts": {"test_utterances": len(rows)}, "hours": {"train": 0.0, "test": 0.0}, "skipped": []}))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny randomly initialised generator in the training checkpoint format."""
    torch.manual_seed(0)
    cfg = ModelConfig(g_channels=CHANNELS, d_channels=CHANNELS, kernel_size=15)
    path = tmp_path_factory.mktemp("model") / "generator.pt"
    save_generator(path, Generator(cfg), cfg, extra={"sample_rate": RATE, "window": WINDOW})
    return path


def make_params(**evaluate):
    return params_from_dict({
        "model": {"g_channels": CHANNELS, "d_channels": CHANNELS, "kernel_size": 15},
        "prepare": {"window": WINDOW, "hop": WINDOW // 2},
        "train": {"device": "cpu"},
        "enhance": {"batch_size": 4},
        "evaluate": {"workers": 1, "num_examples": 2, **evaluate},
    })


@pytest.fixture(scope="module")
def evaluated(prepared: Path, checkpoint: Path, tmp_path_factory) -> tuple[dict, Path]:
    torch.set_num_threads(1)
    reports_dir = tmp_path_factory.mktemp("reports")
    summary = evaluate(make_params(), prepared, str(checkpoint), reports_dir, run_file=None, progress=False)
    return summary, reports_dir


def test_metrics_json_structure(evaluated: tuple[dict, Path]) -> None:
    summary, reports_dir = evaluated
    on_disk = json.loads((reports_dir / "metrics.json").read_text())
    assert on_disk == summary
    for system in SYSTEMS:
        assert set(on_disk[system]) == set(METRICS)
        for metric in METRICS:
            record = on_disk[system][metric]
            assert set(record) == {"mean", "ci95", "n"}
            assert 0 < record["n"] <= len(UTTERANCES)
            assert math.isfinite(record["mean"]) and record["ci95"] >= 0
    assert on_disk["utterances"] == len(UTTERANCES)
    # noisy vs clean: plausible numbers
    noisy = on_disk["noisy"]
    assert 1.0 <= noisy["pesq"]["mean"] <= 4.6
    assert 0.0 < noisy["stoi"]["mean"] <= 1.0
    assert 1.0 <= noisy["csig"]["mean"] <= 5.0


def test_pesq_failures_counted_not_fatal(evaluated: tuple[dict, Path]) -> None:
    summary, reports_dir = evaluated
    missing = summary["pesq_missing"]
    # u4 (silent reference) fails for all four systems; u5 (0.2 s) too
    assert missing["total"] == 8
    assert missing["by_system"] == {s: 2 for s in SYSTEMS}
    assert sum(missing["reasons"].values()) == 8
    assert any("silent" in reason for reason in missing["reasons"])
    for system in SYSTEMS:
        assert summary[system]["pesq"]["n"] == len(UTTERANCES) - 2
        assert summary[system]["csig"]["n"] == len(UTTERANCES) - 2
        assert summary[system]["ssnr"]["n"] == len(UTTERANCES)
    per = pd.read_csv(reports_dir / "eval_per_utterance.csv")
    silent = per[per["utterance"] == "u4"]
    assert silent["pesq"].isna().all() and silent["pesq_error"].notna().all()
    assert per[per["utterance"] == "u1"]["pesq_error"].isna().all()


def test_per_utterance_csv_and_wiener_sanity(evaluated: tuple[dict, Path]) -> None:
    _, reports_dir = evaluated
    per = pd.read_csv(reports_dir / "eval_per_utterance.csv")
    assert list(per.columns) == ["utterance", "system", "noise", "snr", "seconds", *METRICS, "pesq_error"]
    assert len(per) == len(UTTERANCES) * len(SYSTEMS)
    # deterministic order: utterance-major, systems in SYSTEMS order
    assert list(per["utterance"]) == [u[0] for u in UTTERANCES for _ in SYSTEMS]
    assert list(per["system"][:4]) == list(SYSTEMS)
    assert per.loc[per["utterance"] == "u5", "snr"].isna().all()
    # the Wiener filter must raise segmental SNR on white noise
    white = per[per["utterance"].isin(["u1", "u2"])].set_index(["utterance", "system"])["ssnr"]
    for utt in ("u1", "u2"):
        assert white[(utt, "wiener")] > white[(utt, "noisy")] + 1.0, white
    # noisy at 10 dB beats noisy at 5 dB
    assert white[("u2", "noisy")] > white[("u1", "noisy")]


def test_breakdowns_charts_and_table(evaluated: tuple[dict, Path]) -> None:
    summary, reports_dir = evaluated
    # wide tables for dvc plots: PESQ under the bare system names, the rest as <metric>_<system>
    by_snr = pd.read_csv(reports_dir / "eval_by_snr.csv")
    assert list(by_snr.columns[:6]) == ["snr", "n", *SYSTEMS]
    assert {"stoi_segan", "csig_wiener", "ssnr_noisy", "covl_spectral_gating"} <= set(by_snr.columns)
    assert by_snr["snr"].iloc[:2].tolist() == [5.0, 10.0] and math.isnan(by_snr["snr"].iloc[2])
    assert by_snr["n"].tolist() == [3, 1, 1]
    per = pd.read_csv(reports_dir / "eval_per_utterance.csv")
    five = per[(per["snr"] == 5.0) & (per["system"] == "wiener")]
    assert by_snr["wiener"].iloc[0] == pytest.approx(five["pesq"].mean(), abs=1e-4)
    assert by_snr["ssnr_wiener"].iloc[0] == pytest.approx(five["ssnr"].mean(), abs=1e-4)
    by_noise = pd.read_csv(reports_dir / "eval_by_noise.csv")
    assert by_noise["noise"].tolist() == ["hum", "white", "unknown"]  # unknown sorts last
    assert by_noise["n"].tolist() == [1, 3, 1]
    for name in ("eval_by_snr.png", "eval_by_noise.png"):
        data = (reports_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (reports_dir / "results.md").read_text()
    assert "| system | PESQ | STOI |" in md
    for system in SYSTEMS:
        assert f"| {system} |" in md
    assert f"{summary['segan']['pesq']['mean']:.2f} ± {summary['segan']['pesq']['ci95']:.2f}" in md
    assert "PESQ undefined for 8" in md
    assert not list(reports_dir.rglob("*.tmp")) and not list(reports_dir.glob(".*"))


def test_examples(evaluated: tuple[dict, Path], prepared: Path) -> None:
    _, reports_dir = evaluated
    files = sorted(p.name for p in (reports_dir / "examples").iterdir())
    # 2 examples spread over the set: the first and the last utterance
    assert files == sorted(f"{u}_{k}" for u in ("u1", "u5")
                           for k in ("noisy.wav", "enhanced.wav", "clean.wav", "spectrogram.png"))
    noisy, rate = sf.read(reports_dir / "examples" / "u1_noisy.wav", dtype="float32")
    original, _ = sf.read(prepared / "test" / "noisy" / "u1.wav", dtype="float32")
    assert rate == RATE and np.array_equal(noisy, original)
    enhanced, _ = sf.read(reports_dir / "examples" / "u1_enhanced.wav", dtype="float32")
    assert enhanced.shape == noisy.shape and not np.allclose(enhanced, noisy)


@pytest.mark.slow
def test_max_utterances_and_workers_give_same_numbers(prepared: Path, checkpoint: Path, tmp_path: Path,
                                                      evaluated: tuple[dict, Path]) -> None:
    """A 2-process pool scores the first 3 utterances exactly as the in-process run did."""
    torch.set_num_threads(1)
    summary = evaluate(make_params(workers=2, max_utterances=3, num_examples=0), prepared, str(checkpoint),
                       tmp_path, run_file=None, progress=False)
    assert summary["utterances"] == 3
    assert not any((tmp_path / "examples").iterdir())
    first = pd.read_csv(evaluated[1] / "eval_per_utterance.csv").head(3 * len(SYSTEMS))
    again = pd.read_csv(tmp_path / "eval_per_utterance.csv")
    pd.testing.assert_frame_equal(first, again, check_dtype=False)


@pytest.mark.slow
def test_logs_into_training_run(prepared: Path, checkpoint: Path, tmp_path: Path, caplog) -> None:
    """Means land in the run recorded in mlflow_run.json; a missing run file only warns."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from segan.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.start("train")
    assert run_id, "could not create an MLflow run in a temp SQLite store"
    tracker.end()
    run_file = tmp_path / "mlflow_run.json"
    tracker.write_run_file(run_file)

    params = make_params(max_utterances=1, num_examples=1)
    evaluate(params, prepared, str(checkpoint), tmp_path / "reports", run_file=run_file, progress=False)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["eval/noisy/pesq"] > 1.0
    assert {"eval/segan/stoi", "eval/wiener/ssnr", "eval/spectral_gating/covl"} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "evaluation")}
    assert "evaluation/metrics.json" in artifacts and "evaluation/examples" in artifacts

    log_to_run(tmp_path / "nope.json", {}, [])
    assert "nope.json" in caplog.text


def test_mean_ci95() -> None:
    rec = mean_ci95([1.0, 2.0, 3.0, float("nan")])
    assert rec["n"] == 3 and rec["mean"] == 2.0
    assert rec["ci95"] == pytest.approx(4.302653 / math.sqrt(3), abs=1e-4)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_ci95([5.0]) == {"mean": 5.0, "ci95": None, "n": 1}
    assert mean_ci95([float("nan")]) == {"mean": None, "ci95": None, "n": 0}


def test_example_indices() -> None:
    assert example_indices(4, 40) == [0, 13, 26, 39]
    assert example_indices(10, 3) == [0, 1, 2]
    assert example_indices(0, 10) == [] and example_indices(3, 0) == []


def test_breakdown_order_and_unknown_group() -> None:
    per = pd.DataFrame({
        "utterance": ["a", "a", "b", "b", "c", "c"], "system": ["noisy", "segan"] * 3,
        "noise": ["x", "x", "y", "y", "x", "x"], "snr": [17.5, 17.5, 2.5, 2.5, float("nan"), float("nan")],
        **{m: [1.0, 2.0, 3.0, 4.0, float("nan"), 6.0] for m in reports.CHART_METRICS}})
    table = reports.breakdown(per, "snr", ["segan", "noisy"])
    assert list(table["snr"]) == ["2.5", "2.5", "17.5", "17.5", "unknown", "unknown"]
    assert list(table["system"][:2]) == ["segan", "noisy"]
    unknown = table[table["snr"] == "unknown"].set_index("system")
    assert math.isnan(unknown.loc["noisy", "pesq"]) and unknown.loc["segan", "pesq"] == 6.0
    assert list(reports.breakdown(per, "noise", ["noisy", "segan"])["noise"]) == ["x", "x", "y", "y"]
    wide = reports.wide_table(table, "snr", ["segan", "noisy"])
    assert list(wide.columns[:4]) == ["snr", "n", "segan", "noisy"]
    assert wide["snr"].tolist()[:2] == [2.5, 17.5] and math.isnan(wide["snr"].iloc[2])
    assert wide["segan"].tolist()[:2] == [4.0, 2.0] and wide["stoi_noisy"].iloc[1] == 1.0
