"""A tiny stand-in denoiser for engine tests (the network contract without the Diff-ST network)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class StandIn(nn.Module):
    """Tiny denoiser following the engine contract ``model(x_t, t, cond) -> (out, aux)``."""

    def __init__(self, config=None):
        super().__init__()
        c = {"genes": 2, "hidden": 8, "he_per_hr": 2}
        c.update(config or {})
        self.config = c
        G, h = c["genes"], c["hidden"]
        self.inp = nn.Conv2d(2 * G + 4, h, 3, padding=1)
        self.temb = nn.Linear(4, h)
        self.out = nn.Conv2d(h, G, 3, padding=1)
        self.progress = 0.0

    def set_progress(self, frac):
        self.progress = float(frac)

    def forward(self, x_t, t, cond):
        he = F.avg_pool2d(cond["he"], self.config["he_per_hr"])
        h = torch.cat([x_t, cond["lr_up"], he, cond["lr_mask"]], 1)
        tt = t.float()[:, None] / 1000 * torch.tensor([1.0, 3.0, 10.0, 30.0])
        h = F.silu(self.inp(h) + self.temb(torch.sin(tt))[:, :, None, None])
        return self.out(h), {"disentangle": h.pow(2).mean()}
