"""End to end: the real DVC pipeline on the embedded synthetic corpus with CI-size params,
then the metrics gate, experiments linked to MLflow, offline plots and the MLflow UI in a
real browser. All tests share one pipeline run (xdist group "pipeline")."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]

SYSTEMS = {"noisy", "segan", "wiener", "spectral_gating"}
METRICS = {"pesq", "stoi", "csig", "cbak", "covl", "ssnr"}
CI_BASELINE = REPO / "tests" / "data" / "ci_baseline_metrics.json"


def test_repro_produces_every_artifact(pipeline_repo: Path):
    root = pipeline_repo
    for rel in ("data/raw/manifest.json", "data/prepared/manifest.json", "data/models/generator.pt",
                "data/models/exported/generator.ts", "data/models/exported/generator.onnx",
                "data/models/exported/model_card.json", "reports/train_losses.csv",
                "reports/eval_per_utterance.csv", "reports/eval_by_snr.png", "reports/eval_by_noise.png"):
        assert (root / rel).is_file(), rel
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert SYSTEMS <= set(metrics)
    for system in SYSTEMS:
        assert METRICS <= set(metrics[system]), system
    card = json.loads((root / "reports/model_card.json").read_text())
    assert card["metrics"]["segan"]["pesq"] == metrics["segan"]["pesq"]["mean"]


def test_second_repro_does_nothing(pipeline_repo: Path):
    out = run(["dvc", "repro"], pipeline_repo)
    text = out.stdout + out.stderr
    assert "Running stage" not in text, text
    status = run(["dvc", "status"], pipeline_repo).stdout
    assert "up to date" in status.lower(), status


def test_metrics_gate_passes_then_catches_a_regression(pipeline_repo: Path, tmp_path: Path):
    root = pipeline_repo
    ok = run(["segan", "check-metrics", "--baseline", str(CI_BASELINE)], root, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doctored = json.loads((root / "reports/metrics.json").read_text())
    doctored["segan"]["pesq"]["mean"] -= 0.5
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps(doctored))
    fail = run(["segan", "check-metrics", "--metrics", str(bad), "--baseline", str(CI_BASELINE)], root,
               check=False)
    assert fail.returncode == 1, fail.stdout + fail.stderr
    assert "pesq" in fail.stdout


def test_mlflow_run_has_params_metrics_and_model(pipeline_repo: Path):
    db = pipeline_repo / "mlflow.db"
    assert db.is_file()
    con = sqlite3.connect(db)
    runs = con.execute("select run_uuid, name, status from runs").fetchall()
    assert runs, "no MLflow run recorded"
    run_id = json.loads((pipeline_repo / "data/models/mlflow_run.json").read_text())["run_id"]
    keys = {k for (k,) in con.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
    assert {"g_l1", "d_loss", "g_adv"} <= keys, keys
    assert any(k.startswith("eval/") for k in keys), keys
    params = {k for (k,) in con.execute("select key from params where run_uuid=?", (run_id,))}
    assert "train.g_lambda" in params
    versions = con.execute("select name, version from model_versions").fetchall()
    assert versions, "no registered model version"


def test_plots_render_offline(pipeline_repo: Path):
    out = run(["dvc", "plots", "show", "--json"], pipeline_repo)
    assert out.returncode == 0
    html_run = run(["dvc", "plots", "show", "-o", "plots_html"], pipeline_repo)
    assert html_run.returncode == 0
    page = (pipeline_repo / "plots_html" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page
