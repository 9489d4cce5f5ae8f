"""MLflow tracking against a real sqlite store: what a training run records, later stages
logging into the same run, and a broken store never stopping training."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from segan.config import flatten, to_dict
from segan.fsutil import repo_root
from segan.tracking import (
    MAX_CONSECUTIVE_FAILURES,
    RUN_FILE,
    SampleItem,
    Tracker,
    flat_params,
    git_revision,
    log_validation_samples,
    open_run_from_file,
    tracking_uri,
)
from segan.train import load_checkpoint, train
from speechlike import add_white_noise, speech_like
from test_train import make_prepared, tiny_params



def broken_store(tmp_path: Path, kind: str = "under-a-file") -> str:
    """A sqlite URI MLflow cannot open even as root: its folder is a regular file, or the
    "database" is a folder. (A merely missing folder would be created by MLflow.)"""
    if kind == "under-a-file":
        (tmp_path / "not-a-folder").write_text("")
        return f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    return f"sqlite:///{tmp_path / 'db'}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "RANK", "WORLD_SIZE",
                "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return out


# ----------------------------------------------------------------------------- store location
def test_tracking_uri_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri() == f"sqlite:///{repo_root()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # dvc exp run --temp: the parent repo's store
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_flat_params_cover_everything_and_truncate() -> None:
    params = tiny_params()
    params.data.folder.clean_dir = "x" * 7000
    flat = flat_params(params)
    assert set(flat) == set(flatten(to_dict(params)))
    assert flat["model.g_channels"] == "[4, 8, 8, 16]" and flat["train.g_lambda"] == "100.0"
    assert len(flat["data.folder.clean_dir"]) == 6000 and flat["data.folder.clean_dir"].endswith("...")


# ----------------------------------------------------------------------------- the Tracker
def test_tracker_records_a_run(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store)
    run_id = tracker.start("unit", tags={"purpose": "test"}, params={"a.b": 1, "long": "y" * 7000})
    assert run_id and tracker.active
    tracker.log_metrics({"d_loss": 0.5, "g_l1": 0.1}, step=1)
    tracker.log_metrics({"d_loss": 0.25}, step=2)
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt", "misc")
    tracker.log_audio(np.zeros(1600, dtype=np.float32), 16000, "silence.wav", "audio")
    tracker.log_dict({"x": 1}, "d.json")
    tracker.write_run_file(tmp_path / RUN_FILE)
    tracker.end("FINISHED")
    assert tracker.failures == 0

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.params["a.b"] == "1" and len(run.data.params["long"]) == 6000
    assert run.data.tags["purpose"] == "test"
    history = client.get_metric_history(run_id, "d_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert sorted(_artifacts(client, run_id)) == ["audio/silence.wav", "d.json", "misc/note.txt"]
    # artifacts live beside the sqlite store, never in the current directory
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "segan" and exp.artifact_location.startswith(Path(store[10:]).parent.as_uri())

    later = open_run_from_file(tmp_path / RUN_FILE)  # what export/evaluate do
    assert later.run_id == run_id
    later.log_metrics({"pesq": 2.5}, step=0)
    assert client.get_run(run_id).data.metrics["pesq"] == 2.5
    assert client.get_run(run_id).info.status == "FINISHED"  # binding does not reopen the run


def test_validation_samples_identity_enhancer(store: str) -> None:
    clean = speech_like(2.0, 16000, seed=5).astype(np.float32)
    noisy = add_white_noise(clean, 10.0, seed=2).astype(np.float32)
    tracker = Tracker(store)
    run_id = tracker.start("samples")
    items = [SampleItem("utt", clean, noisy)]
    score = log_validation_samples(tracker, items, lambda x: x, 16000, step=3, log_inputs=True)
    metrics = MlflowClient(store).get_run(run_id).data.metrics
    assert score == pytest.approx(metrics["val_pesq"]) and metrics["val_pesq"] == metrics["val_pesq_noisy"]
    files = _artifacts(MlflowClient(store), run_id)
    tag = f"_pesq{score:.2f}"
    assert f"samples/step_0000003/utt_enhanced{tag}.wav" in files
    assert f"samples/step_0000003/utt_spectrogram{tag}.png" in files
    assert f"samples/inputs/utt_noisy{tag}.wav" in files and "samples/inputs/utt_clean.wav" in files


@pytest.mark.parametrize("kind", ["under-a-file", "folder-as-db"])
def test_broken_store_only_warns(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker(broken_store(tmp_path, kind))
    with caplog.at_level(logging.WARNING, logger="segan.tracking"):
        assert tracker.start("x", params={"a": 1}) is None
        tracker.log_metrics({"a": 1.0}, 1)  # no run: nothing attempted
        tracker.bind("0" * 32)
        for step in range(MAX_CONSECUTIVE_FAILURES + 2):
            tracker.log_metrics({"a": 1.0}, step)
        tracker.end("FINISHED")
    assert tracker.failures == MAX_CONSECUTIVE_FAILURES  # then it gave up
    assert not tracker.active
    failed = [r for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    assert len(failed) == 1  # warned once


def test_open_run_from_missing_file_is_disabled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="segan.tracking"):
        tracker = open_run_from_file(tmp_path / "nope.json")
    assert not tracker.active and "cannot read" in caplog.text
    tracker.log_metrics({"x": 1.0}, 0)  # harmless


# ----------------------------------------------------------------------------- through train()
def test_training_run_is_tracked(prepared: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    params = tiny_params(max_steps=4, log_every=2, num_samples=1, sample_every=2)
    summary = train(params, prepared, tmp_path / "models", tmp_path / "reports", progress=False)

    run_file = json.loads((tmp_path / "models" / RUN_FILE).read_text())
    assert run_file["run_id"] == summary["mlflow_run_id"] and run_file["tracking_uri"] == store
    client = MlflowClient(store)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "brisk-lamb" and run.info.status == "FINISHED"
    assert run.data.tags["dvc_exp_name"] == "brisk-lamb" and run.data.tags["dvc_baseline_rev"] == "abc123"
    assert run.data.tags["params_hash"] == summary["params_hash"]
    if git_revision():
        assert run.data.tags["git_revision"] == git_revision()
    assert run.data.params == flat_params(params)
    for key in ("d_real", "d_fake", "d_loss", "g_adv", "g_l1", "g_loss", "lr_g", "lr_d", "g_grad_norm",
                "d_grad_norm", "windows_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_pesq")] == [2, 4]
    files = _artifacts(client, run.info.run_id)
    assert {"reports/train_losses.csv", "reports/train_losses.png"} <= set(files)
    assert any(f.startswith("samples/step_0000002/test_000_enhanced_pesq") for f in files)
    assert any(f.startswith("samples/step_0000004/test_000_spectrogram") for f in files)
    assert any(f.startswith("samples/inputs/test_000_noisy") for f in files)


def test_training_survives_a_broken_store(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", broken_store(tmp_path))
    out = tmp_path / "models"
    with caplog.at_level(logging.WARNING):
        summary = train(tiny_params(max_steps=3, checkpoint_every=2, num_samples=1), prepared, out,
                        tmp_path / "reports", progress=False)
    assert summary["steps"] == 3 and summary["tracking_failures"] >= 1 and summary["mlflow_run_id"] is None
    assert "MLflow tracking failed" in caplog.text
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
    assert (out / "generator.pt").is_file() and (tmp_path / "reports" / "train_losses.png").is_file()
    assert json.loads((out / RUN_FILE).read_text())["run_id"] is None
