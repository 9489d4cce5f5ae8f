"""Export the trained generator for serving: TorchScript, ONNX, a model card, the MLflow registry.

Both exported files hold the whole signal contract (:class:`segan.model.Enhancer`:
pre-emphasis -> G -> de-emphasis), take ``noisy [B, 1, T]`` and ``z [B, C, T / 2**depth]``
for any batch size and any ``T`` that is a multiple of ``2**depth``, and carry their
metadata (rate, window, z shape) inside, so a lone file can be served by
:func:`segan.loading.load_enhancer`.

Nothing is trusted untested: before any file is put in place, TorchScript and ONNX Runtime
outputs are compared with eager PyTorch on random inputs and on real windows of the prepared
test set, at batch 1 and batch > 1 and at two lengths; a difference above
``export.tolerance`` raises :class:`ExportError` naming the format, the case and the
difference. Files are written atomically and ``model_card.json`` last, so a present card
means a complete, verified export.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .config import Params, to_dict
from .fsutil import atomic_path, write_json
from .loading import MODEL_CARD, META_KEY, TS_META_FILE, ModelMeta, OnnxRunner, load_torchscript

log = logging.getLogger(__name__)

TS_FILE = "generator.ts"
ONNX_FILE = "generator.onnx"
ARTIFACT_NAME = "generator"
Z_DESCRIPTION = ("z ~ N(0,1) of shape [B, C, T/2^d], drawn from numpy/torch generator seeded with "
                 "enhance.seed (segan enhance: window k of channel c uses the k-th draw of "
                 "numpy.random.default_rng([enhance.seed, c]))")


def _readable(path: Path) -> None:
    """Temp files are created 0600; give the published file the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class ExportError(RuntimeError):
    """An export that failed or does not reproduce eager PyTorch; names format and difference."""


# ----------------------------------------------------------------------------- conversion
def to_torchscript(enhancer: Any, example: tuple[Any, Any]) -> tuple[Any, str]:
    """Script the Enhancer (keeps every shape dynamic; trace it if scripting fails), then
    freeze it: weights become constants, which makes CPU inference ~20% faster."""
    import torch

    try:
        module, method = torch.jit.script(enhancer), "script"
    except Exception as exc:  # TorchScript frontend errors come in many types
        log.warning("torch.jit.script failed (%s: %s); tracing instead", type(exc).__name__, exc)
        with torch.no_grad():
            module, method = torch.jit.trace(enhancer, example, check_trace=False), "trace"
    try:
        return torch.jit.freeze(module.eval()), f"{method}+freeze"
    except Exception as exc:  # freezing is an optimisation only
        log.warning("torch.jit.freeze failed (%s: %s); exporting the unfrozen module", type(exc).__name__, exc)
        return module, method


def save_torchscript(module: Any, path: Path, meta: dict[str, Any]) -> None:
    import torch

    torch.jit.save(module, str(path), _extra_files={TS_META_FILE: json.dumps(meta)})


def _opset(proto: Any) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def export_onnx(enhancer: Any, example: tuple[Any, Any], path: Path, opset: int, depth: int,
                meta: dict[str, Any]) -> dict[str, Any]:
    """Write ONNX at exactly ``opset`` with dynamic batch and length (length = 2**depth * frames)
    and the metadata in ``metadata_props``; returns {"exporter", "opset"}.

    The torch.export-based exporter is tried first. It emits opset >= 18, so for opset 17 its
    optimized graph is converted down with ``onnx.version_converter``; if that or the export
    fails, the TorchScript-based exporter (native opset 17) is used.
    """
    import onnx
    import torch

    names = {"input_names": ["noisy", "z"], "output_names": ["enhanced"]}
    try:
        batch = torch.export.Dim("batch", min=1)
        frames = torch.export.Dim("frames", min=1)
        with warnings.catch_warnings(), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                enhancer, example, None, dynamo=True, opset_version=max(opset, 18), external_data=False,
                dynamic_shapes={"noisy": {0: batch, 2: (2 ** depth) * frames}, "z": {0: batch, 2: frames}},
                verbose=False, **names)
            proto = program.model_proto
            if _opset(proto) != opset:
                proto = onnx.version_converter.convert_version(proto, opset)
        exporter = "dynamo"
    except Exception as exc:  # fall back on any exporter failure; verification judges the result
        log.warning("torch.export-based ONNX export at opset %d failed (%s: %s); using the "
                    "TorchScript-based exporter", opset, type(exc).__name__, exc)
        exporter = "torchscript"
        with tempfile.TemporaryDirectory(prefix="segan-onnx-") as tmp:
            legacy = Path(tmp) / "model.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(enhancer, example, str(legacy), dynamo=False, opset_version=opset,
                                  dynamic_axes={"noisy": {0: "batch", 2: "samples"},
                                                "z": {0: "batch", 2: "frames"},
                                                "enhanced": {0: "batch", 2: "samples"}}, **names)
            proto = onnx.load(str(legacy))
    if _opset(proto) != opset:
        raise ExportError(f"ONNX export produced opset {_opset(proto)}, expected export.onnx_opset = {opset}")
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    proto.producer_name = "segan"
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return {"exporter": exporter, "opset": _opset(proto)}


