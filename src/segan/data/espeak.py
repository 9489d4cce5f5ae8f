"""Offline, byte-reproducible speech synthesis with the espeak-ng bundled in ``espeakng-loader``.

The library and its voice data ship inside the ``espeakng-loader`` wheel; we bind its C API
with :mod:`ctypes` (no system espeak, no subprocess).

Why every utterance gets a *freshly loaded* library: espeak-ng keeps synthesis state in
static variables (e.g. the pitch "flutter" phase in ``wavegen.c``) that neither
``espeak_ng_SetRandSeed`` nor ``espeak_Terminate`` resets, so the same text synthesized
twice in one process differs sample by sample. To make the output a pure function of
``(text, voice, rate, pitch, range, seed)`` - independent of what was synthesized before,
of the worker that does it and of the worker count - each call ``dlopen``\\ s a private
copy of the library, synthesizes, and ``dlclose``\\ s it so the next call starts from
pristine static data. Loading + initializing costs ~5 ms, negligible next to the rest.

The private copy (one per process, in a memfd) guarantees nobody else in the process holds
the same handle, which would keep the library mapped between calls; we check it really
was unmapped. Calls are serialized with a lock because the library is process-global state.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import functools
import logging
import multiprocessing.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# espeak_ng_OUTPUT_MODE: audio is handed to the synth callback and the call blocks until done.
_ENOUTPUT_MODE_SYNCHRONOUS = 0x0001
# espeak_PARAMETER ids (speak_lib.h)
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ENS_OK = 0

RATE_RANGE = (80, 450)  # words per minute espeak accepts
PITCH_RANGE = (0, 100)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """espeak-ng is unavailable, or rejected a voice, parameter or text."""


class _Voice(ctypes.Structure):
    """``espeak_VOICE`` from speak_lib.h (only read, never allocated by us)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class VoiceInfo:
    """What espeak actually selected for a requested voice name."""

    requested: str
    identifier: str  # e.g. "gmw/en-US+m3": language file + variant
    name: str  # e.g. "English (America)"
    gender: str  # "male" | "female" | "unknown"


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def _paths() -> tuple[Path, Path]:
    try:
        import espeakng_loader
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise EspeakError("the 'espeakng-loader' package is required for synthetic data "
                          "(pip install espeakng-loader)") from exc
    lib, data = Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path())
    if not lib.is_file():
        raise EspeakError(f"{lib}: espeak-ng library missing from the espeakng-loader package")
    if not (data / "phontab").is_file():
        raise EspeakError(f"{data}: espeak-ng data folder incomplete (no phontab)")
    return lib, data


def data_path() -> Path:
    """The espeak-ng data folder bundled with ``espeakng-loader``."""
    return _paths()[1]


_LOCK = threading.Lock()
_PRIVATE: dict[int, str] = {}  # pid -> path of this process's private copy of the library


def _new_lock_after_fork() -> None:
    # a fork while another thread synthesizes would otherwise leave the child's lock held
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def _private_library() -> str:
    """A path to a copy of the library that only this module loads (one per process).

    On Linux the copy lives in an anonymous memfd (nothing to clean up, works where /tmp is
    noexec); elsewhere in a temp folder removed at exit.
    """
    pid = os.getpid()
    if pid not in _PRIVATE:
        lib, _ = _paths()
        if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
            fd = os.memfd_create("segan-libespeak-ng")  # close-on-exec; forked children keep it
            with os.fdopen(os.dup(fd), "wb") as out, lib.open("rb") as src:
                shutil.copyfileobj(src, out)
            _PRIVATE[pid] = f"/proc/self/fd/{fd}"
        else:  # pragma: no cover - non-Linux
            folder = Path(tempfile.mkdtemp(prefix="segan-espeak-"))
            copy = folder / lib.name
            shutil.copyfile(lib, copy)
            _PRIVATE[pid] = str(copy)
            atexit.register(_remove_private, pid, folder)
            # multiprocessing children skip atexit; their finalizers still run
            multiprocessing.util.Finalize(None, _remove_private, args=(pid, folder), exitpriority=0)
        logger.debug("espeak-ng: private library copy for pid %d at %s", pid, _PRIVATE[pid])
    return _PRIVATE[pid]


