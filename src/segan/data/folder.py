"""Import the user's own clean/noisy recordings into the common layout.

``clean_dir`` and ``noisy_dir`` hold the same recordings, matched by path relative to the
folder without the extension (``spk1/a.wav`` pairs with ``spk1/a.flac``), searched
recursively. Any format soundfile reads and any sample rate is accepted; partners may
differ in rate and format but must last equally long (within 1 ms).

Every pair is checked before anything appears in ``out_dir``, and all problems found
(a file without its partner, an unreadable, corrupt or empty file, NaN samples, a duration
mismatch, ...) are raised together as one :class:`DataError`, so a user fixes a folder in
one go rather than one file per run.

Output files are mono wavs at each file's own rate (``prepare`` resamples), 16-bit unless
the source exceeds [-1, 1] (then 32-bit float, so nothing clips), named after the relative
path with ``/`` replaced by ``__``. Without test folders a deterministic ``test_fraction``
of the pairs (the first ones in order of a hash of their names) is held out for testing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..audio import AUDIO_EXTENSIONS, AudioError, read_audio, to_mono, write_audio
from ..config import FolderConfig
from ..fsutil import atomic_dir, write_json, write_text
from . import layout

log = logging.getLogger(__name__)

DURATION_TOLERANCE_S = 1e-3
NAME_SEP = "__"


class DataError(ValueError):
    """User data that cannot be imported; the message lists every problem, one per line."""

    def __init__(self, problems: list[str], header: str = "folder data") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Pair:
    """A clean recording and its noisy partner; ``key`` is the relative path without extension."""

    key: str
    clean: Path
    noisy: Path

    @property
    def name(self) -> str:
        """Output file stem: the key with ``/`` replaced by ``__``."""
        return self.key.replace("/", NAME_SEP)


def scan_audio(folder: Path, problems: list[str]) -> dict[str, Path]:
    """Audio files under ``folder`` (recursive, hidden entries skipped) by relative key."""
    if not folder.is_dir():
        problems.append(f"{folder}: folder not found")
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(p.startswith(".") or p == "__MACOSX" for p in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            log.debug("skipping non-audio file %s", path)
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            problems.append(f"{path}: same name as {found[key]} (only the extension differs); keep one")
            continue
        found[key] = path
    return found


def find_pairs(clean_dir: Path, noisy_dir: Path, problems: list[str]) -> list[Pair]:
    """Match files of the two folders; unmatched files are appended to ``problems``."""
    clean = scan_audio(clean_dir, problems)
    noisy = scan_audio(noisy_dir, problems)
    for key in sorted(set(noisy) - set(clean)):
        problems.append(f"{noisy[key]}: noisy file without a clean partner (expected {clean_dir / key}.<ext>)")
    for key in sorted(set(clean) - set(noisy)):
        problems.append(f"{clean[key]}: clean file without a noisy partner (expected {noisy_dir / key}.<ext>)")
    if clean_dir.is_dir() and noisy_dir.is_dir() and not clean and not noisy:
        problems.append(f"{clean_dir} and {noisy_dir}: no audio files found "
                        f"(known extensions: {', '.join(sorted(AUDIO_EXTENSIONS))})")
    pairs = [Pair(k, clean[k], noisy[k]) for k in sorted(set(clean) & set(noisy))]
    names: dict[str, str] = {}
    for p in pairs:  # "a/b" and a file literally named "a__b" would collide
        if p.name in names:
            problems.append(f"{p.clean}: output name {p.name}.wav also used by {names[p.name]}")
        names[p.name] = str(p.clean)
    return pairs


def _name_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def holdout_split(pairs: list[Pair], test_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Deterministic split: the first ``round(n * test_fraction)`` pairs by name hash are test.

    At least one pair goes to each side when ``test_fraction > 0`` and there are two or more pairs.
    """
    n = len(pairs)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    ranked = sorted(pairs, key=lambda p: (_name_hash(p.key), p.key))
    test = sorted(ranked[:n_test], key=lambda p: p.key)
    train = sorted(ranked[n_test:], key=lambda p: p.key)
    return train, test


def _load(path: Path, problems: list[str]) -> tuple[np.ndarray, int] | None:
    if path.stat().st_size == 0:
        problems.append(f"{path}: empty file (0 bytes)")
        return None
    try:
        return read_audio(path)  # rejects unreadable, empty and NaN/Inf files with a message
    except AudioError as exc:
        problems.append(str(exc))
        return None


def _write(path: Path, data: np.ndarray, rate: int) -> None:
    mono = to_mono(data)
    subtype = "FLOAT" if float(np.max(np.abs(mono))) > 1.0 else "PCM_16"
    write_audio(path, mono, rate, subtype=subtype)


