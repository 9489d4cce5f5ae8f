"""Typed, validated configuration loaded from ``params.yaml``.

Every section of ``params.yaml`` maps onto one dataclass below. Loading is strict:
an unknown key, a value of the wrong type or a value out of range raises
:class:`ConfigError` naming the full dotted key (``train.g_lambda``) and what was
expected, so a typo in ``dvc exp run -S ...`` never silently falls back to a default.

Ranges live in field metadata (``min``/``max``/``choices``); cross-field rules in each
section's ``check()``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


def _f(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
       min_exclusive: bool = False, help: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    meta = {"min": min, "max": max, "min_exclusive": min_exclusive, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    seed: int = _f(1234, min=0, help="seed for sentences, voices, noise and SNR choice")
    train_utterances: int = _f(500, min=1)
    test_utterances: int = _f(40, min=1)
    sample_rate: int = _f(16000, min=8000, max=48000)
    train_snrs: list[float] = _f(default_factory=lambda: [15.0, 10.0, 5.0, 0.0])
    test_snrs: list[float] = _f(default_factory=lambda: [17.5, 12.5, 7.5, 2.5])
    workers: int = _f(2, min=1, max=64)

    def check(self, key: str) -> None:
        for name in ("train_snrs", "test_snrs"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}: expected at least one SNR, got an empty list")


@dataclass
class ValentiniConfig:
    train_speakers: Literal[28, 56] = 28
    base_url: str = "https://datashare.ed.ac.uk/bitstream/handle/10283/2791"
    archive_dir: str = _f("", help="folder with the zips already on disk; empty = download")
    retries: int = _f(5, min=0, max=50)
    timeout_s: float = _f(60.0, min=1.0)


@dataclass
class FolderConfig:
    clean_dir: str = ""
    noisy_dir: str = ""
    test_clean_dir: str = _f("", help="optional; empty = hold out test_fraction of clean_dir")
    test_noisy_dir: str = ""
    test_fraction: float = _f(0.1, min=0.0, max=0.9)


@dataclass
class DataConfig:
    source: Literal["synthetic", "valentini", "folder"] = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    valentini: ValentiniConfig = field(default_factory=ValentiniConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)

    def check(self, key: str) -> None:
        if self.source == "folder":
            for name in ("clean_dir", "noisy_dir"):
                if not getattr(self.folder, name):
                    raise ConfigError(f"{key}.folder.{name}: required when {key}.source is 'folder'")
            if bool(self.folder.test_clean_dir) != bool(self.folder.test_noisy_dir):
                raise ConfigError(f"{key}.folder.test_clean_dir and test_noisy_dir: give both or neither")


# ----------------------------------------------------------------------------- prepare
@dataclass
class PrepareConfig:
    sample_rate: int = _f(16000, min=8000, max=48000)
    window: int = _f(16384, min=256, help="samples per training window")
    hop: int = _f(8192, min=1, help="samples between window starts (window/2 = 50% overlap)")
    workers: int = _f(2, min=1, max=64)

    def check(self, key: str) -> None:
        if self.hop > self.window:
            raise ConfigError(f"{key}.hop: expected at most {key}.window ({self.window}), got {self.hop}")


# ----------------------------------------------------------------------------- model
PAPER_CHANNELS = [16, 32, 32, 64, 64, 128, 128, 256, 256, 512, 1024]


@dataclass
class ModelConfig:
    g_channels: list[int] = _f(default_factory=lambda: list(PAPER_CHANNELS),
                               help="generator encoder channels; the decoder mirrors them")
    d_channels: list[int] = _f(default_factory=lambda: list(PAPER_CHANNELS))
    kernel_size: int = _f(31, min=1)
    preemphasis: float = _f(0.95, min=0.0, max=0.99, help="0 disables pre/de-emphasis")
    d_leaky_slope: float = _f(0.3, min=0.0, max=1.0)
    residual: bool = _f(False, help="G output = input + tanh(last deconv): starts as the identity")
    resize_layers: int = _f(0, min=0, help="last N decoder layers: linear x2 interpolation + conv "
                                            "instead of a transposed conv (0 = paper)")

    def check(self, key: str) -> None:
        for name in ("g_channels", "d_channels"):
            chans = getattr(self, name)
            if not chans or any(c < 1 for c in chans):
                raise ConfigError(f"{key}.{name}: expected a non-empty list of positive ints, got {chans}")
        if self.resize_layers > len(self.g_channels):
            raise ConfigError(f"{key}.resize_layers: expected at most len(g_channels) = {len(self.g_channels)}, "
                              f"got {self.resize_layers}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"{key}.kernel_size: expected an odd number, got {self.kernel_size}")


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    seed: int = _f(0, min=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    deterministic: bool = True
    optimizer: Literal["adam", "rmsprop"] = "adam"
    g_lr: float = _f(1e-4, min=0.0, min_exclusive=True)
    d_lr: float = _f(1e-4, min=0.0, min_exclusive=True)
    betas: list[float] = _f(default_factory=lambda: [0.5, 0.999])
    lr_schedule: Literal["constant", "cosine"] = "constant"
    g_lambda: float = _f(100.0, min=0.0, help="weight of the L1 term in the generator loss")
    stft_lambda: float = _f(0.0, min=0.0, help="weight of a multi-resolution STFT term in the generator "
                                                 "loss; 0 = the seed's loss")
    max_grad_norm: float = _f(0.0, min=0.0, help="clip each network's gradient norm; 0 = no clipping")
    batch_size: int = _f(16, min=1)
    ref_batch_size: int = _f(16, min=1, help="virtual batch norm reference batch size")
    epochs: int = _f(1, min=1)
    max_steps: int = _f(0, min=0, help="stop after this many steps; 0 = run all epochs")
    checkpoint_every: int = _f(100, min=1, help="steps between checkpoints")
    log_every: int = _f(10, min=1, help="steps between metric logs")
    sample_every: int = _f(0, min=0, help="steps between MLflow audio samples; 0 = only at the end")
    num_samples: int = _f(3, min=0, max=16, help="validation utterances logged as audio")
    nproc_per_node: int = _f(1, min=1, max=64, help="DDP processes per node (torchrun)")
    num_workers: int = _f(0, min=0, max=32, help="DataLoader worker processes")

    def check(self, key: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{key}.betas: expected two numbers in [0, 1), got {self.betas}")


# ----------------------------------------------------------------------------- export / evaluate / gate
@dataclass
class ExportConfig:
    onnx_opset: int = _f(17, min=17, max=23)
    tolerance: float = _f(1e-4, min=0.0, min_exclusive=True)
    registered_model_name: str = "segan-generator"
    verify_windows: int = _f(2, min=1, max=64, help="windows per batch used to verify the exports")


@dataclass
class EnhanceConfig:
    overlap: float = _f(0.5, min=0.0, max=0.9)
    batch_size: int = _f(16, min=1)
    seed: int = _f(0, min=0)


@dataclass
class EvaluateConfig:
    workers: int = _f(2, min=1, max=64)
    num_examples: int = _f(4, min=0, max=64, help="enhanced examples copied to reports/examples")
    noisereduce_prop_decrease: float = _f(0.7, min=0.0, max=1.0)
    max_utterances: int = _f(0, min=0, help="score only the first N test utterances; 0 = all")


@dataclass
class GateConfig:
    baseline: str = "reports/baseline_metrics.json"
    system: str = "segan"
    tolerances: dict[str, float] = _f(default_factory=lambda: {
        "pesq": 0.05, "stoi": 0.01, "csig": 0.05, "cbak": 0.05, "covl": 0.05, "ssnr": 0.5})


@dataclass
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def check(self, key: str) -> None:
        depth = len(self.model.g_channels)
        if self.prepare.window % (2 ** depth):
            raise ConfigError(
                f"prepare.window: expected a multiple of 2**len(model.g_channels) = {2 ** depth}, "
                f"got {self.prepare.window}")
        if self.prepare.window % (2 ** len(self.model.d_channels)):
            raise ConfigError(f"prepare.window: expected a multiple of 2**len(model.d_channels), "
                              f"got {self.prepare.window}")


# ----------------------------------------------------------------------------- machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _check_range(value: Any, meta: Any, key: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and (v < lo or (meta.get("min_exclusive") and v == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{key}: expected a value {op} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: expected a value <= {hi}, got {v!r}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}: expected one of {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], key)
        _check_range(converted, fields[name].metadata, key)
        kwargs[name] = converted
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(prefix or "params")
    return obj


def params_from_dict(raw: dict | None) -> Params:
    """Build validated :class:`Params` from a mapping (missing keys take defaults)."""
    return _build(Params, raw or {}, "")


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml``; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted='a.b.c'`` (creating sections)."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists kept as values), e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
