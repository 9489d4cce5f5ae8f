"""Resumable, verified HTTP downloads (stdlib ``urllib`` only).

``download`` fetches ``url`` into ``dest`` so that:

* a file already at ``dest`` whose MD5 matches is never fetched again (a ``<dest>.md5ok``
  marker keyed by size and mtime spares re-hashing multi-GB archives on every run);
* bytes go to ``<dest>.part`` first; an interrupted transfer resumes with an HTTP
  ``Range`` request (206), restarts when the server ignores the range (200), and copes
  with 416 (the partial file is already complete, or is stale and must be discarded);
* connection errors, timeouts, 5xx/429 answers and truncated bodies are retried with
  exponential backoff; other 4xx answers fail at once;
* the result is renamed onto ``dest`` only after its MD5 matched; a mismatching file is
  deleted and :class:`ChecksumError` names the URL, file, expected and actual MD5.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 16
USER_AGENT = "segan-downloader/1.0 (+https://github.com/; python-urllib)"
MAX_BACKOFF_S = 60.0
#: HTTP answers worth retrying: server-side trouble, throttling, request timeout.
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download that failed for good; the message names the URL and the reason."""


class ChecksumError(DownloadError):
    """A file whose MD5 is not the expected one."""


class _Retry(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks so multi-GB archives need little memory."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".md5ok")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(path: Path, md5: str) -> None:
    try:
        _marker(path).write_text(json.dumps({"md5": md5, **_stat_key(path)}) + "\n")
    except OSError as exc:  # the marker is only a cache; a read-only folder is fine
        log.debug("cannot write %s: %s", _marker(path), exc)


def _marker_says_ok(path: Path, md5: str) -> bool:
    try:
        saved = json.loads(_marker(path).read_text())
        return saved == {"md5": md5, **_stat_key(path)}
    except (OSError, ValueError):
        return False


def file_md5_matches(path: str | Path, md5: str, *, use_marker: bool = True) -> tuple[bool, str]:
    """Whether ``path`` has MD5 ``md5``; returns (ok, actual md5).

    With ``use_marker`` a ``<path>.md5ok`` marker recording md5, size and mtime short-cuts
    the hash when nothing changed, and is written after a successful hash.
    """
    path = Path(path)
    md5 = md5.lower()
    if use_marker and _marker_says_ok(path, md5):
        return True, md5
    actual = md5_file(path)
    ok = actual == md5
    if ok and use_marker:
        _write_marker(path, md5)
    return ok, actual


def download(url: str, dest: Path, md5: str | None, retries: int = 5, timeout_s: float = 60.0,
             progress: bool = True, *, backoff_s: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` (resuming, retrying, verifying) and return ``dest``.

    Args:
        url: http(s) URL.
        dest: final path; its folder is created. ``<dest>.part`` holds bytes in flight.
        md5: expected hex MD5, or None to skip verification (an existing ``dest`` is then
            trusted as is).
        retries: extra attempts after the first on retryable failures.
        timeout_s: socket timeout for connecting and for each read.
        progress: show a tqdm bar (bytes, with the total when the server sends it).
        backoff_s: delay before the first retry; doubles each retry (capped at 60 s).

    Raises:
        ChecksumError: the downloaded bytes do not have MD5 ``md5`` (the file is deleted).
        DownloadError: a non-retryable HTTP answer, or every attempt failed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if md5 is None:
            log.info("%s already present (no md5 to check)", dest)
            return dest
        ok, actual = file_md5_matches(dest, md5)
        if ok:
            log.info("%s already present, md5 ok", dest)
            return dest
        log.warning("%s has md5 %s, expected %s: fetching it again", dest, actual, md5)
        dest.unlink()
        _marker(dest).unlink(missing_ok=True)

    part = dest.with_suffix(dest.suffix + ".part")
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, timeout_s, progress, dest.name)
            break
        except _Retry as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: download failed after {attempt} attempt(s): {exc} "
                                    f"(partial data kept in {part}; rerun to resume)") from None
            delay = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            log.warning("%s: %s; retry %d/%d in %.1f s", url, exc, attempt, retries, delay)
            time.sleep(delay)

    if md5 is not None:
        actual = md5_file(part)
        if actual != md5.lower():
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: MD5 mismatch for {dest} (expected {md5.lower()}, got {actual}); "
                                f"the bad file was deleted")
    os.replace(part, dest)
    if md5 is not None:
        _write_marker(dest, md5.lower())
    log.info("downloaded %s -> %s", url, dest)
    return dest


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _fetch_once(url: str, part: Path, timeout_s: float, progress: bool, label: str) -> None:
    """One HTTP request appending to ``part``; raises :class:`_Retry` on recoverable errors."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and offset:
                _, total = _parse_content_range(exc.headers.get("Content-Range"))
                if total == offset:
                    log.info("%s: partial file %s is already complete", url, part)
                    return
                part.unlink(missing_ok=True)
                raise _Retry(f"server refused resuming at byte {offset} (HTTP 416); restarting") from None
            if exc.code in RETRYABLE_STATUS:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Retry(f"cannot connect: {getattr(exc, 'reason', exc)}") from None

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, asked for {offset}; restarting")
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif status == 200:
            if offset:
                log.info("%s: server ignored the Range request; restarting from byte 0", url)
            offset, total, mode = 0, length, "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")

        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=label, disable=not progress,
                                          leave=False) as bar:
            try:
                while block := response.read(CHUNK):
                    fh.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"transfer interrupted at byte {fh.tell()}: {exc}") from None
            got = fh.tell()

    if total is not None and got < total:
        raise _Retry(f"transfer ended early ({got} of {total} bytes)")
    if total is not None and got > total:
        part.unlink(missing_ok=True)
        raise _Retry(f"received {got} bytes, more than the announced {total}; restarting")
