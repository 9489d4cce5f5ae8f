"""The ``prepare`` stage: a raw corpus in the VoiceBank-DEMAND layout -> training windows
and whole test utterances at one sample rate.

Output folder (``data/prepared``)::

    manifest.json            sample rate, window, hop, counts, hours, skipped pairs, source
    train_clean.npy          1-D float32: every training utterance once, concatenated
    train_noisy.npy          1-D float32: the same, noisy side (sample-aligned with clean)
    train_windows.npy        1-D int64: start offset of each window into the two arrays above
    train_utterances.csv     utterance, offset, length, noise, snr, n_windows
    test_manifest.csv        utterance, noise, snr, seconds, clean_path, noisy_path
    test/clean/<utt>.wav     whole test utterances, mono float32 wav
    test/noisy/<utt>.wav

Each training utterance occupies ``max(length, window)`` samples of the concatenation
(zero-padded when shorter than a window), starting at its ``offset``. Its windows start at
0, hop, 2*hop, ... relative to that offset, plus one window aligned to the segment's end
when the regular ones stop short of it. Overlapping windows therefore share storage: the
arrays are memory-mapped by :class:`segan.data.dataset.WindowDataset` and never copied.

Pre-emphasis is not applied here; it belongs to the model.

Pairs that cannot be used (missing partner, unreadable, empty, NaN/Inf, silent, lengths
that disagree) are skipped with the reason logged and listed in ``manifest.json``; a split
with no usable pair at all is an error.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from scipy.io import wavfile
from tqdm import tqdm

from ..audio import AUDIO_EXTENSIONS, AudioError, read_audio, resample, to_mono
from ..config import ConfigError, PrepareConfig
from ..fsutil import atomic_dir
from . import layout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAIN_CLEAN = "train_clean.npy"
TRAIN_NOISY = "train_noisy.npy"
TRAIN_WINDOWS = "train_windows.npy"
TRAIN_UTTERANCES = "train_utterances.csv"
TEST_MANIFEST = "test_manifest.csv"
TEST_DIR = "test"

TRAIN_COLUMNS = ("utterance", "offset", "length", "noise", "snr", "n_windows")
TEST_COLUMNS = ("utterance", "noise", "snr", "seconds", "clean_path", "noisy_path")

#: Clean (and noisy) RMS at or below this is treated as a silent, unusable file.
SILENCE_DBFS = -60.0
#: Resampling may round the two sides of a pair differently by a sample or two; such
#: pairs are trimmed to the shorter side. A larger difference means the files don't match.
LENGTH_TOLERANCE = 2
#: Noise label for utterances the log does not mention.
UNKNOWN_NOISE = "unknown"


class PrepareError(ValueError):
    """The raw corpus (or the settings) cannot produce a prepared corpus."""


@dataclass(frozen=True)
class PairTask:
    """One clean/noisy pair to load; either path is ``None`` when that file is missing."""

    split: str
    utterance: str
    clean_path: Path | None
    noisy_path: Path | None
    sample_rate: int
    #: where test utterances are written (``<out>/test``); ``None`` for training pairs
    test_dir: Path | None = None
    #: a problem found while listing the files; the pair is skipped with this reason
    problem: str | None = None


@dataclass
class PairResult:
    """The outcome of :func:`process_pair`: audio (training pairs only) or a skip reason."""

    utterance: str
    length: int = 0
    reason: str | None = None
    clean: np.ndarray | None = field(default=None, repr=False)
    noisy: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.reason is None


# ----------------------------------------------------------------------------- windows
def window_starts(length: int, window: int, hop: int) -> np.ndarray:
    """Window start offsets within one utterance of ``length`` samples (int64).

    The utterance is zero-padded to ``max(length, window)``; windows start at 0, hop,
    2*hop, ... while they fit, and one more window ending exactly at the padded end is
    added when the regular ones do not reach it.
    """
    if window < 1 or hop < 1:
        raise ValueError(f"window and hop must be positive, got window={window}, hop={hop}")
    padded = max(int(length), window)
    starts = np.arange(0, padded - window + 1, hop, dtype=np.int64)
    if starts[-1] + window < padded:
        starts = np.append(starts, np.int64(padded - window))
    return starts


# ----------------------------------------------------------------------------- per pair
def _rms_dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return -np.inf if rms <= 0 else 20.0 * np.log10(rms)


def _load(path: Path, rate: int) -> np.ndarray:
    data, sr = read_audio(path)
    return resample(to_mono(data), sr, rate)


def load_pair(task: PairTask) -> tuple[np.ndarray, np.ndarray]:
    """Load, mix down, resample and validate one pair; raise :class:`AudioError` if unusable.

    Returns the clean and noisy signals trimmed to a common length.
    """
    if task.problem is not None:
        raise AudioError(task.problem)
    if task.clean_path is None:
        raise AudioError(f"{task.noisy_path}: no clean file with the same name")
    if task.noisy_path is None:
        raise AudioError(f"{task.clean_path}: no noisy file with the same name")
    clean = _load(task.clean_path, task.sample_rate)
    noisy = _load(task.noisy_path, task.sample_rate)
    if abs(len(clean) - len(noisy)) > LENGTH_TOLERANCE:
        raise AudioError(
            f"{task.clean_path} has {len(clean)} samples but {task.noisy_path} has {len(noisy)} "
            f"at {task.sample_rate} Hz (expected equal lengths, within {LENGTH_TOLERANCE} samples)")
    n = min(len(clean), len(noisy))
    clean, noisy = clean[:n], noisy[:n]
    if n == 0:  # a file of a few samples can resample to nothing
        raise AudioError(f"{task.clean_path}: empty after resampling to {task.sample_rate} Hz")
    for path, x in ((task.clean_path, clean), (task.noisy_path, noisy)):
        if not np.all(np.isfinite(x)):
            raise AudioError(f"{path}: NaN or Inf samples after resampling")
        level = _rms_dbfs(x)
        if level <= SILENCE_DBFS:
            raise AudioError(f"{path}: silent (RMS {level:.1f} dBFS, expected above {SILENCE_DBFS:g} dBFS)")
    return clean, noisy


def process_pair(task: PairTask) -> PairResult:
    """Worker entry point: load one pair; test pairs are written whole under ``task.test_dir``.

    Problems with the *input* become a skip reason; problems writing the output (disk
    full, permissions) are not the input's fault and propagate.
    """
    try:
        clean, noisy = load_pair(task)
    except (AudioError, OSError, ValueError, RuntimeError) as exc:
        return PairResult(task.utterance, reason=str(exc) if isinstance(exc, AudioError)
                          else f"{type(exc).__name__}: {exc}")
    if task.test_dir is None:
        return PairResult(task.utterance, length=len(clean), clean=clean, noisy=noisy)
    for side, x in (("clean", clean), ("noisy", noisy)):
        write_float_wav(task.test_dir / side / f"{task.utterance}.wav", x, task.sample_rate)
    return PairResult(task.utterance, length=len(clean))


def write_float_wav(path: Path, x: np.ndarray, rate: int) -> None:
    """Write mono float32 wav, byte-for-byte reproducible.

    float32 keeps the reference the evaluation scores against free of requantisation;
    scipy's writer is used because libsndfile stamps float wavs with the write time (PEAK
    chunk), which would change the stage's output hash on every run. No temp file: the
    whole output folder is already built in a temp dir and swapped in atomically.
    """
    wavfile.write(path, rate, np.ascontiguousarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------- discovery
def _audio_files(folder: Path) -> dict[str, list[Path]]:
    """Audio files of ``folder`` by stem (hidden and non-audio files ignored)."""
    out: dict[str, list[Path]] = collections.defaultdict(list)
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS:
            out[p.stem].append(p)
    return out


def discover_pairs(raw_dir: Path, split: str, sample_rate: int,
                   test_dir: Path | None = None) -> list[PairTask]:
    """One task per utterance name found on either side of ``split``, sorted by name."""
    cdir, ndir = layout.clean_dir(raw_dir, split), layout.noisy_dir(raw_dir, split)
    for d in (cdir, ndir):
        if not d.is_dir():
            raise PrepareError(f"{d}: folder not found (expected the VoiceBank-DEMAND layout "
                               f"of segan.data.layout under {raw_dir})")
    clean, noisy = _audio_files(cdir), _audio_files(ndir)
    tasks = []
    for utt in sorted(set(clean) | set(noisy)):
        c, n = clean.get(utt, []), noisy.get(utt, [])
        problem = None
        if len(c) > 1 or len(n) > 1:  # a.wav and a.flac: which one is meant is a guess
            names = ", ".join(str(p) for p in (*c, *n))
            problem = f"several audio files share the name {utt!r} ({names}); expected one per side"
        tasks.append(PairTask(split, utt, c[0] if c else None, n[0] if n else None, sample_rate, test_dir,
                              problem))
    if not tasks:
        raise PrepareError(f"no {split} audio found in {cdir} and {ndir}")
    return tasks


def _read_log(raw_dir: Path, split: str) -> dict[str, layout.LogEntry]:
    path = layout.log_path(raw_dir, split)
    try:
        entries = layout.read_log(path)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    if not entries:
        log.warning("%s: missing or empty; %s noise labels and SNRs are unknown", path, split)
    return entries


def _source_info(raw_dir: Path) -> dict[str, Any]:
    path = layout.manifest_path(raw_dir)
    if not path.exists():
        log.warning("%s: not found; the prepared manifest records no source", path)
        return {"source": None, "source_manifest_sha256": None}
    data = path.read_bytes()
    source = None
    try:
        source = json.loads(data).get("source")
    except (ValueError, AttributeError):
        log.warning("%s: not a JSON object; recording only its hash", path)
    return {"source": source, "source_manifest_sha256": hashlib.sha256(data).hexdigest()}


# ----------------------------------------------------------------------------- parallel map
T = TypeVar("T")
R = TypeVar("R")


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], executor: Executor | None,
                 in_flight: int) -> Iterator[R]:
    """``map(fn, items)`` on ``executor`` in input order, at most ``in_flight`` pending.

    Bounding the queue keeps memory flat on a big corpus: results (audio arrays) are
    consumed as they arrive instead of piling up behind a slow head-of-line item.
    """
    if executor is None:
        yield from map(fn, items)
        return
    it = iter(items)
    pending: collections.deque[Future[R]] = collections.deque(
        executor.submit(fn, x) for _, x in zip(range(in_flight), it))
    try:
        while pending:
            result = pending.popleft().result()
            for x in it:
                pending.append(executor.submit(fn, x))
                break
            yield result
    finally:
        for fut in pending:
            fut.cancel()


def _executor(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 1:
        return None  # in-process: no start-up cost, plain tracebacks
    # forkserver: fork-safety even when the caller has threads (torch, MLflow) running.
    # Preloading this module in the server lets each worker fork with numpy, soxr and
    # soundfile already imported instead of paying ~0.3 s of imports per worker.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:  # pragma: no cover - not on Linux/macOS
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI, dvc logs)
    return tqdm(total=total, desc=desc, unit="utt", disable=None if enabled else True)


# ----------------------------------------------------------------------------- writers
class NpyAppender:
    """Stream a 1-D array to a ``.npy`` file without holding it in memory.

    The header is written first with length 0 and rewritten on close; numpy pads the
    header so a 1-D shape can grow in place (``GROWTH_AXIS_MAX_DIGITS``), which is checked.
    """

    def __init__(self, path: Path, dtype: str = "<f4") -> None:
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), 0
        self._fh: BinaryIO = open(self.path, "wb")
        self._header_len = self._write_header(0)

    def _write_header(self, n: int) -> int:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})
        self._fh.write(buf.getvalue())
        return len(buf.getvalue())

    def append(self, x: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(x, dtype=self.dtype).data)  # memoryview: no copy
        self.length += len(x)

    def close(self) -> None:
        self._fh.seek(0)
        if self._write_header(self.length) != self._header_len:  # pragma: no cover - numpy change
            raise RuntimeError(f"{self.path}: .npy header changed size; cannot finalise in place")
        self._fh.close()


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _snr_text(entry: layout.LogEntry | None) -> str:
    return "" if entry is None or entry.snr is None else repr(float(entry.snr))


# ----------------------------------------------------------------------------- splits
def _skip(skipped: list[dict[str, str]], split: str, res: PairResult) -> None:
    log.warning("skipping %s pair %s: %s", split, res.utterance, res.reason)
    skipped.append({"split": split, "utterance": res.utterance, "reason": str(res.reason)})


def _all_bad(split: str, skipped: list[dict[str, str]]) -> PrepareError:
    mine = [s for s in skipped if s["split"] == split]
    shown = "; ".join(f"{s['utterance']}: {s['reason']}" for s in mine[:5])
    more = f" (and {len(mine) - 5} more)" if len(mine) > 5 else ""
    return PrepareError(f"all {len(mine)} {split} pairs are unusable: {shown}{more}")


def _prepare_train(tasks: list[PairTask], logs: dict[str, layout.LogEntry], out: Path, cfg: PrepareConfig,
                   executor: Executor | None, skipped: list[dict[str, str]], progress: bool) -> dict[str, int]:
    clean_out, noisy_out = NpyAppender(out / TRAIN_CLEAN), NpyAppender(out / TRAIN_NOISY)
    windows: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    audio_samples = 0
    try:
        with _progress(len(tasks), "prepare train", progress) as bar:
            for res in _ordered_map(process_pair, tasks, executor, 4 * cfg.workers):
                bar.update()
                if not res.ok:
                    _skip(skipped, "train", res)
                    continue
                offset, pad = clean_out.length, max(0, cfg.window - res.length)
                for w, x in ((clean_out, res.clean), (noisy_out, res.noisy)):
                    w.append(x)
                    w.append(np.zeros(pad, np.float32))
                starts = window_starts(res.length, cfg.window, cfg.hop)
                windows.append(offset + starts)
                entry = logs.get(res.utterance)
                rows.append({"utterance": res.utterance, "offset": offset, "length": res.length,
                             "noise": entry.noise if entry else UNKNOWN_NOISE, "snr": _snr_text(entry),
                             "n_windows": len(starts)})
                audio_samples += res.length
    finally:
        clean_out.close()
        noisy_out.close()
    if not rows:
        raise _all_bad("train", skipped)
    starts_all = np.concatenate(windows).astype(np.int64)
    np.save(out / TRAIN_WINDOWS, starts_all)
    _write_csv(out / TRAIN_UTTERANCES, TRAIN_COLUMNS, rows)
    return {"utterances": len(rows), "windows": len(starts_all), "samples": audio_samples,
            "stored_samples": clean_out.length}


def _prepare_test(tasks: list[PairTask], logs: dict[str, layout.LogEntry], out: Path, cfg: PrepareConfig,
                  executor: Executor | None, skipped: list[dict[str, str]], progress: bool) -> dict[str, int]:
    for side in ("clean", "noisy"):
        (out / TEST_DIR / side).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    audio_samples = 0
    with _progress(len(tasks), "prepare test", progress) as bar:
        for res in _ordered_map(process_pair, tasks, executor, 4 * cfg.workers):
            bar.update()
            if not res.ok:
                _skip(skipped, "test", res)
                continue
            entry = logs.get(res.utterance)
            rows.append({"utterance": res.utterance, "noise": entry.noise if entry else UNKNOWN_NOISE,
                         "snr": _snr_text(entry), "seconds": f"{res.length / cfg.sample_rate:.6f}",
                         "clean_path": f"{TEST_DIR}/clean/{res.utterance}.wav",
                         "noisy_path": f"{TEST_DIR}/noisy/{res.utterance}.wav"})
            audio_samples += res.length
    if not rows:
        raise _all_bad("test", skipped)
    _write_csv(out / TEST_MANIFEST, TEST_COLUMNS, rows)
    return {"utterances": len(rows), "samples": audio_samples}


# ----------------------------------------------------------------------------- entry point
def _check_config(cfg: PrepareConfig) -> None:
    for name in ("sample_rate", "window", "hop", "workers"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"prepare.{name}: expected a positive integer, got {value!r}")
    cfg.check("prepare")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare_corpus(raw_dir: Path, out_dir: Path, cfg: PrepareConfig, progress: bool = True) -> dict:
    """Prepare ``raw_dir`` (VoiceBank-DEMAND layout) into ``out_dir``; return the manifest.

    ``out_dir`` is built in a temporary sibling and swapped in only when complete, so an
    interrupted or failed run leaves any previous output untouched and nothing partial.
    Raises :class:`PrepareError` when the layout is missing or a split has no usable pair.

    With ``cfg.workers > 1`` pairs are decoded in a process pool (forkserver), so a script
    calling this must guard its entry point with ``if __name__ == "__main__":``. Results
    are consumed in input order: the output is byte-identical for any number of workers.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_config(cfg)
    if not raw_dir.is_dir():
        raise PrepareError(f"{raw_dir}: raw corpus folder not found")
    source = _source_info(raw_dir)
    skipped: list[dict[str, str]] = []
    executor = _executor(cfg.workers)
    try:
        with atomic_dir(out_dir) as tmp:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is a normal folder
            # everything that can fail on the layout fails before any audio is decoded
            train_tasks = discover_pairs(raw_dir, "train", cfg.sample_rate)
            test_tasks = discover_pairs(raw_dir, "test", cfg.sample_rate, test_dir=tmp / TEST_DIR)
            train_log, test_log = _read_log(raw_dir, "train"), _read_log(raw_dir, "test")
            train = _prepare_train(train_tasks, train_log, tmp, cfg, executor, skipped, progress)
            test = _prepare_test(test_tasks, test_log, tmp, cfg, executor, skipped, progress)
            manifest = _manifest(cfg, train, test, skipped, source)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    log.info("prepared %s: train %.2f h in %d utterances (%d windows), test %.2f h in %d utterances; "
             "skipped %d pair(s)", out_dir, manifest["hours"]["train"], train["utterances"], train["windows"],
             manifest["hours"]["test"], test["utterances"], len(skipped))
    return manifest