def _quiet_exporter_logs() -> contextlib.AbstractContextManager:
    """The torch.export ONNX path logs expected notes (opset conversion, optimizer passes)."""
    return _quiet_loggers("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Raise the given loggers to ERROR for the duration of the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ----------------------------------------------------------------------------- verification
def real_windows(prepared_dir: Path, count: int, length: int, rate: int) -> np.ndarray | None:
    """``count`` noisy segments ``[count, 1, length]`` from the first test utterances of a
    prepared corpus (consecutive, zero-padded at the end); ``None`` without a test set."""
    from .audio import load_mono

    manifest = Path(prepared_dir) / "test_manifest.csv"
    if not manifest.is_file():
        log.warning("%s not found; verifying the exports on random inputs only", manifest)
        return None
    need = count * length
    chunks: list[np.ndarray] = []
    have = 0
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if "noisy_path" not in row:
                raise ExportError(f"{manifest}: expected a noisy_path column, got {list(row)}")
            chunks.append(load_mono(Path(prepared_dir) / row["noisy_path"], rate))
            have += len(chunks[-1])
            if have >= need:
                break
    if not chunks:
        log.warning("%s lists no utterances; verifying the exports on random inputs only", manifest)
        return None
    audio = np.concatenate(chunks)[:need]
    audio = np.pad(audio, (0, need - len(audio)))
    return audio.reshape(count, 1, length).astype(np.float32)


def verification_cases(meta: ModelMeta, batch: int, real: np.ndarray | None, seed: int = 0
                       ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, noisy, z) at batch 1 and ``batch``, lengths window and 2 * window, random and real."""
    rng = np.random.default_rng(seed)
    cases = []
    for length in (meta.window, 2 * meta.window):
        for b in (1, batch):
            frames = length // 2 ** meta.depth
            noisy = np.clip(0.25 * rng.standard_normal((b, 1, length)), -1, 1).astype(np.float32)
            z = rng.standard_normal((b, meta.z_channels, frames), dtype=np.float32)
            cases.append((f"random batch={b} length={length}", noisy, z))
            if real is not None:
                zr = rng.standard_normal((b, meta.z_channels, frames), dtype=np.float32)
                cases.append((f"test-set batch={b} length={length}", real[:b, :, :length], zr))
    return cases


def verify(reference: Any, runners: dict[str, Any], cases: list[tuple[str, np.ndarray, np.ndarray]],
           tolerance: float) -> dict[str, dict[str, Any]]:
    """Max |format - eager| per format and case; raises :class:`ExportError` above ``tolerance``."""
    import torch

    report: dict[str, dict[str, Any]] = {name: {"max_abs_diff": 0.0, "cases": {}} for name in runners}
    for case, noisy, z in cases:
        with torch.inference_mode():
            expected = reference(torch.from_numpy(noisy), torch.from_numpy(z)).numpy()
        for name, runner in runners.items():
            got = runner(noisy, z)
            if got.shape != expected.shape:
                raise ExportError(f"{name} export returns shape {got.shape}, eager PyTorch {expected.shape} "
                                  f"({case})")
            diff = float(np.max(np.abs(got - expected)))
            if not np.isfinite(diff) or diff > tolerance:
                raise ExportError(f"{name} export differs from eager PyTorch: max abs diff {diff:.3g} > "
                                  f"export.tolerance {tolerance:g} ({case})")
            report[name]["cases"][case] = diff
            report[name]["max_abs_diff"] = max(report[name]["max_abs_diff"], diff)
            log.debug("%s %s: max abs diff %.3g", name, case, diff)
    return report


# ----------------------------------------------------------------------------- MLflow
def log_to_mlflow(scripted: Any, meta: dict[str, Any], card: dict[str, Any], run_file: Path,
                  registered_name: str) -> dict[str, Any]:
    """Log the TorchScript Enhancer to the training run and register it; returns the registry info.

    The run comes from ``mlflow_run.json`` (written by training); without one a new run
    named ``export`` is started in the ``segan`` experiment.
    """
    import torch

    from .tracking import EXPERIMENT, RUN_FILE, Tracker, tracking_uri  # sets MLFLOW_DISABLE_TELEMETRY

    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    uri = tracking_uri()
    run_id = None
    if run_file.is_file():
        try:
            run_id = json.loads(run_file.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("cannot read %s (%s); logging to a new run", run_file, exc)
    else:
        log.info("no %s beside the generator; logging the model to a new run", RUN_FILE)
    if run_id:
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a run recorded in another store
            log.warning("training run %s from %s is not in %s (%s); logging to a new run",
                        run_id, run_file, uri, exc)
            run_id = None
    if not run_id:
        tracker = Tracker(uri, experiment=EXPERIMENT)
        run_id = tracker.start("export")
        if run_id is None:
            raise RuntimeError(f"cannot create an MLflow run in {uri}")
        tracker.end()
    f32 = np.dtype(np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, 1, -1), "noisy"), TensorSpec(f32, (-1, meta["z_channels"], -1), "z")]),
        outputs=Schema([TensorSpec(f32, (-1, 1, -1), "enhanced")]))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), _quiet_loggers("mlflow.pytorch"):
        # TorchScript via the "pickle" format: the default "pt2" (torch.export) would fix the
        # input shapes; a ScriptModule keeps batch and length dynamic, is saved with
        # torch.jit.save (not pickle; hence the silenced pickle warning) and loads with
        # torch.jit.load.
        info = mlflow.pytorch.log_model(
            scripted, name=ARTIFACT_NAME, serialization_format="pickle", signature=signature,
            registered_model_name=registered_name, metadata={META_KEY: meta},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])
        mlflow.log_metrics({f"export_max_abs_diff_{k}": float(v)
                            for k, v in card["export"]["max_abs_diff"].items()})
        version = info.registered_model_version
        result = {"tracking_uri": uri, "run_id": run_id, "model_uri": info.model_uri,
                  "registered_model_name": registered_name,
                  "registered_model_version": int(version) if version is not None else None,
                  "registry_uri": f"models:/{registered_name}/{version}" if version is not None else None}
        mlflow.log_dict({**card, "mlflow": result}, "export/model_card.json")
    log.info("MLflow: logged the exported model to run %s, registered as %s", run_id, result["registry_uri"])
    return result


# ----------------------------------------------------------------------------- stage
def export_generator(generator_path: Path, out_dir: Path, params: Params, *, prepared_dir: Path | None,
                     tracking: bool = True) -> dict:
    """Export ``generator_path`` into ``out_dir`` (generator.ts, generator.onnx, model_card.json),
    verify both against eager PyTorch, log + register in MLflow; returns the model card."""
    import torch

    from .model import Enhancer, count_parameters, load_generator
    from .tracking import RUN_FILE, git_revision

    generator_path, out_dir = Path(generator_path), Path(out_dir)
    generator, cfg, extra = load_generator(generator_path)
    sample_rate = int(extra.get("sample_rate", params.prepare.sample_rate))
    window = int(extra.get("window", params.prepare.window))
    preemph = float(extra.get("preemphasis", cfg.preemphasis))
    for key, ours, theirs in (("sample_rate", sample_rate, params.prepare.sample_rate),
                              ("window", window, params.prepare.window)):
        if ours != theirs:
            log.warning("%s: trained with %s=%s but params.yaml prepare.%s=%s; exporting the trained value",
                        generator_path, key, ours, key, theirs)
    enhancer = Enhancer(generator, preemph).eval()
    meta = ModelMeta(sample_rate=sample_rate, window=window, z_channels=int(generator.z_channels),
                     depth=int(generator.depth), preemphasis=preemph)
    meta_dict = meta.to_dict()
    ex_cfg = params.export
    batch = max(2, ex_cfg.verify_windows)
    example_len = 2 * window  # a bottleneck length > 1, so the exporter cannot pin it to 1
    gen = torch.Generator().manual_seed(0)
    example = (0.25 * torch.randn(2, 1, example_len, generator=gen),
               torch.randn(2, meta.z_channels, example_len // 2 ** meta.depth, generator=gen))

    real = real_windows(prepared_dir, batch, 2 * window, sample_rate) if prepared_dir is not None else None
    cases = verification_cases(meta, batch, real)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        ts_tmp = stack.enter_context(atomic_path(out_dir / TS_FILE, suffix=".ts"))
        onnx_tmp = stack.enter_context(atomic_path(out_dir / ONNX_FILE, suffix=".onnx"))
        log.info("exporting TorchScript")
        scripted, ts_method = to_torchscript(enhancer, example)
        save_torchscript(scripted, ts_tmp, meta_dict)
        log.info("exporting ONNX (opset %d)", ex_cfg.onnx_opset)
        try:
            onnx_info = export_onnx(enhancer, example, onnx_tmp, ex_cfg.onnx_opset, meta.depth, meta_dict)
        except Exception as exc:
            raise ExportError(f"ONNX export of {generator_path} failed: {type(exc).__name__}: {exc}") from exc
        log.info("verifying TorchScript and ONNX Runtime against eager PyTorch on %d cases", len(cases))
        runners = {"torchscript": load_torchscript(ts_tmp), "onnx": OnnxRunner(onnx_tmp)}
        for name, runner in runners.items():
            if runner.meta != meta:
                raise ExportError(f"{name} export carries metadata {runner.meta}, expected {meta}")
        report = verify(enhancer, runners, cases, ex_cfg.tolerance)
        _readable(ts_tmp)
        _readable(onnx_tmp)
        # leaving the block renames both files into place (only when everything above passed)

    hop = int(round(window * (1 - params.enhance.overlap)))
    card: dict[str, Any] = {
        "format_version": 1,
        "model": "SEGAN generator (Pascual et al., 2017) with pre-/de-emphasis inside",
        "files": {"torchscript": TS_FILE, "onnx": ONNX_FILE, "source": str(generator_path)},
        **meta_dict,
        "hop": hop,
        "overlap": params.enhance.overlap,
        "inputs": {"noisy": "[B, 1, T] float32 waveform in [-1, 1] at sample_rate; T a multiple of 2^depth "
                            "(the window is what the model was trained on)",
                   "z": f"[B, {meta.z_channels}, T/2^{meta.depth}] float32"},
        "outputs": {"enhanced": "[B, 1, T] float32 waveform at sample_rate"},
        "z": {"shape": "[B, C, T/2^d]", "channels": meta.z_channels, "depth": meta.depth,
              "seed": params.enhance.seed, "description": Z_DESCRIPTION},
        "model_params": to_dict(cfg),
        "param_counts": {"generator": count_parameters(generator)},
        "training": {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        "export": {"torchscript_method": ts_method, "onnx_exporter": onnx_info["exporter"],
                   "onnx_opset": onnx_info["opset"], "tolerance": ex_cfg.tolerance,
                   "max_abs_diff": {k: v["max_abs_diff"] for k, v in report.items()},
                   "cases": {k: v["cases"] for k, v in report.items()},
                   "verified_on_test_set": real is not None},
        "mlflow": {"run_id": extra.get("mlflow_run_id")},
        "metrics": {},
    }
    if tracking:
        try:
            card["mlflow"] = log_to_mlflow(scripted, meta_dict, card, generator_path.parent / RUN_FILE,
                                           ex_cfg.registered_model_name)
        except Exception as exc:  # noqa: BLE001 - tracking must not fail a verified export
            log.warning("MLflow logging/registration failed (%s: %s); the export itself is complete",
                        type(exc).__name__, exc)
            card["mlflow"]["error"] = f"{type(exc).__name__}: {exc}"
    write_json(out_dir / MODEL_CARD, card)
    _readable(out_dir / MODEL_CARD)
    log.info("exported %s -> %s (max abs diff: %s)", generator_path, out_dir,
             ", ".join(f"{k} {v:.2g}" for k, v in card["export"]["max_abs_diff"].items()))
    return card


__all__ = ["ExportError", "export_generator", "export_onnx", "real_windows", "to_torchscript", "verify",
           "verification_cases"]
