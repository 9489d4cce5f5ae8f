#!/usr/bin/env python
"""Benchmark one SEGAN training step (D update + G update) on this CPU.

Each variant runs in a worker process of its own (its own allocator state and OpenMP pool);
the parent drives them one step at a time, interleaved, so background load hits all alike.
Variants:

* ``optimized``: :func:`segan.step.train_step` (one G forward, fused real+fake D call,
  reference moments reused, no D weight gradients in the G update) with the model's fast
  convolution paths (polyphase early layers, matmul bottleneck) and glibc malloc set to reuse
  freed memory (:mod:`segan.allocator`): what ``segan train`` runs;
* ``seed_step``: the seed's literal step (:func:`segan.step.baseline_step`: G computed again,
  the reference batch through D on each of three D calls, D weight gradients in the G update)
  on the same model and allocator settings: isolates the step restructuring;
* ``seed_step_plain_convs``: the seed's step with PyTorch's standard convolution kernels only
  (no fast paths), same allocator settings;
* ``straightforward``: the seed's step, standard kernels, glibc's default allocator: a
  straightforward re-implementation of the seed, run as a plain script would. The issue's
  baseline.

The paper-size model (Pascual et al. 2017, channels 16..1024) is timed at batch 4 and 16, and
the project's default model (``params.yaml``'s ``model`` section: narrow, kernel 15, resize-conv
decoder) at its ``train.batch_size`` and ``train.ref_batch_size``, each in float32 and under
bf16 autocast. The script also counts the step's convolution FLOPs
analytically (forward = 2*Cin*Cout*K*Tout per conv, transposed conv 2*Cin*Cout*K*Tin;
backward = weight-gradient + input-gradient passes of the same size where they are computed)
and compares the achieved GFLOP/s with a large fp32 and bf16 matmul measured in the same run.
A torch.profiler pass of one optimized step shows what dominates. Steps use Adam with the
fused CPU kernel by default (``--optimizer``). Reported per variant: best-of-N and median
wall-clock windows/s (``--threads`` threads, default 2), windows per CPU-second of the worker
(less sensitive to other processes on the machine, but counts OpenMP spin-waits) and page
faults per step.

    python bench/train_step.py --json bench/results/train_step.json         # ~5 min
    python bench/train_step.py --quick                                        # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from segan.allocator import keep_freed_memory
from segan.config import ModelConfig, load_params
from segan.fsutil import write_json
from segan.model import MATMUL_MAX_LEN, build_models, count_parameters, set_fast_paths
from segan.step import baseline_step, reset_reference_cache, train_step

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- analytic FLOPs
@dataclass
class NetFlops:
    """Per-window forward FLOPs of a network and of its first layer (whose input needs no grad)."""

    forward: float
    first: float


def encoder_flops(channels: list[int], k: int, window: int, in_channels: int) -> tuple[float, float]:
    """(total, first layer) forward FLOPs of a stack of stride-2 convolutions."""
    total, first, t, prev = 0.0, 0.0, window, in_channels
    for i, ch in enumerate(channels):
        t //= 2
        f = 2.0 * prev * ch * k * t
        first = f if i == 0 else first
        total += f
        prev = ch
    return total, first


def generator_flops(channels: list[int], k: int, window: int, resize_layers: int = 0) -> NetFlops:
    total, first = encoder_flops(channels, k, window, in_channels=1)
    # decoder: transposed conv i takes 2*ch[i] channels at length window/2**(i+1); the last
    # ``resize_layers`` are interpolation + stride-1 conv at twice that length (2x the work)
    for i in reversed(range(len(channels))):
        out = channels[i - 1] if i > 0 else 1
        factor = 2.0 if i < resize_layers else 1.0
        total += factor * 2.0 * (2 * channels[i]) * out * k * (window >> (i + 1))
    return NetFlops(total, first)


def discriminator_flops(channels: list[int], k: int, window: int) -> NetFlops:
    total, first = encoder_flops(channels, k, window, in_channels=2)
    total += 2.0 * channels[-1] * 1 * (window >> len(channels))  # 1x1 conv to one channel (the Linear is negligible)
    return NetFlops(total, first)


@dataclass(frozen=True)
class Variant:
    """What one worker process runs."""

    step: str           # "optimized" (train_step) | "optimized_nocache" | "seed" (baseline_step)
    fast_paths: bool    # segan.model.set_fast_paths: polyphase and matmul convolution paths
    tuned_malloc: bool  # segan.allocator.keep_freed_memory()


VARIANTS = {
    "optimized": Variant("optimized", True, True),
    "optimized_nocache": Variant("optimized_nocache", True, True),  # reference moments recomputed
    "seed_step": Variant("seed", True, True),
    "seed_step_plain_convs": Variant("seed", False, True),
    "straightforward": Variant("seed", False, False),
}
TARGET_BASELINE = "straightforward"  # the "straightforward re-implementation of the seed's step"


def step_flops(g: NetFlops, d: NetFlops, batch: int, ref: int, step: str) -> float:
    """Convolution FLOPs of one step of kind ``step`` (steady state)."""
    d_wgrad, d_igrad = d.forward, d.forward - d.first      # D's first layer input is data
    g_wgrad, g_igrad = g.forward, g.forward - g.first      # G's first layer input is data
    if step == "seed":
        d_update = 2 * ref * d.forward + 2 * batch * (d.forward + d_wgrad + d_igrad) + batch * g.forward
        g_update = (ref * d.forward + batch * (d.forward + d_wgrad + d.forward)
                    + batch * (g.forward + g_wgrad + g_igrad))
        return d_update + g_update
    # optimized: one ref pass per step (reused), fused real+fake, one G forward, no D wgrad in G update
    refs = ref if step == "optimized" else 2 * ref      # "optimized_nocache": two ref passes
    d_update = 2 * batch * (d.forward + d_wgrad + d_igrad) + batch * g.forward
    g_update = batch * (d.forward + d.forward) + batch * (g_wgrad + g_igrad)
    return refs * d.forward + d_update + g_update


# ----------------------------------------------------------------------------- timing
def matmul_gflops(n: int, dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(times) / 1e9


def make_optimizers(G: torch.nn.Module, D: torch.nn.Module, impl: str) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The seed's Adam (lr 1e-4, betas 0.5/0.999) with the chosen kernel implementation."""
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[impl]
    return (torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.999), **kw),
            torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.999), **kw))


