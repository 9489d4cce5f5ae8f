"""Shared fixtures: a throw-away copy of this repository in which the real DVC pipeline
runs with CI-size params (tests/ci_params.yaml).

The copy is a fresh git repo with one commit (dvc exp run needs a commit) and its own
SQLite MLflow store, so tests never touch the developer's data/, reports/ or mlflow.db.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def pipeline_env(root: Path) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="segan-tests", GIT_AUTHOR_EMAIL="tests@segan.invalid",
        GIT_COMMITTER_NAME="segan-tests", GIT_COMMITTER_EMAIL="tests@segan.invalid",
        TQDM_DISABLE="1",
    )
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=pipeline_env(cwd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def apply_overrides(params_file: Path, overrides: dict) -> None:
    raw = yaml.safe_load(params_file.read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def make_repo_copy(dest: Path) -> Path:
    """Copy tracked and untracked-not-ignored files (what a commit of the working tree holds)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        # Pipeline outputs of the developer's own runs are not part of a fresh clone's state.
        if rel == "dvc.lock" or (rel.startswith("reports/") and rel != "reports/.gitkeep"):
            continue
        if not src.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    apply_overrides(dest / "params.yaml", yaml.safe_load((REPO / "tests" / "ci_params.yaml").read_text()))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "pipeline test copy"], dest)
    return dest


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    """A repo copy on which `dvc repro` has run once with CI-size params."""
    root = make_repo_copy(tmp_path_factory.mktemp("pipeline") / "repo")
    run(["dvc", "repro"], root, timeout=1500)
    return root
