"""MLflow experiment tracking that can never stop a training run.

:class:`Tracker` wraps one MLflow run through :class:`mlflow.tracking.MlflowClient` (no
global "active run" state, so several trackers can coexist). Every call is guarded: a
store that is down, locked or misconfigured logs ONE warning, later failures are only
counted (:attr:`Tracker.failures`), and training goes on.

The store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<project>/mlflow.db`` with artifacts in
``<project>/mlartifacts`` (the same place ``make ui`` serves). The run id is written to
``<out_dir>/mlflow_run.json`` so later stages (export, evaluate) log into the same run via
:func:`open_run_from_file`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .config import Params, flatten, to_dict
from .fsutil import repo_root, write_json

# must be set before mlflow is imported anywhere in the process
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

EXPERIMENT = "segan"
RUN_FILE = "mlflow_run.json"
_PARAM_LIMIT_FALLBACK = 6000
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_METRICS_PER_BATCH = 1000
# a store that keeps failing (e.g. an HTTP server that is down: each call retries for a
# while) is abandoned after this many failures in a row, so it cannot slow training down
MAX_CONSECUTIVE_FAILURES = 5
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow.db``.

    ``root`` defaults to ``$DVC_ROOT`` (set by ``dvc exp run``, also for ``--temp``/``--queue``
    runs executing in a temporary copy, so every experiment lands in the one project store),
    else the project root found from the current directory.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if root is None:
        root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else repo_root()
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: ``mlartifacts/`` beside a sqlite store (so a test
    store in a tmp dir keeps its artifacts there too, never in the current directory);
    ``None`` (the server's default) for other stores."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    return (Path(db).parent / "mlartifacts").resolve().as_uri()


def _check_sqlite(uri: str) -> None:
    """Fail fast on a sqlite store that cannot be opened: MLflow itself retries opening it
    with exponential back-off for ~100 s per call, which would stall training."""
    if urlparse(uri).scheme != "sqlite":
        return
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return
    path = Path(db)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
    except (OSError, sqlite3.Error) as exc:
        raise RuntimeError(f"cannot open the sqlite store {path}: {exc}") from None


def _param_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except Exception:  # pragma: no cover - moved in some MLflow version
        return _PARAM_LIMIT_FALLBACK


def flat_params(params: Params | Mapping[str, Any]) -> dict[str, str]:
    """All of ``params.yaml`` as ``{"train.g_lr": "0.0001", ...}``, values cut to MLflow's limit."""
    raw = to_dict(params) if isinstance(params, Params) else dict(params)
    limit = _param_limit()
    out = {}
    for key, value in flatten(raw).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > limit:
            text = text[:limit - 3] + "..."
        out[key] = text
    return out


