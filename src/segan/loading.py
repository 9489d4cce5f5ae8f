"""Load an enhancer from any of the forms the pipeline produces, behind one runner API.

Accepted specs (:func:`load_enhancer`):

* ``generator.ts``   — TorchScript exported by ``export`` (metadata embedded as an extra file)
* ``generator.onnx`` — ONNX, run with ONNX Runtime (metadata in ``metadata_props``)
* ``*.pt``           — a training checkpoint (``segan.model.load_generator`` + ``Enhancer``)
* ``models:/name/version``, ``runs:/id/path`` or any other MLflow model URI, or a local
  MLflow model folder (one with an ``MLmodel`` file)
* a folder holding ``generator.ts`` (e.g. ``data/models/exported``)

Every runner takes raw waveforms and returns raw waveforms: ``runner(noisy [B,1,T], z)``
with ``z`` of shape ``runner.z_shape(B, T)``; pre-/de-emphasis happen inside the model.
Torch and ONNX Runtime are imported only when a model of that kind is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

META_KEY = "segan_meta"            # ONNX metadata_props key / MLflow model metadata key
TS_META_FILE = "segan_meta.json"   # TorchScript extra file
MODEL_CARD = "model_card.json"
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # scheme:/... but not C:\ drive paths


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message names the spec and the reason."""


@dataclass(frozen=True)
class ModelMeta:
    """What a caller must know to feed a model: its rate, window and noise shape."""

    sample_rate: int
    window: int
    z_channels: int
    depth: int
    preemphasis: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "ModelMeta":
        missing = [k for k in ("sample_rate", "window", "z_channels", "depth") if k not in d]
        if missing:
            raise ModelLoadError(f"{source}: model metadata lacks {missing}; got keys {sorted(d)}")
        try:
            meta = cls(sample_rate=int(d["sample_rate"]), window=int(d["window"]),
                       z_channels=int(d["z_channels"]), depth=int(d["depth"]),
                       preemphasis=float(d.get("preemphasis", 0.0)))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: invalid model metadata {d!r}: {exc}") from None
        if meta.window % (2 ** meta.depth):
            raise ModelLoadError(f"{source}: window {meta.window} is not a multiple of 2**depth "
                                 f"= {2 ** meta.depth}")
        return meta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EnhancerRunner:
    """Raw waveform in, raw waveform out, on numpy arrays.

    Subclasses implement :meth:`_run`; this class checks shapes so every backend fails the
    same clear way on a bad call.
    """

    def __init__(self, meta: ModelMeta, source: str) -> None:
        self.meta = meta
        self.source = source

    @property
    def sample_rate(self) -> int:
        return self.meta.sample_rate

    @property
    def window(self) -> int:
        return self.meta.window

    def z_shape(self, batch: int, length: int) -> tuple[int, int, int]:
        """Shape of the latent noise for ``batch`` inputs of ``length`` samples."""
        step = 2 ** self.meta.depth
        if length <= 0 or length % step:
            raise ValueError(f"{self.source}: input length must be a positive multiple of "
                             f"2**depth = {step}, got {length}")
        return (batch, self.meta.z_channels, length // step)

    def __call__(self, noisy: np.ndarray, z: np.ndarray) -> np.ndarray:
        if noisy.ndim != 3 or noisy.shape[1] != 1:
            raise ValueError(f"{self.source}: expected noisy of shape [B, 1, T], got {noisy.shape}")
        expected = self.z_shape(noisy.shape[0], noisy.shape[2])
        if tuple(z.shape) != expected:
            raise ValueError(f"{self.source}: expected z of shape {expected}, got {tuple(z.shape)}")
        out = self._run(np.ascontiguousarray(noisy, dtype=np.float32),
                        np.ascontiguousarray(z, dtype=np.float32))
        if out.shape != noisy.shape:
            raise RuntimeError(f"{self.source}: model returned shape {out.shape} for input {noisy.shape}")
        return out

    def _run(self, noisy: np.ndarray, z: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {self.meta})"


class TorchRunner(EnhancerRunner):
    """Eager ``nn.Module`` or TorchScript module, on CPU or CUDA."""

    def __init__(self, module: Any, meta: ModelMeta, source: str, device: str = "cpu") -> None:
        import torch

        super().__init__(meta, source)
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    def _run(self, noisy: np.ndarray, z: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(noisy).to(self.device), torch.from_numpy(z).to(self.device))
        return out.float().cpu().numpy()


class OnnxRunner(EnhancerRunner):
    """ONNX Runtime session (CPU provider; CUDA provider when asked for and available)."""

    def __init__(self, path: Path, meta: ModelMeta | None = None, device: str = "cpu") -> None:
        import onnxruntime as ort
        import torch

        opts = ort.SessionOptions()
        # Follow torch's thread setting so a caller (or the benchmark) controls both the same way.
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("%s: onnxruntime has no CUDA provider here; running on CPU", path)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{path}: cannot load ONNX model ({exc})") from None
        if meta is None:
            props = self.session.get_modelmeta().custom_metadata_map
            meta = _meta_from_json_or_card(props.get(META_KEY), path)
        super().__init__(meta, str(path))
        self.input_names = [i.name for i in self.session.get_inputs()]
        if self.input_names != ["noisy", "z"]:
            raise ModelLoadError(f"{path}: expected ONNX inputs ['noisy', 'z'], got {self.input_names}")

    def _run(self, noisy: np.ndarray, z: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {"noisy": noisy, "z": z})
        return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- loaders
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"device: expected auto, cpu or cuda, got {device!r}")
    return device


