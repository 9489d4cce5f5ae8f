"""`dvc exp run` and a queued sweep on a copy of the CI pipeline repo: each experiment
trains, exports and evaluates, and its MLflow run carries the DVC experiment name,
the baseline revision, its params and final metrics."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]


@pytest.fixture(scope="module")
def exp_repo(pipeline_repo: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experiments") / "repo"
    shutil.copytree(pipeline_repo, root, symlinks=True)
    return root


def mlflow_runs(root: Path) -> dict[str, dict]:
    con = sqlite3.connect(root / "mlflow.db")
    out = {}
    for run_id, name in con.execute("select run_uuid, name from runs"):
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
        metrics = {k for (k,) in con.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
        out[run_id] = {"name": name, "tags": tags, "params": params, "metrics": metrics}
    return out


def test_exp_run_is_tracked_in_mlflow(exp_repo: Path):
    run(["dvc", "exp", "run", "-n", "lambda50", "-S", "train.g_lambda=50"], exp_repo, timeout=1200)
    runs = [r for r in mlflow_runs(exp_repo).values() if r["tags"].get("dvc_exp_name") == "lambda50"]
    assert runs, "no MLflow run tagged with the DVC experiment name"
    tracked = runs[0]
    assert tracked["name"] == "lambda50"
    assert tracked["params"]["train.g_lambda"] in ("50", "50.0")
    assert tracked["tags"].get("dvc_baseline_rev")
    assert any(m.startswith("eval/") for m in tracked["metrics"])

    show = json.loads(run(["dvc", "exp", "show", "--json"], exp_repo).stdout)
    assert "lambda50" in json.dumps(show)
    diff = run(["dvc", "metrics", "diff", "HEAD", "--json"], exp_repo)
    assert diff.returncode == 0
    plots = run(["dvc", "plots", "diff", "HEAD", "-o", "plots_diff"], exp_repo)
    assert (exp_repo / "plots_diff" / "index.html").is_file(), plots.stdout


def test_queued_sweep_runs_every_value(exp_repo: Path):
    run(["dvc", "exp", "run", "--queue", "-S", "train.g_lambda=10,100"], exp_repo)
    run(["dvc", "queue", "start", "-j", "1"], exp_repo)
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], exp_repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status + run(["dvc", "queue", "logs", "--help"], exp_repo).stdout
    lambdas = {r["params"].get("train.g_lambda") for r in mlflow_runs(exp_repo).values()
               if r["tags"].get("dvc_exp_name")}
    assert {"10", "100"} <= {v.split(".")[0] for v in lambdas if v}, lambdas
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], exp_repo).stdout
    assert show.count("\n") >= 3, show
