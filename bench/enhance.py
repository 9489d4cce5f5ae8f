"""Benchmark `segan enhance`: real-time factor and memory.

1. Real-time factor (RTF = processing seconds / audio seconds, lower is faster) with
   ``torch.set_num_threads(THREADS)`` for the paper-size generator (``ModelConfig()``
   defaults; random weights, timing does not depend on them) and a small one
   (``--small-channels``): eager PyTorch, the exported TorchScript and ONNX Runtime, each
   through ``segan.enhance.enhance_signal`` (batched windows, 50% overlap, cross-fade). The
   baseline, measured in the same run on the same audio: a plain loop over non-overlapping
   windows, one window per call, eager PyTorch (how the original SEGAN code enhances).
   Both models are exported with ``segan.export.export_generator`` (which verifies
   TorchScript and ONNX against eager PyTorch); export time and max abs diffs are reported.
2. Peak memory (RSS, in a fresh child process) enhancing a long 16 kHz file with
   ``segan.enhance.enhance_files``: "beyond model" is the peak RSS during enhancement minus
   the RSS after loading the model and one batch-16 warm-up forward (the model's own working
   memory at that batch size). The streaming pipeline (read, resample, window, cross-fade,
   write) is measured on 1 hour with an identity runner (the model's cost per window does
   not change what the pipeline holds, and a real model would take many minutes here) and 5
   minutes; a tiny real generator (``--memory-channels``) is run on the 5-minute file.
   ``--quick``: 1 and 5 minutes, the 1-hour value EXTRAPOLATED (and labelled so) from the
   growth between the two.

Usage: python bench/enhance.py [--quick] [--json OUT] [--threads 2] [--seconds S]
                               [--small-channels 16,32,32,64,64,128,128,256]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the speech-like test signal lives there

from speechlike import add_white_noise, speech_like  # noqa: E402

RATE = 16000
WINDOW = 16384
PAPER_TARGET_RTF = 0.05
SMALL_DEFAULT = "16,32,32,64,64,128,128,256"
MEMORY_DEFAULT = "4,4,8,8,16,16,32,32"


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (least disturbed by other load) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def plain_loop(enhancer, x: np.ndarray, z_channels: int, depth: int) -> np.ndarray:
    """Baseline: non-overlapping windows, batch 1, eager, zero-padded last window."""
    import torch

    n = -(-len(x) // WINDOW)
    padded = np.zeros(n * WINDOW, np.float32)
    padded[:len(x)] = x
    rng = np.random.default_rng(0)
    out = []
    with torch.inference_mode():
        for i in range(n):
            w = torch.from_numpy(padded[i * WINDOW:(i + 1) * WINDOW]).view(1, 1, WINDOW)
            z = torch.from_numpy(rng.standard_normal((1, z_channels, WINDOW // 2 ** depth), dtype=np.float32))
            out.append(enhancer(w, z).view(-1).numpy())
    return np.concatenate(out)[:len(x)]


def bench_model(name: str, channels: list[int], audio: np.ndarray, tmp: Path, batch_size: int,
                repeats: int) -> dict:
    import torch

    from segan.config import ModelConfig, params_from_dict
    from segan.enhance import enhance_signal
    from segan.export import export_generator
    from segan.loading import ModelMeta, TorchRunner, load_enhancer
    from segan.model import Enhancer, Generator, count_parameters, init_weights, save_generator

    cfg = ModelConfig(g_channels=channels, d_channels=channels)
    torch.manual_seed(0)
    generator = Generator(cfg)
    init_weights(generator)
    generator.eval()
    folder = tmp / name
    gen_path = folder / "generator.pt"
    save_generator(gen_path, generator, cfg, {"sample_rate": RATE, "window": WINDOW, "preemphasis": 0.95,
                                              "mlflow_run_id": None})
    params = params_from_dict({"model": {"g_channels": channels, "d_channels": channels},
                               "prepare": {"window": WINDOW, "hop": WINDOW // 2}})
    print(f"[{name}] exporting ({count_parameters(generator) / 1e6:.1f} M parameters) ...", flush=True)
    export_s, card = timed(lambda: export_generator(gen_path, folder / "exported", params, prepared_dir=None,
                                                     tracking=False))
    seconds = len(audio) / RATE
    enhancer = Enhancer(generator, 0.95).eval()
    meta = ModelMeta(RATE, WINDOW, generator.z_channels, generator.depth, 0.95)
    runners = {"eager": TorchRunner(enhancer, meta, "eager"),
               "torchscript": load_enhancer(folder / "exported" / "generator.ts"),
               "onnxruntime": load_enhancer(folder / "exported" / "generator.onnx")}
    result: dict = {"channels": channels, "parameters": count_parameters(generator), "audio_seconds": seconds,
                    "export_seconds": round(export_s, 1), "export_max_abs_diff": card["export"]["max_abs_diff"],
                    "onnx_exporter": card["export"]["onnx_exporter"], "rtf": {}}
    warm = audio[:2 * WINDOW]
    plain_loop(enhancer, warm, meta.z_channels, meta.depth)
    t, _ = timed(lambda: plain_loop(enhancer, audio, meta.z_channels, meta.depth), repeats)
    result["rtf"]["baseline_plain_loop_eager_batch1_no_overlap"] = round(t / seconds, 4)
    print(f"[{name}] baseline plain loop: RTF {t / seconds:.4f} (load {load_avg()})", flush=True)
    for label, runner in runners.items():
        enhance_signal(warm, RATE, runner, batch_size=batch_size)  # warm-up (allocations, ORT init)
        for overlap in (0.5, 0.0):
            t, _ = timed(lambda: enhance_signal(audio, RATE, runner, overlap=overlap, batch_size=batch_size),
                         repeats)
            key = f"{label}_batch{batch_size}_overlap{overlap:g}"
            result["rtf"][key] = round(t / seconds, 4)
            print(f"[{name}] {key}: RTF {t / seconds:.4f} (load {load_avg()})", flush=True)
    base = result["rtf"]["baseline_plain_loop_eager_batch1_no_overlap"]
    best_key = min((k for k in result["rtf"] if k.endswith("overlap0.5")), key=result["rtf"].get)
    result["best_default_overlap"] = {"config": best_key, "rtf": result["rtf"][best_key],
                                      "speedup_vs_baseline": round(base / result["rtf"][best_key], 2)}
    return result


# ----------------------------------------------------------------------------- memory
def memory_model(channels: list[int], tmp: Path) -> Path:
    """A generator checkpoint (random weights) for the memory run."""
    import torch

    from segan.config import ModelConfig
    from segan.model import Generator, init_weights, save_generator

    cfg = ModelConfig(g_channels=channels, d_channels=channels)
    torch.manual_seed(0)
    generator = Generator(cfg)
    init_weights(generator)
    path = tmp / "memory" / "generator.pt"
    save_generator(path, generator, cfg, {"sample_rate": RATE, "window": WINDOW, "preemphasis": 0.95,
                                          "mlflow_run_id": None})
    return path


def write_long_file(path: Path, minutes: float) -> None:
    """A long 16 kHz PCM_16 file: one minute of noisy speech-like audio, repeated with fresh noise."""
    import soundfile as sf

    block = speech_like(60.0, RATE, seed=0)
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", samplerate=RATE, channels=1, subtype="PCM_16") as f:
        left = int(minutes * 60 * RATE)
        while left > 0:
            n = min(left, len(block))
            f.write(np.clip(block[:n] + 0.02 * rng.standard_normal(n), -1, 1).astype(np.float32))
            left -= n


MEMORY_CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import numpy as np, psutil, torch
torch.set_num_threads(int(sys.argv[4]))
from segan.enhance import IdentityRunner, enhance_files
from segan.loading import load_enhancer

def hwm():  # this process image's peak RSS (VmHWM), bytes; None off Linux
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None

runner = IdentityRunner(16000, 16384) if sys.argv[1] == "identity" else load_enhancer(sys.argv[1])
runner(np.zeros((16, 1, runner.window), np.float32), np.zeros(runner.z_shape(16, runner.window), np.float32))
proc = psutil.Process()
before = proc.memory_info().rss
try:  # Linux >= 4.0: reset the high-water mark to the current RSS, so VmHWM covers enhancement only
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
polled = [before]
done = threading.Event()
def poll():
    while not done.wait(0.05):
        polled.append(proc.memory_info().rss)
threading.Thread(target=poll, daemon=True).start()
start = time.perf_counter()
summary = enhance_files([Path(sys.argv[2])], Path(sys.argv[3]), runner, batch_size=16, progress=False)
elapsed = time.perf_counter() - start
done.set()
print(json.dumps({"ok": summary.ok, "audio_seconds": summary.audio_seconds, "seconds": elapsed,
                  "rss_after_model_bytes": before, "polled_peak_bytes": max(polled),
                  "hwm_bytes": hwm() if reset else None}))
"""