def _manifest(cfg: PrepareConfig, train: dict[str, int], test: dict[str, int],
              skipped: list[dict[str, str]], source: dict[str, Any]) -> dict[str, Any]:
    def hours(samples: int) -> float:
        return round(samples / cfg.sample_rate / 3600, 6)

    return {
        "format_version": FORMAT_VERSION,
        "sample_rate": cfg.sample_rate,
        "window": cfg.window,
        "hop": cfg.hop,
        "counts": {
            "train_utterances": train["utterances"],
            "train_windows": train["windows"],
            "train_samples": train["samples"],
            "train_stored_samples": train["stored_samples"],
            "test_utterances": test["utterances"],
            "test_samples": test["samples"],
            "skipped": len(skipped),
        },
        "hours": {"train": hours(train["samples"]), "test": hours(test["samples"])},
        "skipped": skipped,
        "files": {"train_clean": TRAIN_CLEAN, "train_noisy": TRAIN_NOISY, "train_windows": TRAIN_WINDOWS,
                  "train_utterances": TRAIN_UTTERANCES, "test_manifest": TEST_MANIFEST},
        "preemphasis": "not applied (the model applies it)",
        **source,
    }


__all__ = [
    "FORMAT_VERSION", "LENGTH_TOLERANCE", "SILENCE_DBFS", "UNKNOWN_NOISE", "NpyAppender", "PairResult",
    "PairTask", "PrepareError", "discover_pairs", "load_pair", "prepare_corpus", "process_pair", "window_starts",
]
