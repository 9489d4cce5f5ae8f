"""One SEGAN training step: D update, then G update, with a single generator forward.

:func:`train_step` computes the same losses and updates as the seed's loop
(deNsuh/segan-pytorch, reproduced literally by :func:`baseline_step`) with less work:

* one generator forward per step: ``G`` only changes in ``opt_g.step()`` at the very end, so
  the seed's second ``G(noisy, z)`` (same ``z``) recomputes the same tensor; the G update
  back-propagates through the graph kept from the first forward (its ``detach()`` fed D).
  The seed draws a fresh ``z`` for its G update; sharing one draw is what makes the single
  forward possible (each update still sees a fresh N(0, 1) draw every step);
* real and fake pairs go through D in one call (VBN normalizes each example on its own, so
  this equals two calls);
* the reference batch goes through D once per D weight version, without gradient (the seed
  detaches the reference moments): the moments computed for the G update (after
  ``opt_d.step()``) are still valid at the next step's D update, because only ``opt_d.step()``
  changes D. They are cached per discriminator and reused when the same ``ref`` tensor object
  comes back and D's parameters are unchanged (version counters and storage pointers; every
  autograd-visible in-place write bumps them). ``opt_d.step()`` inside ``train_step`` drops
  the cache explicitly (fused optimizers do not bump version counters). If you change D's
  weights through ``.data`` or step a fused optimizer on D outside ``train_step``, call
  :func:`reset_reference_cache`;
* in the G update D's weights have ``requires_grad`` off, so backward computes only the
  input gradients D passes on to G (the seed also computed D weight gradients it then
  threw away).

Distributed training: ``G`` and ``D`` may be DistributedDataParallel wrappers. The D update
calls ``D`` (the wrapper: its gradients are all-reduced); the G update calls ``D.module``
(the plain module) with frozen weights, because a second forward through a DDP wrapper per
backward, with parameters that get no gradient, would confuse the DDP reducer. ``G`` is called
once through its wrapper and back-propagated once, as DDP expects.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch import Tensor, nn

from .losses import d_loss_terms, g_loss_terms
from .model import Discriminator, ReferenceStats, unwrap_model

__all__ = ["train_step", "baseline_step", "reset_reference_cache", "STEP_METRICS"]

STEP_METRICS = ("d_real", "d_fake", "clean_loss", "noisy_loss", "d_loss",
                "g_adv", "g_l1", "g_stft", "g_loss", "g_grad_norm", "d_grad_norm")


# ----------------------------------------------------------------------------- reference cache
class _CacheEntry:
    __slots__ = ("ref", "key", "stats")

    def __init__(self, ref: Tensor, key: tuple, stats: ReferenceStats) -> None:
        self.ref, self.key, self.stats = ref, key, stats


_REF_CACHE: "weakref.WeakKeyDictionary[nn.Module, _CacheEntry]" = weakref.WeakKeyDictionary()


def _cache_key(disc: nn.Module, ref: Tensor) -> tuple:
    device_type = ref.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else None
    params = tuple((p._version, p.data_ptr()) for p in disc.parameters())
    return (ref._version, tuple(ref.shape), autocast, dtype, params)


def reset_reference_cache(D: nn.Module) -> None:
    """Forget the reference moments cached for ``D`` (next use recomputes them)."""
    _REF_CACHE.pop(unwrap_model(D), None)


def _reference_stats(disc: Discriminator, ref: Tensor) -> ReferenceStats:
    """The reference moments for ``disc``'s current weights: cached, or one no-grad pass."""
    key = _cache_key(disc, ref)
    entry = _REF_CACHE.get(disc)
    if entry is not None and entry.ref is ref and entry.key == key:
        return entry.stats
    stats = disc.reference_stats(ref)
    _REF_CACHE[disc] = _CacheEntry(ref, key, stats)
    return stats