def measure_memory(model: str, minutes: float, tmp: Path, threads: int, label: str = "") -> dict:
    """Enhance a ``minutes``-long file in a fresh process with ``model`` (a spec or "identity")."""
    src = tmp / f"long_{minutes:g}min.wav"
    if not src.exists():
        write_long_file(src, minutes)
    out = tmp / f"out_{minutes:g}_{Path(model).parent.name or model}"
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, model, str(src), str(out), str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    # peak RSS while enhancing: the kernel's high-water mark (reset after the model was loaded
    # and run once at batch 16) when available, else a 50 ms RSS poll
    peak = max(r["hwm_bytes"] or 0, r["polled_peak_bytes"])
    res = {"model": label or ("identity runner (pipeline only)" if model == "identity" else model),
           "minutes": minutes,
           "file_mib": round(src.stat().st_size / mib, 1), "ok": r["ok"],
           "rtf": round(r["seconds"] / r["audio_seconds"], 4),
           "rss_after_model_mib": round(r["rss_after_model_bytes"] / mib, 1),
           "peak_rss_mib": round(peak / mib, 1), "peak_source": "VmHWM" if r["hwm_bytes"] else "poll",
           "peak_beyond_model_mib": round(max(peak - r["rss_after_model_bytes"], 0) / mib, 1)}
    shutil.rmtree(out, ignore_errors=True)
    print(f"[memory] {res['model']}, {minutes:g} min: peak RSS {res['peak_rss_mib']} MiB, beyond model "
          f"{res['peak_beyond_model_mib']} MiB, RTF {res['rtf']}", flush=True)
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter audio, 5-minute memory file")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (default 2)")
    parser.add_argument("--seconds", type=float, default=None, help="audio length for RTF (default 20, quick 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--small-channels", default=SMALL_DEFAULT,
                        help=f"encoder channels of the small model (default {SMALL_DEFAULT})")
    parser.add_argument("--memory-channels", default=MEMORY_DEFAULT,
                        help=f"encoder channels of the model used for the memory run (default {MEMORY_DEFAULT})")
    parser.add_argument("--skip-paper", action="store_true", help="only the small model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from segan.config import PAPER_CHANNELS

    torch.set_num_threads(args.threads)
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    audio = add_white_noise(speech_like(seconds, RATE, seed=0), 5.0).astype(np.float32)
    audio = np.clip(audio, -1, 1)
    small = [int(c) for c in args.small_channels.split(",")]
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": args.threads,
                                "torch": torch.__version__, "load_avg_start": load_avg()},
                    "settings": {"window": WINDOW, "rate": RATE, "batch_size": args.batch_size, "quick": args.quick},
                    "models": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segan-bench-") as tmp_s:
        tmp = Path(tmp_s)
        repeats = 1 if args.quick else 2
        report["models"]["small"] = bench_model("small", small, audio, tmp, args.batch_size, repeats)
        if not args.skip_paper:
            report["models"]["paper"] = bench_model("paper", list(PAPER_CHANNELS), audio, tmp, args.batch_size,
                                                    repeats)
            best = report["models"]["paper"]["best_default_overlap"]
            report["paper_target"] = {"rtf_target": PAPER_TARGET_RTF, "best_rtf": best["rtf"],
                                      "config": best["config"], "met": best["rtf"] <= PAPER_TARGET_RTF}
        model = str(memory_model([int(c) for c in args.memory_channels.split(",")], tmp))
        short_min, long_min = (1.0, 5.0) if args.quick else (5.0, 60.0)
        short = measure_memory("identity", short_min, tmp, args.threads)
        long = measure_memory("identity", long_min, tmp, args.threads)
        with_model = measure_memory(model, short_min, tmp, args.threads,
                                    f"tiny generator [{args.memory_channels}] (eager, from .pt)")
        report["memory"] = {"measured": [short, long, with_model],
                            "model_channels": args.memory_channels}
        if args.quick:
            growth = (long["peak_beyond_model_mib"] - short["peak_beyond_model_mib"]) / (long_min - short_min)
            report["memory"]["extrapolated_1h_peak_beyond_model_mib"] = round(
                long["peak_beyond_model_mib"] + max(growth, 0.0) * (60 - long_min), 1)
            report["memory"]["note"] = (
                "EXTRAPOLATED (quick mode): the 1-hour value is the 5-minute value plus 55 x the per-minute "
                "growth between the 1- and 5-minute runs (growth clipped at 0); not measured")
        else:
            report["memory"]["peak_beyond_model_mib_1h"] = long["peak_beyond_model_mib"]
        report["machine"]["load_avg_end"] = load_avg()
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        from segan.fsutil import write_json

        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
