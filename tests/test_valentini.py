"""segan.data.valentini end to end: small generated zips in the real archive layout,
served by a real HTTP server on 127.0.0.1 (see test_fetch.FileServer)."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from segan.config import ValentiniConfig
from segan.data import layout
from segan.data.fetch import ChecksumError, md5_file
from segan.data.valentini import ARCHIVES, ArchiveError, archive_url, archives_for, fetch_valentini
from test_fetch import FileServer

RATE = 48000
UTTS = {
    "testset": ["p232_001", "p232_002"],
    "trainset_28spk": ["p226_001", "p226_002", "p287_001"],
    "trainset_56spk": ["p226_001", "p234_001", "p234_002", "p287_001"],
}


def _wav_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    sf.write(buf, (0.1 * rng.standard_normal(960)).astype(np.float32), RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _zip(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, b"/etc/passwd")
    return buf.getvalue()


def make_archives() -> dict[str, bytes]:
    """All seven archives, shaped like the DataShare ones (top folder, __MACOSX junk)."""
    out = {}
    for kind in ("clean", "noisy"):
        for split, utts in UTTS.items():
            top = f"{kind}_{split}_wav"
            entries = {f"{top}/": b""}
            for utt in utts:
                entries[f"{top}/{utt}.wav"] = _wav_bytes(zlib.crc32(f"{kind}/{utt}".encode()))
                entries[f"__MACOSX/{top}/._{utt}.wav"] = b"\x00\x05\x16\x07 resource fork"
            entries[f"{top}/.DS_Store"] = b"junk"
            out[f"{top}.zip"] = _zip(entries)
    logs = {}
    for split, utts in UTTS.items():
        logs[f"log_{split}.txt"] = "".join(f"{u} cafe {12.5 if split == 'testset' else 15}\n" for u in utts).encode()
        logs[f"__MACOSX/._log_{split}.txt"] = b"junk"
    out["logfiles.zip"] = _zip(logs)
    assert set(out) == set(ARCHIVES)
    return out


ZIPS = make_archives()
MD5S = {name: hashlib.md5(data).hexdigest() for name, data in ZIPS.items()}


@pytest.fixture
def server():
    with FileServer() as srv:
        srv.files.update(ZIPS)
        yield srv


def _cfg(server: FileServer, **kw) -> ValentiniConfig:
    return ValentiniConfig(base_url=server.base_url, retries=3, timeout_s=5.0, **kw)


def _fetch(cfg, out, cache, md5s=MD5S):
    return fetch_valentini(cfg, out, cache, progress=False, md5s=md5s, backoff_s=0.01)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_and_layout_end_to_end(server, tmp_path):
    out, cache = tmp_path / "raw", tmp_path / "archives"
    server.faults["noisy_trainset_28spk_wav.zip"] = ["drop"]  # one archive is interrupted and resumed
    manifest = _fetch(_cfg(server), out, cache)

    for split, key in (("train", "trainset_28spk"), ("test", "testset")):
        expected = [f"{u}.wav" for u in UTTS[key]]
        assert _files(layout.clean_dir(out, split)) == expected
        assert _files(layout.noisy_dir(out, split)) == expected
        assert sorted(layout.read_log(layout.log_path(out, split))) == UTTS[key]
    assert sf.info(str(layout.clean_dir(out, "test") / "p232_001.wav")).samplerate == RATE
    assert layout.read_log(layout.log_path(out, "test"))["p232_001"].snr == 12.5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["clean_trainset_wav", "noisy_trainset_wav", "clean_testset_wav", "noisy_testset_wav",
         "log_trainset.txt", "log_testset.txt", "manifest.json"])

    on_disk = json.loads(layout.manifest_path(out).read_text())
    assert on_disk == manifest
    assert manifest["source"] == "valentini"
    assert manifest["counts"] == {"train": 3, "test": 2}
    assert manifest["sample_rate"] == RATE
    assert manifest["dataset"]["doi"] == "10.7488/ds/2117" and "CC BY 4.0" in manifest["dataset"]["license"]
    assert {a["name"]: a["md5"] for a in manifest["archives"]} == {a.name: MD5S[a.name] for a in archives_for(28)}

    # Only the 5 archives of a 28-speaker run, each requested once except the resumed one.
    assert sorted({r["name"] for r in server.requests}) == sorted(a.name for a in archives_for(28))
    resumed = server.requests_for("noisy_trainset_28spk_wav.zip")
    assert len(resumed) == 2 and resumed[1]["range"] == f"bytes={len(ZIPS[resumed[0]['name']]) // 2}-"
    assert md5_file(cache / "noisy_trainset_28spk_wav.zip") == MD5S["noisy_trainset_28spk_wav.zip"]
    assert all("sequence=" in r["path"] and "isAllowed=y" in r["path"] for r in server.requests)


def test_second_call_does_not_download_again(server, tmp_path):
    out, cache = tmp_path / "raw", tmp_path / "archives"
    _fetch(_cfg(server), out, cache)
    n = len(server.requests)
    (layout.clean_dir(out, "train") / "p226_001.wav").unlink()  # the layout is rebuilt from the cache
    _fetch(_cfg(server), out, cache)
    assert len(server.requests) == n == 5
    assert (layout.clean_dir(out, "train") / "p226_001.wav").exists()


def test_56_speakers_uses_the_56_speaker_archives(server, tmp_path):
    manifest = _fetch(_cfg(server, train_speakers=56), tmp_path / "raw", tmp_path / "archives")
    assert {"clean_trainset_56spk_wav.zip", "noisy_trainset_56spk_wav.zip"} <= {r["name"] for r in server.requests}
    assert not any("28spk" in r["name"] for r in server.requests)
    assert manifest["counts"]["train"] == len(UTTS["trainset_56spk"])
    assert _files(layout.clean_dir(tmp_path / "raw", "train")) == [f"{u}.wav" for u in UTTS["trainset_56spk"]]


def test_wrong_md5_is_clear_and_leaves_nothing(server, tmp_path):
    out, cache = tmp_path / "raw", tmp_path / "archives"
    bad = {**MD5S, "clean_testset_wav.zip": "f" * 32}
    with pytest.raises(ChecksumError) as info:
        _fetch(_cfg(server), out, cache, md5s=bad)
    msg = str(info.value)
    assert "clean_testset_wav.zip" in msg and "f" * 32 in msg and MD5S["clean_testset_wav.zip"] in msg
    assert not (cache / "clean_testset_wav.zip").exists()
    assert not (cache / "clean_testset_wav.zip.part").exists()
    assert not out.exists()


def test_published_checksums_reject_other_files(server, tmp_path):
    # Without the override the real DataShare MD5s apply, which our small zips cannot match.
    with pytest.raises(ChecksumError, match=ARCHIVES["clean_testset_wav.zip"].md5):
        _fetch(_cfg(server), tmp_path / "raw", tmp_path / "archives", md5s=None)


@pytest.mark.parametrize("evil", [
    "clean_testset_wav/../../evil.wav",
    "../evil.wav",
    "/tmp/evil.wav",
    "__MACOSX/../../evil.wav",
    "symlink",
])
def test_escaping_entry_is_refused(server, tmp_path, evil):
    entries = {f"clean_testset_wav/{u}.wav": _wav_bytes(i) for i, u in enumerate(UTTS["testset"])}
    symlinks = ()
    if evil == "symlink":
        symlinks, evil = ("clean_testset_wav/link.wav",), "clean_testset_wav/link.wav"
    else:
        entries[evil] = b"evil"
    server.files["clean_testset_wav.zip"] = _zip(entries, symlinks)
    md5s = {**MD5S, "clean_testset_wav.zip": hashlib.md5(server.files["clean_testset_wav.zip"]).hexdigest()}
    work = tmp_path / "a" / "b"
    out = work / "raw"
    with pytest.raises(ArchiveError) as info:
        _fetch(_cfg(server), out, work / "archives", md5s=md5s)
    assert "clean_testset_wav.zip" in str(info.value) and evil in str(info.value)
    assert not out.exists()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith("a/b/archives/") for p in written), written  # only the downloaded zips
    assert not any("evil" in p or "link" in p for p in written)


def test_archive_dir_makes_no_request(server, tmp_path):
    zips = tmp_path / "my_zips"
    zips.mkdir()
    for a in archives_for(28):
        (zips / a.name).write_bytes(ZIPS[a.name])
    before = {p.name: p.stat().st_mtime_ns for p in zips.iterdir()}
    manifest = _fetch(_cfg(server, archive_dir=str(zips)), tmp_path / "raw", tmp_path / "archives")
    assert server.requests == []
    assert manifest["counts"] == {"train": 3, "test": 2}
    assert manifest["archive_dir"] == str(zips.resolve())
    assert {p.name: p.stat().st_mtime_ns for p in zips.iterdir()} == before  # user folder untouched
    assert not (tmp_path / "archives").exists()


def test_archive_dir_missing_or_corrupt_zip_is_clear(server, tmp_path):
    zips = tmp_path / "my_zips"
    zips.mkdir()
    for a in archives_for(28)[:3]:
        (zips / a.name).write_bytes(ZIPS[a.name])
    cfg = _cfg(server, archive_dir=str(zips))
    with pytest.raises(ArchiveError, match="noisy_trainset_28spk_wav.zip, logfiles.zip"):
        _fetch(cfg, tmp_path / "raw", tmp_path / "archives")
    for a in archives_for(28)[3:]:
        (zips / a.name).write_bytes(ZIPS[a.name])
    (zips / "clean_testset_wav.zip").write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="clean_testset_wav.zip: MD5 mismatch") as info:
        _fetch(cfg, tmp_path / "raw", tmp_path / "archives")
    assert MD5S["clean_testset_wav.zip"] in str(info.value)
    assert (zips / "clean_testset_wav.zip").exists()  # never deletes the user's files
    assert server.requests == []


def test_clean_noisy_mismatch_is_reported(server, tmp_path):
    entries = {f"noisy_testset_wav/{u}.wav": _wav_bytes(i) for i, u in enumerate(UTTS["testset"][:1])}
    server.files["noisy_testset_wav.zip"] = _zip(entries)
    md5s = {**MD5S, "noisy_testset_wav.zip": hashlib.md5(server.files["noisy_testset_wav.zip"]).hexdigest()}
    with pytest.raises(ArchiveError, match="p232_002.wav"):
        _fetch(_cfg(server), tmp_path / "raw", tmp_path / "archives", md5s=md5s)
    assert not (tmp_path / "raw").exists()


def test_archive_url_and_selection():
    a = ARCHIVES["noisy_trainset_56spk_wav.zip"]
    assert archive_url("https://x/handle/10283/2791/", a) == \
        "https://x/handle/10283/2791/noisy_trainset_56spk_wav.zip?sequence=7&isAllowed=y"
    assert [x.name for x in archives_for(28)] == ["clean_testset_wav.zip", "noisy_testset_wav.zip",
                                                  "clean_trainset_28spk_wav.zip", "noisy_trainset_28spk_wav.zip",
                                                  "logfiles.zip"]
    with pytest.raises(ValueError, match="28 or 56"):
        archives_for(30)


def test_malformed_log_names_the_archive(server, tmp_path):
    server.files["logfiles.zip"] = _zip({"log_testset.txt": b"p232_001\n", "log_trainset_28spk.txt": b"p226_001 a 1\n",
                                         "log_trainset_56spk.txt": b""})
    md5s = {**MD5S, "logfiles.zip": hashlib.md5(server.files["logfiles.zip"]).hexdigest()}
    with pytest.raises(ArchiveError, match=r"logfiles.zip: log of the test set is malformed: .*p232_001"):
        _fetch(_cfg(server), tmp_path / "raw", tmp_path / "archives", md5s=md5s)
    assert not (tmp_path / "raw").exists()