def _meta_from_json_or_card(text: str | None, path: Path) -> ModelMeta:
    """Embedded metadata first (it travels with the file), else ``model_card.json`` beside it."""
    if text:
        try:
            return ModelMeta.from_dict(json.loads(text), str(path))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path}: embedded metadata is not JSON ({exc})") from None
    card = path.parent / MODEL_CARD
    if card.exists():
        try:
            d = json.loads(card.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{card}: not valid JSON ({exc})") from None
        return ModelMeta.from_dict(d, str(card))
    raise ModelLoadError(f"{path}: no embedded segan metadata and no {MODEL_CARD} beside it; "
                         "re-export the model with the export stage")


def load_torchscript(path: Path, device: str = "cpu") -> TorchRunner:
    import torch

    extra = {TS_META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError / ValueError for bad archives
        raise ModelLoadError(f"{path}: cannot load TorchScript model ({exc})") from None
    meta = _meta_from_json_or_card(extra[TS_META_FILE] or None, path)
    return TorchRunner(module, meta, str(path), device)


def load_checkpoint(path: Path, device: str = "cpu") -> TorchRunner:
    """A training checkpoint: rebuild the eager Enhancer (pre-emphasis, G, de-emphasis)."""
    from .model import Enhancer, load_generator

    try:
        generator, cfg, extra = load_generator(path)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load generator checkpoint ({exc})") from None
    for key in ("sample_rate", "window"):
        if key not in extra:
            raise ModelLoadError(f"{path}: checkpoint lacks {key!r} in its metadata")
    preemph = float(extra.get("preemphasis", cfg.preemphasis))
    meta = ModelMeta(sample_rate=int(extra["sample_rate"]), window=int(extra["window"]),
                     z_channels=int(generator.z_channels), depth=int(generator.depth), preemphasis=preemph)
    return TorchRunner(Enhancer(generator, preemph), meta, str(path), device)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_mlflow(uri: str, device: str = "cpu") -> TorchRunner:
    """An MLflow model logged by ``export`` (TorchScript; metadata under ``segan_meta``)."""
    from .tracking import tracking_uri  # sets MLFLOW_DISABLE_TELEMETRY before mlflow loads

    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory(prefix="segan-mlflow-") as tmp, _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                                                                          "false"):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            meta_dict = (Model.load(local).metadata or {}).get(META_KEY)
            with warnings.catch_warnings():
                # mlflow tries torch.load first; for our TorchScript archive that dispatches to
                # torch.jit.load with a UserWarning saying so
                warnings.simplefilter("ignore", UserWarning)
                module = mlflow.pytorch.load_model(local, map_location=device)
        except Exception as exc:  # mlflow raises MlflowException / OSError for unknown models
            raise ModelLoadError(f"{uri}: cannot load MLflow model ({exc})") from None
    if not meta_dict:
        raise ModelLoadError(f"{uri}: MLflow model has no {META_KEY!r} metadata; log it with segan's export")
    meta = ModelMeta.from_dict(json.loads(meta_dict) if isinstance(meta_dict, str) else meta_dict, uri)
    return TorchRunner(module, meta, uri, device)


def load_enhancer(spec: str | Path, device: str = "cpu") -> EnhancerRunner:
    """Load ``spec`` (see module docstring) as an :class:`EnhancerRunner` on ``device``."""
    device = resolve_device(device)
    text = str(spec)
    if _URI_RE.match(text) and not Path(text).exists():
        return load_mlflow(text, device)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file, folder or MLflow URI "
                             "(expected .ts, .onnx, .pt, a folder or models:/name/version)")
    if path.is_dir():
        if (path / "MLmodel").exists():
            return load_mlflow(str(path.resolve()), device)
        for name in ("generator.ts", "generator.onnx"):
            if (path / name).exists():
                return load_enhancer(path / name, device)
        raise ModelLoadError(f"{path}: folder holds neither an MLmodel nor generator.ts/.onnx")
    suffix = path.suffix.lower()
    if suffix == ".ts":
        return load_torchscript(path, device)
    if suffix == ".onnx":
        return OnnxRunner(path, device=device)
    if suffix in (".pt", ".pth", ".ckpt"):
        return load_checkpoint(path, device)
    raise ModelLoadError(f"{path}: unknown model type {suffix!r}; expected .ts, .onnx, .pt or an MLflow URI")
