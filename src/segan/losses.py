"""SEGAN's least-squares GAN losses, exactly as in the seed (deNsuh/segan-pytorch).

D is trained to output 1 for real ``[clean, noisy]`` pairs and 0 for ``[G(noisy), noisy]``;
G is trained to make D output 1, plus ``g_lambda`` times the L1 distance to the clean target.
All reductions are plain means over every element; losses are computed in float32 even when
the networks ran under bf16 autocast.
"""

from __future__ import annotations

from torch import Tensor


def d_loss_terms(d_real: Tensor, d_fake: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(clean_loss, noisy_loss, d_loss)``: ``mean((d_real-1)^2)``, ``mean(d_fake^2)`` and their mean."""
    clean_loss = (d_real.float() - 1.0).square().mean()
    noisy_loss = d_fake.float().square().mean()
    return clean_loss, noisy_loss, 0.5 * (clean_loss + noisy_loss)


def g_loss_terms(d_gen: Tensor, generated: Tensor, clean: Tensor, g_lambda: float,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_adv, g_l1, g_loss)``: ``0.5*mean((d_gen-1)^2)``, ``mean(|generated-clean|)``,
    ``g_adv + g_lambda * g_l1``."""
    g_adv = 0.5 * (d_gen.float() - 1.0).square().mean()
    g_l1 = (generated.float() - clean.float()).abs().mean()
    return g_adv, g_l1, g_adv + g_lambda * g_l1
