"""Shared helpers for the network tests: a tiny Diff-ST denoiser and a random batch for it."""
from __future__ import annotations

import torch

from napari_diffst.model import build_model


def build_tiny(base: dict, seed: int = 0, n_genes: int = 3, **kw):
    """A seeded denoiser from the config ``base`` (3 genes) updated with ``kw``."""
    torch.manual_seed(seed)
    cfg = dict(base, n_genes=n_genes)
    cfg.update(kw)
    return build_model(cfg)


def random_batch(B, G, H, W, k, seed=0, hr_mask=False):
    """(x_t, t, cond) with values in [-1, 1], a full LR mask and H&E of ``k`` px per HR pixel; ``hr_mask`` adds
    a full HR mask to ``cond``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, G, H, W, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (B,), generator=g)
    cond = dict(lr_up=torch.rand(B, G, H, W, generator=g) * 2 - 1, lr_mask=torch.ones(B, 1, H, W),
                he=torch.rand(B, 3, H * k, W * k, generator=g))
    if hr_mask:
        cond["hr_mask"] = torch.ones(B, 1, H, W)
    return x, t, cond
