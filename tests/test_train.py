"""The training loop on a real (tiny) prepared corpus: outputs, exact resume after a
clean stop / SIGINT / SIGTERM / SIGKILL, the NaN guard, stale checkpoints and DDP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from segan import distributed as ddp
from segan.config import PrepareConfig, params_from_dict
from segan.data import layout
from segan.data.prepare import prepare_corpus
from segan.model import load_generator
from segan.train import (
    LOG_COLUMNS,
    TrainingDiverged,
    autocast_dtype,
    cpu_supports_bf16,
    load_checkpoint,
    make_scheduler,
    params_hash,
    train,
)
from speechlike import add_white_noise, speech_like

RATE, WINDOW, HOP = 16000, 1024, 512
TINY_MODEL = {"g_channels": [4, 8, 8, 16], "d_channels": [4, 8, 8, 16], "kernel_size": 31}
REF_STEPS = 12
PYTHON = sys.executable


# ----------------------------------------------------------------------------- fixtures/helpers
def make_prepared(base: Path, train_utts: int = 1, test_utts: int = 2) -> Path:
    """A real prepared corpus: speech-like clean audio + white noise, through prepare_corpus."""
    raw = base / "raw"
    # ~30 training windows: 7 batches of 4 per epoch, so REF_STEPS spans an epoch boundary
    for split, count, seconds in (("train", train_utts, 1.0), ("test", test_utts, 1.5)):
        for i in range(count):
            clean = speech_like(seconds, RATE, seed=i + (50 if split == "test" else 0)).astype(np.float32)
            noisy = add_white_noise(clean, 5.0, seed=i + 7).astype(np.float32)
            for folder, audio in ((layout.clean_dir(raw, split), clean), (layout.noisy_dir(raw, split), noisy)):
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(str(folder / f"{split}_{i:03d}.wav"), audio, RATE, subtype="FLOAT")
        entries = [layout.LogEntry(f"{split}_{i:03d}", "white", 5.0) for i in range(count)]
        layout.log_path(raw, split).write_text(layout.format_log(entries))
    layout.manifest_path(raw).write_text(json.dumps({"source": "synthetic", "seed": 0}))
    out = base / "prepared"
    prepare_corpus(raw, out, PrepareConfig(sample_rate=RATE, window=WINDOW, hop=HOP, workers=1), progress=False)
    return out


def tiny_raw(**train: object) -> dict:
    """Raw params dict for a tiny, fast, deterministic CPU run (train keys overridable)."""
    t = {"device": "cpu", "batch_size": 4, "ref_batch_size": 4, "epochs": 10, "max_steps": REF_STEPS,
         "checkpoint_every": 4, "log_every": 2, "num_samples": 0, "seed": 3}
    t.update(train)
    return {"prepare": {"window": WINDOW, "hop": HOP, "workers": 1}, "model": dict(TINY_MODEL), "train": t}


def tiny_params(**train: object):
    return params_from_dict(tiny_raw(**train))


def run_dirs(root: Path) -> tuple[Path, Path]:
    return root / "models", root / "reports"


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """G, D and optimizer tensors of a finished run (from the final checkpoint)."""
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    flat = {}
    for part in ("generator", "discriminator"):
        flat.update({f"{part}.{k}": v for k, v in ck[part].items()})
    for part in ("opt_g", "opt_d"):
        for pid, st in ck[part]["state"].items():
            flat.update({f"{part}.{pid}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return flat


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def losses(reports: Path) -> pd.DataFrame:
    return pd.read_csv(reports / "train_losses.csv").drop(columns=["windows_per_s"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow sqlite store per module (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _env(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # identical to the subprocess runs below; the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(prepared: Path, tmp_path_factory: pytest.TempPathFactory, store: str) -> dict:
    """An uninterrupted run of REF_STEPS steps that the resumed runs must match exactly."""
    root = tmp_path_factory.mktemp("reference")
    out, reports = run_dirs(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", store)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(tiny_params(), prepared, out, reports, progress=False)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return {"root": root, "out": out, "reports": reports, "summary": summary, "weights": weights(out),
            "losses": losses(reports)}


# ----------------------------------------------------------------------------- outputs
def test_outputs_of_a_run(reference: dict, prepared: Path) -> None:
    out, reports, summary = reference["out"], reference["reports"], reference["summary"]
    assert summary["steps"] == REF_STEPS and summary["start_step"] == 0 and not summary["resumed"]
    assert summary["tracking_failures"] == 0 and summary["mlflow_run_id"]

    gen, cfg, extra = load_generator(out / "generator.pt")
    assert cfg.g_channels == TINY_MODEL["g_channels"]
    assert extra["window"] == WINDOW and extra["sample_rate"] == RATE and extra["preemphasis"] == 0.95
    assert extra["train_steps"] == REF_STEPS and extra["params_hash"] == summary["params_hash"]
    assert extra["mlflow_run_id"] == summary["mlflow_run_id"]
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    for k, v in gen.state_dict().items():
        assert torch.equal(v, ck["generator"][k])

    # everything an exact resume needs, as weights_only-loadable data
    for key in ("opt_g", "opt_d", "sched_g", "sched_d", "order", "ref", "ref_indices", "rng", "params_hash"):
        assert key in ck
    assert set(ck["rng"][0]) >= {"torch", "numpy", "python", "z"}
    idx = ck["ref_indices"]
    assert len(idx) == 4 and len(set(idx.tolist())) == 4  # without replacement
    assert ck["ref"].shape == (4, 2, WINDOW)
    assert sorted(ck["order"].tolist()) == list(range(ck["num_windows"]))

    df = pd.read_csv(reports / "train_losses.csv")
    assert tuple(df.columns) == LOG_COLUMNS
    assert df["step"].tolist() == list(range(2, REF_STEPS + 1, 2))
    assert np.isfinite(df.drop(columns=["step", "epoch"]).to_numpy()).all()
    assert (df["windows_per_s"] > 0).all() and (df["lr_g"] == 1e-4).all()
    assert (reports / "train_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "mlflow_run.json").read_text())
    assert run["run_id"] == summary["mlflow_run_id"] and run["tracking_uri"].startswith("sqlite:///")


def test_weights_change_and_runs_repeat(reference: dict, prepared: Path, tmp_path: Path) -> None:
    """Same seed, fresh folder -> bit-identical weights (determinism is what resume relies on)."""
    out, reports = run_dirs(tmp_path)
    train(tiny_params(max_steps=3), prepared, out, reports, progress=False)
    three = weights(out)
    first = reference["weights"]
    assert not torch.equal(three["generator.encoder.0.0.weight"], first["generator.encoder.0.0.weight"])
    out2, reports2 = run_dirs(tmp_path / "again")
    # DataLoader worker processes change nothing (the batches are fixed index lists)
    train(tiny_params(max_steps=3, num_workers=1), prepared, out2, reports2, progress=False)
    assert_same_weights(three, weights(out2))


# ----------------------------------------------------------------------------- resume
def test_resume_after_a_shorter_run_is_exact(reference: dict, prepared: Path, tmp_path: Path) -> None:
    out, reports = run_dirs(tmp_path)
    first = train(tiny_params(max_steps=5), prepared, out, reports, progress=False)
    assert first["steps"] == 5
    second = train(tiny_params(), prepared, out, reports, progress=False)
    assert second["resumed"] and second["start_step"] == 5 and second["steps"] == REF_STEPS
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run continues
    assert_same_weights(weights(out), reference["weights"])
    pd.testing.assert_frame_equal(losses(reports), reference["losses"])


def test_finished_run_rerun_only_rewrites_outputs(reference: dict, prepared: Path, tmp_path: Path) -> None:
    out, reports = run_dirs(tmp_path)
    train(tiny_params(max_steps=4), prepared, out, reports, progress=False)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    (out / "generator.pt").unlink()
    (reports / "train_losses.csv").unlink()
    summary = train(tiny_params(max_steps=4), prepared, out, reports, progress=False)
    assert summary["resumed"] and summary["start_step"] == summary["steps"] == 4
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert (out / "generator.pt").is_file() and (reports / "train_losses.csv").is_file()


def test_changed_params_start_fresh(prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out, reports = run_dirs(tmp_path)
    train(tiny_params(max_steps=2), prepared, out, reports, progress=False)
    # an operational key does not invalidate the checkpoint ...
    resumed = train(tiny_params(max_steps=3, log_every=1, checkpoint_every=1), prepared, out, reports,
                    progress=False)
    assert resumed["resumed"] and resumed["start_step"] == 2
    # ... a training key does
    with caplog.at_level(logging.WARNING, logger="segan.train"):
        fresh = train(tiny_params(max_steps=3, g_lambda=10.0), prepared, out, reports, progress=False)
    assert not fresh["resumed"] and fresh["start_step"] == 0
    assert "training params changed" in caplog.text
    stale = load_checkpoint(out / "checkpoints" / "last.stale.pt")
    assert stale["step"] == 3 and stale["params_hash"] == resumed["params_hash"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["params_hash"] == fresh["params_hash"]


def _signal_when_checkpoint_exists(path: Path, signum: int) -> threading.Thread:
    def fire() -> None:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_resume_is_exact(signum: int, reference: dict, prepared: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The signal arrives (from another thread, like a real Ctrl-C/kill) once training runs:
    the current step completes, a checkpoint is written, SIGINT raises KeyboardInterrupt and
    SIGTERM exits with 143; re-running continues to exactly the uninterrupted result."""
    out, reports = run_dirs(tmp_path)
    ckpt = out / "checkpoints" / "last.pt"
    original = signal.getsignal(signum)

    def ignore(*_: object) -> None:  # should the signal ever land after train() returned
        pass

    signal.signal(signum, ignore)
    try:
        thread = _signal_when_checkpoint_exists(ckpt, signum)
        expected = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
        with caplog.at_level(logging.ERROR, logger="segan.train"), pytest.raises(expected) as info:
            train(tiny_params(checkpoint_every=2), prepared, out, reports, progress=False)
        thread.join()
        assert signal.getsignal(signum) is ignore  # train() restored the handler it found
    finally:
        signal.signal(signum, original)
    if signum == signal.SIGTERM:
        assert info.value.code == 143
    name = signal.Signals(signum).name
    assert f"interrupted by {name}" in caplog.text and "run again to resume" in caplog.text
    stopped = load_checkpoint(ckpt)["step"]
    assert 2 <= stopped < REF_STEPS
    summary = train(tiny_params(), prepared, out, reports, progress=False)
    assert summary["resumed"] and summary["start_step"] == stopped
    assert_same_weights(weights(out), reference["weights"])
    pd.testing.assert_frame_equal(losses(reports), reference["losses"])


SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from segan.config import params_from_dict
from segan.train import train
raw, prepared, root = {raw!r}, {prepared!r}, {root!r}
train(params_from_dict(raw), prepared, root + "/models", root + "/reports", progress=False)
"""


def _start_training(tmp_path: Path, prepared: Path, **train_keys: object) -> subprocess.Popen:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(raw=tiny_raw(**train_keys), prepared=str(prepared), root=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([PYTHON, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {path} appeared:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_then_rerun_is_exact(reference: dict, prepared: Path, tmp_path: Path) -> None:
    out, reports = run_dirs(tmp_path)
    ckpt = out / "checkpoints" / "last.pt"
    proc = _start_training(tmp_path, prepared, checkpoint_every=2)
    _wait_for(ckpt, proc)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["step"]
    assert killed_at < REF_STEPS, "the kill came too late to test resuming"
    summary = train(tiny_params(), prepared, out, reports, progress=False)
    assert summary["resumed"] and summary["start_step"] == killed_at
    assert_same_weights(weights(out), reference["weights"])
    g_ref, _, _ = load_generator(reference["out"] / "generator.pt")
    g, _, _ = load_generator(out / "generator.pt")
    for k, v in g_ref.state_dict().items():
        assert torch.equal(v, g.state_dict()[k])
    pd.testing.assert_frame_equal(losses(reports), reference["losses"])


# ----------------------------------------------------------------------------- divergence
def test_non_finite_loss_stops_and_keeps_last_checkpoint(prepared: Path, tmp_path: Path, store: str) -> None:
    """A huge learning rate makes the weights blow up within a few steps (a real cause)."""
    out, reports = run_dirs(tmp_path)
    ckpt = out / "checkpoints" / "last.pt"
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_params(g_lr=1e30, checkpoint_every=1, max_steps=REF_STEPS), prepared, out,
              reports, progress=False)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert f"step {err.step}" in str(err) and err.name in str(err) and str(ckpt) in str(err)
    assert err.step > 1 and not np.isfinite(err.value)
    ck = load_checkpoint(ckpt)
    assert ck["step"] == err.step - 1  # the last good step; the diverged one was never saved
    assert not (out / "generator.pt").exists()

    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"


# ----------------------------------------------------------------------------- pieces
def test_params_hash_ignores_operational_keys() -> None:
    base = params_hash(tiny_params())
    assert params_hash(tiny_params(log_every=7, checkpoint_every=9, num_workers=2, device="auto")) == base
    assert params_hash(tiny_params(max_steps=99, epochs=3)) == base  # constant lr: length only says where to stop
    assert params_hash(tiny_params(g_lambda=1.0)) != base
    assert params_hash(tiny_params(seed=4)) != base
    assert params_hash(tiny_params(), world_size=2) != base
    cosine = params_hash(tiny_params(lr_schedule="cosine"))
    assert params_hash(tiny_params(lr_schedule="cosine", max_steps=99)) != cosine  # schedule depends on length


def test_cosine_schedule_decays_to_zero() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "cosine", total=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_bf16_only_where_supported(caplog: pytest.LogCaptureFixture) -> None:
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    with caplog.at_level(logging.WARNING, logger="segan.train"):
        dtype = autocast_dtype("bf16", torch.device("cpu"))
    if cpu_supports_bf16():
        assert dtype is torch.bfloat16
    else:
        assert dtype is None and "training in fp32" in caplog.text


def test_rank_batches_partition_each_epoch() -> None:
    order = ddp.epoch_order(50, seed=1, epoch=2)
    assert np.array_equal(order, ddp.epoch_order(50, seed=1, epoch=2))
    assert not np.array_equal(order, ddp.epoch_order(50, seed=1, epoch=3))
    world = 3
    bpe = ddp.batches_per_epoch(50, 4, world)
    assert bpe == 4
    seen = [i for b in range(bpe) for r in range(world)
            for i in ddp.rank_batch(order, b, 4, ddp.DistInfo(rank=r, world_size=world))]
    assert len(seen) == len(set(seen)) == bpe * world * 4
    single = [i for b in range(12) for i in ddp.rank_batch(order, b, 4, ddp.DistInfo())]
    assert single == order[:48].tolist()


def test_ref_batch_larger_than_corpus_is_a_clear_error(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.ref_batch_size=100000 exceeds"):
        train(tiny_params(ref_batch_size=100000), prepared, *run_dirs(tmp_path), progress=False)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_replicas(prepared: Path, tmp_path: Path, store: str) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_raw(max_steps=3, checkpoint_every=2, log_every=1)))
    out, reports = run_dirs(tmp_path)
    summary_file = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", MLFLOW_TRACKING_URI=store)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "segan.train",
           "--params", str(params_file), "--prepared", str(prepared), "--out", str(out), "--reports",
           str(reports), "--summary", str(summary_file), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    digests = summary["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    # each rank drew its own latent noise
    assert not torch.equal(ck["rng"][0]["z"], ck["rng"][1]["z"])
    assert (out / "generator.pt").is_file() and (reports / "train_losses.csv").is_file()
