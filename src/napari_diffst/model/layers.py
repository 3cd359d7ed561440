"""Shared building blocks of the Diff-ST denoiser.

Sinusoidal time embedding + MLP, GroupNorm with a safe group count, a ResBlock with FiLM
conditioning (``h = GN(h) * (1 + scale) + shift`` with ``(scale, shift) = Linear(emb)``), spatial
self-attention, down/up-sampling, and a fixed 2-D sinusoidal position encoding used by the
histology cross-attention.

None of the blocks is zero-initialised: every parameter receives a gradient from the first step
(the test-suite checks this), which a zero-initialised output conv would prevent.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "num_groups", "norm", "timestep_embedding", "TimeEmbedding", "ResBlock", "SelfAttention2d",
    "Downsample", "Upsample", "sinusoidal_2d",
]


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` dividing ``channels`` with >= 4 channels per group
    (falls back to 1 for tiny layers)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps ``t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal(t) -> Linear -> SiLU -> Linear."""

    def __init__(self, base: int, dim: int):
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base))


class ResBlock(nn.Module):
    """GN-SiLU-Conv3 -> FiLM(emb) -> GN-SiLU-Dropout-Conv3, plus a 1x1 skip when channels change.

    ``emb_dim=None`` gives an unconditioned block (used by the histology encoder)."""

    def __init__(self, cin: int, cout: int, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.norm2 = norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (pre-norm, residual)."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(o.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def sinusoidal_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int,
                  min_wavelength: float = 2.0, max_wavelength: float = 512.0) -> torch.Tensor:
    """Fixed 2-D sinusoidal encoding of positions given in HR-pixel units.

    ``rows``, ``cols``: (N,) float -> (N, dim). Half of the channels encode the row, half the
    column, with wavelengths log-spaced between ``min_wavelength`` and ``max_wavelength`` HR
    pixels. Parameter-free, so pixel queries and patch keys at the same place get the same code."""
    nf = max(dim // 4, 1)
    wl = torch.exp(torch.linspace(math.log(min_wavelength), math.log(max_wavelength), nf,
                                  device=rows.device))
    w = 2 * math.pi / wl
    parts = []
    for p in (rows, cols):
        a = p.float()[:, None] * w[None]
        parts += [torch.sin(a), torch.cos(a)]
    enc = torch.cat(parts, dim=1)
    if enc.shape[1] < dim:
        enc = F.pad(enc, (0, dim - enc.shape[1]))
    return enc[:, :dim]