# ----------------------------------------------------------------------------- worker process
def worker(spec: dict) -> None:
    """Build one variant, run two warm-up steps, then one timed step per "step" line on stdin."""
    variant = VARIANTS[spec["variant"]]
    if variant.tuned_malloc:
        keep_freed_memory()  # before the models exist, as in segan.train
    torch.set_num_threads(spec["threads"])
    batch, window = spec["batch"], spec["window"]
    cfg = ModelConfig(**spec["model"])
    gen = torch.Generator().manual_seed(spec["seed"])
    clean = 0.1 * torch.randn(batch, 1, window, generator=gen)
    noisy = clean + 0.05 * torch.randn(batch, 1, window, generator=gen)
    ref = 0.1 * torch.randn(spec["ref_batch"], 2, window, generator=gen)
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
    torch.manual_seed(spec["seed"])
    G, D = build_models(cfg, window)
    set_fast_paths(G, variant.fast_paths)
    set_fast_paths(D, variant.fast_paths)
    opt_g, opt_d = make_optimizers(G, D, spec["optimizer"])
    z = torch.randn(*G.z_shape(batch, window), generator=gen)
    step = baseline_step if variant.step == "seed" else train_step

    def run() -> None:
        if variant.step == "optimized_nocache":
            reset_reference_cache(D)
        step(G, D, opt_g, opt_d, noisy, clean, ref, z, 100.0, dtype)

    for _ in range(2):  # warm-up: oneDNN primitives, optimizer state, malloc's heap reaching steady state
        run()
    print(json.dumps({"g_params": count_parameters(G), "d_params": count_parameters(D)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
        print(json.dumps({"wall": wall, "cpu": cpu, "faults": faults}), flush=True)


class Worker:
    """Parent-side handle of a worker process (one line of JSON per request)."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read(f"{spec['variant']} start-up")

    def _read(self, what: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died during {what} (exit {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read("a step")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def bench_config(name: str, cfg: ModelConfig, batch: int, ref_batch: int, window: int, precision: str,
                 variants: list[str], iters: int, threads: int, optimizer: str = "fused",
                 seed: int = 0) -> dict:
    """Time ``variants`` of one model, each in its own process, interleaved step by step."""
    spec = {"model": asdict(cfg), "batch": batch, "ref_batch": ref_batch,
            "window": window, "precision": precision, "threads": threads, "optimizer": optimizer, "seed": seed}
    # each variant trains its own copy in its own process: shared models would let every
    # baseline step change D under the optimized step's cached reference moments, and a shared
    # process would share malloc's state (which is one of the things measured)
    workers: dict[str, Worker] = {}
    try:
        for v in variants:  # started one after another: warm-ups do not overlap
            workers[v] = Worker({**spec, "variant": v})
        samples: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(iters):
            for v in variants:
                samples[v].append(workers[v].step())
    finally:
        for w in workers.values():
            w.close()
    g_f = generator_flops(cfg.g_channels, cfg.kernel_size, window, cfg.resize_layers)
    d_f = discriminator_flops(cfg.d_channels, cfg.kernel_size, window)
    out = {"model": name, "batch": batch, "ref_batch": ref_batch, "window": window, "precision": precision,
           **workers[variants[0]].info, "variants": {}}
    for v in variants:
        times = [s["wall"] for s in samples[v]]
        # best-of-N is the primary figure: the machine is shared, and the least disturbed
        # step is the closest to the real cost; the median is kept alongside
        best, med = min(times), statistics.median(times)
        cpu = min(s["cpu"] for s in samples[v])
        flops = step_flops(g_f, d_f, batch, ref_batch, VARIANTS[v].step)
        out["variants"][v] = {**asdict(VARIANTS[v]), "step_s": [round(t, 4) for t in times],
                              "best_step_s": round(best, 4), "median_step_s": round(med, 4),
                              "windows_per_s": round(batch / best, 3),
                              "windows_per_s_median": round(batch / med, 3),
                              "cpu_s_per_step": round(cpu, 4), "windows_per_cpu_s": round(batch / cpu, 3),
                              "page_faults_per_step": int(statistics.median(s["faults"] for s in samples[v])),
                              "step_gflop": round(flops / 1e9, 2), "gflops": round(flops / best / 1e9, 2)}
    for base in ("seed_step", TARGET_BASELINE):
        if base not in variants:
            continue
        b = out["variants"][base]
        for v in variants:
            if v != base:
                r = out["variants"][v]
                r[f"speedup_vs_{base}"] = round(r["windows_per_s"] / b["windows_per_s"], 3)
                r[f"cpu_speedup_vs_{base}"] = round(r["windows_per_cpu_s"] / b["windows_per_cpu_s"], 3)
    return out


def profile_step(cfg: ModelConfig, batch: int, window: int, precision: str, optimizer: str = "fused",
                 top: int = 12) -> dict:
    """Self-CPU time of one optimized step by op, grouped into what dominates."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    G, D = build_models(cfg, window)
    opt_g, opt_d = make_optimizers(G, D, optimizer)
    noisy, clean = torch.randn(batch, 1, window) * 0.1, torch.randn(batch, 1, window) * 0.1
    ref, z = torch.randn(batch, 2, window) * 0.1, torch.randn(*G.z_shape(batch, window))
    dtype = torch.bfloat16 if precision == "bf16" else None
    train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, 100.0, dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, 100.0, dtype)
    events = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    groups = dict.fromkeys(("conv_forward", "conv_backward", "matmul", "optimizer", "dtype_casts",
                            "grad_norm", "other"), 0.0)
    for key, t in events:
        if "convolution_backward" in key:
            groups["conv_backward"] += t
        elif "conv" in key:
            groups["conv_forward"] += t
        elif key in ("aten::mm", "aten::addmm", "aten::bmm"):
            groups["matmul"] += t  # the short-length layers (im2col + matmul), forward and backward
        elif "adam" in key.lower() or key.startswith(("aten::_foreach", "aten::addcdiv_", "aten::lerp_")):
            groups["optimizer"] += t
        elif key in ("aten::copy_", "aten::_to_copy"):
            groups["dtype_casts"] += t  # mostly autocast's fp32 -> bf16 weight copies
        elif "norm" in key:
            groups["grad_norm"] += t
        else:
            groups["other"] += t
    ranked = sorted(events, key=lambda e: -e[1])[:top]
    return {"precision": precision, "batch": batch, "self_cpu_s": round(total, 3),
            "share": {k: round(v / total, 3) for k, v in groups.items()},
            "top_ops": [{"op": k, "self_s": round(t, 3)} for k, t in ranked]}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here (atomically)")
    ap.add_argument("--quick", action="store_true", help="short run: 1 timed step, batch 4 only, no profile")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; with other processes on the machine, --threads 1 and the "
                         "windows/cpu-s figures are the stable comparison")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--no-default-model", action="store_true", help="only the paper-size model")
    ap.add_argument("--params", type=Path, default=REPO_PARAMS,
                    help="params.yaml whose model, batch_size and ref_batch_size make the default model")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--window", type=int, default=16384)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16], help="paper-model batch sizes")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--optimizer", choices=["fused", "foreach", "default"], default="fused",
                    help="Adam kernel (fused is ~4x faster than the per-tensor default on CPU)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant (JSON spec)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}

    keep_freed_memory()  # the profile pass below runs as segan train does
    torch.set_num_threads(args.threads)
    iters = 1 if args.quick else args.iters
    batches = [min(args.batches)] if args.quick else args.batches
    started = time.perf_counter()
    result: dict = {
        "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled, "loadavg_start": os.getloadavg(), "quick": args.quick,
        "optimizer": f"Adam ({args.optimizer})",
        "matmul_max_len_conv_out_deconv_in": {str(k).removeprefix("torch."): v for k, v in MATMUL_MAX_LEN.items()},
        "configs": []}

    result["matmul"] = {f"fp32_{args.matmul_n}": round(matmul_gflops(args.matmul_n, torch.float32, 5), 1),
                        f"bf16_{args.matmul_n}": round(matmul_gflops(args.matmul_n, torch.bfloat16, 5), 1)}
    log(f"matmul GFLOP/s: {result['matmul']}")

    paper = ModelConfig()
    plan = [("paper", paper, b, b) for b in batches]
    if not args.no_default_model:
        params = load_params(args.params)
        result["default_model"] = asdict(params.model)
        plan.append(("default", params.model, params.train.batch_size, params.train.ref_batch_size))
    for name, cfg, batch, ref_batch in plan:
        for precision in args.precisions:
            variants = ["optimized", "seed_step"]
            variants += ["seed_step_plain_convs", TARGET_BASELINE] if name == "paper" else [TARGET_BASELINE]
            if name == "paper" and batch == min(batches) and precision == "fp32" and not args.quick:
                variants.append("optimized_nocache")  # how much the reference-moment reuse gives
            log(f"{name} batch {batch} {precision}: {', '.join(variants)} ...")
            res = bench_config(name, cfg, batch, ref_batch, args.window, precision, variants, iters, args.threads,
                               args.optimizer)
            for v, r in res["variants"].items():
                log(f"  {v:22s} {r['windows_per_s']:7.2f} windows/s  {r['gflops']:6.1f} GFLOP/s  "
                    f"{r['windows_per_cpu_s']:6.2f} windows/cpu-s  {r['page_faults_per_step']:7d} faults/step"
                    + (f"  x{r['speedup_vs_seed_step']:.2f} vs seed step" if "speedup_vs_seed_step" in r else "")
                    + (f"  x{r[f'speedup_vs_{TARGET_BASELINE}']:.2f} vs {TARGET_BASELINE}"
                       if f"speedup_vs_{TARGET_BASELINE}" in r else ""))
            for v, r in res["variants"].items():
                peak = result["matmul"][f"{precision}_{args.matmul_n}"]
                r["fraction_of_matmul"] = round(r["gflops"] / peak, 3)
            result["configs"].append(res)
    # the target: >= 2x a straightforward re-implementation, paper-size model, equal batch
    result["target_2x_vs_straightforward"] = {
        f"{c['model']} batch {c['batch']} {c['precision']}":
            c["variants"]["optimized"][f"speedup_vs_{TARGET_BASELINE}"]
        for c in result["configs"] if c["model"] == "paper"}
    log(f"optimized vs {TARGET_BASELINE} (target >= 2x): {result['target_2x_vs_straightforward']}")
    if not (args.quick or args.no_profile):
        result["profile"] = [profile_step(paper, min(batches), args.window, p, args.optimizer)
                             for p in args.precisions]
        for p in result["profile"]:
            log(f"profile {p['precision']}: {p['share']}")
    result["loadavg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - started, 1)
    log(f"total {result['total_s']} s")
    if args.json:
        write_json(args.json, result)
    else:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
