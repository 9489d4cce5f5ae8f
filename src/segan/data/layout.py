"""The VoiceBank-DEMAND folder layout every source is written in.

``download`` turns any source into this layout under ``data/raw``; ``prepare`` reads only
this layout, so synthetic, real and user data go through the same code afterwards::

    data/raw/
      clean_trainset_wav/*.wav   noisy_trainset_wav/*.wav
      clean_testset_wav/*.wav    noisy_testset_wav/*.wav
      log_trainset.txt           log_testset.txt      # "<utterance> <noise> <snr>" per line
      manifest.json                                   # source, seed, versions, counts ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")


def clean_dir(root: Path, split: str) -> Path:
    return Path(root) / f"clean_{split}set_wav"


def noisy_dir(root: Path, split: str) -> Path:
    return Path(root) / f"noisy_{split}set_wav"


def log_path(root: Path, split: str) -> Path:
    return Path(root) / f"log_{split}set.txt"


def manifest_path(root: Path) -> Path:
    return Path(root) / "manifest.json"


@dataclass(frozen=True)
class LogEntry:
    utterance: str
    noise: str
    snr: float | None


def format_log(entries: list[LogEntry]) -> str:
    lines = []
    for e in entries:
        snr = "" if e.snr is None else f" {e.snr:g}"
        lines.append(f"{e.utterance} {e.noise}{snr}")
    return "\n".join(lines) + ("\n" if lines else "")


def read_log(path: Path) -> dict[str, LogEntry]:
    """Parse ``<utterance> <noise> <snr>`` lines (SNR optional); missing file -> empty."""
    path = Path(path)
    if not path.exists():
        return {}
    out: dict[str, LogEntry] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            raise ValueError(f"{path}:{lineno}: expected '<utterance> <noise> <snr>', got {line!r}")
        snr = None
        if len(parts) == 3:
            try:
                snr = float(parts[2])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: SNR {parts[2]!r} is not a number") from None
        out[parts[0]] = LogEntry(parts[0], parts[1], snr)
    return out
