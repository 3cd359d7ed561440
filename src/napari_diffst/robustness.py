"""Image variants for the robustness suite (issue 14): the same section, the same spots, another image.

Users apply a model to slides unlike the training ones: another lab's stain, a coarse export, a background
masked to black or white, a thumbnail inset, an image mirrored against the spots and registered again.  Each
variant here changes **only the image** (and, for the mirror, the registration that places the spots on it), so
the spots — and with them every truth the benchmark scores against — stay the same:

=====================  ======================================================================================
``clean``              the image as read
``black_bg``           everything outside the tissue set to black (a masked export)
``white_bg``           everything outside the tissue set to white
``png_2um``            downsampled to 2 µm/px (box filter) and stored as 8-bit PNG
``png_3.2um``          3.2 µm/px PNG (the 2000-px exports of issue 14)
``png_8um``            8 µm/px PNG
``hed_jitter``         stain intensities shifted: haematoxylin, eosin and DAB optical densities scaled by
                       1 + N(0, 0.15) and offset by N(0, 0.02) (seeded), the way another lab's stain differs
``jpeg30``             re-encoded as JPEG at quality 30
``inset``              a thumbnail of the slide (1/5 of its side) pasted into the top-left corner
``mirrored``           the image flipped left–right, the spots registered onto it again (the known mirror as
                       the landmark start, then :func:`~napari_diffst.data.registration.refine_registration`)
=====================  ======================================================================================

:func:`image_variant` builds one as a new :class:`~napari_diffst.data.sample.Sample` sharing the section's
AnnData; the work is done at the image's own resolution in row strips (a 10k × 10k H&E stays under ~1 GB).
scikit-image does the colour deconvolution and Pillow the PNG/JPEG coding.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np

from .data.sample import HistologyImage, Sample

__all__ = ["VARIANTS", "image_variant"]

VARIANTS = ("clean", "black_bg", "white_bg", "png_2um", "png_3.2um", "png_8um", "hed_jitter", "jpeg30", "inset",
            "mirrored")

_STRIP = 1024  # image rows per strip for the per-pixel colour work


def _full_rgb(sample: Sample) -> np.ndarray:
    """The image's level 0 as uint8 (H, W, 3) in memory."""
    a = np.asarray(sample.image.levels[0])[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(np.asarray(a, np.float32) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _tissue_full(a: np.ndarray) -> np.ndarray:
    """The tissue mask (holes filled) of a thumbnail of the level-0 image ``a`` (H, W, 3), brought back to its
    shape (nearest)."""
    from scipy import ndimage as ndi

    from .data.registration import tissue_mask

    shape = a.shape[:2]
    step = max(1, int(np.ceil(max(shape) / 1024)))
    thumb = a[::step, ::step]
    m = ndi.binary_fill_holes(tissue_mask(thumb))
    rr = np.minimum(np.arange(shape[0]) // step, m.shape[0] - 1)
    cc = np.minimum(np.arange(shape[1]) // step, m.shape[1] - 1)
    return m[rr][:, cc]


def _codec(arr: np.ndarray, fmt: str, **kw) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _with_image(sample: Sample, arr: np.ndarray, kind: str, *, fullres_per_px: float | None = None,
                transform: np.ndarray | None = None) -> Sample:
    img = HistologyImage.from_array(arr, fullres_per_px=float(fullres_per_px or sample.image.fullres_per_px))
    for attr in ("modality", "channel_names"):
        if hasattr(sample.image, attr):
            try:
                setattr(img, attr, getattr(sample.image, attr))
            except AttributeError:  # pragma: no cover - read-only property
                pass
    prov = dict(sample.provenance or {}, image_variant=kind)
    return dataclasses.replace(sample, image=img, name=f"{sample.name}/{kind}", provenance=prov,
                               transform=np.asarray(sample.transform if transform is None else transform, float))


def _hed_jitter(a: np.ndarray, seed: int) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(seed)
    scale = 1.0 + rng.normal(0.0, 0.15, 3)
    shift = rng.normal(0.0, 0.02, 3)
    out = np.empty_like(a)
    for r0 in range(0, a.shape[0], _STRIP):
        hed = rgb2hed(a[r0:r0 + _STRIP].astype(np.float32) / 255.0)
        rgb = hed2rgb(hed * scale + shift)
        out[r0:r0 + _STRIP] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def image_variant(sample: Sample, kind: str, *, seed: int = 0) -> Sample:
    """The section ``sample`` with its image changed as ``kind`` (:data:`VARIANTS`); spots and counts unchanged.
    The new Sample is named ``'<name>/<kind>'`` and records the variant in ``provenance['image_variant']``."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown image variant {kind!r}; choose from {', '.join(VARIANTS)}")
    if sample.image is None:
        raise ValueError(f"{sample.name}: no image to vary")
    if kind == "clean":
        return _with_image(sample, _full_rgb(sample), kind)
    a = _full_rgb(sample)
    H, W = a.shape[:2]
    if kind in ("black_bg", "white_bg"):
        m = _tissue_full(a)
        a = a.copy()
        a[~m] = 0 if kind == "black_bg" else 255
        return _with_image(sample, a, kind)
    if kind.startswith("png_"):
        from PIL import Image

        target_um = float(kind[4:-2])
        um_img = float(sample.um_per_px) * float(sample.image.fullres_per_px)  # µm per level-0 pixel
        f = target_um / um_img
        if f <= 1.0:
            raise ValueError(f"{sample.name}: the image is already {um_img:.3g} µm/px, not finer than {target_um}")
        size = (max(1, int(round(W / f))), max(1, int(round(H / f))))
        small = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BOX))
        small = _codec(small, "PNG")
        return _with_image(sample, small, kind, fullres_per_px=float(sample.image.fullres_per_px) * W / size[0])
    if kind == "hed_jitter":
        return _with_image(sample, _hed_jitter(a, seed), kind)
    if kind == "jpeg30":
        return _with_image(sample, _codec(a, "JPEG", quality=30), kind)
    if kind == "inset":
        from PIL import Image

        tw, th = max(1, W // 5), max(1, H // 5)
        thumb = np.asarray(Image.fromarray(a).resize((tw, th), Image.Resampling.BOX))
        a = a.copy()
        a[:th, :tw] = thumb
        return _with_image(sample, a, kind)
    # mirrored: flip left-right; the spots' image position mirrors with it (x → W − x in level-0 px, in the full-res
    # frame of the transform), then the registration is refined on the new image as a user would
    from .data.registration import refine_registration

    fr = float(sample.image.fullres_per_px)
    M = np.array([[-1.0, 0.0, W * fr], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = _with_image(sample, np.ascontiguousarray(a[:, ::-1]), kind, transform=M @ np.asarray(sample.transform))
    try:
        res = refine_registration(out)
        out.transform = np.asarray(res.transform, float)
        out.provenance["registration"] = {"kept": bool(getattr(res, "kept", False))}
    except Exception as exc:  # the landmark start stands; say so
        out.provenance["registration"] = {"error": str(exc)}
    return out
