"""The contract between the data pipeline, the engine, the baselines and the benchmark.

A :class:`SRField` is one section rasterised on an HR grid with its LR input and aligned H&E;
:func:`random_patches` crops aligned training patches from a list of fields.

Value convention ("model units"): per gene, ``v = log1p(CP10k) / gene_scale[g]`` so that values
lie roughly in [0, 1]; ``gene_scale`` is stored so outputs can be shown in expression units
(``v * gene_scale``). Diffusion maps these to [-1, 1] internally (``2v - 1``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["GeneGrid", "SRField", "random_patches", "Patches"]


class GeneGrid:
    """``G`` and ``hr_shape`` of anything with ``genes``, ``lr`` (G, h, w) and ``scale``."""

    @property
    def G(self) -> int:
        return len(self.genes)

    @property
    def hr_shape(self) -> tuple[int, int]:
        return (self.lr.shape[1] * self.scale, self.lr.shape[2] * self.scale)


@dataclass
class SRField(GeneGrid):
    """One section on aligned LR / HR / H&E rasters.

    Shapes: ``lr`` (G, h, w); ``hr`` (G, h*s, w*s) or None when no truth; masks (h, w) / (H, W) bool;
    ``he`` (3, H*k, W*k) float32 in [0, 1] where ``k = he_per_hr`` H&E pixels per HR pixel.
    Pixel (0, 0) of every raster shares its top-left corner at ``origin_px`` (x, y) in full-res image
    pixels; ``hr_um`` is the HR pixel size (LR pitch / s).
    """

    name: str
    genes: list
    scale: int
    lr: np.ndarray
    lr_mask: np.ndarray
    hr: np.ndarray | None
    hr_mask: np.ndarray
    he: np.ndarray
    he_per_hr: int
    hr_um: float
    gene_scale: np.ndarray
    origin_px: tuple = (0.0, 0.0)
    um_per_px: float = 1.0
    #: pixel (row, col) → spot index on the HR grid (−1 where none), for spot-level scoring
    hr_spot_index: np.ndarray | None = None
    #: raw counts behind ``hr`` (spots × genes), for the split-half reference
    hr_counts: object | None = None
    extra: dict = field(default_factory=dict)

    def lr_upsampled(self, order: int = 0) -> np.ndarray:
        """LR map on the HR grid: order 0 = block copy; order 3 = edge-aware cubic spline (out-of-tissue LR
        pixels filled from the nearest in-tissue ones first, pixel centres aligned), cached per field."""
        s = self.scale
        if order == 0:
            return np.repeat(np.repeat(self.lr, s, axis=1), s, axis=2)
        key = f"lr_up{order}"
        cached = self.extra.get(key)
        if cached is None or cached.shape != (self.G, *self.hr_shape):
            from .upsample import cubic_upsample

            cached = cubic_upsample(self.lr, s, self.lr_mask, order=order).astype(np.float32)
            self.extra[key] = cached
        return cached


@dataclass
class Patches:
    """A batch of aligned training patches (numpy, float32)."""

    lr: np.ndarray        # (B, G, p, p)
    lr_mask: np.ndarray   # (B, 1, p, p)
    hr: np.ndarray        # (B, G, p*s, p*s)
    hr_mask: np.ndarray   # (B, 1, p*s, p*s)
    he: np.ndarray        # (B, 3, p*s*k, p*s*k)
    lr_up: np.ndarray | None = None  # (B, G, p*s, p*s) edge-aware cubic LR on the HR grid (with_lr_up)


def random_patches(fields: list[SRField], n: int, lr_size: int, rng: np.random.Generator,
                   augment: bool = True, min_valid: float = 0.3, with_lr_up: bool = False) -> Patches:
    """Crop ``n`` aligned patches of ``lr_size`` LR pixels from fields with HR truth.

    Patches are zero-padded where they leave a field; flips and 90° rotations when ``augment``.
    Crops with less than ``min_valid`` of HR pixels under tissue are re-drawn (up to 20 times)."""
    fields = [f for f in fields if f.hr is not None]
    if not fields:
        raise ValueError("random_patches needs at least one field with HR truth")
    s, k = fields[0].scale, fields[0].he_per_hr
    G = fields[0].G
    P, Ph = lr_size * s, lr_size * s * k
    out = Patches(np.zeros((n, G, lr_size, lr_size), np.float32), np.zeros((n, 1, lr_size, lr_size), np.float32),
                  np.zeros((n, G, P, P), np.float32), np.zeros((n, 1, P, P), np.float32),
                  np.zeros((n, 3, Ph, Ph), np.float32),
                  np.zeros((n, G, P, P), np.float32) if with_lr_up else None)
    names = ("lr", "lr_mask", "hr", "hr_mask", "he") + (("lr_up",) if with_lr_up else ())
    weights = np.array([f.hr_mask.sum() for f in fields], float)
    weights /= weights.sum()
    for b in range(n):
        for _ in range(20):
            f = fields[rng.choice(len(fields), p=weights)]
            h, w = f.lr.shape[1:]
            r0 = int(rng.integers(-(lr_size // 2), max(h - lr_size // 2, 1)))
            c0 = int(rng.integers(-(lr_size // 2), max(w - lr_size // 2, 1)))
            hm = _crop(f.hr_mask[None].astype(np.float32), r0 * s, c0 * s, P)
            if hm.mean() >= min_valid:
                break
        out.lr[b] = _crop(f.lr, r0, c0, lr_size)
        out.lr_mask[b] = _crop(f.lr_mask[None].astype(np.float32), r0, c0, lr_size)
        out.hr[b] = _crop(f.hr, r0 * s, c0 * s, P)
        out.hr_mask[b] = hm
        out.he[b] = _crop(f.he, r0 * s * k, c0 * s * k, Ph)
        if with_lr_up:
            out.lr_up[b] = _crop(f.lr_upsampled(3), r0 * s, c0 * s, P)
        if augment:
            kk, flip = int(rng.integers(4)), bool(rng.integers(2))
            for name in names:
                a = getattr(out, name)[b]
                a = np.rot90(a, kk, axes=(1, 2))
                if flip:
                    a = a[:, :, ::-1]
                getattr(out, name)[b] = a
    return out


def _crop(a: np.ndarray, r0: int, c0: int, size: int) -> np.ndarray:
    """``a[:, r0:r0+size, c0:c0+size]`` with zero padding outside."""
    C, H, W = a.shape
    out = np.zeros((C, size, size), a.dtype)
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r0 + size, H), max(c0, 0), min(c0 + size, W)
    if rr1 > rr0 and cc1 > cc0:
        out[:, rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = a[:, rr0:rr1, cc0:cc1]
    return out
