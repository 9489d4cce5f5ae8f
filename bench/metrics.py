"""Benchmark the metric suite.

1. The vectorized WSS + LLR + segSNR of ``segan.metrics`` against the plain
   frame-by-frame reference port (``tests/reference_composite.py``) on the same audio:
   seconds each, speed ratio, and the largest difference of the three aggregates.
2. The whole suite (``segan.metrics.score``: PESQ, STOI, ESTOI, composite, segSNR) as
   seconds of audio scored per second of wall-clock time.

Usage: python bench/metrics.py [--seconds 10] [--repeats 3] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference port and the test signal live there

import reference_composite as ref  # noqa: E402
from speechlike import add_white_noise, speech_like  # noqa: E402

from segan import metrics  # noqa: E402
from segan.fsutil import write_json  # noqa: E402

RATE = 16000


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (the least disturbed by other load) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(seconds: float, repeats: int) -> dict:
    clean = speech_like(seconds, RATE, seed=0)
    noisy = add_white_noise(clean, 5.0, seed=1)
    # peak 1.0 makes segan's scale normalization the identity, so both compute the same thing
    peak = np.max(np.abs(clean))
    c, d = clean / peak, noisy / peak

    t_fast, fast = best_time(lambda: metrics.composite_measures(c, d, RATE), repeats)
    t_ref, slow = best_time(lambda: ref.composite_measures(c, d, RATE), max(1, repeats // 2))
    t_suite, scores = best_time(lambda: metrics.score(clean, noisy, RATE), repeats)
    return {
        "audio_seconds": seconds,
        "frames": metrics.framing(len(clean), RATE).count,
        "composite_vectorized_s": t_fast,
        "composite_reference_s": t_ref,
        "composite_speedup": t_ref / t_fast,
        "composite_max_abs_diff": max(abs(fast[k] - slow[k]) for k in ("wss", "llr", "ssnr")),
        "suite_s": t_suite,
        "suite_audio_seconds_per_second": seconds / t_suite,
        "scores": scores,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the test audio (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the fastest counts (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s of audio, one repeat")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 3.0, 1
    if args.seconds < 1.0 or args.repeats < 1:
        parser.error("--seconds must be >= 1 and --repeats >= 1")

    result = run(args.seconds, args.repeats)
    print(f"{args.seconds:g} s of audio, {result['frames']} composite frames")
    print(f"WSS+LLR+segSNR  vectorized {result['composite_vectorized_s'] * 1000:8.1f} ms   "
          f"reference {result['composite_reference_s'] * 1000:8.1f} ms   "
          f"speed-up x{result['composite_speedup']:.1f}   max |diff| {result['composite_max_abs_diff']:.1e}")
    print(f"full suite (score)  {result['suite_s']:.3f} s  = "
          f"{result['suite_audio_seconds_per_second']:.1f} s of audio per second")
    if args.json:
        write_json(args.json, {**result, "scores": {k: None if isinstance(v, float) and np.isnan(v) else v
                                                     for k, v in result["scores"].items()}})
    return result


if __name__ == "__main__":
    main()
