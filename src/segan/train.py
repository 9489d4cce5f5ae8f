"""The SEGAN training loop: exact resume, signal-safe checkpoints, a NaN guard, DDP and MLflow.

``train(params, prepared_dir, out_dir, reports_dir)`` trains a generator/discriminator pair
on the windows of a prepared corpus and writes::

    <out_dir>/checkpoints/last.pt   everything needed to continue bit-exactly (kept across runs)
    <out_dir>/generator.pt          the final generator (segan.model.save_generator)
    <out_dir>/mlflow_run.json       the MLflow run, for later stages to log into
    <reports_dir>/train_losses.csv  losses every train.log_every steps
    <reports_dir>/train_losses.png

Re-running continues from ``last.pt`` when it was written with the same training-relevant
params (see :func:`params_hash`); a finished run just rewrites its outputs. A run stopped by
SIGKILL and re-run ends with exactly the same weights as an uninterrupted one (CPU,
``train.deterministic``): data order, the VBN reference batch and every random draw come from
seeded sources whose state is in the checkpoint.

Multi-process: ``torchrun --nproc-per-node=N -m segan.train --params params.yaml
--prepared data/prepared --out data/models --reports reports`` (or ``train.nproc_per_node``,
which makes :func:`main` launch torchrun itself). ``train.batch_size`` is per process.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed as ddp
from .allocator import keep_freed_memory
from .config import ConfigError, Params, TrainConfig, load_params, to_dict
from .fsutil import atomic_path
from .tracking import (
    RUN_FILE,
    Tracker,
    default_run_name,
    flat_params,
    load_sample_items,
    log_validation_samples,
    run_tags,
)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
STALE_CHECKPOINT = "last.stale.pt"
GENERATOR_FILE = "generator.pt"
LOSSES_CSV = "train_losses.csv"
LOSSES_PNG = "train_losses.png"

LOG_COLUMNS = ("step", "epoch", "d_real", "d_fake", "d_loss", "g_adv", "g_l1", "g_stft", "g_loss", "lr_g", "lr_d",
               "g_grad_norm", "d_grad_norm", "windows_per_s")
# values averaged over each log interval (the rest are instantaneous)
AVERAGED = ("d_real", "d_fake", "d_loss", "g_adv", "g_l1", "g_stft", "g_loss", "g_grad_norm", "d_grad_norm")
# checked every step, losses first so the error names the loss that blew up
GUARDED = ("d_real", "d_fake", "clean_loss", "noisy_loss", "d_loss", "g_adv", "g_l1", "g_stft", "g_loss",
           "g_grad_norm", "d_grad_norm")

# keys that change how a run is executed or reported, never the weights it produces
OPERATIONAL_KEYS = {
    "train": {"device", "compile", "checkpoint_every", "log_every", "sample_every", "num_samples",
              "num_workers", "nproc_per_node"},
    "prepare": {"workers"},
    "data": {"workers", "base_url", "archive_dir", "retries", "timeout_s"},
}


class TrainingDiverged(RuntimeError):
    """A loss (or gradient norm) became NaN/Inf; the last checkpoint on disk is left as it was."""

    def __init__(self, step: int, name: str, value: float, checkpoint: Path | None) -> None:
        where = f"; last good checkpoint: {checkpoint}" if checkpoint and checkpoint.exists() else \
            "; no checkpoint was written yet"
        super().__init__(f"training diverged at step {step}: {name} = {value} (non-finite). Lower "
                         f"train.g_lr/train.d_lr or check the data{where}")
        self.step, self.name, self.value = step, name, value


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ============================================================================ params hash
def _drop_operational(section: str, value: Any) -> Any:
    if isinstance(value, dict):
        skip = OPERATIONAL_KEYS.get(section, set())
        return {k: _drop_operational(section, v) for k, v in value.items() if k not in skip}
    return value


def params_hash(params: Params, world_size: int = 1) -> str:
    """Fingerprint of everything that shapes the trained weights: the data, prepare, model
    and train sections minus operational keys, plus the number of processes.

    With a constant learning rate, ``epochs`` and ``max_steps`` only say where to stop, so
    they are left out: a finished run can be extended. With a cosine schedule they define
    the schedule itself and are part of the hash.
    """
    raw = to_dict(params)
    train = _drop_operational("train", raw["train"])
    if params.train.lr_schedule == "constant":
        train.pop("epochs", None)
        train.pop("max_steps", None)
    payload = {
        "data": _drop_operational("data", raw["data"]),
        "prepare": _drop_operational("prepare", raw["prepare"]),
        "model": raw["model"],
        "train": train,
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ============================================================================ device, precision, seeds
def resolve_device(name: str, info: ddp.DistInfo) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Under DDP each process takes GPU ``LOCAL_RANK``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available "
                          "(use 'auto' or 'cpu')")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    with contextlib.suppress(Exception):
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
        if "BF16" in cap or "AMX" in cap:
            return True
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``torch.bfloat16`` when bf16 was asked for and the device runs it natively, else ``None``
    (fp32) with a warning: emulated bf16 on an old CPU is slower than fp32."""
    if precision != "bf16":
        return None
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if not ok:
        log.warning("train.precision: bf16 is not supported natively on %s; training in fp32", device)
        return None
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training; the previous global settings are
    restored afterwards (so a library call does not change the caller's process)."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        if device.type == "cuda":
            # cuBLAS needs a fixed workspace for reproducible GEMMs; some CUDA kernels have no
            # deterministic variant, so warn there rather than stop
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


# ============================================================================ RNG state (weights_only-safe)
def capture_rng(z_gen: torch.Generator) -> dict[str, Any]:
    """Every random state of this process as tensors and plain types (loadable with
    ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "z": z_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any], z_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    z_gen.set_state(state["z"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ============================================================================ signals
class StopRequest:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, exit. A second signal aborts
    at once (checkpoints are written atomically, so that is safe too)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.signum = signum
        log.warning("%s received: stopping after the current step and saving a checkpoint "
                    "(send it again to abort at once)", signal.Signals(signum).name)

    def exit(self, step: int, checkpoint: Path) -> None:
        """Raise what the signal means: KeyboardInterrupt for SIGINT, SystemExit(128+n) otherwise."""
        name = signal.Signals(self.signum).name if self.signum else "signal"
        msg = f"training interrupted by {name} after step {step}; checkpoint saved to {checkpoint}; " \
              f"run again to resume"
        log.error("%s", msg)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt(msg)
        raise SystemExit(128 + int(self.signum or signal.SIGTERM))


# ============================================================================ data
def draw_reference_batch(dataset: Any, size: int, seed: int) -> torch.Tensor:
    """Indices of the virtual-batch-norm reference batch: ``size`` distinct training windows,
    drawn once from a seed of their own (independent of the data order and of z)."""
    n = len(dataset)
    if size > n:
        raise ValueError(f"train.ref_batch_size={size} exceeds the {n} training windows of "
                         f"{getattr(dataset, 'prepared_dir', 'the prepared corpus')}")
    rng = np.random.default_rng([seed, 0x2EF])
    return torch.from_numpy(rng.choice(n, size=size, replace=False).astype(np.int64))


def reference_tensor(dataset: Any, indices: torch.Tensor, coef: float) -> torch.Tensor:
    """The reference pairs ``[R, 2, T]`` (channel 0 clean, channel 1 noisy), pre-emphasised,
    in the same layout as the discriminator's real input."""
    from .model import preemphasize

    pairs = [dataset[int(i)] for i in indices]
    clean = torch.stack([c for c, _ in pairs])
    noisy = torch.stack([x for _, x in pairs])
    return torch.cat([preemphasize(clean, coef), preemphasize(noisy, coef)], dim=1)


def _loader(dataset: Any, order: np.ndarray, start: int, stop: int, batch_size: int, info: ddp.DistInfo,
            num_workers: int, pin: bool) -> DataLoader:
    batches = [ddp.rank_batch(order, b, batch_size, info) for b in range(start, stop)]
    # a private generator: DataLoader otherwise draws its worker base seed from the global
    # RNG, and a resumed run would then see a different global stream than an uninterrupted one
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(0))