def import_folder(cfg: FolderConfig, out_dir: Path, progress: bool = True) -> dict:
    """Validate the user's folders and write them to ``out_dir`` in the common layout.

    Relative folder paths are taken from the current directory. Raises :class:`DataError`
    listing every problem found; ``out_dir`` is then left as it was.

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    out_dir = Path(out_dir)
    problems: list[str] = []
    clean_dir, noisy_dir = Path(cfg.clean_dir).expanduser(), Path(cfg.noisy_dir).expanduser()
    if not cfg.clean_dir or not cfg.noisy_dir:
        raise DataError(["data.folder.clean_dir and data.folder.noisy_dir are both required"])
    if bool(cfg.test_clean_dir) != bool(cfg.test_noisy_dir):
        raise DataError(["data.folder.test_clean_dir and test_noisy_dir: give both or neither"])

    pairs = find_pairs(clean_dir, noisy_dir, problems)
    if cfg.test_clean_dir:
        test = find_pairs(Path(cfg.test_clean_dir).expanduser(), Path(cfg.test_noisy_dir).expanduser(), problems)
        train, split_by = pairs, "folders"
    else:
        train, test = holdout_split(pairs, cfg.test_fraction)
        split_by = f"name hash, test_fraction={cfg.test_fraction:g}"

    jobs = [(split, p) for split, ps in (("train", train), ("test", test)) for p in ps]
    records: dict[str, list[dict]] = {"train": [], "test": []}
    with atomic_dir(out_dir) as tmp:
        for split in layout.SPLITS:
            layout.clean_dir(tmp, split).mkdir()
            layout.noisy_dir(tmp, split).mkdir()
        # One pass reads each file once: it is checked, and written while no problem has
        # been seen yet; any problem aborts the atomic folder at the end.
        for split, pair in tqdm(jobs, desc="import folder", unit="pair", disable=not progress):
            clean, noisy = _load(pair.clean, problems), _load(pair.noisy, problems)
            if clean is None or noisy is None:
                continue
            (c_data, c_rate), (n_data, n_rate) = clean, noisy
            c_sec, n_sec = len(c_data) / c_rate, len(n_data) / n_rate
            if abs(c_sec - n_sec) > DURATION_TOLERANCE_S:
                problems.append(f"{pair.noisy}: lasts {n_sec:.3f} s but its clean partner {pair.clean} "
                                f"lasts {c_sec:.3f} s")
            if problems:
                continue
            _write(layout.clean_dir(tmp, split) / f"{pair.name}.wav", c_data, c_rate)
            _write(layout.noisy_dir(tmp, split) / f"{pair.name}.wav", n_data, n_rate)
            records[split].append({"name": pair.name, "clean": str(pair.clean), "noisy": str(pair.noisy),
                                   "clean_rate": c_rate, "noisy_rate": n_rate, "seconds": round(c_sec, 4)})
        if not problems and not train:
            problems.append(f"{clean_dir}: no training pairs left (test_fraction={cfg.test_fraction:g}, "
                            f"{len(test)} test pairs)")
        if not problems and not test:  # evaluation needs a test set; better to say so now than at prepare
            problems.append(f"no test pairs: set data.folder.test_fraction > 0 (now {cfg.test_fraction:g}, "
                            f"{len(train)} pairs) or give data.folder.test_clean_dir/test_noisy_dir")
        if problems:
            raise DataError(problems, header=f"cannot import {clean_dir} / {noisy_dir}")
        for split in layout.SPLITS:
            entries = [layout.LogEntry(r["name"], "unknown", None) for r in records[split]]
            write_text(layout.log_path(tmp, split), layout.format_log(entries))
        manifest = {
            "source": "folder",
            "clean_dir": str(clean_dir.resolve()),
            "noisy_dir": str(noisy_dir.resolve()),
            "test_clean_dir": str(Path(cfg.test_clean_dir).expanduser().resolve()) if cfg.test_clean_dir else "",
            "test_noisy_dir": str(Path(cfg.test_noisy_dir).expanduser().resolve()) if cfg.test_noisy_dir else "",
            "split_by": split_by,
            "counts": {split: len(records[split]) for split in layout.SPLITS},
            "sample_rates": sorted({r[k] for rs in records.values() for r in rs for k in ("clean_rate", "noisy_rate")}),
            "files": records,
        }
        write_json(layout.manifest_path(tmp), manifest)
    log.info("imported %s into %s: %s", clean_dir, out_dir, manifest["counts"])
    return manifest


__all__ = ["DataError", "Pair", "find_pairs", "holdout_split", "import_folder", "scan_audio"]
