"""Hand-built toy :class:`SRField`s for metric and baseline tests (no data pipeline needed).

The truth is smooth with histology-correlated structure; the LR is the exact masked s×s block mean
of the truth; the H&E is a coloured image whose hue follows a "tumour" region and whose darkness
follows a continuous "cellularity" field that also drives some genes.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_diffst.data.pairs import SRField

STROMA = np.array([0.93, 0.66, 0.80])
TUMOUR = np.array([0.50, 0.32, 0.68])
BACKGROUND = np.array([0.96, 0.96, 0.96])


def _smooth01(rng, shape, sigma):
    z = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (z - z.min()) / (z.max() - z.min())


def masked_block_mean(hr, s, mask):
    G, H, W = hr.shape
    h, w = H // s, W // s
    m = mask.astype(np.float64)
    cnt = m.reshape(h, s, w, s).sum(axis=(1, 3))
    tot = (hr * m).reshape(G, h, s, w, s).sum(axis=(2, 4))
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0), cnt


def make_toy_field(seed: int = 0, h: int = 12, w: int = 12, s: int = 4, k: int = 2,
                   piecewise: bool = False, he_noise: float = 0.03, name: str | None = None) -> SRField:
    """A toy field of ``h × w`` LR pixels, scale ``s``, ``k`` H&E pixels per HR pixel.

    Genes: ``region`` (piecewise constant, tumour vs stroma), ``cellular`` (= H&E darkness field),
    ``hidden`` (smooth, invisible in the H&E: only the LR knows it), ``mixed``.
    ``piecewise=True``: a single gene equal to the region indicator and a noise-free H&E whose colour
    is exactly the region colour (a perfect colour cue)."""
    rng = np.random.default_rng(seed)
    H, W = h * s, w * s
    yy, xx = np.mgrid[0:H, 0:W]
    cy, cx = (H - 1) / 2, (W - 1) / 2
    rad = ((yy - cy) / (0.46 * H)) ** 2 + ((xx - cx) / (0.46 * W)) ** 2
    wobble = 0.15 * (_smooth01(rng, (H, W), H / 8) - 0.5)
    mask = rad + wobble < 1.0
    region = (_smooth01(rng, (H, W), H / 10) > 0.5).astype(np.float64)
    cell = _smooth01(rng, (H, W), H / 14)
    hidden = _smooth01(rng, (H, W), H / 6)
    if piecewise:
        genes = ["region"]
        hr = region[None].copy()
    else:
        genes = ["region", "cellular", "hidden", "mixed"]
        hr = np.stack([0.15 + 0.6 * region + 0.05 * hidden,
                       0.1 + 0.8 * cell,
                       0.1 + 0.8 * hidden,
                       0.2 + 0.35 * region + 0.35 * cell])
    hr = (hr * mask).astype(np.float32)
    lr, cnt = masked_block_mean(hr, s, mask)
    lr_mask = cnt > 0
    # H&E on the k-times finer grid
    up = lambda a, order: ndi.zoom(a, k, order=order, grid_mode=True, mode="nearest")  # noqa: E731
    reg_k = up(region, 0)
    m_k = up(mask.astype(float), 0) > 0.5
    col = reg_k[..., None] * TUMOUR + (1 - reg_k[..., None]) * STROMA
    if not piecewise:
        col = col * (1 - 0.35 * up(cell, 1))[..., None]
        col = col + he_noise * rng.standard_normal(col.shape)
    col = np.where(m_k[..., None], col, BACKGROUND)
    he = np.clip(col, 0, 1).transpose(2, 0, 1).astype(np.float32)
    return SRField(name=name or f"toy{seed}", genes=genes, scale=s, lr=lr.astype(np.float32),
                   lr_mask=lr_mask, hr=hr, hr_mask=mask, he=he, he_per_hr=k, hr_um=100.0 / s,
                   gene_scale=np.ones(len(genes), np.float32))
