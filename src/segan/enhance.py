"""Enhance audio of any length, rate and channel count with a windowed model.

The model sees fixed windows (``runner.window`` samples at ``runner.sample_rate``). A signal
is resampled to the model rate, cut into windows that overlap by ``overlap`` (default 50%),
each window of each channel is enhanced (batched), and the windows are joined by weighted
overlap-add with a squared-sine cross-fade, normalised by the summed weights: with an
identity model the output equals the input exactly, so joining adds no seam. The result is
resampled back, trimmed to the input length and written in the input's format.

Everything streams: audio is read and written in blocks, the resamplers are
``soxr.ResampleStream`` (the same VHQ quality as :func:`segan.audio.resample`) and only a
batch of windows is held at a time, so memory does not grow with file length.

The latent ``z`` for window ``k`` of channel ``c`` is the ``k``-th draw of
``numpy.random.default_rng([seed, c])``: the same file and seed give the same output,
whatever the batch size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import soundfile as sf
import soxr

from .audio import AUDIO_EXTENSIONS, AudioError
from .fsutil import atomic_path
from .loading import EnhancerRunner, ModelMeta

log = logging.getLogger(__name__)

BLOCK_FRAMES = 1 << 16        # frames read/written per block
RESAMPLE_QUALITY = "VHQ"       # as segan.audio.resample
_FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}


class EnhanceError(ValueError):
    """A request that cannot be carried out at all (e.g. outputs would overwrite inputs)."""


class IdentityRunner(EnhancerRunner):
    """A runner whose output equals its input: checks the windowing/cross-fade machinery
    (no seam, exact length) and measures pipeline overhead without a model."""

    def __init__(self, sample_rate: int = 16000, window: int = 1024, depth: int = 0) -> None:
        super().__init__(ModelMeta(sample_rate=sample_rate, window=window, z_channels=1, depth=depth),
                         "identity")

    def _run(self, noisy: np.ndarray, z: np.ndarray) -> np.ndarray:
        return noisy.copy()


# ----------------------------------------------------------------------------- windowing
def hop_for(window: int, overlap: float) -> int:
    """Samples between window starts for ``overlap`` in [0, 1)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap}")
    return max(1, int(round(window * (1.0 - overlap))))


def crossfade_weights(window: int) -> np.ndarray:
    """``sin^2(pi (n + 0.5) / N)``: smooth, strictly positive (so even a signal edge covered
    by one window divides cleanly), and summing to exactly 1 at 50% overlap."""
    n = np.arange(window, dtype=np.float64)
    return np.sin(np.pi * (n + 0.5) / window) ** 2


