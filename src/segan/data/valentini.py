"""VoiceBank-DEMAND (Valentini-Botinhao 2017): fetch the archives and lay them out.

The corpus lives on Edinburgh DataShare (handle 10283/2791, DOI 10.7488/ds/2117, CC BY 4.0)
as seven zips. :func:`fetch_valentini` takes the ones a run needs (test sets, the 28- or
56-speaker training sets and the SNR logs) either from ``valentini.archive_dir`` (zips the
user already has; verified, never modified) or by downloading them into a persistent
archive cache, then extracts them into the common layout of :mod:`segan.data.layout`.

Extraction is defensive: every entry of every archive is checked before anything is
written, and an entry that would land outside the target (absolute path, ``..``, symlink)
stops the run with an error naming the archive and the entry. ``__MACOSX/`` resource forks
and dotfiles are skipped. Everything is built in a temporary folder that replaces
``out_dir`` only when complete.
"""

from __future__ import annotations

import logging
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import soundfile as sf
from tqdm import tqdm

from ..config import ValentiniConfig
from ..fsutil import atomic_dir, write_json, write_text
from . import layout
from .fetch import DownloadError, download, file_md5_matches

log = logging.getLogger(__name__)

DATASET = {
    "name": "Noisy speech database for training speech enhancement algorithms and TTS models "
            "(VoiceBank-DEMAND)",
    "authors": "Cassia Valentini-Botinhao",
    "publisher": "University of Edinburgh. School of Informatics. Centre for Speech Technology Research (CSTR)",
    "year": 2017,
    "handle": "https://datashare.ed.ac.uk/handle/10283/2791",
    "doi": "10.7488/ds/2117",
    "license": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
    "citation": "Valentini-Botinhao, Cassia. (2017). Noisy speech database for training speech "
                "enhancement algorithms and TTS models, 2016 [sound]. University of Edinburgh. "
                "School of Informatics. Centre for Speech Technology Research (CSTR). "
                "https://doi.org/10.7488/ds/2117",
}


@dataclass(frozen=True)
class Archive:
    """One zip on DataShare: file name, bitstream sequence number and MD5."""

    name: str
    sequence: int
    md5: str

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".zip")


ARCHIVES: dict[str, Archive] = {a.name: a for a in (
    Archive("clean_testset_wav.zip", 1, "34eb1c0ba7ef667e9b966866c542fc16"),
    Archive("clean_trainset_28spk_wav.zip", 2, "d2d5a45ec32f8fcbf201bde0447e20ba"),
    Archive("clean_trainset_56spk_wav.zip", 3, "c351cbc9db30e41686c988c19f0e1475"),
    Archive("logfiles.zip", 4, "0d16f5b6afe12d64238d1e4a0e6ff6e8"),
    Archive("noisy_testset_wav.zip", 5, "fb1b86caa31e8ba5b506c0c64da9aab5"),
    Archive("noisy_trainset_28spk_wav.zip", 6, "1fca9e8bafb8cd069f6653c6d92f9e9c"),
    Archive("noisy_trainset_56spk_wav.zip", 7, "b26382542716642b8f2845880af69cf0"),
)}


class ArchiveError(ValueError):
    """An archive that is missing, corrupt or unsafe; the message names it."""


def archives_for(train_speakers: int) -> list[Archive]:
    """The archives a run with ``train_speakers`` (28 or 56) needs, in a stable order."""
    if train_speakers not in (28, 56):
        raise ValueError(f"valentini.train_speakers: expected 28 or 56, got {train_speakers!r}")
    names = ["clean_testset_wav.zip", "noisy_testset_wav.zip",
             f"clean_trainset_{train_speakers}spk_wav.zip", f"noisy_trainset_{train_speakers}spk_wav.zip",
             "logfiles.zip"]
    return [ARCHIVES[n] for n in names]


def archive_url(base_url: str, archive: Archive) -> str:
    """DataShare bitstream URL of ``archive`` under ``base_url``."""
    return f"{base_url.rstrip('/')}/{archive.name}?sequence={archive.sequence}&isAllowed=y"


# ----------------------------------------------------------------------------- obtaining zips
def _expected_md5(archive: Archive, md5s: dict[str, str] | None) -> str:
    return (md5s or {}).get(archive.name, archive.md5).lower()