# ============================================================================ optimisers
def make_optimizer(params: Any, lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.betas[0], cfg.betas[1]))
    return torch.optim.RMSprop(params, lr=lr)


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    else:
        def factor(step: int) -> float:
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ============================================================================ run state
@dataclass
class RunState:
    """Where training is: the next step runs batch ``batch`` of epoch ``epoch`` (0-based)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    history: dict[str, list] = field(default_factory=lambda: {c: [] for c in LOG_COLUMNS})
    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in AVERAGED})
    count: int = 0
    run_id: str | None = None
    experiment_id: str | None = None
    tail: dict[str, float] | None = None  # log row of a final step that is off the log_every grid

    def rows(self) -> dict[str, list]:
        """The logged rows for reports: the history plus the final partial row, if any."""
        if not self.tail:
            return self.history
        return {c: [*self.history[c], self.tail[c]] for c in LOG_COLUMNS}


def _reset_interval(st: RunState) -> None:
    st.sums = {k: 0.0 for k in AVERAGED}
    st.count = 0


def _digest(*modules: torch.nn.Module) -> str:
    """Exact fingerprint of the weights (to check that DDP replicas are identical)."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ============================================================================ outputs
def write_losses_csv(path: Path, history: dict[str, list]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(LOG_COLUMNS)
            writer.writerows(zip(*(history[c] for c in LOG_COLUMNS)))


def plot_losses(path: Path, history: dict[str, list]) -> None:
    """Discriminator, adversarial, L1 and STFT losses against the step (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = history["step"]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    for ax, keys, title in ((axes[0], ("d_loss", "d_real", "d_fake"), "discriminator"),
                            (axes[1], ("g_adv",), "generator: adversarial"),
                            (axes[2], ("g_l1",), "generator: L1 (before x g_lambda)"),
                            (axes[3], ("g_stft",), "generator: multi-resolution STFT "
                                                   "(before x stft_lambda; 0 when off)")):
        for key in keys:
            ax.plot(steps, history[key], label=key, linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    if not steps:
        axes[0].text(0.5, 0.5, "no logged steps", ha="center", transform=axes[0].transAxes)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


# ============================================================================ checkpoints
def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no pickled code is ever executed)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); move it away "
                              f"to start training from scratch") from None
    if not isinstance(ck, dict) or "version" not in ck:
        raise CheckpointError(f"{path}: not a segan training checkpoint")
    return ck


def _stale_reason(ck: dict[str, Any], expected_hash: str, num_windows: int, window: int, total: int) -> str | None:
    if ck.get("version") != CHECKPOINT_VERSION:
        return f"checkpoint format {ck.get('version')} (expected {CHECKPOINT_VERSION})"
    if ck.get("params_hash") != expected_hash:
        return f"training params changed (checkpoint hash {ck.get('params_hash')}, now {expected_hash})"
    if ck.get("num_windows") != num_windows or ck.get("window") != window:
        return (f"prepared data changed ({ck.get('num_windows')} windows of {ck.get('window')} in the "
                f"checkpoint, now {num_windows} of {window})")
    if int(ck.get("step", 0)) > total:
        return f"checkpoint is at step {ck['step']}, past the {total} steps now requested"
    return None


# ============================================================================ training
@dataclass
class _Setup:
    """Objects shared by the loop helpers (one instance per train() call)."""

    params: Params
    info: ddp.DistInfo
    device: torch.device
    G: torch.nn.Module
    D: torch.nn.Module
    G_run: Any
    D_run: Any
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: Any
    sched_d: Any
    z_gen: torch.Generator
    ref_indices: torch.Tensor
    ref: torch.Tensor
    p_hash: str
    num_windows: int
    window: int
    total: int
    bpe: int
    ckpt_path: Path


def _save_checkpoint(s: _Setup, st: RunState) -> None:
    """Collect every rank's RNG state; rank 0 writes ``last.pt`` atomically; all ranks wait."""
    rngs = ddp.all_gather_object(capture_rng(s.z_gen), s.info)
    if s.info.is_main:
        ck = {
            "version": CHECKPOINT_VERSION,
            "params_hash": s.p_hash,
            "step": st.step, "epoch": st.epoch, "batch": st.batch, "total_steps": s.total,
            "order": torch.from_numpy(np.asarray(st.order, dtype=np.int64)),
            "num_windows": s.num_windows, "window": s.window, "world_size": s.info.world_size,
            "generator": s.G.state_dict(), "discriminator": s.D.state_dict(),
            "opt_g": s.opt_g.state_dict(), "opt_d": s.opt_d.state_dict(),
            "sched_g": s.sched_g.state_dict(), "sched_d": s.sched_d.state_dict(),
            "ref_indices": s.ref_indices, "ref": s.ref.detach().cpu(),
            "rng": rngs,
            "history": st.history, "interval_sums": dict(st.sums), "interval_count": st.count,
            "mlflow_run_id": st.run_id, "mlflow_experiment_id": st.experiment_id, "tail_row": st.tail,
        }
        with atomic_path(s.ckpt_path, suffix=".pt") as tmp:
            torch.save(ck, tmp)
        log.debug("checkpoint: step %d -> %s", st.step, s.ckpt_path)
    ddp.barrier(s.info)


def _restore(s: _Setup, st: RunState, ck: dict[str, Any]) -> None:
    try:
        s.G.load_state_dict(ck["generator"])
        s.D.load_state_dict(ck["discriminator"])
        s.opt_g.load_state_dict(ck["opt_g"])
        s.opt_d.load_state_dict(ck["opt_d"])
        s.sched_g.load_state_dict(ck["sched_g"])
        s.sched_d.load_state_dict(ck["sched_d"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{s.ckpt_path}: does not fit the model/optimizer ({exc})") from None
    st.step, st.epoch, st.batch = int(ck["step"]), int(ck["epoch"]), int(ck["batch"])
    st.order = ck["order"].numpy().astype(np.int64)
    st.history = {c: list(ck["history"].get(c, [])) for c in LOG_COLUMNS}
    st.sums = {k: float(ck["interval_sums"].get(k, 0.0)) for k in AVERAGED}
    st.count = int(ck["interval_count"])
    st.run_id = ck.get("mlflow_run_id")
    st.experiment_id = ck.get("mlflow_experiment_id")
    st.tail = ck.get("tail_row")
    rngs = ck["rng"]
    restore_rng(rngs[s.info.rank], s.z_gen)


def _build(params: Params, info: ddp.DistInfo, device: torch.device, dataset: Any, p_hash: str,
           ckpt_path: Path) -> _Setup:
    from .model import build_models

    cfg = params.train
    n = len(dataset)
    bpe = ddp.batches_per_epoch(n, cfg.batch_size, info.world_size)
    if bpe < 1:
        raise ValueError(f"the prepared corpus has {n} training windows, fewer than one global batch "
                         f"(train.batch_size={cfg.batch_size} x {info.world_size} process(es))")
    total = cfg.epochs * bpe
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    G, D = build_models(params.model, int(dataset.window))
    G.to(device)
    D.to(device)
    opt_g = make_optimizer(G.parameters(), cfg.g_lr, cfg)
    opt_d = make_optimizer(D.parameters(), cfg.d_lr, cfg)
    ref_idx = draw_reference_batch(dataset, cfg.ref_batch_size, cfg.seed)
    ref = reference_tensor(dataset, ref_idx, params.model.preemphasis).to(device)
    z_gen = torch.Generator().manual_seed(_derived_seed(cfg.seed, info.rank, 0x2))
    return _Setup(params=params, info=info, device=device, G=G, D=D, G_run=G, D_run=D, opt_g=opt_g, opt_d=opt_d,
                  sched_g=make_scheduler(opt_g, cfg.lr_schedule, total),
                  sched_d=make_scheduler(opt_d, cfg.lr_schedule, total), z_gen=z_gen, ref_indices=ref_idx, ref=ref,
                  p_hash=p_hash, num_windows=n, window=int(dataset.window), total=total, bpe=bpe,
                  ckpt_path=ckpt_path)


def _wrap(s: _Setup) -> None:
    """Compile, then DDP-wrap (after the weights are final, so every replica starts from rank
    0's). Compiling inside the wrapper keeps ``D.module`` a plain callable, which the G update
    of :func:`segan.step.train_step` uses to bypass D's reducer."""
    G_run: Any = s.G
    D_run: Any = s.D
    if s.params.train.compile:
        G_run, D_run = torch.compile(G_run), torch.compile(D_run)
    if s.info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [s.device.index] if s.device.type == "cuda" else None
        G_run, D_run = DDP(G_run, device_ids=ids), DDP(D_run, device_ids=ids)
    s.G_run, s.D_run = G_run, D_run


def _resume_or_fresh(s: _Setup, st: RunState) -> bool:
    """Load ``last.pt`` when it belongs to this run; move a stale one aside. True if resumed."""
    path = s.ckpt_path
    ck = load_checkpoint(path) if path.exists() else None
    reason = None if ck is None else _stale_reason(ck, s.p_hash, s.num_windows, s.window, s.total)
    ddp.barrier(s.info)  # every rank has read the file before rank 0 may move it
    if ck is not None and reason is None:
        _restore(s, st, ck)
        if st.step < s.total:
            log.info("resuming from %s at step %d/%d (epoch %d)", path, st.step, s.total, st.epoch + 1)
        return True
    if ck is not None and s.info.is_main:
        stale = path.with_name(STALE_CHECKPOINT)
        os.replace(path, stale)
        log.warning("not resuming from %s: %s. Starting from scratch; the old checkpoint was moved to %s",
                    path, reason, stale)
    ddp.barrier(s.info)
    st.order = ddp.epoch_order(s.num_windows, s.params.train.seed, 0)
    return False


def _enhance_fn(s: _Setup) -> Callable[[np.ndarray], np.ndarray]:
    """Raw noisy audio -> enhanced audio with the current generator, in non-overlapping
    windows of the training size; z from a fixed private seed so samples never disturb the
    training random streams."""
    from .model import Enhancer

    enhancer = Enhancer(s.G, s.params.model.preemphasis)
    window, device, seed = s.window, s.device, s.params.train.seed

    def run(noisy: np.ndarray) -> np.ndarray:
        n = len(noisy)
        x = np.pad(np.asarray(noisy, dtype=np.float32), (0, (-n) % window)).reshape(-1, 1, window)
        xt = torch.from_numpy(x).to(device)
        z = torch.randn(s.G.z_shape(xt.shape[0], window), generator=torch.Generator().manual_seed(seed))
        was_training = s.G.training
        s.G.eval()
        try:
            with torch.no_grad():
                y = enhancer(xt, z.to(device))
        finally:
            s.G.train(was_training)
        return y.detach().float().cpu().numpy().reshape(-1)[:n]

    return run


def train(params: Params, prepared_dir: Path, out_dir: Path, reports_dir: Path, *, run_name: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or just rewrite the outputs of a finished run); returns a summary dict
    (steps, start_step, resumed, params_hash, mlflow_run_id, final log row, val_pesq, ...).

    Raises :class:`TrainingDiverged` on a non-finite loss, ``KeyboardInterrupt`` after SIGINT
    and ``SystemExit(143)`` after SIGTERM (both once a checkpoint is saved), ``ValueError``
    (incl. :class:`CheckpointError`, ``PreparedCorpusError``, ``ConfigError``) for bad inputs.
    """
    prepared_dir, out_dir, reports_dir = Path(prepared_dir), Path(out_dir), Path(reports_dir)
    keep_freed_memory()  # 15 % faster steps here: no page faults on re-allocated buffers
    cfg = params.train
    info = ddp.env_info()
    device = resolve_device(cfg.device, info)
    owns_group = info.enabled and not torch.distributed.is_initialized()
    info = ddp.init_distributed(device.type == "cuda")
    try:
        with deterministic_mode(cfg.deterministic, device), StopRequest() as stop:
            return _train(params, prepared_dir, out_dir, reports_dir, info, device, stop, run_name, progress)
    finally:
        if owns_group:
            ddp.cleanup(info)


def _train(params: Params, prepared_dir: Path, out_dir: Path, reports_dir: Path, info: ddp.DistInfo,
           device: torch.device, stop: StopRequest, run_name: str | None, progress: bool) -> dict[str, Any]:
    from .data.dataset import WindowDataset

    t_start = time.perf_counter()
    cfg = params.train
    dataset = WindowDataset(prepared_dir)
    if dataset.window != params.prepare.window:
        log.warning("prepared windows are %d samples but prepare.window is %d; training on %d",
                    dataset.window, params.prepare.window, dataset.window)
    p_hash = params_hash(params, info.world_size)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    s = _build(params, info, device, dataset, p_hash, ckpt_dir / LAST_CHECKPOINT)
    st = RunState()
    resumed = _resume_or_fresh(s, st)
    start_step = st.step
    amp = autocast_dtype(cfg.precision, device)
    if info.is_main:
        log.info("training %d steps (%d per epoch, %d windows, batch %d x %d process(es)) on %s, %s",
                 s.total, s.bpe, s.num_windows, cfg.batch_size, info.world_size, device,
                 "bf16 autocast" if amp else "fp32")

    finished_before = st.step >= s.total
    tracker = Tracker(enabled=info.is_main)
    if finished_before:
        if st.run_id:
            tracker.bind(st.run_id, st.experiment_id)  # finished: rewrite files, add nothing to MLflow
    else:
        if not (st.run_id and tracker.resume(st.run_id)):
            tracker.start(run_name or default_run_name(params),
                          tags={**run_tags(), "params_hash": p_hash, "world_size": str(info.world_size)},
                          params=flat_params(params))
        st.run_id = tracker.run_id or st.run_id
        st.experiment_id = tracker.experiment_id or st.experiment_id
    if info.is_main:
        tracker.write_run_file(out_dir / RUN_FILE)

    val_pesq = None
    status = "FAILED"
    try:
        if not finished_before:
            _wrap(s)
            val_pesq = _loop(s, st, dataset, amp, stop, tracker, prepared_dir, reports_dir, progress)
        elif info.is_main:
            log.info("%s is already at the final step %d: rewriting the outputs", s.ckpt_path, s.total)
        digests = ddp.all_gather_object(_digest(s.G, s.D), info)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas hold different weights after training: {digests}")
        if info.is_main:
            _write_outputs(s, st, out_dir, reports_dir, tracker, finished_before)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if not finished_before:
            tracker.end(status)
    ddp.barrier(info)
    rows = st.rows()
    last = {c: rows[c][-1] for c in LOG_COLUMNS} if rows["step"] else {}
    return {
        "steps": s.total, "start_step": start_step, "resumed": resumed, "epochs": s.total / s.bpe,
        "params_hash": p_hash, "mlflow_run_id": st.run_id, "tracking_failures": tracker.failures,
        "generator": str(out_dir / GENERATOR_FILE), "checkpoint": str(s.ckpt_path),
        "device": str(device), "precision": "bf16" if amp else "fp32", "world_size": info.world_size,
        "final": last, "val_pesq": val_pesq, "replica_digests": digests,
        "windows_per_s": float(np.mean(rows["windows_per_s"])) if rows["windows_per_s"] else None,
        "wall_s": time.perf_counter() - t_start,
    }


def _loop(s: _Setup, st: RunState, dataset: Any, amp: torch.dtype | None, stop: StopRequest, tracker: Tracker,
          prepared_dir: Path, reports_dir: Path, progress: bool) -> float | None:
    """Run steps ``st.step .. s.total``; checkpoint, log, sample on the way. Returns the last val PESQ."""
    from tqdm import tqdm

    from .model import preemphasize
    from .step import train_step

    cfg, info, params = s.params.train, s.info, s.params
    coef = params.model.preemphasis
    windows_per_step = cfg.batch_size * info.world_size
    samples = []
    if info.is_main and tracker.active and cfg.num_samples:
        try:
            samples = load_sample_items(prepared_dir, cfg.num_samples, dataset.sample_rate)
        except Exception as exc:  # noqa: BLE001 - samples are a nice-to-have
            log.warning("validation samples unavailable: %s", exc)
    enhance = _enhance_fn(s) if samples else None
    val_pesq = None
    st.tail = None  # continuing past a previous run's final partial log row
    inputs_logged = st.step > 0  # the noisy/clean inputs are logged once per run
    interval_time = 0.0
    interval_steps = 0
    last_saved = st.step
    bar = tqdm(total=s.total, initial=st.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and info.is_main), leave=True)
    try:
        while st.step < s.total:
            loader = _loader(dataset, st.order, st.batch, s.bpe, cfg.batch_size, info, cfg.num_workers,
                             s.device.type == "cuda")
            for clean, noisy in loader:
                t0 = time.perf_counter()
                clean = preemphasize(clean.to(s.device, non_blocking=True), coef)
                noisy = preemphasize(noisy.to(s.device, non_blocking=True), coef)
                z = torch.randn(s.G.z_shape(clean.shape[0], clean.shape[-1]), generator=s.z_gen).to(s.device)
                lr_g, lr_d = s.opt_g.param_groups[0]["lr"], s.opt_d.param_groups[0]["lr"]
                m = train_step(s.G_run, s.D_run, s.opt_g, s.opt_d, noisy, clean, s.ref, z, cfg.g_lambda,
                               autocast_dtype=amp, max_grad_norm=cfg.max_grad_norm or None,
                               stft_lambda=cfg.stft_lambda)
                s.sched_g.step()
                s.sched_d.step()
                interval_time += time.perf_counter() - t0
                interval_steps += 1
                epoch_of_step = st.epoch + 1
                st.step += 1
                st.batch += 1
                if st.batch == s.bpe:  # roll over now, so a checkpoint here points at the next epoch
                    st.epoch, st.batch = st.epoch + 1, 0
                    st.order = ddp.epoch_order(s.num_windows, cfg.seed, st.epoch)

                bad = next(((k, float(m[k])) for k in GUARDED if k in m and not math.isfinite(m[k])), None)
                diverged, stopping = ddp.any_flag([bad is not None, stop.signum is not None], info, s.device)
                if diverged:
                    name, value = bad or ("loss on another rank", float("nan"))
                    raise TrainingDiverged(st.step, name, value, s.ckpt_path)
                for k in AVERAGED:
                    st.sums[k] += float(m.get(k, float("nan")))
                st.count += 1

                bar.update(1)
                if bar.n % 5 == 0 or st.step == s.total:
                    bar.set_postfix(d_loss=f"{m['d_loss']:.3f}", g_adv=f"{m['g_adv']:.3f}",
                                    g_l1=f"{m['g_l1']:.4f}", g_stft=f"{m['g_stft']:.3f}",
                                    win_s=f"{windows_per_step * interval_steps / max(interval_time, 1e-9):.1f}",
                                    refresh=False)
                on_grid = st.step % cfg.log_every == 0
                if on_grid or st.step == s.total:
                    row = {"step": st.step, "epoch": epoch_of_step, "lr_g": lr_g, "lr_d": lr_d,
                           "windows_per_s": windows_per_step * interval_steps / max(interval_time, 1e-9)}
                    row.update({k: st.sums[k] / max(st.count, 1) for k in AVERAGED})
                    if on_grid:
                        for c in LOG_COLUMNS:
                            st.history[c].append(row[c])
                        _reset_interval(st)
                        interval_time, interval_steps = 0.0, 0
                    else:
                        # a final partial interval: reported, but kept out of the history so that
                        # extending this run later logs exactly what one longer run would
                        st.tail = row
                    tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, st.step)
                if st.step % cfg.checkpoint_every == 0 or stopping:
                    _save_checkpoint(s, st)
                    last_saved = st.step
                    if info.is_main:
                        write_losses_csv(reports_dir / LOSSES_CSV, st.rows())
                if stopping:
                    stop.exit(st.step, s.ckpt_path)
                if enhance and cfg.sample_every and st.step % cfg.sample_every == 0 and st.step < s.total:
                    val_pesq = log_validation_samples(tracker, samples, enhance, dataset.sample_rate, st.step,
                                                      log_inputs=not inputs_logged)
                    inputs_logged = True
                if st.step >= s.total:
                    break
    finally:
        bar.close()
    if last_saved != st.step:
        _save_checkpoint(s, st)
    if enhance:
        val_pesq = log_validation_samples(tracker, samples, enhance, dataset.sample_rate, st.step,
                                          log_inputs=not inputs_logged)
    return val_pesq


def _write_outputs(s: _Setup, st: RunState, out_dir: Path, reports_dir: Path, tracker: Tracker,
                   rewrite_only: bool) -> None:
    from .model import save_generator

    extra = {"sample_rate": int(s.params.prepare.sample_rate), "window": s.window,
             "preemphasis": float(s.params.model.preemphasis), "train_steps": st.step,
             "params_hash": s.p_hash, "mlflow_run_id": st.run_id}
    save_generator(out_dir / GENERATOR_FILE, s.G, s.params.model, extra)
    csv_path, png_path = reports_dir / LOSSES_CSV, reports_dir / LOSSES_PNG
    write_losses_csv(csv_path, st.rows())
    plot_losses(png_path, st.rows())
    tracker.write_run_file(out_dir / RUN_FILE)
    if not rewrite_only:
        tracker.log_artifact(csv_path, "reports")
        tracker.log_artifact(png_path, "reports")
    log.info("wrote %s, %s, %s", out_dir / GENERATOR_FILE, csv_path, png_path)


# ============================================================================ command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segan.train",
                                description="Train SEGAN (also under torchrun for multi-process DDP).")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="prepared corpus folder")
    p.add_argument("--out", type=Path, default=Path("data/models"), help="models/checkpoints folder")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="reports folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: $DVC_EXP_NAME or from params)")
    p.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON here (rank 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m segan.train ...`` / ``torchrun --nproc-per-node=N -m segan.train ...``.

    Exit codes: 0 done, 2 bad params/data, 130 SIGINT, 143 SIGTERM (checkpoint saved)."""
    from .fsutil import write_json
    from .stage import parse_overrides

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [train rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        params = load_params(args.params, parse_overrides(args.overrides))
        nproc = params.train.nproc_per_node
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "segan.train", *argv]
            log.info("train.nproc_per_node=%d: launching %s", nproc, " ".join(cmd))
            return subprocess.call(cmd)
        summary = train(params, args.prepared, args.out, args.reports, run_name=args.run_name,
                        progress=not args.quiet)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return 1
    if args.summary and rank == "0":
        write_json(args.summary, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