# ----------------------------------------------------------------------------- helpers
def _autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily turn off ``requires_grad`` on the module's parameters (restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _grad_norm(module: nn.Module, max_norm: float | None) -> float:
    """Total L2 norm of the gradients (before clipping); clips in place when ``max_norm`` is set."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params]))


def _pair(candidate: Tensor, noisy: Tensor) -> Tensor:
    return torch.cat([candidate, noisy], dim=1)


def _check_inputs(noisy: Tensor, clean: Tensor, ref: Tensor, z: Tensor) -> None:
    if noisy.dim() != 3 or noisy.shape[1] != 1:
        raise ValueError(f"noisy: expected [B, 1, T], got {list(noisy.shape)}")
    if clean.shape != noisy.shape:
        raise ValueError(f"clean: expected the shape of noisy {list(noisy.shape)}, got {list(clean.shape)}")
    if ref.dim() != 3 or ref.shape[1] != 2 or ref.shape[2] != noisy.shape[2]:
        raise ValueError(f"ref: expected [R, 2, {noisy.shape[2]}] (clean, noisy) pairs, got {list(ref.shape)}")
    if z.shape[0] != noisy.shape[0]:
        raise ValueError(f"z: expected batch {noisy.shape[0]}, got {list(z.shape)}")


def _metrics(d_real: Tensor, d_fake: Tensor, d_terms: tuple, g_terms: tuple,
             g_norm: float, d_norm: float) -> dict[str, float]:
    clean_loss, noisy_loss, d_loss = d_terms
    g_adv, g_l1, g_stft, g_loss = g_terms
    values = (d_real.float().mean(), d_fake.float().mean(), clean_loss, noisy_loss, d_loss,
              g_adv, g_l1, g_stft, g_loss)
    out = {name: float(v.detach()) for name, v in zip(STEP_METRICS, values)}
    out["g_grad_norm"], out["d_grad_norm"] = g_norm, d_norm
    return out


# ----------------------------------------------------------------------------- the steps
def train_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               noisy: Tensor, clean: Tensor, ref: Tensor, z: Tensor, g_lambda: float,
               autocast_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
               stft_lambda: float = 0.0) -> dict[str, float]:
    """One D update then one G update (one G forward); returns the float metrics ``STEP_METRICS``.

    ``noisy``/``clean``: pre-emphasized ``[B, 1, T]``; ``ref``: pre-emphasized reference pairs
    ``[R, 2, T]`` (keep passing the same tensor object to benefit from the moment cache);
    ``z``: ``[B, C, T/2**depth]``. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the
    forwards under ``torch.autocast``; ``max_grad_norm`` clips each network's gradients;
    ``stft_lambda`` weighs the optional multi-resolution STFT term of the G loss (0 = the
    seed's loss). Grad norms are reported before clipping.
    """
    _check_inputs(noisy, clean, ref, z)
    disc = unwrap_model(D)
    if not isinstance(disc, Discriminator):
        raise TypeError(f"D: expected a segan Discriminator (optionally wrapped), got {type(disc).__name__}")
    device_type = noisy.device.type
    batch = noisy.shape[0]

    # ---- D update: real and fake pairs in one call; one G forward, kept for the G update
    opt_d.zero_grad(set_to_none=True)
    with _autocast(device_type, autocast_dtype):
        generated = G(noisy, z)
        stats = _reference_stats(disc, ref)
        pairs = torch.cat([_pair(clean, noisy), _pair(generated.detach(), noisy)], dim=0)
        d_out = D(pairs, stats)
    d_real, d_fake = d_out[:batch], d_out[batch:]
    d_terms = d_loss_terms(d_real, d_fake)
    d_terms[2].backward()
    d_norm = _grad_norm(disc, max_grad_norm)
    opt_d.step()
    reset_reference_cache(disc)  # D changed (fused optimizers do not bump version counters)

    # ---- G update: the updated D on [G(noisy), noisy]; D weights need no gradient
    opt_g.zero_grad(set_to_none=True)
    d_plain = D.module if isinstance(D, nn.parallel.DistributedDataParallel) else D
    with _frozen(disc):
        with _autocast(device_type, autocast_dtype):
            stats = _reference_stats(disc, ref)  # also serves the next step's D update
            d_gen = d_plain(_pair(generated, noisy), stats)
        g_terms = g_loss_terms(d_gen, generated, clean, g_lambda, stft_lambda)
        g_terms[-1].backward()  # g_loss
    g_norm = _grad_norm(unwrap_model(G), max_grad_norm)
    opt_g.step()
    return _metrics(d_real, d_fake, d_terms, g_terms, g_norm, d_norm)


def baseline_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                  noisy: Tensor, clean: Tensor, ref: Tensor, z: Tensor, g_lambda: float,
                  autocast_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
                  ) -> dict[str, float]:
    """The seed's step, literally: three D calls each pushing ``ref`` through D, G computed twice
    (same ``z``), D weight gradients computed in the G update. Reference for tests and benchmarks;
    single process only (the third D call would break a DDP-wrapped D's reducer)."""
    _check_inputs(noisy, clean, ref, z)
    device_type = noisy.device.type

    # ---- TRAIN D
    with _autocast(device_type, autocast_dtype):
        outputs = D(_pair(clean, noisy), ref)
    clean_loss = (outputs.float() - 1.0).square().mean()
    d_real = outputs
    with _autocast(device_type, autocast_dtype):
        generated = G(noisy, z)
        outputs = D(_pair(generated.detach(), noisy), ref)
    noisy_loss = outputs.float().square().mean()
    d_fake = outputs
    d_loss = 0.5 * (clean_loss + noisy_loss)
    D.zero_grad()
    d_loss.backward()
    d_norm = _grad_norm(unwrap_model(D), max_grad_norm)
    opt_d.step()

    # ---- TRAIN G
    with _autocast(device_type, autocast_dtype):
        generated = G(noisy, z)
        outputs = D(_pair(generated, noisy), ref)
    g_adv = 0.5 * (outputs.float() - 1.0).square().mean()
    g_l1 = (generated.float() - clean.float()).abs().mean()
    g_loss = g_adv + g_lambda * g_l1
    G.zero_grad()
    g_loss.backward()
    g_norm = _grad_norm(unwrap_model(G), max_grad_norm)
    opt_g.step()
    g_stft = g_l1.new_zeros(())  # the seed has no STFT term
    return _metrics(d_real, d_fake, (clean_loss, noisy_loss, d_loss), (g_adv, g_l1, g_stft, g_loss), g_norm, d_norm)
