"""Fluorescence morphology images (DAPI, PolyT, IF) as the histology modality.

Imaging-based platforms image a nuclear stain (DAPI) and sometimes an RNA stain (PolyT) or membrane/IF channels
instead of H&E.  :func:`fluorescence_image` wraps one to three single-channel arrays (lazy zarr levels of a
TIFF/OME-TIFF pyramid, or numpy) as a :class:`~napari_diffst.data.sample.HistologyImage` whose pixels are the
channels **contrast-stretched to [0, 255]** (per channel, from the 0.5 and 99.8 percentiles of a strided
thumbnail) and stacked as (C0, C1, C2) = (nuclear, second stain or nuclear, nuclear) — so everything that samples
an "H&E" (fields, the encoder, registration's tissue mask) gets a stain-intensity image on the same frame.
The image carries ``modality = 'fluorescence'``, ``channel_names`` and ``contrast`` (raw-unit percentiles,
for napari's greyscale layer).

:func:`detect_modality` tells brightfield (H&E: bright, saturated background-free) from fluorescence (dark
background, grey or one-channel) on a thumbnail, so images opened by any reader are handled automatically;
``image.modality`` can be set by hand to override.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fluorescence_image", "detect_modality", "image_modality", "nuclear_threshold", "FLUOR_LOW_PCT",
           "FLUOR_HIGH_PCT"]

FLUOR_LOW_PCT, FLUOR_HIGH_PCT = 0.5, 99.8


def _strided(arr, max_size: int = 1024) -> np.ndarray:
    H, W = arr.shape[:2]
    step = max(1, int(np.ceil(max(H, W) / max_size)))
    return np.asarray(arr[::step, ::step], np.float32)


def _contrast(arr) -> tuple[float, float]:
    t = _strided(arr)
    lo, hi = (float(v) for v in np.percentile(t, [FLUOR_LOW_PCT, FLUOR_HIGH_PCT]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


class _FluorRGB:
    """(Y, X, 3) uint8 view of up to three (Y, X) channel arrays, each stretched by its (lo, hi)."""

    def __init__(self, channels: list, contrast: list[tuple[float, float]], order: tuple[int, int, int]):
        self._ch = channels
        self._contrast = contrast
        self._order = order
        H, W = channels[0].shape[:2]
        self.shape = (int(H), int(W), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key[:2]) + (slice(None),) * (2 - len(key[:2]))
        planes = {}
        for i in set(self._order):
            lo, hi = self._contrast[i]
            a = np.asarray(self._ch[i][key], np.float32)
            planes[i] = np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        return np.stack([planes[i] for i in self._order], axis=-1)

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


def fluorescence_image(levels_per_channel: list[list], channel_names: list[str], *, path=None,
                       fullres_per_px: float = 1.0):
    """A :class:`HistologyImage` from ``levels_per_channel[c][level]`` (each (Y, X), largest level first).

    Channel 0 is the nuclear stain; channel 1 (when given) the second stain.  Contrast is measured on the
    smallest level of each channel."""
    from .sample import HistologyImage

    if not levels_per_channel:
        raise ValueError("fluorescence_image needs at least one channel")
    n_lev = min(len(c) for c in levels_per_channel)
    contrast = [_contrast(c[n_lev - 1]) for c in levels_per_channel]
    order = (0, 1, 0) if len(levels_per_channel) > 1 else (0, 0, 0)
    levels = [_FluorRGB([c[L] for c in levels_per_channel], contrast, order) for L in range(n_lev)]
    img = HistologyImage(levels, fullres_per_px=fullres_per_px, path=path)
    img.modality = "fluorescence"
    img.channel_names = [str(n) for n in channel_names]
    img.contrast = contrast
    img.raw_levels = [list(c[:n_lev]) for c in levels_per_channel]
    return img


def detect_modality(rgb: np.ndarray) -> str:
    """'fluorescence' or 'brightfield' from an RGB thumbnail (uint8 or float in [0, 1]).

    H&E has a bright background (the median pixel is light) and colour; fluorescence mosaics are mostly dark
    (the median pixel is below a quarter of the range) or grey with a dark background."""
    a = np.asarray(rgb, np.float32)
    if a.size == 0:
        return "brightfield"
    if a.max() > 1.5:
        a = a / 255.0
    if a.ndim == 2:
        a = a[..., None]
    grey = a[..., :3].mean(axis=-1)
    med = float(np.median(grey))
    if med < 0.25:
        return "fluorescence"
    return "brightfield"


def image_modality(image) -> str:
    """The modality of a HistologyImage: its ``modality`` attribute when set (by a reader or by hand), else
    :func:`detect_modality` on its thumbnail (cached on the image)."""
    if image is None:
        return "brightfield"
    m = getattr(image, "modality", None)
    if m in ("fluorescence", "brightfield"):
        return m
    thumb, _ = image.thumbnail(256)
    m = detect_modality(thumb)
    try:
        image.modality = m
    except AttributeError:  # pragma: no cover
        pass
    return m


def nuclear_threshold(image, max_size: int = 2048) -> float:
    """Otsu threshold of the nuclear channel (channel 0, stretched to [0, 1]) on a thumbnail of ``image``
    (longest side ≤ ``max_size``; lightly smoothed), cached on the image as ``nuclear_threshold_``.  One value per
    image, so every field cut from it uses the same nucleus definition."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    cached = getattr(image, "nuclear_threshold_", None)
    if cached is not None:
        return float(cached)
    thumb, _ = image.thumbnail(max_size)
    a = np.asarray(thumb, np.float32)
    a = a[..., 0] if a.ndim == 3 else a
    if a.max() > 1.5:
        a = a / 255.0
    a = ndi.gaussian_filter(a, 1.0)
    thr = float(threshold_otsu(a)) if float(a.max()) > float(a.min()) else 0.5
    try:
        image.nuclear_threshold_ = thr
    except AttributeError:  # pragma: no cover
        pass
    return thr