def _from_archive_dir(folder: Path, archives: list[Archive], md5s: dict[str, str] | None) -> dict[str, Path]:
    """Locate and verify the user's zips; never modifies ``folder``."""
    if not folder.is_dir():
        raise ArchiveError(f"valentini.archive_dir: {folder} is not a folder")
    missing = [a.name for a in archives if not (folder / a.name).is_file()]
    if missing:
        raise ArchiveError(f"valentini.archive_dir: {folder} lacks {', '.join(missing)} "
                           f"(download them from {DATASET['handle']} or set archive_dir to \"\" to download)")
    paths = {}
    for a in archives:
        path = folder / a.name
        expected = _expected_md5(a, md5s)
        log.info("verifying %s", path)
        ok, actual = file_md5_matches(path, expected, use_marker=False)
        if not ok:
            raise ArchiveError(f"{path}: MD5 mismatch (expected {expected}, got {actual}); the file is "
                               f"corrupt or a different version - download it again from {DATASET['handle']}")
        paths[a.name] = path
    return paths


def _download_all(cfg: ValentiniConfig, cache: Path, archives: list[Archive], md5s: dict[str, str] | None,
                  progress: bool, backoff_s: float) -> dict[str, Path]:
    paths = {}
    for a in archives:
        paths[a.name] = download(archive_url(cfg.base_url, a), cache / a.name, _expected_md5(a, md5s),
                                 retries=cfg.retries, timeout_s=cfg.timeout_s, progress=progress,
                                 backoff_s=backoff_s)
    return paths


# ----------------------------------------------------------------------------- safe extraction
def _is_skipped(parts: tuple[str, ...]) -> bool:
    """macOS resource forks and hidden files carry no audio."""
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


