#!/usr/bin/env python
"""Benchmark the prepare stage: hours of audio prepared per minute, 1 worker vs N.

Builds a synthetic raw corpus in the VoiceBank-DEMAND layout (harmonic "voiced" tones
with a syllable-rate envelope plus noise, written as 48 kHz 16-bit wav like the real
corpus) in a temp dir, then times ``prepare_corpus`` once per worker count, baseline
(1 worker) measured in the same run. Timings include the process pool's start-up,
which is part of what a user waits for. Outputs of all worker counts are checked to be
byte-identical, so the speed-up is for the same work.

    python bench/prepare.py --json reports/bench/prepare.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from segan.config import PrepareConfig
from segan.data import layout
from segan.data.prepare import prepare_corpus
from segan.fsutil import write_json

NOISES = ("babble", "cafe", "street", "bus", "living", "office")


def build_corpus(root: Path, minutes: float, rate: int, seed: int, test_fraction: float) -> dict:
    """Write ~``minutes`` of paired audio (2-4 s utterances); return corpus statistics."""
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * rate)
    written, entries = 0, {"train": [], "test": []}
    i = 0
    while written < total:
        n = int(rng.uniform(2.0, 4.0) * rate)
        t = np.arange(n) / rate
        f0 = rng.uniform(90, 250)
        voiced = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
        envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t))  # ~syllable rate
        clean = 0.2 * envelope * voiced + 0.005 * rng.standard_normal(n)
        snr = float(rng.choice([0.0, 5.0, 10.0, 15.0]))
        noise = rng.standard_normal(n)
        noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (snr / 10))
        noisy = clean + noise
        peak = max(np.abs(noisy).max(), np.abs(clean).max())
        if peak > 0.99:
            clean, noisy = clean * 0.99 / peak, noisy * 0.99 / peak
        split = "test" if rng.random() < test_fraction else "train"
        utt = f"p{i // 100:03d}_{i % 100:03d}"
        for d, x in ((layout.clean_dir(root, split), clean), (layout.noisy_dir(root, split), noisy)):
            d.mkdir(parents=True, exist_ok=True)
            sf.write(str(d / f"{utt}.wav"), x.astype(np.float32), rate, subtype="PCM_16")
        entries[split].append(layout.LogEntry(utt, str(rng.choice(NOISES)), snr))
        written += n
        i += 1
    for split in layout.SPLITS:
        if not entries[split]:
            raise SystemExit(f"corpus too small: no {split} utterance; raise --minutes or --test-fraction")
        layout.log_path(root, split).write_text(layout.format_log(entries[split]))
    layout.manifest_path(root).write_text(json.dumps({"source": "bench-synthetic", "seed": seed}))
    return {"utterances": i, "train_utterances": len(entries["train"]), "test_utterances": len(entries["test"]),
            "minutes": written / rate / 60, "source_rate": rate}


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=12.0, help="audio to generate (default 12)")
    ap.add_argument("--rate", type=int, default=48000, help="source sample rate (default 48000)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=1, help="runs per worker count; the median is reported")
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]

    params = PrepareConfig()  # the defaults of params.yaml: 16 kHz, 16384 / 8192
    load_before = os.getloadavg()  # other work on the machine skews a parallel speed-up
    with tempfile.TemporaryDirectory(prefix="segan-bench-prepare-") as tmp:
        t0 = time.perf_counter()
        corpus = build_corpus(Path(tmp) / "raw", args.minutes, args.rate, args.seed, args.test_fraction)
        corpus["build_seconds"] = time.perf_counter() - t0
        results, digests = [], {}
        for w in workers:
            cfg = PrepareConfig(sample_rate=params.sample_rate, window=params.window, hop=params.hop, workers=w)
            times = []
            for r in range(args.repeats):
                out = Path(tmp) / f"out_w{w}_{r}"
                t0 = time.perf_counter()
                summary = prepare_corpus(Path(tmp) / "raw", out, cfg, progress=False)
                times.append(time.perf_counter() - t0)
                digests.setdefault(w, tree_digest(out))
            secs = statistics.median(times)
            hours = summary["hours"]["train"] + summary["hours"]["test"]
            results.append({"workers": w, "seconds": secs, "all_seconds": times, "audio_hours": hours,
                            "hours_per_minute": hours / (secs / 60), "realtime_factor": hours * 3600 / secs,
                            "train_windows": summary["counts"]["train_windows"]})
    base = results[0]["seconds"]
    for r in results:
        r["speedup_vs_baseline"] = base / r["seconds"]
    identical = len(set(digests.values())) == 1

    print(f"corpus: {corpus['utterances']} utterances, {corpus['minutes']:.1f} min at {args.rate} Hz "
          f"(built in {corpus['build_seconds']:.1f} s); prepare -> {params.sample_rate} Hz, "
          f"window {params.window}, hop {params.hop}; cpus available: {len(os.sched_getaffinity(0))}")
    print(f"{'workers':>7} {'seconds':>8} {'h audio/min':>11} {'x realtime':>10} {'speedup':>7}")
    for r in results:
        print(f"{r['workers']:>7} {r['seconds']:>8.2f} {r['hours_per_minute']:>11.2f} "
              f"{r['realtime_factor']:>10.0f} {r['speedup_vs_baseline']:>7.2f}")
    print(f"outputs identical across worker counts: {identical}; load average before/after: "
          f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")

    report = {
        "benchmark": "prepare",
        "corpus": corpus,
        "config": {"sample_rate": params.sample_rate, "window": params.window, "hop": params.hop,
                   "repeats": args.repeats, "seed": args.seed},
        "results": results,
        "speedup": {f"{r['workers']}_vs_{workers[0]}": r["speedup_vs_baseline"] for r in results[1:]},
        "outputs_identical": identical,
        "machine": {"cpus_available": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "soxr": soxr.__version__,
                   "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
    }
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
