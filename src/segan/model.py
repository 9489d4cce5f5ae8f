"""SEGAN networks (Pascual et al., 2017), the waveform signal contract and the generator file.

* :class:`Generator` - fully convolutional encoder/decoder with skip connections and a latent
  ``z`` concatenated at the bottleneck; any input length that is a multiple of ``2**depth``.
  With ``model.residual`` the tanh output is a correction added to the input (zero at
  initialisation), so training starts from the identity instead of from silence.
* :class:`Discriminator` - strided conv stack with virtual batch norm (Salimans et al., 2016)
  on ``[candidate, noisy]`` pairs; least-squares output (no sigmoid).
* :class:`Enhancer` - raw waveform in, raw waveform out (pre-emphasis -> G -> de-emphasis),
  written with ops that TorchScript and ONNX (opset 17) export with dynamic batch and length.
* :func:`save_generator` / :func:`load_generator` - the ``segan-generator/1`` file format.

Virtual batch norm, as in the original SEGAN code (taken from Salimans' improved-GAN): each
layer's reference moments (mean and mean square per channel, over the reference batch and
time) are computed once from a fixed reference batch; every candidate example is normalized
with ``1/(R+1)`` of its own moments plus ``R/(R+1)`` of the reference moments, i.e. as if it
had been appended to the reference batch. The normalization of one example therefore never
depends on the other candidates, so real and fake pairs can share one forward call. As in the
seed implementation (deNsuh/segan-pytorch) the reference moments carry no gradient, so
:meth:`Discriminator.reference_stats` runs under ``no_grad`` and its result can be reused for
as long as the discriminator's weights and the reference batch are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError, ModelConfig
from .fsutil import atomic_path

log = logging.getLogger(__name__)

GENERATOR_FORMAT = "segan-generator/1"
PAPER_WINDOW = 16384
_RESERVED_KEYS = ("format", "model", "state_dict")
VBN_EPS = 1e-5
DEEMPHASIS_TOL = 1e-8


class GeneratorFileError(ValueError):
    """A generator file that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------- helpers