def _remove_private(pid: int, folder: Path) -> None:  # pragma: no cover - non-Linux
    if os.getpid() == pid:  # a forked child must not delete its parent's copy
        shutil.rmtree(folder, ignore_errors=True)


def _assert_unloaded(path: str) -> None:
    """Fail loudly if the library stayed mapped (the next call would not start fresh)."""
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOLOAD)
    except OSError:
        return  # not loaded: good
    _ctypes.dlclose(lib._handle)
    raise EspeakError(f"{path}: espeak-ng library stayed loaded after dlclose; synthesis would not "
                      "be reproducible")


class _Session:
    """One load of the library: initialize on enter, terminate and unload on exit."""

    def __init__(self) -> None:
        self.path = _private_library()
        self.samples: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive for the whole session
        self.lib: ctypes.CDLL | None = None
        self._set_rand_seed = None

    def _collect(self, wav, count, _events) -> int:  # noqa: ANN001 - ctypes callback
        if count > 0 and wav:
            self.samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0 = keep going

    def __enter__(self) -> "_Session":
        try:
            lib = ctypes.CDLL(self.path, mode=os.RTLD_LOCAL)
        except OSError as exc:
            raise EspeakError(f"{self.path}: cannot load the espeak-ng library from espeakng-loader "
                              f"({exc})") from None
        self.lib = lib
        try:
            self._initialize(lib)
        except BaseException:
            self.__exit__()  # unload even on failure, or the next session would not start fresh
            raise
        return self

    def _initialize(self, lib: ctypes.CDLL) -> None:
        lib.espeak_ng_InitializePath.argtypes = [ctypes.c_char_p]
        lib.espeak_ng_Initialize.argtypes = [ctypes.c_void_p]
        lib.espeak_ng_InitializeOutput.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
        lib.espeak_ng_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_ng_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        # espeak_ng_SetRandSeed appeared in espeak-ng 1.52; without it a fresh load still
        # starts espeak's generator from the same state.
        self._set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_rand_seed is not None:
            self._set_rand_seed.argtypes = [ctypes.c_long]
        lib.espeak_ng_Synthesize.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_GetStatusCodeMessage.argtypes = [ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t]
        lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_Voice)
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_ng_InitializePath(str(_paths()[1]).encode())
        context = ctypes.c_void_p()
        self._check(lib.espeak_ng_Initialize(ctypes.byref(context)), "initialize")
        self._check(lib.espeak_ng_InitializeOutput(_ENOUTPUT_MODE_SYNCHRONOUS, 0, None), "initialize output")

    def __exit__(self, *exc: object) -> None:
        lib, self.lib, self._set_rand_seed = self.lib, None, None
        if lib is None:
            return
        lib.espeak_ng_Terminate()
        handle = lib._handle
        del lib
        _ctypes.dlclose(handle)  # last reference: the next session maps pristine static data
        _assert_unloaded(self.path)

    def _check(self, status: int, what: str) -> None:
        if status != _ENS_OK:
            buf = ctypes.create_string_buffer(512)
            assert self.lib is not None
            self.lib.espeak_ng_GetStatusCodeMessage(status, buf, len(buf))
            raise EspeakError(f"espeak-ng {what} failed: {buf.value.decode(errors='replace')} "
                              f"(status 0x{status & 0xFFFFFFFF:08x})")

    def sample_rate(self) -> int:
        assert self.lib is not None
        return int(self.lib.espeak_ng_GetSampleRate())

    def set_voice(self, voice: str) -> VoiceInfo:
        assert self.lib is not None
        status = self.lib.espeak_ng_SetVoiceByName(voice.encode())
        if status != _ENS_OK:
            raise EspeakError(f"espeak-ng voice {voice!r} not found in {_paths()[1]} "
                              f"(status 0x{status & 0xFFFFFFFF:08x}); see segan.data.espeak.list_languages()")
        current = self.lib.espeak_GetCurrentVoice().contents
        identifier = (current.identifier or b"").decode()
        # espeak silently drops an unknown "+variant"; refuse instead of using another voice.
        if "+" in voice and not identifier.endswith("+" + voice.split("+", 1)[1]):
            raise EspeakError(f"espeak-ng voice {voice!r}: variant {voice.split('+', 1)[1]!r} not found "
                              f"(espeak selected {identifier!r}); see segan.data.espeak.list_variants()")
        gender = {1: "male", 2: "female"}.get(current.gender, "unknown")
        return VoiceInfo(voice, identifier, (current.name or b"").decode(), gender)

    def set_parameter(self, param: int, value: int, name: str) -> None:
        assert self.lib is not None
        self._check(self.lib.espeak_ng_SetParameter(param, int(value), 0), f"set {name}={value}")

    def synthesize(self, text: str, seed: int) -> np.ndarray:
        assert self.lib is not None
        # espeak draws from its own generator and from libc rand(); seed both (this reseeds
        # the process-wide libc rand(), which Python and numpy do not use).
        if self._set_rand_seed is not None:
            self._set_rand_seed(seed)
        _libc().srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        data = text.encode("utf-8")
        self.samples.clear()
        self._check(self.lib.espeak_ng_Synthesize(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                                                  _ESPEAK_CHARS_UTF8, None, None), f"synthesize {text[:40]!r}")
        return np.concatenate(self.samples) if self.samples else np.zeros(0, np.int16)


