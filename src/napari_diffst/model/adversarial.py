"""Channel-aware adversarial learning (HaDM-ST idea): a per-gene patch discriminator on HR maps.

Every gene map is judged on its own, together with its LR condition (so the discriminator looks at the
*detail* a map adds, not at the expression level the LR map already fixes) and the tissue mask; a learned
gene embedding makes the decision channel-aware (projection discriminator, Miyato & Koyama 2018)::

    φ = LReLU(Conv3x3(LReLU(Conv4x4/2(LReLU(Conv3x3([map_g, lr_up_g, mask]))))))      (N, 2h, H/2, W/2)
    D(map_g) = Conv1x1(φ) + <e_g, φ> / sqrt(2h)                                      patch logits (N, 1, H/2, W/2)

Real = HR truth maps, fake = the denoiser's x0 prediction. Non-saturating losses, averaged over the
(down-sampled) tissue mask: ``L_D = softplus(−D(real)) + softplus(D(fake))``, ``L_G = softplus(−D(fake))``.
The trainer adds ``adv_weight · L_G`` to the diffusion loss and steps the discriminator alternately
(:class:`napari_diffst.train.Trainer`, ``TrainConfig.adv_weight``; 0 = off).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GeneDiscriminator", "discriminator_loss", "generator_adv_loss", "gene_maps"]


class GeneDiscriminator(nn.Module):
    """``forward(maps (N, 1, H, W), lr_up (N, 1, H, W), mask (N, 1, H, W), gene (N,) long) -> (N, 1, h, w)``."""

    def __init__(self, n_genes: int, hidden: int = 32):
        super().__init__()
        h = int(hidden)
        self.n_genes = int(n_genes)
        self.body = nn.Sequential(nn.Conv2d(3, h, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(h, 2 * h, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(2 * h, 2 * h, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(2 * h, 1, 1)
        self.gene_emb = nn.Embedding(self.n_genes, 2 * h)
        nn.init.normal_(self.gene_emb.weight, std=0.1)

    def forward(self, maps, lr_up, mask, gene):
        mask = torch.ones_like(maps) if mask is None else mask.to(maps.dtype)
        f = self.body(torch.cat([maps, lr_up, mask], 1))
        proj = (f * self.gene_emb(gene)[:, :, None, None].to(f.dtype)).sum(1, keepdim=True)
        return self.out(f) + proj / math.sqrt(f.shape[1])


def _masked_mean(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return v.mean()
    m = F.adaptive_avg_pool2d(mask.to(v.dtype), v.shape[-2:])
    return (v * m).sum() / m.sum().clamp_min(1e-6)


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean softplus(−D(real)) + mean softplus(D(fake))`` over the mask (non-saturating GAN)."""
    return _masked_mean(F.softplus(-d_real), mask) + _masked_mean(F.softplus(d_fake), mask)


def generator_adv_loss(d_fake: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean softplus(−D(fake))`` over the mask."""
    return _masked_mean(F.softplus(-d_fake), mask)


def gene_maps(x: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
    """(B, G, H, W), genes (n,) -> (B·n, 1, H, W): the chosen gene maps of every sample, sample-major."""
    B, _, H, W = x.shape
    return x[:, genes].reshape(B * genes.numel(), 1, H, W)
