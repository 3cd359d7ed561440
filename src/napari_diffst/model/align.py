"""Spatial alignment module (HaDM-ST idea): a learned deformable offset field for the histology features.

H&E and ST are registered globally, but local misalignment (tissue tearing, section deformation, spot
position error) remains. ``SpatialAlign`` predicts a per-HR-pixel 2-D offset from
[histology features, LR expression, LR mask] with a small conv net and resamples the histology features
there (``grid_sample``, bilinear, border padding)::

    d = max_offset · tanh(Conv3x3(SiLU(Conv3x3(SiLU(Conv3x3([P_h(F), P_y(lr_up, lr_mask)]))))))   (B, 2, H, W)
    F'(p) = F(p + d(p))                                                                        in HR pixels

The last conv is zero-initialised, so the module starts as the identity (d = 0, F' = F exactly) and the
offsets grow only where the diffusion loss profits from them. ``smoothness_loss(d)`` (mean squared
difference of neighbouring offsets, in HR pixels²) is returned as ``aux['align_smooth']`` and weighted
by ``align_weight`` so the field stays smooth. Enabled with ``use_align=True`` in the model config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SpatialAlign", "smoothness_loss", "warp"]


def warp(feats: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sample ``feats`` (B, C, H, W) at ``p + offsets`` (B, 2, H, W; (dy, dx) in pixels), bilinear, border."""
    B, _, H, W = feats.shape
    ys = (torch.arange(H, device=feats.device, dtype=feats.dtype) + 0.5) * (2.0 / H) - 1.0
    xs = (torch.arange(W, device=feats.device, dtype=feats.dtype) + 0.5) * (2.0 / W) - 1.0
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    off = offsets.to(feats.dtype)
    grid = torch.stack([gx[None] + off[:, 1] * (2.0 / W), gy[None] + off[:, 0] * (2.0 / H)], dim=-1)
    return F.grid_sample(feats, grid, mode="bilinear", padding_mode="border", align_corners=False)


def smoothness_loss(offsets: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of horizontally and vertically neighbouring offsets (pixels²)."""
    dy = offsets[..., 1:, :] - offsets[..., :-1, :]
    dx = offsets[..., :, 1:] - offsets[..., :, :-1]
    parts = [d.pow(2).mean() for d in (dy, dx) if d.numel()]
    return torch.stack(parts).sum() if parts else offsets.new_zeros(())


class SpatialAlign(nn.Module):
    """``forward(hist (B, C_h, H, W), lr_up (B, G, H, W), lr_mask (B, 1, H, W)) -> (aligned hist, offsets)``."""

    def __init__(self, hist_channels: int, n_genes: int, hidden: int = 32, max_offset: float = 2.0):
        super().__init__()
        self.max_offset = float(max_offset)
        self.hist_in = nn.Conv2d(hist_channels, hidden, 1)
        self.st_in = nn.Conv2d(n_genes + 1, hidden, 1)
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(2 * hidden, hidden, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.offset = nn.Conv2d(hidden, 2, 3, padding=1)
        nn.init.zeros_(self.offset.weight)   # identity at initialisation
        nn.init.zeros_(self.offset.bias)

    def offsets(self, hist, lr_up, lr_mask) -> torch.Tensor:
        h = torch.cat([self.hist_in(hist), self.st_in(torch.cat([lr_up, lr_mask], 1))], 1)
        return self.max_offset * torch.tanh(self.offset(self.body(h)))

    def forward(self, hist, lr_up, lr_mask):
        d = self.offsets(hist, lr_up, lr_mask)
        return warp(hist, d), d
