"""SEGAN networks, virtual batch norm, the Enhancer signal contract and the generator file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segan.audio import deemphasis as np_deemphasis
from segan.audio import preemphasis as np_preemphasis
from segan import model as model_module
from segan.config import ConfigError, ModelConfig
from segan.model import (MATMUL_MAX_LEN, POLYPHASE_MIN_CHANNELS, POLYPHASE_MIN_LEN, GENERATOR_FORMAT, Discriminator, Enhancer, Generator, GeneratorFileError,
                         ReferenceStats, StridedConv1d, StridedConvTranspose1d, UpsampleConv1d, VirtualBatchNorm1d,
                         build_models, conv1d_stride2_polyphase, count_parameters, set_fast_paths,
                         deemphasis_kernel, deemphasize, load_generator, matmul_max_len, preemphasize,
                         save_generator)

TINY = ModelConfig(g_channels=[4, 8, 8], d_channels=[4, 8, 8], kernel_size=31, preemphasis=0.95)
T = 256  # multiple of 2**3


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_models(TINY, window=T)


def _conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k + cout


# ----------------------------------------------------------------------------- paper size
@pytest.fixture(scope="module")
def paper():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_models(ModelConfig())


def test_paper_parameter_counts_match_the_architecture(paper):
    G, D = paper
    ch = ModelConfig().g_channels
    k = 31
    enc = sum(_conv_params(cin, cout, k) for cin, cout in zip([1] + ch[:-1], ch)) + sum(ch)  # + PReLU
    dec_in = [2 * c for c in reversed(ch)]
    dec_out = list(reversed([1] + ch[:-1]))
    dec = sum(_conv_params(cin, cout, k) for cin, cout in zip(dec_in, dec_out)) + sum(ch[:-1])
    assert count_parameters(G) == enc + dec == 73_100_049
    d_conv = sum(_conv_params(cin, cout, k) for cin, cout in zip([2] + ch[:-1], ch))
    vbn = 2 * sum(ch)
    head = (1024 + 1) + (8 + 1)  # 1x1 conv 1024->1, Linear(16384/2**11 = 8 -> 1)
    assert count_parameters(D) == d_conv + vbn + head == 24_373_082
    # the paper's sizes: G ~ 73M (encoder 24M + decoder 49M with doubled skip inputs), D ~ 24M
    assert 72e6 < count_parameters(G) < 74e6 and 23.5e6 < count_parameters(D) < 25e6


def test_paper_bottleneck_is_1024_by_8(paper):
    G, _ = paper
    assert G.depth == 11 and G.z_channels == 1024
    assert G.z_shape(4, 16384) == (4, 1024, 8)
    h = torch.zeros(1, 1, 16384)
    with torch.no_grad():
        for block in G.encoder:
            h = block(h)
    assert tuple(h.shape) == (1, 1024, 8)


# ----------------------------------------------------------------------------- strided convs
@pytest.mark.parametrize("k", [31, 5, 3, 1])
@pytest.mark.parametrize("length", [8, 32, 64])
def test_matmul_convolutions_equal_the_reference_ops_with_gradients(k, length):
    torch.manual_seed(k * 100 + length)
    pad = (k - 1) // 2
    conv = StridedConv1d(24, 40, k, stride=2, padding=pad)
    deconv = StridedConvTranspose1d(40, 24, k, stride=2, padding=pad, output_padding=1)
    for module, ref_op, x in (
            (conv, lambda x, w, b: F.conv1d(x, w, b, 2, pad), torch.randn(3, 24, 2 * length)),
            (deconv, lambda x, w, b: F.conv_transpose1d(x, w, b, 2, pad, 1), torch.randn(3, 40, length))):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        w2, b2 = module.weight.detach().clone().requires_grad_(), module.bias.detach().clone().requires_grad_()
        y1, y2 = module(x1), ref_op(x2, w2, b2)
        assert y1.shape == y2.shape
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)
        grad = torch.randn_like(y1)
        y1.backward(grad)
        y2.backward(grad)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(module.weight.grad, w2.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(module.bias.grad, b2.grad, atol=1e-4, rtol=1e-4)


def test_matmul_convolutions_under_bf16_autocast():
    torch.manual_seed(0)
    conv = StridedConv1d(64, 32, 31, stride=2, padding=15)
    deconv = StridedConvTranspose1d(64, 32, 31, stride=2, padding=15, output_padding=1)
    for module, x, ref_op in ((conv, torch.randn(2, 64, 32), F.conv1d),
                              (deconv, torch.randn(2, 64, 16), F.conv_transpose1d)):
        with torch.no_grad():
            expect = module._conv_forward(x, module.weight, module.bias) if module is conv else \
                F.conv_transpose1d(x, module.weight, module.bias, 2, 15, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = module(x)
                ref_bf16 = ref_op(x, module.weight, module.bias, 2, 15) if module is conv else \
                    ref_op(x, module.weight, module.bias, 2, 15, 1)
        assert got.dtype == ref_bf16.dtype == torch.bfloat16
        scale = expect.abs().max()
        assert (got.float() - expect).abs().max() <= 0.02 * scale


# ----------------------------------------------------------------------------- generator
def test_generator_keeps_length_for_any_multiple_of_2_pow_depth(tiny):
    G, _ = tiny
    for batch, length in [(1, 8), (2, T), (3, 3 * 8 * 5)]:
        x = torch.rand(batch, 1, length) * 2 - 1
        z = torch.randn(*G.z_shape(batch, length))
        y = G(x, z)
        assert y.shape == x.shape
        assert y.abs().max() <= 1.0  # tanh output


def test_generator_uses_z_and_skips(tiny):
    G, _ = tiny
    x = torch.randn(2, 1, T)
    z = torch.randn(*G.z_shape(2, T))
    assert not torch.allclose(G(x, z), G(x, torch.randn_like(z)))
    # skip connections: the first decoder input is bottleneck + z, later ones prev + skip
    assert G.decoder[0].deconv.in_channels == 2 * 8 and G.decoder[-1].deconv.in_channels == 2 * 4


@pytest.mark.parametrize("length", [0, 100, 257])
def test_z_shape_rejects_bad_lengths(tiny, length):
    G, _ = tiny
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth = 8"):
        G.z_shape(1, length)


# ----------------------------------------------------------------------------- discriminator
def test_vbn_equals_batch_norm_over_reference_plus_example():
    torch.manual_seed(1)
    vbn = VirtualBatchNorm1d(3)
    torch.nn.init.normal_(vbn.gamma, 1.0, 0.3)
    torch.nn.init.normal_(vbn.beta, 0.0, 0.3)
    ref = torch.randn(5, 3, 40) * 2 + 1
    x = torch.randn(4, 3, 40) * 3 - 1
    mean, mean_sq = VirtualBatchNorm1d.batch_moments(ref)
    out = vbn(x, mean, mean_sq, ref_size=5)
    for i in range(4):
        union = torch.cat([ref, x[i:i + 1]], dim=0)  # the "virtual batch": ref plus this example
        expect = F.batch_norm(union, None, None, vbn.gamma.view(-1), vbn.beta.view(-1),
                              training=True, eps=vbn.eps)[-1]
        torch.testing.assert_close(out[i], expect, atol=1e-5, rtol=1e-5)


def test_discriminator_shapes_and_fused_call_equals_separate_calls(tiny):
    _, D = tiny
    real, fake = torch.randn(3, 2, T), torch.randn(3, 2, T)
    ref = torch.randn(4, 2, T)
    both = D(torch.cat([real, fake]), ref)
    assert both.shape == (6, 1)
    torch.testing.assert_close(both, torch.cat([D(real, ref), D(fake, ref)]), atol=1e-5, rtol=1e-5)
    stats = D.reference_stats(ref)
    assert isinstance(stats, ReferenceStats) and stats.batch_size == 4 and len(stats.moments) == 3
    assert not any(m.requires_grad or s.requires_grad for m, s in stats.moments)
    torch.testing.assert_close(D(real, stats), D(real, ref))
    # a different reference batch changes the normalization
    assert not torch.allclose(D(real, torch.randn(4, 2, T) * 3), D(real, ref))


def test_discriminator_rejects_wrong_shapes(tiny):
    _, D = tiny
    with pytest.raises(ValueError, match=r"expected \[N, 2, 256\]"):
        D(torch.randn(2, 2, 128), torch.randn(2, 2, 256))
    with pytest.raises(ValueError, match="reference batch"):
        D(torch.randn(2, 2, 256), torch.randn(2, 1, 256))
    with pytest.raises(ValueError, match="multiple of 2\\*\\*len\\(d_channels\\)"):
        Discriminator(TINY, window=100)


def test_build_models_is_seeded_and_initialized():
    torch.manual_seed(3)
    g1, d1 = build_models(TINY, window=T)
    torch.manual_seed(3)
    g2, d2 = build_models(TINY, window=T)
    for a, b in zip(list(g1.parameters()) + list(d1.parameters()), list(g2.parameters()) + list(d2.parameters())):
        assert torch.equal(a, b)
    conv = g1.encoder[1][0]
    assert torch.count_nonzero(conv.bias) == 0
    fan = conv.in_channels * 31 + conv.out_channels * 31
    assert conv.weight.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.3)  # xavier normal
    gamma = d1.blocks[0].vbn.gamma
    assert 0.9 < gamma.mean().item() < 1.1 and gamma.std().item() < 0.1


def test_residual_generator_starts_as_the_identity_and_adds_a_tanh_correction():
    cfg = dataclasses.replace(TINY, residual=True)
    torch.manual_seed(0)
    G, _ = build_models(cfg, window=T)
    x = torch.rand(2, 1, T) * 2 - 1  # loud samples too: the input path has no tanh
    z = torch.randn(*G.z_shape(2, T))
    assert torch.equal(G(x, z), x)  # zero correction at initialisation
    G(x, z).square().mean().backward()
    last = G.decoder[-1].deconv
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    with torch.no_grad():
        last.weight.normal_(0, 0.01)
        plain = Generator(TINY)  # same weights, paper output (tanh of the last deconv)
        plain.load_state_dict(G.state_dict())
        correction = plain(x, z)
        assert correction.abs().max() > 0
        torch.testing.assert_close(G(x, z), x + correction)


def test_resize_convolution_is_interpolation_then_conv_on_both_paths():
    torch.manual_seed(0)
    # 16 samples after upsampling: the matmul path; 80: oneDNN's conv, or for one output
    # channel (the generator's output layer) the single-output matmul path
    for out_ch, length in ((3, 8), (3, 40), (1, 40), (1, 301)):
        layer = UpsampleConv1d(6, out_ch, 31)
        x = torch.randn(2, 6, length, requires_grad=True)
        up = F.interpolate(x, scale_factor=2.0, mode="linear", align_corners=False)
        expect = F.conv1d(up, layer.weight, layer.bias, padding=15)
        got = layer(x)
        assert got.shape == (2, out_ch, 2 * length)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(expect)
        for got_grad, expect_grad in zip(torch.autograd.grad(got, (x, layer.weight, layer.bias), g),
                                         torch.autograd.grad(expect, (x, layer.weight, layer.bias), g)):
            torch.testing.assert_close(got_grad, expect_grad, atol=1e-4, rtol=1e-5)
    G = Generator(dataclasses.replace(TINY, resize_layers=2))
    kinds = [type(block.deconv).__name__ for block in G.decoder]
    assert kinds == ["StridedConvTranspose1d", "UpsampleConv1d", "UpsampleConv1d"]
    assert count_parameters(G) == count_parameters(Generator(TINY))
    x, z = torch.randn(2, 1, T), torch.randn(*G.z_shape(2, T))
    with torch.no_grad():
        fast = G(x, z)
        set_fast_paths(G, False)  # the standard kernels everywhere: same function
        assert all(not m.fast_paths for m in G.modules() if hasattr(type(m), "fast_paths"))
        torch.testing.assert_close(G(x, z), fast, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="model.resize_layers"):
        dataclasses.replace(TINY, resize_layers=4).check("model")


def test_residual_resize_enhancer_scripts_and_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = dataclasses.replace(TINY, residual=True, resize_layers=2)
    torch.manual_seed(0)
    G, _ = build_models(cfg, window=T)
    with torch.no_grad():
        G.decoder[-1].deconv.weight.normal_(0, 0.01)
    enh = Enhancer(G, 0.95).eval()
    x, z = torch.randn(2, 1, T) * 0.3, torch.randn(*G.z_shape(2, T))
    path = tmp_path / "residual.onnx"
    torch.onnx.export(enh, (x, z), str(path), dynamo=False, opset_version=17, input_names=["noisy", "z"],
                      output_names=["enhanced"], dynamic_axes={"noisy": {0: "batch", 2: "length"},
                                                              "z": {0: "batch", 2: "frames"}})
    x2, z2 = torch.randn(3, 1, 2 * T) * 0.3, torch.randn(*G.z_shape(3, 2 * T))
    with torch.no_grad():
        expect = enh(x2, z2)
        torch.testing.assert_close(torch.jit.script(enh)(x2, z2), expect, atol=1e-5, rtol=1e-4)
    got = ort.InferenceSession(str(path)).run(None, {"noisy": x2.numpy(), "z": z2.numpy()})[0]
    np.testing.assert_allclose(got, expect.numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- emphasis / Enhancer
def test_deemphasis_inverts_preemphasis_on_a_window():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16384) * 2 - 1
    y = preemphasize(x, 0.95)
    np.testing.assert_allclose(y.numpy(), np_preemphasis(x.numpy(), 0.95), atol=1e-6)
    back = deemphasize(y, 0.95)
    assert back.shape == x.shape
    assert (back - x).abs().max().item() < 1e-5
    # and it is the IIR filter of segan.audio (scipy lfilter) up to truncation/rounding
    np.testing.assert_allclose(back.numpy(), np_deemphasis(y.numpy(), 0.95), atol=1e-5)
    assert deemphasis_kernel(0.95).shape[-1] == 360 and 0.95 ** 360 < 1e-8 <= 0.95 ** 359
    assert preemphasize(x, 0.0) is x and deemphasize(x, 0.0) is x


def test_enhancer_is_deemphasis_of_generator_on_preemphasized_input(tiny):
    G, _ = tiny
    enh = Enhancer(G, 0.95).eval()
    x = torch.rand(2, 1, T) * 2 - 1
    z = torch.randn(*G.z_shape(2, T))
    with torch.no_grad():
        got = enh(x, z)
        gen = G(preemphasize(x, 0.95), z)
    expect = np_deemphasis(gen.numpy(), 0.95)
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(Enhancer(G, 0.0)(x, z), G(x, z))


def test_enhancer_round_trip_with_identity_generator():
    class Identity(Generator):
        def forward(self, x, z):  # noqa: ARG002 - the contract's filters alone
            return x

    enh = Enhancer(Identity(TINY), 0.95)
    x = torch.rand(2, 1, 16384) * 2 - 1
    assert (enh(x, torch.zeros(2, 8, 16384 // 8)) - x).abs().max().item() < 1e-5


def test_enhancer_scripts_and_traces_with_dynamic_shapes(tiny):
    G, _ = tiny
    enh = Enhancer(G, 0.95).eval()
    x, z = torch.randn(2, 1, T), torch.randn(*G.z_shape(2, T))
    x2, z2 = torch.randn(3, 1, 2 * T), torch.randn(*G.z_shape(3, 2 * T))
    scripted = torch.jit.script(enh)
    traced = torch.jit.trace(enh, (x, z))
    with torch.no_grad():
        for a, b in ((x, z), (x2, z2)):  # at T the bottleneck deconv runs as matmul in eager mode
            expect = enh(a, b)
            torch.testing.assert_close(scripted(a, b), expect, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(traced(a, b), expect, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_enhancer_exports_to_onnx_opset17_with_dynamic_batch_and_length(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    G, _ = tiny
    enh = Enhancer(G, 0.95).eval()
    x, z = torch.randn(2, 1, T), torch.randn(*G.z_shape(2, T))
    path = tmp_path / "enhancer.onnx"
    torch.onnx.export(enh, (x, z), str(path), dynamo=False, opset_version=17,
                      input_names=["noisy", "z"], output_names=["enhanced"],
                      dynamic_axes={"noisy": {0: "batch", 2: "length"}, "z": {0: "batch", 2: "frames"},
                                    "enhanced": {0: "batch", 2: "length"}})
    assert onnx.load(str(path)).opset_import[0].version == 17
    session = ort.InferenceSession(str(path))
    for batch, length in ((3, 3 * T), (1, T // 2)):
        x2, z2 = torch.randn(batch, 1, length), torch.randn(*G.z_shape(batch, length))
        out = session.run(None, {"noisy": x2.numpy(), "z": z2.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, enh(x2, z2).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- generator file
def test_generator_file_round_trip(tiny, tmp_path):
    G, _ = tiny
    path = tmp_path / "models" / "generator.pt"
    save_generator(path, G, TINY, {"step": 7, "sample_rate": 16000, "losses": {"g": 1.5}})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == GENERATOR_FORMAT and payload["model"] == dataclasses.asdict(TINY)
    G2, cfg, extra = load_generator(path)
    assert cfg == TINY and extra == {"step": 7, "sample_rate": 16000, "losses": {"g": 1.5}}
    assert not G2.training
    x, z = torch.randn(1, 1, T), torch.randn(*G.z_shape(1, T))
    with torch.no_grad():
        assert torch.equal(G2(x, z), G(x, z))
    assert [p.name for p in path.parent.iterdir()] == ["generator.pt"]  # no temp files left


def test_generator_file_errors_name_the_file(tiny, tmp_path):
    G, _ = tiny
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt: generator file not found"):
        load_generator(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(GeneratorFileError, match="corrupt.pt: not a readable generator file"):
        load_generator(corrupt)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something-else", "state_dict": {}}, wrong)
    with pytest.raises(GeneratorFileError, match="wrong.pt: expected format 'segan-generator/1'"):
        load_generator(wrong)
    mismatch = tmp_path / "mismatch.pt"
    save_generator(mismatch, G, dataclasses.replace(TINY, g_channels=[4, 8, 16]), {})
    with pytest.raises(GeneratorFileError, match="mismatch.pt: weights do not match"):
        load_generator(mismatch)
    with pytest.raises(ValueError, match="'format' is reserved"):
        save_generator(tmp_path / "x.pt", G, TINY, {"format": "x"})
    with pytest.raises(TypeError, match=r"extra\[where\]"):
        save_generator(tmp_path / "x.pt", G, TINY, {"where": tmp_path})
    assert not (tmp_path / "x.pt").exists()


def test_matmul_path_lengths_depend_on_the_compute_dtype(monkeypatch):
    """float32 takes the matmul path only at the 8-step bottleneck, bf16 up to 16 steps
    (where each is faster than oneDNN, see MATMUL_MAX_LEN); both paths compute the same."""
    conv = StridedConv1d(8, 8, 5, stride=2, padding=2)
    calls = []
    original = model_module.conv1d_matmul
    # record which inputs take the matmul path (the real function still computes them)
    monkeypatch.setattr(model_module, "conv1d_matmul", lambda *a: calls.append(a[0].shape[-1]) or original(*a))
    for length, autocast in ((16, False), (32, False), (16, True), (32, True), (64, True)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            conv(torch.randn(1, 8, length))
    assert calls == [16, 16, 32]  # fp32: output 8 only; bf16: outputs 8 and 16
    assert matmul_max_len(torch.zeros(1)) == MATMUL_MAX_LEN[torch.float32] == (8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul_max_len(torch.zeros(1)) == MATMUL_MAX_LEN[torch.bfloat16] == (16, 16)
    assert matmul_max_len(torch.zeros(1, dtype=torch.float64)) == (8, 8)  # other dtypes: float32's


@pytest.mark.parametrize("k, length", [(31, 512), (15, 600), (5, 513), (4, 514), (1, 256)])
def test_polyphase_convolution_equals_the_strided_conv_with_gradients(k, length):
    torch.manual_seed(k + length)
    pad = (k - 1) // 2
    x = torch.randn(2, 8, length, requires_grad=True)
    w = torch.randn(16, 8, k, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    got = conv1d_stride2_polyphase(x, w, b, pad)
    expect = F.conv1d(x, w, b, stride=2, padding=pad)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-5)
    g = torch.randn_like(expect)
    for got_grad, expect_grad in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(expect, (x, w, b), g)):
        torch.testing.assert_close(got_grad, expect_grad, atol=1e-3, rtol=1e-5)


def test_polyphase_path_is_taken_for_long_outputs_with_enough_channels(monkeypatch):
    calls = []
    original = model_module.conv1d_stride2_polyphase
    monkeypatch.setattr(model_module, "conv1d_stride2_polyphase",
                        lambda x, *a: calls.append(tuple(x.shape[1:])) or original(x, *a))
    many, few = POLYPHASE_MIN_CHANNELS, POLYPHASE_MIN_CHANNELS // 2
    with torch.no_grad():
        for cin, length in ((many, 2 * POLYPHASE_MIN_LEN), (many, 2 * POLYPHASE_MIN_LEN - 2), (few, 4096)):
            conv = StridedConv1d(cin, 4, 15, stride=2, padding=7)
            x = torch.randn(1, cin, length)
            torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, stride=2, padding=7),
                                       atol=1e-5, rtol=1e-5)
        conv = StridedConv1d(many, 4, 15, stride=2, padding=7)
        set_fast_paths(conv, False)
        conv(torch.randn(1, many, 4096))
    assert calls == [(many, 2 * POLYPHASE_MIN_LEN)]  # not 1 step shorter, not 4 channels, not when off
