#!/usr/bin/env python
"""Benchmark one SEGAN training step (D update + G update) on this CPU.

Measures windows/s of :func:`segan.step.train_step` (one G forward, fused real+fake D call,
reference moments reused, no D weight gradients in the G update) and, in the same run and
interleaved step by step (so background load hits both alike), the seed's literal
:func:`segan.step.baseline_step`, for:

A second baseline, ``baseline_plain``, runs the seed's step on the same model with PyTorch's
standard convolution kernels only (no short-length matmul path): what a straightforward
re-implementation gets end to end. Both are timed for:

* the paper-size model (Pascual et al. 2017, channels 16..1024) at batch 4 and 16,
* a smaller CPU model (default: half the paper's width at every layer),

each in float32 and under bf16 autocast. It also counts the step's convolution FLOPs
analytically (forward = 2*Cin*Cout*K*Tout per conv, transposed conv 2*Cin*Cout*K*Tin;
backward = weight-gradient + input-gradient passes of the same size where they are computed)
and compares the achieved GFLOP/s with a large fp32 and bf16 matmul measured in the same run.
A torch.profiler pass of one optimized step shows what dominates. Steps use Adam with the
fused CPU kernel by default (``--optimizer``). Reported per variant: best-of-N and median
wall-clock windows/s (``--threads`` threads, default 2) and windows per CPU-second of this
process (less sensitive to other processes on the machine, but counts OpenMP spin-waits).

    python bench/train_step.py --json reports/bench_train_step.json          # ~3-5 min
    python bench/train_step.py --quick                                        # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from segan.config import PAPER_CHANNELS, ModelConfig
from segan.fsutil import write_json
from segan.model import MATMUL_CONV_MAX_LEN, MATMUL_DECONV_MAX_LEN, build_models, count_parameters, set_matmul_path
from segan.step import baseline_step, reset_reference_cache, train_step

HALF_CHANNELS = [max(1, c // 2) for c in PAPER_CHANNELS]


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


def generator_flops(channels: list[int], k: int, window: int) -> NetFlops:
    total, first = encoder_flops(channels, k, window, in_channels=1)
    # decoder: transposed conv i takes 2*ch[i] channels at length window/2**(i+1)
    for i in reversed(range(len(channels))):
        out = channels[i - 1] if i > 0 else 1
        total += 2.0 * (2 * channels[i]) * out * k * (window >> (i + 1))
    return NetFlops(total, first)


def discriminator_flops(channels: list[int], k: int, window: int) -> NetFlops:
    total, first = encoder_flops(channels, k, window, in_channels=2)
    total += 2.0 * channels[-1] * 1 * (window >> len(channels))  # 1x1 conv to one channel (the Linear is negligible)
    return NetFlops(total, first)


def step_flops(g: NetFlops, d: NetFlops, batch: int, ref: int, variant: str) -> float:
    """Convolution FLOPs of one step of ``variant`` (steady state)."""
    d_wgrad, d_igrad = d.forward, d.forward - d.first      # D's first layer input is data
    g_wgrad, g_igrad = g.forward, g.forward - g.first      # G's first layer input is data
    if variant.startswith("baseline"):
        d_update = 2 * ref * d.forward + 2 * batch * (d.forward + d_wgrad + d_igrad) + batch * g.forward
        g_update = (ref * d.forward + batch * (d.forward + d_wgrad + d.forward)
                    + batch * (g.forward + g_wgrad + g_igrad))
        return d_update + g_update
    # optimized: one ref pass per step (reused), fused real+fake, one G forward, no D wgrad in G update
    refs = ref if variant == "optimized" else 2 * ref      # "optimized_nocache": two ref passes
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


def bench_config(name: str, cfg: ModelConfig, batch: int, ref_batch: int, window: int, precision: str,
                 variants: list[str], iters: int, optimizer: str = "fused", seed: int = 0) -> dict:
    """Time ``variants`` on one model, interleaving them step by step after one warm-up each."""
    gen = torch.Generator().manual_seed(seed)
    clean = 0.1 * torch.randn(batch, 1, window, generator=gen)
    noisy = clean + 0.05 * torch.randn(batch, 1, window, generator=gen)
    ref = 0.1 * torch.randn(ref_batch, 2, window, generator=gen)
    dtype = torch.bfloat16 if precision == "bf16" else None
    params: dict[str, int] = {}

    def runner(variant: str) -> Callable[[], dict]:
        # each variant trains its own copy: interleaved on shared models, every baseline step
        # would change D and void the reference moments the optimized step left for its next one
        torch.manual_seed(seed)
        G, D = build_models(cfg, window)
        if variant == "baseline_plain":  # the same model on PyTorch's standard conv kernels only
            set_matmul_path(G, False)
            set_matmul_path(D, False)
        params.update(g_params=count_parameters(G), d_params=count_parameters(D))
        opt_g, opt_d = make_optimizers(G, D, optimizer)
        z = torch.randn(*G.z_shape(batch, window), generator=gen)
        step = baseline_step if variant.startswith("baseline") else train_step

        def run() -> dict:
            if variant == "optimized_nocache":
                reset_reference_cache(D)
            return step(G, D, opt_g, opt_d, noisy, clean, ref, z, 100.0, dtype)
        return run

    fns = {v: runner(v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up: oneDNN primitive creation, allocator, optimizer state
        fns[v]()
    for _ in range(iters):  # interleaved, so background load hits every variant alike
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[v]()
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(time.process_time() - c0)
    g_f = generator_flops(cfg.g_channels, cfg.kernel_size, window)
    d_f = discriminator_flops(cfg.d_channels, cfg.kernel_size, window)
    out = {"model": name, "batch": batch, "ref_batch": ref_batch, "window": window, "precision": precision,
           **params, "variants": {}}
    for v in variants:
        # best-of-N is the primary figure: the machine is shared, and the least disturbed
        # step is the closest to the real cost; the median is kept alongside
        best, med = min(times[v]), statistics.median(times[v])
        cpu = min(cpu_times[v])
        flops = step_flops(g_f, d_f, batch, ref_batch, v)
        out["variants"][v] = {"step_s": [round(t, 4) for t in times[v]], "best_step_s": round(best, 4),
                              "median_step_s": round(med, 4), "windows_per_s": round(batch / best, 3),
                              "windows_per_s_median": round(batch / med, 3),
                              "cpu_s_per_step": round(cpu, 4), "windows_per_cpu_s": round(batch / cpu, 3),
                              "step_gflop": round(flops / 1e9, 2), "gflops": round(flops / best / 1e9, 2)}
    if "baseline" in times:
        base = out["variants"]["baseline"]
        for v in variants:
            if v != "baseline":
                r = out["variants"][v]
                r["speedup_vs_baseline"] = round(r["windows_per_s"] / base["windows_per_s"], 3)
                r["cpu_speedup_vs_baseline"] = round(r["windows_per_cpu_s"] / base["windows_per_cpu_s"], 3)
    if "baseline_plain" in times:  # the seed's step on a plain-PyTorch model: the end-to-end gain
        plain = out["variants"]["baseline_plain"]
        for v in variants:
            if v != "baseline_plain":
                r = out["variants"][v]
                r["speedup_vs_plain_baseline"] = round(r["windows_per_s"] / plain["windows_per_s"], 3)
    del fns
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
def parse_channels(text: str) -> list[int]:
    try:
        chans = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not chans or any(c < 1 for c in chans):
        raise argparse.ArgumentTypeError(f"expected positive channel counts, got {text!r}")
    return chans


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here (atomically)")
    ap.add_argument("--quick", action="store_true", help="short run: 1 timed step, batch 4 only, no profile")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; with other processes on the machine, --threads 1 and the "
                         "windows/cpu-s figures are the stable comparison")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--no-cpu-model", action="store_true", help="only the paper-size model")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per variant (after 1 warm-up)")
    ap.add_argument("--window", type=int, default=16384)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16], help="paper-model batch sizes")
    ap.add_argument("--cpu-channels", type=parse_channels, default=HALF_CHANNELS,
                    help="channels of the CPU model (default: half the paper's width)")
    ap.add_argument("--cpu-batch", type=int, default=16)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--optimizer", choices=["fused", "foreach", "default"], default="fused",
                    help="Adam kernel (fused is ~4x faster than the per-tensor default on CPU)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    iters = 1 if args.quick else args.iters
    batches = [min(args.batches)] if args.quick else args.batches
    started = time.perf_counter()
    result: dict = {
        "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled, "loadavg_start": os.getloadavg(), "quick": args.quick,
        "cpu_model_channels": args.cpu_channels, "optimizer": f"Adam ({args.optimizer})",
        "matmul_conv_max_len": MATMUL_CONV_MAX_LEN, "matmul_deconv_max_len": MATMUL_DECONV_MAX_LEN,
        "configs": []}

    result["matmul"] = {f"fp32_{args.matmul_n}": round(matmul_gflops(args.matmul_n, torch.float32, 5), 1),
                        f"bf16_{args.matmul_n}": round(matmul_gflops(args.matmul_n, torch.bfloat16, 5), 1)}
    log(f"matmul GFLOP/s: {result['matmul']}")

    paper = ModelConfig()
    small = ModelConfig(g_channels=list(args.cpu_channels), d_channels=list(args.cpu_channels))
    plan = [("paper", paper, b) for b in batches] + ([] if args.no_cpu_model else [("cpu", small, args.cpu_batch)])
    for name, cfg, batch in plan:
        for precision in args.precisions:
            variants = ["optimized", "baseline"] + (["baseline_plain"] if name == "paper" else [])
            if name == "paper" and batch == min(batches) and precision == "fp32" and not args.quick:
                variants.append("optimized_nocache")  # how much the reference-moment reuse gives
            log(f"{name} batch {batch} {precision}: {', '.join(variants)} ...")
            res = bench_config(name, cfg, batch, batch, args.window, precision, variants, iters, args.optimizer)
            for v, r in res["variants"].items():
                log(f"  {v:18s} {r['windows_per_s']:7.2f} windows/s  {r['gflops']:6.1f} GFLOP/s  "
                    f"{r['windows_per_cpu_s']:6.2f} windows/cpu-s"
                    + (f"  x{r['speedup_vs_baseline']:.2f} (cpu x{r['cpu_speedup_vs_baseline']:.2f}) vs baseline"
                       if "speedup_vs_baseline" in r else "")
                    + (f"  x{r['speedup_vs_plain_baseline']:.2f} vs plain baseline"
                       if "speedup_vs_plain_baseline" in r else ""))
            for v, r in res["variants"].items():
                peak = result["matmul"][f"{precision}_{args.matmul_n}"]
                r["fraction_of_matmul"] = round(r["gflops"] / peak, 3)
            result["configs"].append(res)
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
