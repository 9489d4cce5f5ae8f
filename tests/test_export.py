"""Export stage: TorchScript and ONNX reproduce eager PyTorch, metadata travels with the files,
and the model goes through a real (SQLite) MLflow registry and back. No mocks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from segan.config import ModelConfig, params_from_dict
from segan.export import ExportError, export_generator, verification_cases, verify
from segan.loading import ModelMeta, OnnxRunner, load_enhancer
from segan.model import Enhancer, build_models, load_generator, save_generator

WINDOW = 1024
CHANNELS = [4, 8, 8, 16]
TINY = ModelConfig(g_channels=CHANNELS, d_channels=CHANNELS)
PARAMS = params_from_dict({"model": {"g_channels": CHANNELS, "d_channels": CHANNELS},
                           "prepare": {"window": WINDOW, "hop": WINDOW // 2},
                           "export": {"verify_windows": 3}})

pytestmark = pytest.mark.slow  # one real export (torch.export -> ONNX) and an MLflow store: ~20 s


def eager(path: Path) -> Enhancer:
    generator, cfg, extra = load_generator(path)
    return Enhancer(generator, extra["preemphasis"]).eval()


def inputs(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noisy = (0.3 * rng.standard_normal((batch, 1, length))).astype(np.float32)
    z = rng.standard_normal((batch, CHANNELS[-1], length // 2 ** len(CHANNELS)), dtype=np.float32)
    return noisy, z


def run_eager(model: Enhancer, noisy: np.ndarray, z: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(noisy), torch.from_numpy(z)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained-looking generator + training run + prepared test set, exported once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from segan.tracking import Tracker

    tracker = Tracker(uri)  # stands in for the training stage: a real run in a real store
    run_id = tracker.start("train")
    tracker.end()
    models = root / "models"
    tracker.write_run_file(models / "mlflow_run.json")
    torch.manual_seed(0)
    generator, _ = build_models(TINY, WINDOW)
    gen_path = models / "generator.pt"
    save_generator(gen_path, generator, TINY, {"sample_rate": 16000, "window": WINDOW, "preemphasis": 0.95,
                                               "mlflow_run_id": run_id})
    prepared = root / "prepared"
    (prepared / "test" / "noisy").mkdir(parents=True)
    rows = []
    for i in range(2):
        noisy = np.random.default_rng(10 + i).uniform(-0.5, 0.5, 1500 + 700 * i).astype(np.float32)
        rel = f"test/noisy/u{i}.wav"
        sf.write(prepared / rel, noisy, 16000, subtype="FLOAT")
        rows.append({"utterance": f"u{i}", "noise": "white", "snr": 5.0, "seconds": len(noisy) / 16000,
                     "clean_path": rel, "noisy_path": rel})
    with (prepared / "test_manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = root / "exported"
    card = export_generator(gen_path, out, PARAMS, prepared_dir=prepared, tracking=True)
    yield {"root": root, "out": out, "card": card, "gen": gen_path, "run_id": run_id, "uri": uri}
    mp.undo()


def test_files_and_model_card(exported):
    out, card = exported["out"], exported["card"]
    assert sorted(p.name for p in out.iterdir()) == ["generator.onnx", "generator.ts", "model_card.json"]
    assert json.loads((out / "model_card.json").read_text()) == json.loads(json.dumps(card))
    assert (card["sample_rate"], card["window"], card["hop"], card["preemphasis"]) == (16000, WINDOW, 512, 0.95)
    assert (card["z_channels"], card["depth"]) == (CHANNELS[-1], len(CHANNELS))
    assert card["z"]["description"].startswith("z ~ N(0,1) of shape [B, C, T/2^d]")
    assert card["model_params"]["g_channels"] == CHANNELS
    assert card["param_counts"]["generator"] > 0
    assert "git_revision" in card and card["metrics"] == {}
    ex = card["export"]
    assert ex["tolerance"] == PARAMS.export.tolerance and ex["onnx_opset"] == 17
    assert ex["verified_on_test_set"] is True
    for fmt in ("torchscript", "onnx"):
        assert 0 <= ex["max_abs_diff"][fmt] <= ex["tolerance"]
        names = list(ex["cases"][fmt])
        assert any("test-set batch=3" in n for n in names) and any("batch=1" in n for n in names)
        assert {n.split("length=")[1] for n in names} == {str(WINDOW), str(2 * WINDOW)}
    assert card["mlflow"]["run_id"] == exported["run_id"], "logged to the training run"
    assert card["mlflow"]["registry_uri"] == f"models:/{PARAMS.export.registered_model_name}/1"


@pytest.mark.parametrize("batch,length", [(1, WINDOW), (4, 3 * WINDOW), (2, 2 ** len(CHANNELS) * 5)])
def test_torchscript_matches_eager(exported, batch, length):
    module = torch.jit.load(str(exported["out"] / "generator.ts"))
    noisy, z = inputs(batch, length, seed=batch)
    with torch.inference_mode():
        got = module(torch.from_numpy(noisy), torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(got, run_eager(eager(exported["gen"]), noisy, z), atol=PARAMS.export.tolerance)


def test_onnx_runtime_matches_eager_at_two_batches_and_lengths(exported):
    path = exported["out"] / "generator.onnx"
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["noisy", "z"] and model.graph.output[0].name == "enhanced"
    noisy_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert noisy_dims[0].dim_param and noisy_dims[2].dim_param, "batch and length must be dynamic"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = eager(exported["gen"])
    for batch in (1, 5):
        for length in (WINDOW, 4 * WINDOW):
            noisy, z = inputs(batch, length, seed=batch * length)
            (got,) = session.run(None, {"noisy": noisy, "z": z})
            assert got.shape == (batch, 1, length)
            np.testing.assert_allclose(got, run_eager(reference, noisy, z), atol=PARAMS.export.tolerance)


def test_lone_files_carry_their_metadata(exported, tmp_path):
    expected = ModelMeta(16000, WINDOW, CHANNELS[-1], len(CHANNELS), 0.95)
    for name in ("generator.ts", "generator.onnx"):
        shutil.copy(exported["out"] / name, tmp_path / name)  # no model_card.json beside it
        runner = load_enhancer(tmp_path / name)
        assert runner.meta == expected
        assert runner.z_shape(2, 2 * WINDOW) == (2, CHANNELS[-1], 2 * WINDOW // 16)


def test_registry_round_trip(exported):
    from mlflow.tracking import MlflowClient

    name = PARAMS.export.registered_model_name
    client = MlflowClient(tracking_uri=exported["uri"])
    version = client.get_model_version(name, "1")
    assert version.run_id == exported["run_id"]
    runner = load_enhancer(f"models:/{name}/1")
    assert runner.sample_rate == 16000 and runner.window == WINDOW
    noisy, z = inputs(3, 2 * WINDOW, seed=7)
    np.testing.assert_allclose(runner(noisy, z), run_eager(eager(exported["gen"]), noisy, z), atol=1e-6)
    metrics = client.get_run(exported["run_id"]).data.metrics
    assert "export_max_abs_diff_onnx" in metrics


def test_every_loader_gives_the_same_output(exported):
    noisy, z = inputs(2, WINDOW, seed=3)
    ref = load_enhancer(exported["gen"])(noisy, z)
    for spec in (exported["out"] / "generator.ts", exported["out"] / "generator.onnx", exported["out"]):
        np.testing.assert_allclose(load_enhancer(spec)(noisy, z), ref, atol=PARAMS.export.tolerance)


def test_verification_rejects_a_mismatch(exported):
    """A model that differs from the reference is caught and named (format + difference)."""
    torch.manual_seed(1)
    other, _ = build_models(TINY, WINDOW)
    reference = Enhancer(other, 0.95).eval()
    runner = OnnxRunner(exported["out"] / "generator.onnx")
    cases = verification_cases(runner.meta, 2, None)
    with pytest.raises(ExportError, match=r"onnx export differs from eager PyTorch: max abs diff .* > "
                                          r"export.tolerance"):
        verify(reference, {"onnx": runner}, cases, 1e-4)
