"""Reading a prepared corpus (the output of :mod:`segan.data.prepare`).

:class:`WindowDataset` serves training windows straight from the memory-mapped
concatenations; :func:`load_test_manifest` lists the whole test utterances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .prepare import (
    FORMAT_VERSION,
    MANIFEST,
    TEST_COLUMNS,
    TEST_MANIFEST,
    TRAIN_CLEAN,
    TRAIN_NOISY,
    TRAIN_WINDOWS,
)

_REQUIRED_KEYS = ("format_version", "sample_rate", "window", "hop", "counts", "hours", "skipped")


class PreparedCorpusError(ValueError):
    """A folder that is not a complete prepared corpus; the message names what is wrong."""


def read_prepared_manifest(prepared_dir: Path) -> dict[str, Any]:
    """Load and sanity-check ``<prepared_dir>/manifest.json``."""
    prepared_dir = Path(prepared_dir)
    if not prepared_dir.is_dir():
        raise PreparedCorpusError(f"{prepared_dir}: prepared corpus folder not found (run the prepare stage)")
    path = prepared_dir / MANIFEST
    if not path.is_file():
        raise PreparedCorpusError(f"{path}: not found; {prepared_dir} is not a complete prepared corpus "
                                  f"(run the prepare stage)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise PreparedCorpusError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise PreparedCorpusError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise PreparedCorpusError(f"{path}: missing key(s) {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise PreparedCorpusError(f"{path}: format_version {manifest['format_version']!r}, expected "
                                  f"{FORMAT_VERSION} (re-run the prepare stage)")
    return manifest


def _open_npy(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise PreparedCorpusError(f"{path}: not found; the prepared corpus is incomplete")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise PreparedCorpusError(f"{path}: not a readable .npy file ({exc})") from None
    if arr.ndim != 1 or arr.dtype != dtype:
        raise PreparedCorpusError(f"{path}: expected a 1-D {dtype} array, got shape {arr.shape} {arr.dtype}")
    return arr


class WindowDataset(Dataset):
    """Training windows of a prepared corpus: item ``i`` is ``(clean, noisy)``, each a
    float32 tensor of shape ``[1, window]`` (no pre-emphasis applied).

    The audio arrays are memory-mapped lazily on first access in each process and are
    left out of pickles, so the dataset can be handed to DataLoader workers (fork or
    spawn) without copying the corpus.
    """

    def __init__(self, prepared_dir: Path) -> None:
        self.prepared_dir = Path(prepared_dir)
        self.manifest = read_prepared_manifest(self.prepared_dir)
        self.window: int = int(self.manifest["window"])
        self.hop: int = int(self.manifest["hop"])
        self.sample_rate: int = int(self.manifest["sample_rate"])
        self.starts = np.array(_open_npy(self.prepared_dir / TRAIN_WINDOWS, np.dtype(np.int64)))
        self._clean: np.ndarray | None = None
        self._noisy: np.ndarray | None = None
        self._validate()

    def _validate(self) -> None:
        clean, noisy = self._arrays()
        expected = self.manifest["counts"].get("train_windows")
        if expected is not None and expected != len(self.starts):
            raise PreparedCorpusError(f"{self.prepared_dir / TRAIN_WINDOWS}: {len(self.starts)} windows, "
                                      f"manifest says {expected}")
        if len(clean) != len(noisy):
            raise PreparedCorpusError(f"{self.prepared_dir}: {TRAIN_CLEAN} has {len(clean)} samples but "
                                      f"{TRAIN_NOISY} has {len(noisy)}")
        if len(self.starts) and (self.starts.min() < 0 or self.starts.max() + self.window > len(clean)):
            raise PreparedCorpusError(f"{self.prepared_dir / TRAIN_WINDOWS}: window starts outside "
                                      f"[0, {len(clean) - self.window}]")
        # drop the maps opened for checking: a DataLoader worker opens its own
        self._clean = self._noisy = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._clean is None or self._noisy is None:
            self._clean = _open_npy(self.prepared_dir / TRAIN_CLEAN, np.dtype(np.float32))
            self._noisy = _open_npy(self.prepared_dir / TRAIN_NOISY, np.dtype(np.float32))
        return self._clean, self._noisy

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.starts)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window index {index} out of range for {n} windows")
        clean, noisy = self._arrays()
        s = int(self.starts[i])
        # np.array copies out of the read-only map (torch wants writable memory)
        c = torch.from_numpy(np.array(clean[s:s + self.window], dtype=np.float32))
        x = torch.from_numpy(np.array(noisy[s:s + self.window], dtype=np.float32))
        return c.unsqueeze(0), x.unsqueeze(0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_clean"] = state["_noisy"] = None  # a pickled memmap would copy the whole corpus
        return state


def load_test_manifest(prepared_dir: Path) -> pd.DataFrame:
    """The whole test utterances: one row each, columns utterance, noise, snr (NaN when
    unknown), seconds, clean_path, noisy_path (relative to ``prepared_dir``)."""
    prepared_dir = Path(prepared_dir)
    read_prepared_manifest(prepared_dir)
    path = prepared_dir / TEST_MANIFEST
    if not path.is_file():
        raise PreparedCorpusError(f"{path}: not found; the prepared corpus is incomplete")
    df = pd.read_csv(path, dtype={"utterance": str, "noise": str, "clean_path": str, "noisy_path": str},
                     keep_default_na=False, na_values={"snr": [""]})
    missing = [c for c in TEST_COLUMNS if c not in df.columns]
    if missing:
        raise PreparedCorpusError(f"{path}: missing column(s) {missing}")
    df["snr"] = df["snr"].astype(float)
    df["seconds"] = df["seconds"].astype(float)
    absent = [p for col in ("clean_path", "noisy_path") for p in df[col] if not (prepared_dir / p).is_file()]
    if absent:
        raise PreparedCorpusError(f"{path}: {len(absent)} listed file(s) missing, e.g. {prepared_dir / absent[0]}")
    return df


__all__ = ["PreparedCorpusError", "WindowDataset", "load_test_manifest", "read_prepared_manifest"]