def synthesize(text: str, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50,
               pitch_range: int = 50, seed: int = 0) -> tuple[np.ndarray, int]:
    """Speak ``text`` with an espeak-ng ``voice`` (``"language[+variant]"``, e.g. ``"en-us+m3"``).

    Returns ``(samples, rate)``: float32 mono in [-1, 1) at espeak's native rate (22050 Hz).
    The result depends only on the arguments: the same call gives byte-identical samples in
    any process, in any order.
    """
    if not text.strip():
        raise EspeakError("synthesize: text is empty")
    for name, value, (lo, hi) in (("rate_wpm", rate_wpm, RATE_RANGE), ("pitch", pitch, PITCH_RANGE),
                                  ("pitch_range", pitch_range, PITCH_RANGE)):
        if not lo <= value <= hi:
            raise EspeakError(f"synthesize: {name} must be in [{lo}, {hi}], got {value}")
    with _LOCK, _Session() as session:
        session.set_voice(voice)
        session.set_parameter(_ESPEAK_RATE, rate_wpm, "rate")
        session.set_parameter(_ESPEAK_PITCH, pitch, "pitch")
        session.set_parameter(_ESPEAK_RANGE, pitch_range, "range")
        samples = session.synthesize(text, seed)
        rate = session.sample_rate()
    if samples.size == 0:
        raise EspeakError(f"espeak-ng produced no audio for {text[:40]!r} with voice {voice!r}")
    return (samples.astype(np.float32) / 32768.0), rate


def resolve_voice(voice: str) -> VoiceInfo:
    """Check that ``voice`` (and its variant) exists; return what espeak selects for it."""
    with _LOCK, _Session() as session:
        return session.set_voice(voice)


def version() -> str:
    """The espeak-ng library version, e.g. ``"1.52.0"``."""
    with _LOCK, _Session() as session:
        assert session.lib is not None
        return session.lib.espeak_Info(None).decode()


def native_rate() -> int:
    """espeak-ng's output sample rate (22050 Hz for the bundled voices)."""
    with _LOCK, _Session() as session:
        return session.sample_rate()


def list_variants() -> list[str]:
    """Voice variants (``+m3``, ``+f2`` ...) in the bundled data."""
    folder = data_path() / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def list_languages() -> list[str]:
    """Language/accent names (``en-us``, ``en-029`` ...) the bundled voices declare."""
    names: set[str] = set()
    for path in (data_path() / "lang").rglob("*"):
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "language":
                    names.add(parts[1])
    return sorted(names)