def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (trainable or not) in ``module``."""
    return sum(p.numel() for p in module.parameters())


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _same_padding(kernel_size: int) -> int:
    return (kernel_size - 1) // 2


# ----------------------------------------------------------------------------- strided convolutions
# oneDNN's CPU conv kernels lose much of their speed when the time axis is short and the
# channels many (the paper model's bottleneck: 8 steps at a 16384 window). There the two
# classes below compute the identical convolution as im2col + matmul (conv) or matmul +
# overlap-add (transposed conv); above the lengths below, and whenever the model is scripted,
# traced or exported, they are plain nn.Conv1d / nn.ConvTranspose1d (same parameters, same
# state_dict). The lengths were measured forward + backward on the paper model's layers, 2
# threads, batch 4 and 16, with malloc reusing freed memory (segan.allocator, as training runs):
# * float32: only the 8-step bottleneck gains (batch 16: conv 512->1024 94 -> 79 ms, transposed
#   conv 2048->512 181 -> 156 ms); at 16 steps oneDNN is faster (conv 256->512 24 vs 35 ms);
# * bfloat16: 8 and 16 steps gain (conv 512->1024 83 -> 25 ms, 256->512 16 -> 12 ms; transposed
#   conv 2048->512 173 -> 49 ms, 1024->256 34 -> 24 ms); at 32 steps oneDNN is faster.
# (With glibc's default malloc, oneDNN's scratch buffers page-fault on every call, which once
# made the matmul path look faster up to 32 steps in float32.)
MATMUL_MAX_LEN: dict[torch.dtype, tuple[int, int]] = {
    torch.float32: (8, 8),    # (strided conv output length, transposed conv input length)
    torch.bfloat16: (16, 16),
}


@torch.jit.unused
def _eager_mode() -> bool:
    """True unless the model is being traced or exported (those must see the standard ops)."""
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def matmul_max_len(x: Tensor) -> tuple[int, int]:
    """(conv output, transposed-conv input) lengths at or below which ``x`` takes the matmul path."""
    return MATMUL_MAX_LEN.get(_compute_dtype(x), MATMUL_MAX_LEN[torch.float32])


@torch.jit.unused
def conv1d_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """``F.conv1d(x, weight, bias, stride, padding)`` as im2col + one matmul (fast for short outputs)."""
    batch, cin, _ = x.shape
    cout, _, k = weight.shape
    x = x.to(_compute_dtype(x))  # cast before im2col (K times smaller than the columns)
    cols = F.pad(x, (padding, padding)).unfold(2, k, stride)  # [B, Cin, Tout, K]
    tout = cols.shape[2]
    cols = cols.permute(0, 2, 1, 3).reshape(batch * tout, cin * k)
    w = weight.reshape(cout, cin * k).t()
    y = cols @ w if bias is None else torch.addmm(bias, cols, w)
    return y.view(batch, tout, cout).transpose(1, 2).contiguous()


@torch.jit.unused
def conv_transpose1d_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                            output_padding: int) -> Tensor:
    """``F.conv_transpose1d`` as one matmul + overlap-add (``F.fold``, in float32)."""
    batch, cin, tin = x.shape
    _, cout, k = weight.shape
    x = x.to(_compute_dtype(x))
    cols = x.transpose(1, 2).reshape(batch * tin, cin) @ weight.reshape(cin, cout * k)  # [B*Tin, Cout*K]
    cols = cols.view(batch, tin, cout * k).transpose(1, 2).float()
    full_len = (tin - 1) * stride + k
    full = F.fold(cols, output_size=(1, full_len), kernel_size=(1, k), stride=(1, stride))[:, :, 0]
    out_len = full_len - 2 * padding + output_padding
    if padding + out_len > full_len:  # output_padding past the last tap: zeros
        full = F.pad(full, (0, padding + out_len - full_len))
    y = full[:, :, padding:padding + out_len]
    if bias is not None:
        y = y + bias.float().view(1, -1, 1)
    return y.to(x.dtype)


@torch.jit.unused
def conv1d_single_output(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """Stride-1 ``F.conv1d`` with one output channel, as one matmul + a shift-and-add.

    oneDNN pads output channels to blocks of 8-16, so a 1-channel conv over a long signal
    (the generator's output layer) takes 2.5-4x longer, forward + backward, than the same
    multiply-adds done as a matmul (measured at kernels 15 and 31). Here ``W_k @ x`` for every tap ``k`` is one matmul
    ``[K, Cin] @ [B, Cin, T]``, and ``y[t] = sum_k taps[k, t + k]`` is a sum over a strided
    diagonal view (no copy).
    """
    batch, _, length = x.shape
    _, cin, k = weight.shape
    x = x.to(_compute_dtype(x))
    taps = torch.matmul(weight.to(x.dtype).reshape(cin, k).t(), x).float()  # [B, K, T]
    taps = F.pad(taps, (padding, padding))
    out_len = length + 2 * padding - k + 1
    s = taps.stride()
    y = taps.as_strided((batch, out_len, k), (s[0], s[2], s[1] + s[2])).sum(-1, keepdim=True).transpose(1, 2)
    if bias is not None:
        y = y + bias.float().view(1, 1, 1)
    return y.to(x.dtype)


# Long strided convolutions with a few channels (the early encoder layers: 256..4096 output
# steps, 8..64 input channels) run 1.05-1.9x faster (more the longer the layer), forward +
# backward, as a stride-1 convolution over the input's two phases (polyphase decomposition:
# even and odd samples as 2*Cin channels, the kernel's even and odd taps as its halves),
# measured on the paper model's layers at batch 16 in float32 (16->32 channels at 4096 steps:
# 56 -> 30 ms; 64->128 at 256: 17.9 -> 17.0 ms; 128->128 at 128: 18 -> 22 ms, so not below
# 256). With 1-4 input channels (the narrow discriminator's first layers) it is slower.
POLYPHASE_MIN_LEN = 256
POLYPHASE_MIN_CHANNELS = 8


@torch.jit.unused
def conv1d_stride2_polyphase(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """``F.conv1d(x, weight, bias, stride=2, padding=padding)`` as one stride-1 conv over x's phases.

    ``y[t] = sum_k w[k] xp[2t + k]`` (``xp``: x zero-padded) splits into even taps over the even
    samples and odd taps over the odd ones: ``y[t] = sum_j (w[2j] xe[t + j] + w[2j + 1] xo[t + j])``,
    a stride-1 conv of ``[xe; xo]`` (2*Cin channels) with ``[w_even; w_odd]`` (ceil(K/2) taps).
    """
    length, k = x.shape[-1], weight.shape[-1]
    out_len = (length + 2 * padding - k) // 2 + 1
    taps = (k + 1) // 2
    # one output sample more than needed, cropped below: at power-of-two lengths every channel's
    # row starts in the same cache sets, and 4097 outputs measured 1.5x faster than 4096
    padded = F.pad(x, (padding, 2 * (out_len + taps) - length - padding))
    phases = torch.cat([padded[..., 0::2], padded[..., 1::2]], dim=1)  # [B, 2*Cin, out_len + taps]
    w = F.pad(weight, (0, 2 * taps - k))
    w = torch.cat([w[..., 0::2], w[..., 1::2]], dim=1)  # [Cout, 2*Cin, taps]
    return F.conv1d(phases, w, bias)[..., :out_len]


def set_fast_paths(module: nn.Module, enabled: bool) -> None:
    """Turn the eager-mode fast paths (short-length matmul, polyphase) of every conv in
    ``module`` on or off (benchmarks use "off" for a plain-PyTorch baseline); the results are
    the same either way, up to float rounding."""
    for m in module.modules():
        if isinstance(m, (StridedConv1d, StridedConvTranspose1d, UpsampleConv1d)):
            m.fast_paths = enabled


class StridedConv1d(nn.Conv1d):
    """``nn.Conv1d`` that computes short outputs (see ``MATMUL_MAX_LEN``) as one matmul and
    long stride-2 ones with many channels by polyphase decomposition (``POLYPHASE_MIN_LEN``)."""

    fast_paths = True

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the standard op below
            if self.fast_paths and _eager_mode():
                out_len = (x.shape[-1] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
                if out_len <= matmul_max_len(x)[0]:
                    return conv1d_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0])
                if (self.stride[0] == 2 and out_len >= POLYPHASE_MIN_LEN
                        and self.in_channels >= POLYPHASE_MIN_CHANNELS):
                    return conv1d_stride2_polyphase(x, self.weight, self.bias, self.padding[0])
        return self._conv_forward(x, self.weight, self.bias)


class StridedConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` that computes short inputs (see ``MATMUL_MAX_LEN``) as one matmul."""

    fast_paths = True

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the standard op below
            if self.fast_paths and _eager_mode() and x.shape[-1] <= matmul_max_len(x)[1]:
                return conv_transpose1d_matmul(x, self.weight, self.bias, self.stride[0], self.padding[0],
                                               self.output_padding[0])
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


class UpsampleConv1d(nn.Conv1d):
    """x2 linear interpolation then a stride-1 "same" convolution (resize-convolution).

    A stride-2 transposed conv computes even and odd output samples with different halves of
    its kernel; whenever they disagree the output carries images of its spectrum mirrored
    about fs/4 and fs/2 (the "checkerboard" artifact of Odena et al., 2016). Interpolating
    first gives both phases the same filter. Twice the multiply-adds of the transposed conv.
    """

    fast_paths = True

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding=_same_padding(kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="linear", align_corners=False)
        if not torch.jit.is_scripting():  # TorchScript compiles only the standard op below
            if self.fast_paths and _eager_mode():
                if x.shape[-1] <= 2 * matmul_max_len(x)[1]:  # the length a transposed conv would output
                    return conv1d_matmul(x, self.weight, self.bias, 1, self.padding[0])
                if self.out_channels == 1:
                    return conv1d_single_output(x, self.weight, self.bias, self.padding[0])
        return self._conv_forward(x, self.weight, self.bias)


# ----------------------------------------------------------------------------- generator
class _DecoderBlock(nn.Module):
    """x2 upsampling (transposed conv, or interpolation + conv) then PReLU, or tanh for the output layer."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, last: bool, resize: bool = False) -> None:
        super().__init__()
        if resize:
            self.deconv: nn.Module = UpsampleConv1d(in_ch, out_ch, kernel_size)
        else:
            # output_padding=1 makes the output exactly twice the input length for odd kernels.
            self.deconv = StridedConvTranspose1d(in_ch, out_ch, kernel_size, stride=2,
                                                 padding=_same_padding(kernel_size), output_padding=1)
        self.act: nn.Module = nn.Tanh() if last else nn.PReLU(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.deconv(x))


class Generator(nn.Module):
    """SEGAN generator: ``forward(x [B,1,T], z [B,C,T/2**depth]) -> [B,1,T]`` in [-1, 1]
    (``x`` + a correction in [-1, 1] when ``cfg.residual``).

    Encoder layer ``i`` halves the length and outputs ``g_channels[i]`` channels (PReLU);
    the decoder mirrors it, each transposed conv taking the previous decoder output
    concatenated with the matching encoder output (skip connection). ``z`` is concatenated
    with the bottleneck features. No shape checks inside ``forward`` so that tracing and
    ONNX export keep the length dynamic; use :meth:`z_shape` to validate a length.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        chans = list(cfg.g_channels)
        k = cfg.kernel_size
        self.depth = len(chans)
        self.z_channels = chans[-1]
        self.residual = bool(cfg.residual)
        self.encoder = nn.ModuleList()
        prev = 1
        for ch in chans:
            self.encoder.append(nn.Sequential(
                StridedConv1d(prev, ch, k, stride=2, padding=_same_padding(k)), nn.PReLU(ch)))
            prev = ch
        # decoder[j] undoes encoder[depth-1-j]; its input is always 2 * chans[i] channels
        # (bottleneck + z, or previous decoder output + skip).
        self.decoder = nn.ModuleList()
        for i in reversed(range(self.depth)):
            out_ch = chans[i - 1] if i > 0 else 1
            self.decoder.append(_DecoderBlock(2 * chans[i], out_ch, k, last=(i == 0), resize=i < cfg.resize_layers))

    def z_shape(self, batch: int, length: int) -> tuple[int, int, int]:
        """Shape of the latent for ``batch`` inputs of ``length`` samples (validated)."""
        factor = 2 ** self.depth
        if length <= 0 or length % factor:
            raise ValueError(f"generator input length: expected a positive multiple of 2**depth = "
                             f"{factor}, got {length}")
        if batch <= 0:
            raise ValueError(f"batch: expected a positive size, got {batch}")
        return (batch, self.z_channels, length // factor)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        inp = x
        skips: list[Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = torch.cat([x, z], dim=1)
        n = len(skips)
        for j, block in enumerate(self.decoder):
            if j == n - 1 and self.residual:
                # the decoder predicts a tanh-bounded correction added to the input; adding it
                # after the tanh keeps loud input samples exact (tanh(input) would compress them)
                x = inp.float() + torch.tanh(block.deconv(x).float())  # float32: the input stays exact under bf16
            else:
                x = block(x)
            if j < n - 1:
                x = torch.cat([x, skips[n - 2 - j]], dim=1)
        return x


# ----------------------------------------------------------------------------- discriminator
class ReferenceStats(NamedTuple):
    """Per-layer reference moments for virtual batch norm (no gradient).

    ``moments[i] = (mean, mean_sq)``, each ``[1, C_i, 1]`` float32, over the reference batch
    and time; ``batch_size`` is the reference batch size R.
    """

    batch_size: int
    moments: list[tuple[Tensor, Tensor]]


class VirtualBatchNorm1d(nn.Module):
    """Virtual batch norm with a learned per-channel scale (init N(1, 0.02)) and shift (0).

    Statistics are computed in float32 even under bf16 autocast (variance as
    ``E[x^2] - E[x]^2`` cancels badly in low precision).
    """

    def __init__(self, channels: int, eps: float = VBN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    @staticmethod
    def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and mean square per channel over batch and time: two ``[1, C, 1]`` tensors."""
        x = x.float()
        return x.mean(dim=(0, 2), keepdim=True), x.square().mean(dim=(0, 2), keepdim=True)

    def normalize(self, x: Tensor, mean: Tensor, mean_sq: Tensor) -> Tensor:
        x = x.float()
        var = (mean_sq - mean.square()).clamp_min(0.0)
        scale = self.gamma * torch.rsqrt(var + self.eps)
        # one fused pass over the activations: x * scale + (beta - mean * scale)
        return torch.addcmul(self.beta - mean * scale, x, scale)

    def forward(self, x: Tensor, ref_mean: Tensor, ref_mean_sq: Tensor, ref_size: int) -> Tensor:
        """Normalize each example of ``x`` as if appended to the reference batch."""
        x = x.float()
        new = 1.0 / (ref_size + 1.0)
        mean = new * x.mean(dim=2, keepdim=True) + (1.0 - new) * ref_mean
        mean_sq = new * x.square().mean(dim=2, keepdim=True) + (1.0 - new) * ref_mean_sq
        return self.normalize(x, mean, mean_sq)


class _DiscriminatorBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = StridedConv1d(in_ch, out_ch, kernel_size, stride=2, padding=_same_padding(kernel_size))
        self.vbn = VirtualBatchNorm1d(out_ch)


class Discriminator(nn.Module):
    """SEGAN discriminator on ``[candidate, noisy]`` pairs ``[N, 2, window]`` -> scores ``[N, 1]``.

    ``forward(x, ref)``: ``ref`` is either the reference pair batch ``[R, 2, window]`` (pushed
    through once, without gradient, before the candidates) or :class:`ReferenceStats` from
    :meth:`reference_stats` (reused; no reference pass at all). ``x`` may hold several
    candidate batches concatenated along dim 0 (e.g. real and fake pairs together): VBN
    normalizes each example independently of the others, so this equals separate calls.
    """

    def __init__(self, cfg: ModelConfig, window: int = PAPER_WINDOW) -> None:
        super().__init__()
        chans = list(cfg.d_channels)
        self.depth = len(chans)
        factor = 2 ** self.depth
        if window <= 0 or window % factor:
            raise ValueError(f"discriminator window: expected a positive multiple of 2**len(d_channels) "
                             f"= {factor}, got {window}")
        self.window = window
        self.leaky_slope = cfg.d_leaky_slope
        self.blocks = nn.ModuleList()
        prev = 2
        for ch in chans:
            self.blocks.append(_DiscriminatorBlock(prev, ch, cfg.kernel_size))
            prev = ch
        self.out_conv = nn.Conv1d(prev, 1, kernel_size=1)
        self.fc = nn.Linear(window // factor, 1)

    def _check(self, x: Tensor, what: str) -> None:
        if x.dim() != 3 or x.shape[1] != 2 or x.shape[2] != self.window:
            raise ValueError(f"discriminator {what}: expected [N, 2, {self.window}] "
                             f"([candidate, noisy] pairs), got {list(x.shape)}")

    @torch.no_grad()
    def reference_stats(self, ref: Tensor) -> ReferenceStats:
        """One pass of the reference batch: each VBN layer's moments (ref normalized by its own)."""
        self._check(ref, "reference batch")
        moments: list[tuple[Tensor, Tensor]] = []
        h = ref
        for i, block in enumerate(self.blocks):
            h = block.conv(h)
            mean, mean_sq = block.vbn.batch_moments(h)
            moments.append((mean, mean_sq))
            if i < len(self.blocks) - 1:  # the last layer's normalized output is never used
                h = F.leaky_relu(block.vbn.normalize(h, mean, mean_sq), self.leaky_slope)
        return ReferenceStats(int(ref.shape[0]), moments)

    def forward(self, x: Tensor, ref: Tensor | ReferenceStats) -> Tensor:
        self._check(x, "input")
        stats = ref if isinstance(ref, ReferenceStats) else self.reference_stats(ref)
        if len(stats.moments) != len(self.blocks):
            raise ValueError(f"reference stats: expected {len(self.blocks)} layers, got {len(stats.moments)}")
        for block, (mean, mean_sq) in zip(self.blocks, stats.moments):
            x = block.vbn(block.conv(x), mean, mean_sq, stats.batch_size)
            x = F.leaky_relu(x, self.leaky_slope)
        return self.fc(self.out_conv(x).flatten(1))


# ----------------------------------------------------------------------------- construction
def init_weights(module: nn.Module) -> None:
    """Xavier-normal conv/linear weights and zero biases (as in the SEGAN implementations);
    VBN scale ~ N(1, 0.02) as in the original code. Uses the global torch RNG."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, VirtualBatchNorm1d):
            nn.init.normal_(m.gamma, mean=1.0, std=0.02)
            nn.init.zeros_(m.beta)


def build_models(cfg: ModelConfig, window: int = PAPER_WINDOW) -> tuple[Generator, Discriminator]:
    """Initialized (G, D) for ``cfg``; ``window`` is the training window (fixes D's final Linear)."""
    generator, discriminator = Generator(cfg), Discriminator(cfg, window)
    init_weights(generator)
    init_weights(discriminator)
    if cfg.residual:  # zero correction at the start: G begins as the identity
        nn.init.zeros_(generator.decoder[-1].deconv.weight)
    return generator, discriminator


# ----------------------------------------------------------------------------- signal contract
def preemphasize(x: Tensor, a: float) -> Tensor:
    """``y[n] = x[n] - a x[n-1]`` along the last axis with zero history; ``a == 0`` is identity."""
    if a == 0:
        return x
    return torch.cat([x[..., :1], x[..., 1:] - a * x[..., :-1]], dim=-1)


def deemphasis_kernel(a: float, tol: float = DEEMPHASIS_TOL) -> Tensor:
    """Truncated impulse response of ``1 / (1 - a z^-1)`` as a conv1d weight ``[1, 1, K]``.

    Taps ``a^k`` for ``k < K`` with ``a^K < tol`` (K = 360 for a = 0.95), reversed because
    conv1d is a cross-correlation. The truncation error is ``a^K * x[n-K]``.
    """
    if not 0.0 <= a < 1.0:
        raise ValueError(f"preemphasis: expected a coefficient in [0, 1), got {a}")
    # at least 2 taps when a > 0 so callers can always drop ``taps - 1`` trailing outputs
    taps = 1 if a == 0 else max(2, math.ceil(math.log(tol) / math.log(a)))
    powers = torch.tensor(a, dtype=torch.float64) ** torch.arange(taps - 1, -1, -1, dtype=torch.float64)
    return powers.to(torch.float32).view(1, 1, taps)


def deemphasize(y: Tensor, a: float) -> Tensor:
    """Inverse of :func:`preemphasize` for ``[B, 1, T]`` (truncated IIR as one conv1d)."""
    if a == 0:
        return y
    kernel = deemphasis_kernel(a).to(device=y.device, dtype=y.dtype)
    taps = kernel.shape[-1]
    return y if taps == 1 else F.conv1d(y, kernel, padding=taps - 1)[..., : 1 - taps]


class Enhancer(nn.Module):
    """The model's signal contract: ``forward(noisy [B,1,T], z) -> enhanced [B,1,T]``, raw waveforms.

    ``de_emphasis(generator(pre_emphasis(noisy), z))``. Both filters are causal conv1d with zero
    history, so TorchScript and ONNX export (opset 17, TorchScript-based or dynamo exporter)
    keep batch and length dynamic.
    ``T`` must be a multiple of ``2**generator.depth``. Run it in float32.
    """

    def __init__(self, generator: Generator, preemphasis: float) -> None:
        super().__init__()
        self.generator = generator
        self.preemphasis = float(preemphasis)
        self.emphasis = self.preemphasis != 0.0
        de = deemphasis_kernel(self.preemphasis)
        self.de_taps = int(de.shape[-1])
        self.register_buffer("pre_kernel", torch.tensor([[[-self.preemphasis, 1.0]]]), persistent=False)
        self.register_buffer("de_kernel", de, persistent=False)

    def forward(self, noisy: Tensor, z: Tensor) -> Tensor:
        # conv1d's symmetric zero padding then dropping the trailing outputs = left padding
        # only (causal filter, zero history), with no Pad op (the dynamo ONNX exporter cannot
        # lower Pad to opset 17) and only static slice bounds (length stays dynamic).
        x = noisy
        if self.emphasis:
            x = F.conv1d(x, self.pre_kernel, padding=1)[..., :-1]
        y = self.generator(x, z)
        if self.emphasis:
            y = F.conv1d(y, self.de_kernel, padding=self.de_taps - 1)[..., : 1 - self.de_taps]
        return y


# ----------------------------------------------------------------------------- file format
def _check_plain(value: Any, key: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"extra[{key}]: expected string keys, got {k!r}")
            _check_plain(v, f"{key}.{k}")
        return
    raise TypeError(f"extra[{key}]: expected str/int/float/bool/None/list/dict/Tensor, "
                    f"got {type(value).__name__}")


def save_generator(path: str | Path, generator: nn.Module, cfg: ModelConfig,
                   extra: dict[str, Any] | None = None) -> None:
    """Write ``{"format", "model", "state_dict", **extra}`` atomically (readable with weights_only)."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra: key {clash[0]!r} is reserved by the generator file format")
    for key, value in extra.items():
        _check_plain(value, key)
    state = {k: v.detach().to("cpu").clone() for k, v in unwrap_model(generator).state_dict().items()}
    payload = {"format": GENERATOR_FORMAT, "model": dataclasses.asdict(cfg), "state_dict": state, **extra}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    log.debug("saved generator to %s", path)


def load_generator(path: str | Path, map_location: str | torch.device = "cpu",
                   ) -> tuple[Generator, ModelConfig, dict[str, Any]]:
    """Read a ``segan-generator/1`` file: (generator in eval mode, its ModelConfig, extra keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: generator file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds for a corrupt or foreign file
        raise GeneratorFileError(f"{path}: not a readable generator file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != GENERATOR_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise GeneratorFileError(f"{path}: expected format {GENERATOR_FORMAT!r}, got {found!r}")
    model = payload.get("model")
    if not isinstance(model, dict):
        raise GeneratorFileError(f"{path}: missing 'model' section (the ModelConfig)")
    try:
        cfg = ModelConfig(**model)
        cfg.check("model")
    except (TypeError, ConfigError) as exc:
        raise GeneratorFileError(f"{path}: invalid 'model' section: {exc}") from None
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise GeneratorFileError(f"{path}: missing 'state_dict'")
    generator = Generator(cfg)
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        raise GeneratorFileError(f"{path}: weights do not match the model section: {exc}") from None
    generator.to(map_location).eval()
    extra = {k: v for k, v in payload.items() if k not in _RESERVED_KEYS}
    return generator, cfg, extra
