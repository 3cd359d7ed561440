"""Cell-level histology features on the HR grid, from the H&E at near-native resolution.

Diff-ST's histology encoder is hierarchical: a *cell level* sees the H&E at the resolution of nuclei
(the paper's patches are 256 × 320 px ≈ 160 µm, ≈ 0.5 µm/px) and a *tissue level* sees the wider
context.  The training fields (:class:`~napari_diffst.data.pairs.SRField`) carry the H&E at ≈ 4–6 µm/px
(``he``), where a nucleus is one pixel.  This module reads the image again at ``um_per_px``
(default 1.25 µm/px, where nuclei are 4–8 px wide) and reduces it to nucleus-level morphometrics per
HR pixel, so no full-resolution raster is ever kept: the image is read in strips of HR rows (with a
margin for the filters) through :func:`~napari_diffst.data.grids.sample_image`.

Pretrained pathology encoders cannot be downloaded here and a few hundred training spots cannot train
a high-resolution CNN from scratch, so the cell level is *handcrafted*: stain densities (H, E, DAB by
colour deconvolution), a nucleus mask (smoothed haematoxylin above a threshold) and nucleus blobs
(local maxima of the Laplacian of Gaussian at the nucleus scale), nucleus size (capped at 400 µm²) and stain, stroma
eosin, white space (fat, lumen), edge and band-pass texture energies at 1–8 px scales, and RGB.
Each map is averaged twice per HR pixel: over the *spot* disk centred on it (diameter ``min(spot
diameter, HR pixel)``, where the expression was measured) and over the whole HR *cell*.

The thresholds are fixed physical/optical-density values (not fitted to any section); the features are
standardised later by whoever uses them, on the training sections only.

**Fluorescence** (DAPI, optionally PolyT: imaging-based ST, :mod:`napari_diffst.data.fluorescence`): colour
deconvolution means nothing on a stain-intensity image, so a fluorescence image gets its own maps
(:data:`FLUOR_FEATURE_MAPS`), chosen automatically from ``image.modality`` (set by the readers, else detected
from a thumbnail; ``modality=`` overrides): nuclear intensity and its square, the nuclear mask (smoothed DAPI
above the image's Otsu threshold, :func:`~napari_diffst.data.fluorescence.nuclear_threshold`), nucleus blobs
(local maxima of the LoG at σ = 3 µm, nucleus scale), the area of each nucleus component (µm², capped at
400 µm²), the second stain (PolyT) and its square and its level outside nuclei (zeros without one), gradient
energies at 1 and 3 µm and DoG band energies at 1–8 µm of the nuclear channel; derived per window: intensity
std, second-stain std, mean nucleus area, DAPI inside nuclei.  Filter scales are in µm.  Every map is bounded
(intensities in [0, 1], areas capped), so no feature is unbounded on any image.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage as ndi

__all__ = ["CELL_FEATURE_MAPS", "FLUOR_FEATURE_MAPS", "cell_feature_names", "cell_feature_maps",
           "add_cell_features"]

#: per-pixel maps averaged per window (order of the output features, then the derived ones)
CELL_FEATURE_MAPS = ("H", "E", "D", "white", "nuc", "blob", "grad1", "grad3", "dog1", "dog2", "dog4",
                     "dog8", "H_nuc", "E_stroma", "nuc_area", "R", "G", "B", "H2", "E2")
_DERIVED = ("H_std", "E_std", "nuc_mean_area", "H_in_nuc")
_WINDOWS = ("spot", "cell")
#: optical-density thresholds (rgb2hed units) and the white level; fixed, not fitted
NUC_OD, BLOB_OD, BLOB_LOG, WHITE = 0.06, 0.04, 0.01, 0.78


#: per-pixel maps of a fluorescence image (nuclear stain channel 0, second stain channel 1)
FLUOR_FEATURE_MAPS = ("dapi", "dapi2", "nuc", "blob", "nuc_area", "poly", "poly2", "poly_cyto", "grad1", "grad3",
                      "dog1", "dog2", "dog4", "dog8", "dapi_nuc")
_FLUOR_DERIVED = ("dapi_std", "poly_std", "nuc_mean_area", "dapi_in_nuc")
#: nucleus scale (µm): LoG σ, blob spacing; nucleus-component area cap (µm²)
NUC_SIGMA_UM, BLOB_SPACING_UM, MAX_NUC_AREA_UM2 = 3.0, 6.0, 400.0


def _modality_maps(modality: str) -> tuple[tuple, tuple]:
    if modality == "fluorescence":
        return FLUOR_FEATURE_MAPS, _FLUOR_DERIVED
    if modality != "brightfield":
        raise ValueError(f"modality must be 'brightfield' or 'fluorescence', not {modality!r}")
    return CELL_FEATURE_MAPS, _DERIVED


def cell_feature_names(modality: str = "brightfield") -> list[str]:
    """Names of the features :func:`cell_feature_maps` returns for an image of ``modality``, in order."""
    maps, derived = _modality_maps(modality)
    return [f"{w}_{k}" for w in _WINDOWS for k in maps + derived]


def _fluor_pixel_maps(img: np.ndarray, px_um: float, threshold: float, second: bool) -> dict:
    """Per-pixel fluorescence maps of one strip; ``img`` (h, w, 3) float32 in [0, 1] (channel 0 nuclear, channel 1
    the second stain when ``second``) at ``px_um`` µm/px; ``threshold``: nuclear threshold (stretched units)."""
    u = 1.0 / px_um  # px per µm
    dapi = img[..., 0]
    poly = img[..., 1] if second else np.zeros_like(dapi)
    ds = ndi.gaussian_filter(dapi, 0.5 * u)
    nuc = ds > threshold
    log = -ndi.gaussian_laplace(dapi, NUC_SIGMA_UM * u) * (NUC_SIGMA_UM * u) ** 2  # scale-normalised
    blob = (log == ndi.maximum_filter(log, max(3, int(round(BLOB_SPACING_UM * u)) | 1))) & (log > 0.02) & nuc
    lab, _ = ndi.label(nuc)
    areas = np.minimum(np.bincount(lab.ravel()).astype(np.float32) * px_um ** 2, MAX_NUC_AREA_UM2)
    areas[0] = 0.0
    blur = {s: ndi.gaussian_filter(dapi, s * u) for s in (1, 2, 4, 8, 16)}
    dog = {s: np.abs(blur[s] - blur[2 * s]) for s in (1, 2, 4, 8)}
    nf = nuc.astype(np.float32)
    return {"dapi": dapi, "dapi2": dapi * dapi, "nuc": nf, "blob": blob.astype(np.float32),
            "nuc_area": areas[lab], "poly": poly, "poly2": poly * poly, "poly_cyto": poly * (1.0 - nf),
            "grad1": ndi.gaussian_gradient_magnitude(dapi, 1.0 * u),
            "grad3": ndi.gaussian_gradient_magnitude(dapi, 3.0 * u), "dog1": dog[1], "dog2": dog[2],
            "dog4": dog[4], "dog8": dog[8], "dapi_nuc": dapi * nf}


def _pixel_maps(rgb: np.ndarray, px_um: float) -> dict:
    """Per-pixel maps of one strip; ``rgb`` (h, w, 3) float32 in [0, 1] at ``px_um`` µm/px."""
    from skimage.color import rgb2hed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hed = rgb2hed(rgb).astype(np.float32)
    Hc, Ec = hed[..., 0], hed[..., 1]
    grey = rgb.mean(axis=2)
    u = 1.25 / px_um  # filter scales are set in pixels of 1.25 µm
    white = rgb.min(axis=2) > WHITE
    Hs = ndi.gaussian_filter(Hc, 1.0 * u)
    log = -ndi.gaussian_laplace(Hc, 2.5 * u)
    blob = (log == ndi.maximum_filter(log, max(3, int(round(7 * u)) | 1))) & (log > BLOB_LOG) & (Hs > BLOB_OD)
    nuc = Hs > NUC_OD
    lab, _ = ndi.label(nuc)
    # nucleus-component area in 1.25 µm px, capped like the fluorescence maps' (a merged mass of nuclei is "large"
    # whatever its size, so a component cut by a strip's edge reads the same as whole)
    areas = np.minimum(np.bincount(lab.ravel()).astype(np.float32) * (px_um / 1.25) ** 2,
                       MAX_NUC_AREA_UM2 / 1.25 ** 2)
    areas[0] = 0.0
    blur = {s: ndi.gaussian_filter(grey, s * u) for s in (1, 2, 4, 8, 16)}  # each scale once
    dog = {s: np.abs(blur[s] - blur[2 * s]) for s in (1, 2, 4, 8)}
    return {"H": Hc, "E": Ec, "D": hed[..., 2], "white": white.astype(np.float32), "nuc": nuc.astype(np.float32),
            "blob": blob.astype(np.float32), "grad1": ndi.gaussian_gradient_magnitude(grey, 1.0 * u),
            "grad3": ndi.gaussian_gradient_magnitude(grey, 3.0 * u), "dog1": dog[1], "dog2": dog[2],
            "dog4": dog[4], "dog8": dog[8], "H_nuc": Hc * nuc, "E_stroma": Ec * (~nuc & ~white),
            "nuc_area": areas[lab], "R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2],
            "H2": Hc * Hc, "E2": Ec * Ec}


def cell_feature_maps(sample, A_hr: np.ndarray, hr_shape: tuple[int, int], hr_um: float, *,
                      um_per_px: float = 1.25, spot_um: float | None = None, max_px_per_hr: int = 256,
                      strip_px: int = 2_000_000, progress=None, modality: str | None = None,
                      windows_um: tuple[float, float] | None = None) -> np.ndarray:
    """Cell-level features (F, H, W) float32 (:func:`cell_feature_names` of the modality) on an HR grid.

    ``A_hr`` maps (col, row, 1) of the HR grid to the sample's *spot frame* (as in
    :func:`~napari_diffst.data.grids.make_field`; the registration is applied on top); ``hr_um`` is the HR
    pixel size.  The H&E is sampled at ``m = round(hr_um / um_per_px)`` px per HR pixel (clamped to
    [4, ``max_px_per_hr``]), strip by strip.  ``spot_um``: the spot diameter (the 'spot' window is a disk of
    diameter ``min(spot_um, hr_um)``; the inscribed disk when None).  ``strip_px``: H&E pixels read per strip
    (whole HR rows; bounds the memory).  ``progress(rows_done, rows)`` after each strip.  ``modality``:
    'brightfield' (H&E maps) or 'fluorescence' (DAPI/PolyT maps); None: the image's own
    (:func:`~napari_diffst.data.fluorescence.image_modality`).  A sample without an image gives zeros.

    ``windows_um`` = (spot disk diameter, cell square side) in µm: windows of a **fixed physical size** centred on
    each HR pixel, whatever the HR pixel size (:func:`_windowed_feature_maps`), so a grid finer than the one the
    features were fitted on (native prediction after training on the section's own spots) sees features with the
    same statistics (issue 13, scale consistency).  None: the windows are the HR pixel itself (and its disk).
    """
    from .fluorescence import image_modality, nuclear_threshold
    from .grids import sample_image

    H, W = int(hr_shape[0]), int(hr_shape[1])
    img = getattr(sample, "image", None)
    modality = modality or image_modality(img)
    maps_names, derived = _modality_maps(modality)
    names = cell_feature_names(modality)
    out = np.zeros((len(names), H, W), np.float32)
    if img is None or H == 0 or W == 0:
        return out
    fluor = modality == "fluorescence"
    if fluor:
        thr = nuclear_threshold(img)
        second = len(getattr(img, "channel_names", None) or []) > 1
    else:
        thr, second = None, False
    m = int(np.clip(round(float(hr_um) / float(um_per_px)), 4, int(max_px_per_hr)))
    px_um = float(hr_um) / m
    A = np.asarray(A_hr, float) @ np.array([[1 / m, 0, 0.5 / m - 0.5], [0, 1 / m, 0.5 / m - 0.5], [0, 0, 1]])
    if windows_um is not None:
        return _windowed_feature_maps(sample, A, out, m, px_um, windows_um, maps_names, derived, fluor, thr, second,
                                      strip_px, progress)
    margin = int(math.ceil(64 * 1.25 / px_um))  # 4σ of the widest filter (dog8: σ = 16 px of 1.25 µm)
    rows_per_strip = max(1, int(strip_px) // max(W * m * m, 1))
    dia = min(float(spot_um), float(hr_um)) if spot_um else float(hr_um)
    yy, xx = np.mgrid[0:m, 0:m]
    disk = (np.hypot(yy - (m - 1) / 2, xx - (m - 1) / 2) <= dia / px_um / 2 + 0.5).astype(np.float32)
    windows = {"spot": disk / disk.sum(), "cell": np.full((m, m), 1.0 / (m * m), np.float32)}
    n_map = len(maps_names)
    n_per = n_map + len(derived)
    for r0 in range(0, H, rows_per_strip):
        r1 = min(H, r0 + rows_per_strip)
        top = r0 * m - margin
        Ar = A @ np.array([[1, 0, 0], [0, 1, top], [0, 0, 1]], float)
        strip = np.clip(sample_image(sample, Ar, ((r1 - r0) * m + 2 * margin, W * m)), 0, 1)
        if fluor:
            maps = _fluor_pixel_maps(strip.transpose(1, 2, 0), px_um, thr, second)
        else:
            maps = _pixel_maps(strip.transpose(1, 2, 0), px_um)
        h = r1 - r0
        for wi, wn in enumerate(_WINDOWS):
            w = windows[wn]
            base = wi * n_per
            for j, k in enumerate(maps_names):
                a = maps[k][margin:margin + h * m]
                out[base + j, r0:r1] = np.einsum("imjn,mn->ij", a.reshape(h, m, W, m), w, optimize=True)
            f = {k: out[base + j, r0:r1] for j, k in enumerate(maps_names)}
            _derive(out, base, n_map, f, fluor, (slice(r0, r1),))
        if progress is not None:
            progress(r1, H)
    return out


def _derive(out: np.ndarray, base: int, n_map: int, f: dict, fluor: bool, sl) -> None:
    """The derived features of one window (std from the mean of squares, per-nucleus ratios) into
    ``out[base + n_map + i][sl]`` from the window means ``f``."""
    nuc = np.maximum(f["nuc"], 1e-3)
    if fluor:
        out[(base + n_map + 0,) + sl] = np.sqrt(np.maximum(f["dapi2"] - f["dapi"] ** 2, 0))
        out[(base + n_map + 1,) + sl] = np.sqrt(np.maximum(f["poly2"] - f["poly"] ** 2, 0))
        has = f["nuc"] > 1e-2  # mean nucleus area / DAPI inside nuclei: 0 where the window holds no nucleus
        out[(base + n_map + 2,) + sl] = np.where(has, f["nuc_area"] / nuc, 0.0)
        out[(base + n_map + 3,) + sl] = np.where(has, f["dapi_nuc"] / nuc, 0.0)
        return
    out[(base + n_map + 0,) + sl] = np.sqrt(np.maximum(f["H2"] - f["H"] ** 2, 0))
    out[(base + n_map + 1,) + sl] = np.sqrt(np.maximum(f["E2"] - f["E"] ** 2, 0))
    has = f["nuc"] > 1e-2  # as above: 0 where the window holds (almost) no nucleus
    out[(base + n_map + 2,) + sl] = np.where(has, f["nuc_area"] / nuc, 0.0)
    out[(base + n_map + 3,) + sl] = np.where(has, f["H_nuc"] / nuc, 0.0)


#: µm per pixel of the working grid the fixed-size windows are averaged on (the per-pixel maps are block-averaged
#: to it first: a 100 µm disk is then ~300 taps, and the windows' edges are placed to ±2.5 µm)
WINDOW_GRID_UM = 5.0


def _windowed_feature_maps(sample, A, out, m, px_um, windows_um, maps_names, derived, fluor, thr, second, strip_px,
                           progress) -> np.ndarray:
    """:func:`cell_feature_maps` with windows of a fixed physical size: the per-pixel maps of strips of the image
    (at ``m = round(hr_um / um_per_px)`` px per HR pixel, as the HR-pixel windows), block-averaged to a working
    grid of ≈ :data:`WINDOW_GRID_UM` µm/px, averaged over a disk of ``windows_um[0]`` µm and a square of
    ``windows_um[1]`` µm (FFT convolution), and read at each HR pixel's centre (bilinear).  The strips carry a
    margin of half the widest window plus the filters' reach on every side, so a pixel's features do not depend on
    the strip or tile it was computed in.
    ``A`` maps (col, row, 1) of the image raster (``m`` px per HR pixel, ``px_um`` µm/px) to the spot frame; ``out``
    (F, H, W) zeros is filled and returned (the prologue of :func:`cell_feature_maps`)."""
    from scipy.signal import fftconvolve

    from .grids import sample_image

    H, W = out.shape[1:]
    b = max(d for d in range(1, m + 1) if m % d == 0 and (d == 1 or d * px_um <= WINDOW_GRID_UM + 1e-9))
    q = b * px_um  # working-grid µm/px
    d_spot, c_cell = (float(w) for w in windows_um)
    ry, rx = np.mgrid[-int(d_spot / q / 2) - 1:int(d_spot / q / 2) + 2, -int(d_spot / q / 2) - 1:int(d_spot / q / 2) + 2]
    disk = (np.hypot(ry, rx) * q <= d_spot / 2 + 1e-9).astype(np.float64)
    if disk.sum() == 0:
        disk[disk.shape[0] // 2, disk.shape[1] // 2] = 1.0
    ns = max(1, int(round(c_cell / q)))
    kernels = {"spot": disk / disk.sum(), "cell": np.full((ns, ns), 1.0 / (ns * ns))}
    reach = max(d_spot, c_cell) / 2 + q
    mb = int(math.ceil((64 * 1.25 + reach) / px_um / b))  # margin in working-grid px (filters + half a window)
    M = mb * b  # ... in image px
    wf = W * m + 2 * M
    rows_per_strip = max(int(math.ceil(2 * M / m)), int(strip_px) // max(wf * m, 1), 1)
    n_map = len(maps_names)
    n_per = n_map + len(derived)
    for r0 in range(0, H, rows_per_strip):
        r1 = min(H, r0 + rows_per_strip)
        h = r1 - r0
        Ar = A @ np.array([[1, 0, -M], [0, 1, r0 * m - M], [0, 0, 1]], float)
        strip = np.clip(sample_image(sample, Ar, (h * m + 2 * M, wf)), 0, 1)
        if fluor:
            maps = _fluor_pixel_maps(strip.transpose(1, 2, 0), px_um, thr, second)
        else:
            maps = _pixel_maps(strip.transpose(1, 2, 0), px_um)
        del strip
        hs, ws = (h * m + 2 * M) // b, wf // b
        stack = np.stack([np.asarray(maps[k], np.float32).reshape(hs, b, ws, b).mean(axis=(1, 3))
                          for k in maps_names])
        del maps
        # HR pixel centres on the working grid
        yc = ((np.arange(h) * m + (m - 1) / 2 + M) + 0.5) / b - 0.5
        xc = ((np.arange(W) * m + (m - 1) / 2 + M) + 0.5) / b - 0.5
        y0, x0 = np.floor(yc).astype(int), np.floor(xc).astype(int)
        fy, fx = (yc - y0)[:, None], (xc - x0)[None, :]
        y1, x1 = np.minimum(y0 + 1, hs - 1), np.minimum(x0 + 1, ws - 1)
        for wi, wn in enumerate(_WINDOWS):
            sm = fftconvolve(stack, kernels[wn][None], mode="same", axes=(1, 2))
            v = (sm[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + sm[:, y0][:, :, x1] * (1 - fy) * fx
                 + sm[:, y1][:, :, x0] * fy * (1 - fx) + sm[:, y1][:, :, x1] * fy * fx)
            base = wi * n_per
            out[base:base + n_map, r0:r1] = v
            f = {k: out[base + j, r0:r1] for j, k in enumerate(maps_names)}
            _derive(out, base, n_map, f, fluor, (slice(r0, r1),))
        if progress is not None:
            progress(r1, H)
    return out


def add_cell_features(field, sample, *, um_per_px: float = 1.25, force: bool = False,
                      modality: str | None = None, windows_um: tuple[float, float] | None = None):
    """Compute :func:`cell_feature_maps` for ``field`` (made from ``sample`` by ``make_field``) and store them
    in ``field.extra['cell_features']`` (F, H, W) with ``field.extra['cell_feature_names']`` and
    ``field.extra['cell_um_per_px']`` (``um_per_px``, or the image's own pixel size when that is coarser:
    a downscaled PNG is not upsampled) and ``field.extra['cell_modality']``.  ``modality`` overrides the
    image's (brightfield H&E maps vs fluorescence DAPI/PolyT maps).  ``windows_um``: fixed physical windows
    (:func:`cell_feature_maps`), recorded in ``field.extra['cell_windows_um']``.  Returns the field (modified in
    place); a no-op when features with the same windows are present."""
    from .fluorescence import image_modality

    want = None if windows_um is None else [float(w) for w in windows_um]
    if (not force and field.extra.get("cell_features") is not None and field.extra.get("cell_windows_um") == want
            and (modality is None or field.extra.get("cell_modality") == modality)):
        return field
    T = np.asarray(sample.transform, float)
    A_hr = np.linalg.solve(T, np.asarray(field.extra["hr_affine"], float))  # HR index → spot frame
    img = getattr(sample, "image", None)
    if img is not None:  # never sample finer than the image itself (e.g. a Space Ranger hires/lowres PNG)
        native = float(sample.um_per_px) * float(getattr(img, "fullres_per_px", 1.0) or 1.0)
        um_per_px = max(float(um_per_px), native)
    spot_um = float(getattr(sample, "spot_diameter_um", 0) or 0) or None
    modality = modality or image_modality(img)
    field.extra["cell_features"] = cell_feature_maps(sample, A_hr, field.hr_shape, field.hr_um,
                                                     um_per_px=um_per_px, spot_um=spot_um, modality=modality,
                                                     windows_um=windows_um)
    field.extra["cell_windows_um"] = None if windows_um is None else [float(w) for w in windows_um]
    field.extra["cell_feature_names"] = cell_feature_names(modality)
    field.extra["cell_modality"] = modality
    field.extra["cell_um_per_px"] = float(um_per_px)
    return field
