"""LR → HR upsampling, one home: the edge-aware cubic spline that :meth:`SRField.lr_upsampled`, the ``bicubic``
baseline, the denoiser's condition (``upsample='cubic'``) and tiled sampling all use."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["fill_lr", "cubic_upsample"]


def fill_lr(lr: np.ndarray, lr_mask: np.ndarray) -> np.ndarray:
    """Replace LR pixels outside ``lr_mask`` with the value of the nearest in-tissue LR pixel."""
    lr = np.asarray(lr, np.float32)
    m = np.asarray(lr_mask, bool)
    if m.all() or not m.any():
        return lr.copy()
    _, (ri, ci) = ndi.distance_transform_edt(~m, return_indices=True)
    return lr[:, ri, ci]


def cubic_upsample(lr: np.ndarray, scale: int, lr_mask: np.ndarray | None = None, order: int = 3) -> np.ndarray:
    """Spline interpolation of ``lr`` (G, h, w) at the centres of the ``scale``-times finer grid.

    HR pixel ``i`` has its centre at LR coordinate ``(i + 0.5)/s − 0.5`` (pixel areas aligned, not
    corners).  With ``lr_mask`` the out-of-tissue LR pixels are filled by nearest in-tissue values
    first.  Constants are preserved exactly (up to float rounding)."""
    s = int(scale)
    src = fill_lr(lr, lr_mask) if lr_mask is not None else np.asarray(lr, np.float32)
    G, h, w = src.shape
    r = (np.arange(h * s) + 0.5) / s - 0.5
    c = (np.arange(w * s) + 0.5) / s - 0.5
    rr, cc = np.meshgrid(r, c, indexing="ij")
    out = np.empty((G, h * s, w * s), np.float32)
    for g in range(G):
        out[g] = ndi.map_coordinates(src[g].astype(np.float64), [rr, cc], order=order, mode="nearest")
    return out
