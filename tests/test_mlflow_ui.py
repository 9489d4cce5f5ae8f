"""The MLflow UI, driven in a real headless Chromium: after the CI pipeline run the run's
page shows its name and metrics. A screenshot lands in reports/ of the pipeline copy and
is copied to reports/ui/ here (git-ignored) for a person to look at."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium missing and cannot be installed (needs root and apt-get)")
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True,
                   timeout=900, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("chromium")


def browse(url: str, screenshot: Path | None = None) -> str:
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
        dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        if screenshot:
            subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return dom


def test_run_page_shows_name_and_metrics(pipeline_repo: Path):
    from segan.ui import start_ui

    info = json.loads((pipeline_repo / "data/models/mlflow_run.json").read_text())
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    proc, url = start_ui(root=pipeline_repo)
    try:
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{pipeline_repo / 'mlflow.db'}")
        tracked = client.get_run(info["run_id"])
        page = f"{url}/#/experiments/{tracked.info.experiment_id}/runs/{tracked.info.run_id}"
        shot = pipeline_repo / "reports" / "mlflow_ui.png"
        dom = browse(page, screenshot=shot)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert tracked.info.run_name in dom, dom[-2000:]
    for metric in ("g_l1", "d_loss"):
        assert metric in dom, f"{metric} not rendered on the run page"
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = REPO / "reports" / "ui"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "mlflow_run_page.png")