class WindowedEnhancer:
    """Streaming overlap-add enhancement of a ``[frames, channels]`` signal at the model rate.

    :meth:`push` takes the next input block and returns the output samples that no later
    window can change any more; :meth:`finish` pads the tail and returns the rest. In total
    the output has exactly as many frames as the input.
    """

    def __init__(self, runner: EnhancerRunner, channels: int, *, overlap: float = 0.5,
                 batch_size: int = 16, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.runner = runner
        self.channels = channels
        self.window = int(runner.window)
        self.hop = hop_for(self.window, overlap)
        self.weights = crossfade_weights(self.window)
        # whole window positions per model call; each position is one window per channel
        self.positions = max(1, batch_size // channels)
        self.rngs = [np.random.default_rng([seed, c]) for c in range(channels)]
        runner.z_shape(1, self.window)  # validates the window against the model's depth
        self.inbuf = np.zeros((channels, 0), np.float32)   # input from absolute frame in_start
        self.in_start = 0
        self.total_in = 0
        self.acc = np.zeros((channels, 0), np.float64)     # weighted sums from frame out_start
        self.wsum = np.zeros(0, np.float64)
        self.out_start = 0
        self.next_window = 0

    # -- input side
    def push(self, block: np.ndarray) -> np.ndarray:
        """Add ``block`` ``[frames, channels]``; return finished output ``[frames, channels]``."""
        if block.size:
            self.inbuf = np.concatenate([self.inbuf, np.asarray(block, np.float32).T], axis=1)
            self.total_in += block.shape[0]
        out = []
        while True:
            ready = self._ready_windows()
            if ready < self.positions:
                break
            out.append(self._process(self.positions))
        return self._join(out)

    def finish(self) -> np.ndarray:
        """Process the remaining windows (the last one zero-padded); return the tail."""
        total = self.total_in
        if total == 0:
            return np.zeros((0, self.channels), np.float32)
        n_windows = 1 + max(0, -(-(total - self.window) // self.hop))
        pad = (n_windows - 1) * self.hop + self.window - (self.in_start + self.inbuf.shape[1])
        if pad > 0:
            self.inbuf = np.concatenate([self.inbuf, np.zeros((self.channels, pad), np.float32)], axis=1)
        out = []
        while self.next_window < n_windows:
            out.append(self._process(min(self.positions, n_windows - self.next_window)))
        out.append(self._emit(total))
        return self._join(out)

    def _ready_windows(self) -> int:
        avail_end = self.in_start + self.inbuf.shape[1]
        last_start = avail_end - self.window  # latest start whose window is complete
        if last_start < self.next_window * self.hop:
            return 0
        return last_start // self.hop - self.next_window + 1

    # -- model side
    def _process(self, count: int) -> np.ndarray:
        starts = [(self.next_window + i) * self.hop for i in range(count)]
        c, n = self.channels, self.window
        frames = np.stack([self.inbuf[:, s - self.in_start:s - self.in_start + n] for s in starts])  # [P,C,N]
        zshape = self.runner.z_shape(1, n)[1:]
        z = np.stack([rng.standard_normal((count, *zshape), dtype=np.float32) for rng in self.rngs], axis=1)
        y = self.runner(frames.reshape(count * c, 1, n), z.reshape(count * c, *zshape))
        y = y.reshape(count, c, n).astype(np.float64)
        end = starts[-1] + n
        grow = end - (self.out_start + self.acc.shape[1])
        if grow > 0:
            self.acc = np.concatenate([self.acc, np.zeros((c, grow))], axis=1)
            self.wsum = np.concatenate([self.wsum, np.zeros(grow)])
        for s, yk in zip(starts, y):
            i = s - self.out_start
            self.acc[:, i:i + n] += yk * self.weights
            self.wsum[i:i + n] += self.weights
        self.next_window += count
        # input before the next window's start is never needed again
        keep_from = self.next_window * self.hop - self.in_start
        if keep_from > 0:
            self.inbuf = self.inbuf[:, keep_from:]
            self.in_start += keep_from
        # output before the next window's start gets no more contributions
        return self._emit(min(self.next_window * self.hop, self.total_in))

    def _emit(self, upto: int) -> np.ndarray:
        n = max(0, upto - self.out_start)
        if n == 0:
            return np.zeros((0, self.channels), np.float32)
        out = (self.acc[:, :n] / self.wsum[:n]).astype(np.float32).T
        self.acc = self.acc[:, n:]
        self.wsum = self.wsum[n:]
        self.out_start += n
        return out

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        parts = [p for p in parts if p.shape[0]]
        if not parts:
            return np.zeros((0, self.channels), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Resampler:
    """Streaming soxr resampler of ``[frames, channels]`` blocks (a pass-through at equal rates)."""

    def __init__(self, rate_in: int, rate_out: int, channels: int) -> None:
        self.stream = None if rate_in == rate_out else soxr.ResampleStream(
            rate_in, rate_out, channels, dtype="float32", quality=RESAMPLE_QUALITY)

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        if self.stream is None:
            return block
        return self.stream.resample_chunk(np.ascontiguousarray(block, np.float32), last=last)


class SignalPipeline:
    """Input rate -> model rate -> windowed enhancement -> input rate, streaming.

    Output frames never run ahead of input frames, and :meth:`finish` pads or trims so the
    total output length equals the total input length exactly.
    """

    def __init__(self, runner: EnhancerRunner, rate: int, channels: int, *, overlap: float = 0.5,
                 batch_size: int = 16, seed: int = 0) -> None:
        self.channels = channels
        self.down = _Resampler(rate, runner.sample_rate, channels)
        self.core = WindowedEnhancer(runner, channels, overlap=overlap, batch_size=batch_size, seed=seed)
        self.up = _Resampler(runner.sample_rate, rate, channels)
        self.frames_in = 0
        self.frames_out = 0

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, np.float32).reshape(block.shape[0], self.channels)
        self.frames_in += block.shape[0]
        return self._limit(self.up(self.core.push(self.down(block))))

    def finish(self) -> np.ndarray:
        tail = self.core.push(self.down(np.zeros((0, self.channels), np.float32), last=True))
        tail = np.concatenate([tail, self.core.finish()])
        out = self._limit(self.up(tail, last=True))
        missing = self.frames_in - self.frames_out
        if missing > 0:  # resampler rounding can leave a frame or two short
            out = np.concatenate([out, np.zeros((missing, self.channels), np.float32)])
            self.frames_out += missing
        return out

    def _limit(self, out: np.ndarray) -> np.ndarray:
        room = self.frames_in - self.frames_out
        out = out[:max(0, room)]
        self.frames_out += out.shape[0]
        return out


def enhance_signal(x: np.ndarray, rate: int, runner: EnhancerRunner, *, overlap: float = 0.5,
                   batch_size: int = 16, seed: int = 0, block_frames: int = BLOCK_FRAMES) -> np.ndarray:
    """Enhance ``x`` (``[T]`` or ``[T, C]``, any rate) with ``runner``; same shape and rate out."""
    x = np.asarray(x)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"signal: expected a non-empty [T] or [T, C] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("signal: contains NaN or Inf samples")
    x2 = x.reshape(x.shape[0], -1).astype(np.float32, copy=False)
    pipe = SignalPipeline(runner, int(rate), x2.shape[1], overlap=overlap, batch_size=batch_size, seed=seed)
    parts = [pipe.push(x2[i:i + block_frames]) for i in range(0, x2.shape[0], block_frames)]
    parts.append(pipe.finish())
    y = np.concatenate(parts)
    return y.reshape(x.shape)


# ----------------------------------------------------------------------------- files
@dataclass
class EnhanceSummary:
    """What :func:`enhance_files` did."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)          # existing outputs left alone
    failed: list[tuple[Path, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    processing_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def rtf(self) -> float:
        """Real-time factor: processing seconds per audio second (lower is faster)."""
        return self.processing_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def format(self) -> str:
        lines = [f"enhanced {len(self.written)} file(s), kept {len(self.kept)} existing, "
                 f"failed {len(self.failed)}; {self.audio_seconds:.1f} s of audio in "
                 f"{self.processing_seconds:.1f} s (RTF {self.rtf:.3f})"]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


@dataclass(frozen=True)
class Job:
    """One input file, where its output goes and how long it is (0 when unreadable)."""

    src: Path
    dst: Path
    seconds: float = 0.0


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _find_inputs(inputs: Iterable[Path], out_res: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """(file, name relative to OUTDIR) for every input; folders are searched recursively."""
    found: list[tuple[Path, Path]] = []
    problems: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            root = item.resolve()
            here = []
            for path in sorted(item.rglob("*")):
                rel = path.relative_to(item)
                if not path.is_file() or _is_hidden(rel) or path.suffix.lower() not in AUDIO_EXTENSIONS:
                    continue
                # never pick up earlier outputs when OUTDIR lies inside an input folder
                if out_res != root and path.resolve().is_relative_to(out_res):
                    continue
                here.append((path, rel))
            if not here:
                problems.append((item, "folder holds no audio files"))
            found += here
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            problems.append((item, "no such file or folder"))
    return found, problems


def plan_jobs(inputs: Iterable[Path], out_dir: Path) -> tuple[list[Job], list[tuple[Path, str]]]:
    """Map inputs (files, or folders searched recursively for audio) to outputs under ``out_dir``.

    A file ``x.wav`` goes to ``out_dir/x.wav``; a file ``d/a/x.wav`` found in folder ``d``
    goes to ``out_dir/a/x.wav`` (suffix ``.wav`` if soundfile cannot write the input's
    format). Returns (jobs, problems); raises :class:`EnhanceError` when an output would land
    on an input: inputs are never overwritten.
    """
    out_dir = Path(out_dir)
    found, problems = _find_inputs(inputs, out_dir.resolve())
    jobs: list[Job] = []
    seen: dict[Path, Path] = {}
    for path, rel in found:
        try:
            dst = safe_output_path(out_dir, rel)
        except EnhanceError as exc:
            problems.append((path, str(exc)))
            continue
        seconds = 0.0
        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate if info.samplerate else 0.0
            if not output_format(info.format, info.subtype)[2]:
                dst = safe_output_path(out_dir, rel.with_suffix(".wav"))
        except EnhanceError as exc:
            problems.append((path, str(exc)))
            continue
        except Exception:  # unreadable: reported by name when it is processed
            pass
        key = dst.resolve()
        if key in seen:
            if seen[key].resolve() != path.resolve():  # the same file given twice is done once
                problems.append((path, f"output {dst} would collide with the output of {seen[key]}"))
            continue
        seen[key] = path
        jobs.append(Job(path, dst, seconds))
    sources = {job.src.resolve() for job in jobs}
    for job in jobs:
        if job.dst.resolve() in sources:
            raise EnhanceError(f"output {job.dst} would overwrite input {job.dst.resolve()}; "
                               f"choose an OUTDIR that is not the input's folder")
    return jobs, problems


def safe_output_path(out_dir: Path, rel: Path) -> Path:
    """``out_dir / rel``, refusing absolute names, ``..`` and anything resolving outside ``out_dir``."""
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise EnhanceError(f"output name {str(rel)!r}: absolute paths and '..' are refused")
    dst = Path(out_dir) / rel
    if not dst.resolve().is_relative_to(Path(out_dir).resolve()):
        raise EnhanceError(f"output {dst} resolves to {dst.resolve()}, outside {Path(out_dir).resolve()}")
    return dst


def _writable(fmt: str, subtype: str) -> bool:
    try:
        return bool(sf.check_format(fmt, subtype))
    except (ValueError, TypeError):
        return False


def output_format(info_format: str, subtype: str) -> tuple[str, str, bool]:
    """(format, subtype, same_format): the input's where soundfile can write it, else WAV."""
    if _writable(info_format, subtype):
        return info_format, subtype, True
    return "WAV", subtype if _writable("WAV", subtype) else "PCM_16", False


def _readable(path: Path) -> None:
    """Temp files are created 0600; give the published file the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _read_blocks(f: sf.SoundFile, path: Path) -> Iterator[np.ndarray]:
    try:
        for block in f.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True):
            if not np.all(np.isfinite(block)):
                raise AudioError(f"{path}: contains NaN or Inf samples")
            yield block
    except sf.LibsndfileError as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from None


def enhance_file(src: Path, dst: Path, runner: EnhancerRunner, *, overlap: float = 0.5, batch_size: int = 16,
                 seed: int = 0, on_seconds: Callable[[float], None] | None = None) -> float:
    """Enhance one file into ``dst`` atomically, in the input's format, rate and channel count
    (WAV when soundfile cannot write that format); returns the audio seconds processed.

    Raises :class:`AudioError` for unreadable, empty or non-finite audio (nothing is written).
    """
    try:
        f = sf.SoundFile(str(src))
    except Exception as exc:  # LibsndfileError / RuntimeError / TypeError for non-audio
        raise AudioError(f"{src}: cannot read audio ({exc})") from None
    with f:
        rate, channels = f.samplerate, f.channels
        fmt, subtype, same = output_format(f.format, f.subtype)
        if not same:
            log.warning("%s: soundfile cannot write %s/%s; writing WAV %s", src, f.format, f.subtype, subtype)
        clip = subtype not in _FLOAT_SUBTYPES  # integer PCM would wrap around past full scale
        pipe = SignalPipeline(runner, rate, channels, overlap=overlap, batch_size=batch_size, seed=seed)
        with atomic_path(dst, suffix=dst.suffix) as tmp:
            with sf.SoundFile(str(tmp), "w", samplerate=rate, channels=channels, format=fmt,
                              subtype=subtype) as out:
                def write(y: np.ndarray) -> None:
                    if y.shape[0]:
                        out.write(np.clip(y, -1.0, 1.0) if clip else y)

                for block in _read_blocks(f, src):
                    write(pipe.push(block))
                    if on_seconds:
                        on_seconds(block.shape[0] / rate)
                if pipe.frames_in == 0:
                    raise AudioError(f"{src}: empty audio (0 samples)")
                write(pipe.finish())
            _readable(tmp)
    return pipe.frames_in / rate


def enhance_files(inputs: list[Path], out_dir: Path, runner: EnhancerRunner, *, overlap: float = 0.5,
                  batch_size: int = 16, seed: int = 0, overwrite: bool = False,
                  progress: bool = True) -> EnhanceSummary:
    """Enhance every input file (folders recursively) into ``out_dir``, mirroring folders.

    A file that cannot be processed is reported in the summary and skipped; the others still
    run. Existing outputs are kept unless ``overwrite``. Raises :class:`EnhanceError` before
    doing anything if an output would overwrite an input.
    """
    from tqdm import tqdm

    hop_for(runner.window, overlap)  # validate before any work
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    jobs, problems = plan_jobs(inputs, out_dir)
    summary = EnhanceSummary(failed=list(problems))
    for path, reason in problems:
        log.error("%s: %s", path, reason)
    todo = []
    for job in jobs:
        if job.dst.exists() and not overwrite:
            log.warning("%s exists; kept (pass overwrite to replace it)", job.dst)
            summary.kept.append(job.dst)
        else:
            todo.append(job)
    total = sum(job.seconds for job in todo)
    start = time.perf_counter()
    with tqdm(total=total, unit="s", desc="enhance", dynamic_ncols=True, disable=None if progress else True,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} audio s "
                         "[{elapsed}<{remaining}{postfix}]") as bar:
        for i, job in enumerate(todo, 1):
            bar.set_postfix_str(f"file {i}/{len(todo)}: {job.src.name}")
            done = 0.0

            def advance(seconds: float) -> None:
                nonlocal done
                done += seconds
                bar.update(seconds)

            try:
                seconds = enhance_file(job.src, job.dst, runner, overlap=overlap, batch_size=batch_size,
                                       seed=seed, on_seconds=advance)
            except (AudioError, OSError, RuntimeError, ValueError) as exc:
                log.error("%s: %s", job.src, exc)
                summary.failed.append((job.src, str(exc)))
                bar.update(max(0.0, job.seconds - done))
                continue
            summary.written.append(job.dst)
            summary.audio_seconds += seconds
    summary.processing_seconds = time.perf_counter() - start
    log.info("%s", summary.format())
    return summary


__all__ = ["EnhanceError", "EnhanceSummary", "IdentityRunner", "Job", "SignalPipeline", "WindowedEnhancer",
           "crossfade_weights", "enhance_file", "enhance_files", "enhance_signal", "hop_for", "plan_jobs",
           "safe_output_path"]
