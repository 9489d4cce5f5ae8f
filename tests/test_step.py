"""Least-squares losses and the one-forward training step (against the seed's literal step)."""

from __future__ import annotations

import copy
import gc
import math
import socket

import pytest
import torch

from segan.config import ModelConfig
from segan.losses import STFT_RESOLUTIONS, d_loss_terms, g_loss_terms, stft_loss
from segan.model import Discriminator, build_models
from segan.step import STEP_METRICS, baseline_step, reset_reference_cache, train_step

TINY = ModelConfig(g_channels=[4, 8, 8], d_channels=[4, 8, 8])
T, B, R = 256, 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_setup(seed: int = 0, lr: float = 1e-3, fused: bool | None = None):
    torch.manual_seed(seed)
    G, D = build_models(TINY, window=T)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999), fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999), fused=fused)
    return G, D, opt_g, opt_d


def make_batch(seed: int = 1, steps: int = 1):
    gen = torch.Generator().manual_seed(seed)
    clean = 0.3 * torch.randn(B, 1, T, generator=gen)
    noisy = clean + 0.1 * torch.randn(B, 1, T, generator=gen)
    ref = 0.3 * torch.randn(R, 2, T, generator=gen)
    zs = [torch.randn(B, 8, T // 8, generator=gen) for _ in range(steps)]
    return noisy, clean, ref, zs


def params(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def assert_same_params(a, b, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------- losses
def test_d_loss_terms_hand_computed():
    d_real = torch.tensor([[0.5], [1.5]])
    d_fake = torch.tensor([[0.2], [-0.4]])
    clean, noisy, total = d_loss_terms(d_real, d_fake)
    assert clean.item() == pytest.approx(0.25)           # ((-0.5)^2 + 0.5^2) / 2
    assert noisy.item() == pytest.approx(0.1)            # (0.04 + 0.16) / 2
    assert total.item() == pytest.approx(0.175)          # 0.5 * (0.25 + 0.1)


def test_g_loss_terms_hand_computed():
    d_gen = torch.tensor([[0.0], [0.5]])
    generated = torch.tensor([[[0.1, -0.2]], [[0.3, 0.0]]])
    clean = torch.tensor([[[0.0, 0.0]], [[0.0, 0.4]]])
    adv, l1, spectral, total = g_loss_terms(d_gen, generated, clean, g_lambda=100.0)
    assert adv.item() == pytest.approx(0.3125)           # 0.5 * (1 + 0.25) / 2
    assert l1.item() == pytest.approx(0.25)              # (0.1 + 0.2 + 0.3 + 0.4) / 4
    assert spectral.item() == 0.0                        # stft_lambda 0: the seed's loss
    assert total.item() == pytest.approx(25.3125)        # 0.3125 + 100 * 0.25


def _hand_stft_loss(generated, clean):
    """The same loss written frame by frame with numpy (reference for the batched version)."""
    import numpy as np
    g, c = generated.double().numpy().reshape(-1, generated.shape[-1]), clean.double().numpy().reshape(-1, clean.shape[-1])
    total = 0.0
    for n_fft, hop, win in STFT_RESOLUTIONS:
        window = np.hanning(win + 1)[:-1]  # periodic Hann, as torch.hann_window
        frames = range(0, g.shape[1] - win + 1, hop)
        mag = lambda x: np.sqrt(np.maximum(np.abs(np.stack(
            [np.fft.rfft(x[:, s:s + win] * window, n=n_fft, axis=1) for s in frames], 1)) ** 2, 1e-7))
        mg, mc = mag(g), mag(c)
        total += np.linalg.norm(mc - mg) / np.linalg.norm(mc) + np.abs(np.log(mc) - np.log(mg)).mean()
    return total / len(STFT_RESOLUTIONS)


def test_stft_loss_against_a_frame_by_frame_reference():
    gen = torch.Generator().manual_seed(0)
    clean = 0.1 * torch.randn(2, 1, 4000, generator=gen)
    generated = clean + 0.03 * torch.randn(2, 1, 4000, generator=gen)
    assert stft_loss(generated, clean).item() == pytest.approx(_hand_stft_loss(generated, clean), rel=1e-4)
    assert stft_loss(clean, clean).item() == 0.0


def test_stft_loss_is_finite_on_silence_and_short_signals():
    silence = torch.zeros(2, 1, 256, requires_grad=True)  # shorter than every STFT window
    loss = stft_loss(silence, torch.zeros(2, 1, 256))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(silence.grad).all()
    loss = stft_loss(0.1 * torch.ones(1, 1, 256), torch.zeros(1, 1, 256))
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_stft_term_adds_to_the_generator_loss():
    gen = torch.Generator().manual_seed(0)
    clean = 0.1 * torch.randn(2, 1, 2048, generator=gen)
    generated = clean + 0.05 * torch.randn(2, 1, 2048, generator=gen)
    d_gen = torch.tensor([[0.2], [0.7]])
    adv, l1, spectral, total = g_loss_terms(d_gen, generated, clean, g_lambda=100.0, stft_lambda=10.0)
    assert spectral.item() == pytest.approx(stft_loss(generated, clean).item())
    assert spectral.item() > 0
    assert total.item() == pytest.approx(adv.item() + 100.0 * l1.item() + 10.0 * spectral.item(), rel=1e-6)


def test_losses_are_float32_under_bf16_inputs():
    d = torch.tensor([[0.5], [1.5]], dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in d_loss_terms(d, d))
    x = torch.randn(2, 1, 1024, dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in g_loss_terms(d, x, x.float() * 0.5, 100.0, stft_lambda=1.0))


# ----------------------------------------------------------------------------- train_step
def test_train_step_metrics_and_both_networks_change():
    G, D, opt_g, opt_d = make_setup()
    noisy, clean, ref, (z,) = make_batch()
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    out = train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
    assert set(out) == set(STEP_METRICS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # the reported values are the losses of the networks as they were before the step
    with torch.no_grad():
        gen = G0(noisy, z)
        d_real = D0(torch.cat([clean, noisy], 1), ref)
        d_fake = D0(torch.cat([gen, noisy], 1), ref)
    clean_loss, noisy_loss, d_loss = d_loss_terms(d_real, d_fake)
    assert out["d_real"] == pytest.approx(d_real.mean().item(), abs=1e-5)
    assert out["d_fake"] == pytest.approx(d_fake.mean().item(), abs=1e-5)
    assert out["clean_loss"] == pytest.approx(clean_loss.item(), rel=1e-5)
    assert out["noisy_loss"] == pytest.approx(noisy_loss.item(), rel=1e-5)
    assert out["d_loss"] == pytest.approx(d_loss.item(), rel=1e-5)
    assert out["g_l1"] == pytest.approx((gen - clean).abs().mean().item(), rel=1e-5)
    assert out["g_loss"] == pytest.approx(out["g_adv"] + 100.0 * out["g_l1"], rel=1e-6)
    for before, after in ((G0, G), (D0, D)):
        changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
        assert all(changed), "every parameter of both networks should move after one Adam step"


def test_train_step_with_the_stft_term():
    G, D, opt_g, opt_d = make_setup()
    noisy, clean, ref, (z,) = make_batch()
    G0 = copy.deepcopy(G)
    out = train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0, stft_lambda=5.0)
    with torch.no_grad():
        expected = stft_loss(G0(noisy, z), clean).item()
    assert out["g_stft"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert out["g_loss"] == pytest.approx(out["g_adv"] + 100.0 * out["g_l1"] + 5.0 * out["g_stft"], rel=1e-6)
    plain = train_step(*make_setup(), noisy, clean, ref, z, g_lambda=100.0)
    assert plain["g_stft"] == 0.0


@pytest.mark.parametrize("fused", [None, True], ids=["adam", "fused-adam"])
def test_train_step_equals_the_seeds_literal_step_over_several_steps(fused):
    # fused Adam does not bump parameter version counters: the cache must still be dropped
    G, D, opt_g, opt_d = make_setup(fused=fused)
    G2, D2, opt_g2, opt_d2 = make_setup(fused=fused)
    noisy, clean, ref, zs = make_batch(steps=3)
    for z in zs:  # step 2 and 3 reuse the reference moments cached in the previous G update
        a = train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
        b = baseline_step(G2, D2, opt_g2, opt_d2, noisy, clean, ref, z, g_lambda=100.0)
        for key in STEP_METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert_same_params(params(G, D), params(G2, D2))


def test_reference_passes_per_step(monkeypatch):
    calls = {"n": 0}
    original = Discriminator.reference_stats

    def counting(self, ref):
        calls["n"] += 1
        return original(self, ref)

    monkeypatch.setattr(Discriminator, "reference_stats", counting)
    noisy, clean, ref, zs = make_batch(steps=3)
    G, D, opt_g, opt_d = make_setup()
    for z in zs:
        train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
    assert calls["n"] == 2 + 1 + 1  # first step 2, then 1 per step (reused by the next D update)
    calls["n"] = 0
    G, D, opt_g, opt_d = make_setup()
    for z in zs:
        baseline_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
    assert calls["n"] == 3 * 3


def test_reference_cache_notices_weight_and_reference_changes():
    noisy, clean, ref, zs = make_batch(steps=3)
    G, D, opt_g, opt_d = make_setup()
    G2, D2, opt_g2, opt_d2 = make_setup()
    train_step(G, D, opt_g, opt_d, noisy, clean, ref, zs[0], g_lambda=100.0)
    baseline_step(G2, D2, opt_g2, opt_d2, noisy, clean, ref, zs[0], g_lambda=100.0)
    # change D behind the step's back (like loading a checkpoint) in both runs
    torch.manual_seed(9)
    other = build_models(TINY, window=T)[1].state_dict()
    D.load_state_dict(other)
    D2.load_state_dict(other)
    a = train_step(G, D, opt_g, opt_d, noisy, clean, ref, zs[1], g_lambda=100.0)
    b = baseline_step(G2, D2, opt_g2, opt_d2, noisy, clean, ref, zs[1], g_lambda=100.0)
    assert a["d_loss"] == pytest.approx(b["d_loss"], rel=1e-4)
    # an in-place change of the reference batch is seen too
    ref.mul_(2.0)
    a = train_step(G, D, opt_g, opt_d, noisy, clean, ref, zs[2], g_lambda=100.0)
    b = baseline_step(G2, D2, opt_g2, opt_d2, noisy, clean, ref, zs[2], g_lambda=100.0)
    assert a["d_loss"] == pytest.approx(b["d_loss"], rel=1e-4)
    assert_same_params(params(G, D), params(G2, D2), atol=1e-5)
    reset_reference_cache(D)  # public escape hatch; must not fail when called twice
    reset_reference_cache(D)


def test_g_update_leaves_d_weights_without_gradient():
    G, D, opt_g, opt_d = make_setup()
    noisy, clean, ref, (z,) = make_batch()
    out = train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
    assert all(p.requires_grad for p in D.parameters())  # restored after the G update
    # D's gradients are exactly those of d_loss (the G update added nothing to them)
    d_norm = torch.nn.utils.get_total_norm([p.grad for p in D.parameters()]).item()
    assert d_norm == pytest.approx(out["d_grad_norm"], rel=1e-6)
    g_norm = torch.nn.utils.get_total_norm([p.grad for p in G.parameters()]).item()
    assert g_norm == pytest.approx(out["g_grad_norm"], rel=1e-6)


def test_max_grad_norm_clips_and_reports_the_norm_before_clipping():
    G, D, opt_g, opt_d = make_setup()
    noisy, clean, ref, (z,) = make_batch()
    out = train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0, max_grad_norm=1e-3)
    assert out["g_grad_norm"] > 1e-3 and out["d_grad_norm"] > 1e-3
    for m in (G, D):
        assert torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item() <= 1e-3 * 1.001


def test_bf16_autocast_step_runs_on_cpu():
    G, D, opt_g, opt_d = make_setup()
    noisy, clean, ref, (z,) = make_batch()
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    ref32 = train_step(*make_setup(), noisy, clean, ref, z, g_lambda=100.0)
    out = train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0, autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in out.values())
    for before, after in ((G0, G), (D0, D)):  # fp32 master weights, all updated
        assert all(p.dtype == torch.float32 for p in after.parameters())
        assert all(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    assert out["g_l1"] == pytest.approx(ref32["g_l1"], rel=0.05)  # bf16 is close to fp32


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        G, D, opt_g, opt_d = make_setup(seed=5)
        noisy, clean, ref, zs = make_batch(seed=6, steps=2)
        for z in zs:
            train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
        runs.append(params(G, D))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_train_step_rejects_bad_shapes():
    G, D, opt_g, opt_d = make_setup()
    noisy, clean, ref, (z,) = make_batch()
    with pytest.raises(ValueError, match="clean: expected the shape of noisy"):
        train_step(G, D, opt_g, opt_d, noisy, clean[:, :, :128], ref, z, 100.0)
    with pytest.raises(ValueError, match=r"ref: expected \[R, 2, 256\]"):
        train_step(G, D, opt_g, opt_d, noisy, clean, ref[:, :1], z, 100.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_step_with_ddp_wrapped_models_matches_plain_models():
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    noisy, clean, ref, zs = make_batch(steps=2)
    G, D, opt_g, opt_d = make_setup()
    for z in zs:
        train_step(G, D, opt_g, opt_d, noisy, clean, ref, z, g_lambda=100.0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ddp_g = ddp_d = None
    try:
        G2, D2, opt_g2, opt_d2 = make_setup()
        ddp_g = torch.nn.parallel.DistributedDataParallel(G2)
        ddp_d = torch.nn.parallel.DistributedDataParallel(D2)
        for z in zs:
            train_step(ddp_g, ddp_d, opt_g2, opt_d2, noisy, clean, ref, z, g_lambda=100.0)
    finally:
        # Free the DDP reducers (they hold the process group) before destroying the group: a
        # reducer freed afterwards destroys the gloo group once its store is gone, and the
        # destructor can then wait forever on its worker threads (seen once in CI-like runs).
        del ddp_g, ddp_d
        gc.collect()
        dist.destroy_process_group()
    assert_same_params(params(G, D), params(G2, D2))