def default_run_name(params: Params) -> str:
    """``$DVC_EXP_NAME`` under ``dvc exp run``, else a name built from the key training params."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return exp
    t = params.train
    return (f"{t.optimizer}-glr{t.g_lr:g}-dlr{t.d_lr:g}-lambda{t.g_lambda:g}-bs{t.batch_size}"
            f"-ep{t.epochs}-seed{t.seed}")


def git_revision(cwd: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the project, or ``None`` outside git / without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or repo_root(), capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev or None


def run_tags() -> dict[str, str]:
    """Provenance tags: git revision and the DVC experiment name / baseline revision."""
    tags: dict[str, str] = {}
    rev = git_revision()
    if rev:
        tags["git_revision"] = rev
        tags["mlflow.source.git.commit"] = rev
    for tag, env in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_baseline_rev", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class Tracker:
    """One MLflow run; every method is a no-op once tracking is unavailable.

    ``Tracker(enabled=False)`` never touches MLflow (e.g. on DDP ranks other than 0).
    """

    def __init__(self, uri: str | None = None, *, experiment: str = EXPERIMENT, enabled: bool = True) -> None:
        self.uri = uri or tracking_uri()
        self.experiment_name = experiment
        self.enabled = enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failures = 0
        self._consecutive = 0
        self._client: Any = None

    # ------------------------------------------------------------------ plumbing
    @property
    def active(self) -> bool:
        """True while bound to a run (calls will try to log)."""
        return self.enabled and self.run_id is not None

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self.failures += 1
            self._consecutive += 1
            if self.failures == 1:
                log.warning("MLflow tracking failed (%s -> %s: %s: %s); training continues, further "
                            "tracking errors are only counted", what, self.uri, type(exc).__name__, exc)
            else:
                log.debug("MLflow %s failed again (%d failures): %s", what, self.failures, exc)
            if self._consecutive >= MAX_CONSECUTIVE_FAILURES and self.enabled:
                self.enabled = False
                log.warning("MLflow: %d failures in a row; no more tracking for this run", self._consecutive)
            return None
        self._consecutive = 0
        return result

    def client(self) -> Any:
        if self._client is None:
            _check_sqlite(self.uri)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment_name, artifact_location=artifact_root(self.uri))
        except Exception:
            # another process (a queued experiment) created it in between
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    # ------------------------------------------------------------------ run lifecycle
    def start(self, run_name: str, tags: Mapping[str, str] | None = None,
              params: Mapping[str, Any] | None = None) -> str | None:
        """Create a new run; returns its id (``None`` when tracking is unavailable)."""
        if not self.enabled:
            return None

        def go() -> str:
            self.experiment_id = self._experiment_id()
            run = self.client().create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
            return run.info.run_id

        self.run_id = self._guard("start run", go)
        if self.run_id and params:
            self.log_params(params)
        if self.run_id:
            log.info("MLflow run %s (%s) in %s", run_name, self.run_id, self.uri)
        return self.run_id

    def resume(self, run_id: str) -> str | None:
        """Re-open an existing run (status back to RUNNING), e.g. after a resumed checkpoint."""
        if not self.enabled:
            return None

        def go() -> str:
            run = self.client().get_run(run_id)
            self.experiment_id = run.info.experiment_id
            self.client().update_run(run_id, status="RUNNING")
            return run_id

        self.run_id = self._guard("resume run", go)
        if self.run_id:
            log.info("MLflow: resumed run %s in %s", run_id, self.uri)
        return self.run_id

    def bind(self, run_id: str, experiment_id: str | None = None) -> None:
        """Attach to a run without changing its status (to add results from a later stage)."""
        self.run_id, self.experiment_id = run_id, experiment_id

    def end(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
        if not self.active:
            return
        self._guard("end run", lambda: self.client().set_terminated(self.run_id, status=status))
        if self.failures:
            log.warning("MLflow: %d tracking call(s) failed during this run (store %s)", self.failures, self.uri)

    def write_run_file(self, path: Path) -> None:
        """Record the run for later stages: ``{"run_id", "tracking_uri", "experiment_id"}``.
        Written even when tracking failed (run_id ``null``), so the file is always current."""
        write_json(path, {"run_id": self.run_id, "tracking_uri": self.uri, "experiment_id": self.experiment_id})

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        limit = _param_limit()
        items = [Param(str(k), str(v)[:limit]) for k, v in params.items()]

        def go() -> None:
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self.client().log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

        self._guard("log params", go)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self._guard("set tags", lambda: self.client().log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]

        def go() -> None:
            for i in range(0, len(items), _METRICS_PER_BATCH):
                self.client().log_batch(self.run_id, metrics=items[i:i + _METRICS_PER_BATCH])

        self._guard("log metrics", go)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self._guard(f"log artifact {path}",
                    lambda: self.client().log_artifact(self.run_id, str(path), artifact_path))

    def log_audio(self, data: np.ndarray, rate: int, name: str, artifact_path: str | None = None) -> None:
        """Log ``data`` (float, [-1, 1]) as ``<artifact_path>/<name>`` (a 16-bit wav)."""
        if not self.active:
            return
        from .audio import write_audio

        self._log_file(name, artifact_path, f"log audio {name}",
                       lambda path: write_audio(path, np.clip(np.asarray(data, dtype=np.float32), -1.0, 1.0), rate))

    def log_figure(self, fig: Any, name: str, artifact_path: str | None = None) -> None:
        """Log a matplotlib figure as ``<artifact_path>/<name>`` (PNG)."""
        if not self.active:
            return
        self._log_file(name, artifact_path, f"log figure {name}", lambda path: fig.savefig(path, dpi=100))

    def log_dict(self, obj: Any, name: str, artifact_path: str | None = None) -> None:
        """Log a JSON-serialisable object as ``<artifact_path>/<name>``."""
        if not self.active:
            return
        self._log_file(name, artifact_path, f"log {name}",
                       lambda path: path.write_text(json.dumps(obj, indent=2, default=str) + "\n"))

    def _log_file(self, name: str, artifact_path: str | None, what: str, write: Callable[[Path], Any]) -> None:
        """Write ``name`` into a temp folder with ``write(path)`` and log it as an artifact (guarded)."""

        def go() -> None:
            with tempfile.TemporaryDirectory(prefix="segan-artifact-") as tmp:
                path = Path(tmp) / name
                write(path)
                self.client().log_artifact(self.run_id, str(path), artifact_path)

        self._guard(what, go)


def open_run_from_file(path: Path) -> Tracker:
    """A :class:`Tracker` bound to the run recorded in ``mlflow_run.json`` (by training).

    A missing/unreadable file or a ``null`` run id gives a disabled tracker and a warning:
    results from later stages are then simply not tracked.
    """
    path = Path(path)
    try:
        info = json.loads(path.read_text())
        run_id, uri = info.get("run_id"), info.get("tracking_uri")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("MLflow: cannot read %s (%s); results will not be tracked", path, exc)
        return Tracker(enabled=False)
    if not run_id:
        log.warning("MLflow: %s has no run id (tracking failed during training); results will not be "
                    "tracked", path)
        return Tracker(uri or None, enabled=False)
    tracker = Tracker(uri or None)
    tracker.bind(str(run_id), info.get("experiment_id"))
    return tracker


# ---------------------------------------------------------------------------- validation samples
@dataclass
class SampleItem:
    """One validation utterance, cropped: name, clean and noisy audio at ``rate``."""

    name: str
    clean: np.ndarray
    noisy: np.ndarray


def load_sample_items(prepared_dir: Path, count: int, rate: int, max_seconds: float = 4.0) -> list[SampleItem]:
    """The first ``count`` test utterances of a prepared corpus, cropped to ``max_seconds``."""
    if count <= 0:
        return []
    from .audio import load_mono
    from .data.dataset import load_test_manifest

    df = load_test_manifest(prepared_dir).head(count)
    limit = int(max_seconds * rate)
    items = []
    for row in df.itertuples(index=False):
        clean = load_mono(Path(prepared_dir) / row.clean_path, rate)[:limit]
        noisy = load_mono(Path(prepared_dir) / row.noisy_path, rate)[:limit]
        n = min(len(clean), len(noisy))
        items.append(SampleItem(str(row.utterance), clean[:n], noisy[:n]))
    return items


def spectrogram_figure(panels: Iterable[tuple[str, np.ndarray]], rate: int, title: str) -> Any:
    """Stacked log-magnitude spectrograms (matplotlib Agg figure; caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (label, audio) in zip(axes[:, 0], panels):
        ax.specgram(np.asarray(audio, dtype=np.float64) + 1e-9, NFFT=512, Fs=rate, noverlap=384,
                    cmap="magma", scale="dB", vmin=-120)
        ax.set_ylabel("Hz")
        ax.set_title(label, fontsize=9)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def log_validation_samples(tracker: Tracker, items: list[SampleItem], enhance: Callable[[np.ndarray], np.ndarray],
                           rate: int, step: int, *, log_inputs: bool = False) -> float | None:
    """Enhance each item, log the wav + a noisy/enhanced/clean spectrogram PNG under
    ``samples/step_<step>/`` (PESQ in the file names) and the mean as metric ``val_pesq``.

    ``log_inputs`` also logs the noisy/clean wavs (once per run is enough) and ``val_pesq_noisy``.
    Returns the mean PESQ, or ``None`` when none could be computed. Never raises.
    """
    if not tracker.active or not items:
        return None
    import matplotlib.pyplot as plt

    from .metrics import pesq_wb

    folder = f"samples/step_{step:07d}"
    scores, noisy_scores = [], []
    for item in items:
        try:
            enhanced = np.asarray(enhance(item.noisy), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - a sample must not stop training
            log.warning("validation sample %s: enhancement failed (%s: %s)", item.name, type(exc).__name__, exc)
            continue
        score = _pesq_or_none(pesq_wb, item.clean, enhanced, rate, item.name)
        tag = f"_pesq{score:.2f}" if score is not None else ""
        if score is not None:
            scores.append(score)
        tracker.log_audio(enhanced, rate, f"{item.name}_enhanced{tag}.wav", folder)
        if log_inputs:
            noisy_score = _pesq_or_none(pesq_wb, item.clean, item.noisy, rate, item.name)
            if noisy_score is not None:
                noisy_scores.append(noisy_score)
            ntag = f"_pesq{noisy_score:.2f}" if noisy_score is not None else ""
            tracker.log_audio(item.noisy, rate, f"{item.name}_noisy{ntag}.wav", "samples/inputs")
            tracker.log_audio(item.clean, rate, f"{item.name}_clean.wav", "samples/inputs")
        try:
            fig = spectrogram_figure([("noisy", item.noisy), (f"enhanced (step {step})", enhanced),
                                      ("clean", item.clean)], rate, f"{item.name}{tag.replace('_', ' ')}")
        except Exception as exc:  # noqa: BLE001
            log.warning("spectrogram of %s failed: %s", item.name, exc)
            continue
        try:
            tracker.log_figure(fig, f"{item.name}_spectrogram{tag}.png", folder)
        finally:
            plt.close(fig)
    metrics = {}
    if scores:
        metrics["val_pesq"] = float(np.mean(scores))
    if noisy_scores:
        metrics["val_pesq_noisy"] = float(np.mean(noisy_scores))
    tracker.log_metrics(metrics, step)
    return metrics.get("val_pesq")


def _pesq_or_none(pesq_fn: Callable[..., float], clean: np.ndarray, degraded: np.ndarray, rate: int,
                  name: str) -> float | None:
    try:
        return float(pesq_fn(clean, degraded, rate=rate))
    except Exception as exc:  # noqa: BLE001 - MetricError (too short, silent...) or resampling issues
        log.warning("PESQ of validation sample %s unavailable: %s", name, exc)
        return None