def check_entries(zip_path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse the whole archive if any entry could be written outside the target folder."""
    for info in zf.infolist():
        name = info.filename
        norm = name.replace("\\", "/")  # zips made on Windows may use backslashes
        parts = PurePosixPath(norm).parts
        why = None
        if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
            why = "is an absolute path"
        elif ".." in parts:
            why = "contains '..'"
        elif stat.S_ISLNK(info.external_attr >> 16):
            why = "is a symbolic link"
        elif "\x00" in name:
            why = "contains a NUL byte"
        if why:
            raise ArchiveError(f"{zip_path}: refusing to extract entry {name!r}: it {why} and could be "
                               f"written outside the target folder")


def _members(zip_path: Path, zf: zipfile.ZipFile, suffix: str) -> list[tuple[zipfile.ZipInfo, str]]:
    """(entry, base name) of the files ending in ``suffix``, skipping folders and junk."""
    out, seen = [], {}
    for info in zf.infolist():
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.is_dir() or not parts or _is_skipped(parts):
            continue
        base = parts[-1]
        if not base.lower().endswith(suffix):
            log.debug("%s: skipping %s", zip_path, info.filename)
            continue
        if base in seen:
            raise ArchiveError(f"{zip_path}: entries {seen[base]!r} and {info.filename!r} have the same name")
        seen[base] = info.filename
        out.append((info, base))
    return out


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{path}: not a readable zip archive ({exc})") from None


def extract_wavs(zip_path: Path, target: Path, progress: bool = True) -> list[str]:
    """Extract every ``.wav`` of ``zip_path`` flat into ``target``; returns the file names."""
    with _open_zip(zip_path) as zf:
        check_entries(zip_path, zf)
        members = _members(zip_path, zf, ".wav")
        if not members:
            raise ArchiveError(f"{zip_path}: contains no .wav files")
        target.mkdir(parents=True, exist_ok=True)
        for info, base in tqdm(members, desc=f"extract {zip_path.name}", unit="file",
                               disable=not progress, leave=False):
            with zf.open(info) as src, open(target / base, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return sorted(base for _, base in members)


def extract_logs(zip_path: Path, train_speakers: int) -> dict[str, str]:
    """Read the test and ``train_speakers`` training logs from ``logfiles.zip``, validated."""
    wanted = {"test": "log_testset.txt", "train": f"log_trainset_{train_speakers}spk.txt"}
    with _open_zip(zip_path) as zf:
        check_entries(zip_path, zf)
        by_name = {base: info for info, base in _members(zip_path, zf, ".txt")}
        texts = {}
        for split, name in wanted.items():
            if name not in by_name:
                raise ArchiveError(f"{zip_path}: no entry named {name} (found {sorted(by_name)})")
            texts[split] = zf.read(by_name[name]).decode("utf-8", errors="replace")
    return texts


# ----------------------------------------------------------------------------- main entry
def fetch_valentini(cfg: ValentiniConfig, out_dir: Path, archive_cache: Path, progress: bool = True,
                    md5s: dict[str, str] | None = None, *, backoff_s: float = 2.0) -> dict:
    """Obtain VoiceBank-DEMAND and write it to ``out_dir`` in the common layout.

    Args:
        cfg: the ``data.valentini`` section (train_speakers, base_url, archive_dir, retries, timeout_s).
        out_dir: layout root (e.g. ``data/raw``); replaced atomically when complete.
        archive_cache: persistent folder for downloaded zips (e.g. ``data/archives``); a zip
            already there with the right MD5 is not fetched again. Unused with ``archive_dir``.
        progress: tqdm bars for downloads and extraction.
        md5s: ``{archive name: md5}`` overriding the published checksums, for mirrors that
            serve re-packed archives and for tests that serve small generated zips.
        backoff_s: first retry delay of downloads (doubles per retry).

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    out_dir, archive_cache = Path(out_dir), Path(archive_cache)
    archives = archives_for(cfg.train_speakers)
    if cfg.archive_dir:
        paths = _from_archive_dir(Path(cfg.archive_dir).expanduser(), archives, md5s)
        origin = {"archive_dir": str(Path(cfg.archive_dir).expanduser().resolve())}
    else:
        paths = _download_all(cfg, archive_cache, archives, md5s, progress, backoff_s)
        origin = {"base_url": cfg.base_url}

    spk = cfg.train_speakers
    with atomic_dir(out_dir) as tmp:
        names: dict[tuple[str, str], list[str]] = {}
        for split in layout.SPLITS:
            for kind, dir_fn in (("clean", layout.clean_dir), ("noisy", layout.noisy_dir)):
                zip_name = f"{kind}_testset_wav.zip" if split == "test" else f"{kind}_trainset_{spk}spk_wav.zip"
                names[split, kind] = extract_wavs(paths[zip_name], dir_fn(tmp, split), progress)
        logs = extract_logs(paths["logfiles.zip"], spk)
        counts = {}
        for split in layout.SPLITS:
            clean, noisy = set(names[split, "clean"]), set(names[split, "noisy"])
            if clean != noisy:
                only = sorted((clean - noisy) | (noisy - clean))
                raise ArchiveError(f"{split} set: clean and noisy archives hold different files, "
                                   f"e.g. {only[:5]} ({len(only)} unmatched)")
            write_text(layout.log_path(tmp, split), logs[split])
            try:
                entries = layout.read_log(layout.log_path(tmp, split))  # validates the format
            except ValueError as exc:
                raise ArchiveError(f"{paths['logfiles.zip']}: log of the {split} set is malformed: {exc}") from None
            stems = {n.removesuffix(".wav") for n in clean}
            unlogged = sorted(stems - set(entries))
            if unlogged:
                log.warning("%s: %d utterances have no log line, e.g. %s", layout.log_path(tmp, split).name,
                            len(unlogged), unlogged[:3])
            counts[split] = len(clean)
        first = layout.clean_dir(tmp, "test") / names["test", "clean"][0]
        manifest = {
            "source": "valentini",
            "dataset": DATASET,
            "train_speakers": spk,
            **origin,
            "archives": [{"name": a.name, "md5": _expected_md5(a, md5s), "url": archive_url(cfg.base_url, a)}
                         for a in archives],
            "counts": counts,
            "sample_rate": sf.info(str(first)).samplerate,
        }
        write_json(layout.manifest_path(tmp), manifest)
    log.info("VoiceBank-DEMAND (%d speakers) in %s: %s", spk, out_dir, counts)
    return manifest


__all__ = ["ARCHIVES", "Archive", "ArchiveError", "DATASET", "DownloadError", "archive_url", "archives_for",
           "check_entries", "extract_logs", "extract_wavs", "fetch_valentini"]
