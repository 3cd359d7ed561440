"""A her2st section with part of its tissue turned into fat (for the tissue-mask tests).

Fat on H&E is mostly empty adipocytes — glass-white inside, with thin (≈ 3 µm) eosin membranes between
them — so a saturation threshold sees little of it. :func:`fatty_copy` replaces the tissue on one side
of a line (through the spots' centroid; ``frac_spots`` of the in-tissue spots lie beyond it) by a Voronoi
pattern of such cells, leaving the outline of the section, the spots and their registration as they are.
The image is kept at ≈ 1024 px on its longest side, area-averaged, as a JPEG's DCT-scaled decode is."""
from __future__ import annotations

from copy import copy

import numpy as np


def fatty_copy(sample, frac_spots: float = 0.45, cell_um: float = 90.0, membrane_um: float = 3.0,
               down: int = 4, seed: int = 0, angle: float = 0.7):
    """Copy of ``sample`` (legacy ST, JPEG H&E) whose image has fat on one side; ``.fat`` is the fat's
    mask on the new image."""
    from PIL import Image
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    from napari_diffst.data.registration import tissue_mask
    from napari_diffst.data.sample import HistologyImage

    img = sample.image
    H, W = img.shape
    with Image.open(img.path) as im:
        im.draft("RGB", (W // down, H // down))
        a = np.asarray(im.convert("RGB")).copy()
    f = a.shape[0] / H  # small px per full-res px
    um = sample.um_per_px / f
    xy = np.asarray(sample.adata.obsm["spatial"], float) * f
    # the tissue under the spots: the dense-tissue mask within ¾ pitch of an in-tissue spot
    seeds_img = np.ones(a.shape[:2], bool)
    seeds_img[np.clip(np.rint(xy[:, 1]).astype(int), 0, a.shape[0] - 1),
              np.clip(np.rint(xy[:, 0]).astype(int), 0, a.shape[1] - 1)] = False
    near = ndi.distance_transform_edt(seeds_img) <= 0.75 * float(sample.lattice_pitch_um or 200.0) / um
    tis = ndi.binary_fill_holes(tissue_mask(a, sigma=2.0, pale=False)) & near
    c = xy.mean(0)
    n = np.array([np.cos(angle), np.sin(angle)])
    cut = np.quantile((xy - c) @ n, 1 - frac_spots)
    rr, cc = np.nonzero(tis)
    sel = ((np.c_[cc, rr] - c) @ n) > cut
    rr, cc = rr[sel], cc[sel]
    rng = np.random.default_rng(seed)
    step = cell_um / um
    gy, gx = np.mgrid[rr.min() - step:rr.max() + step:step, cc.min() - step:cc.max() + step:step]
    cells = np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-0.35, 0.35, (gx.size, 2)) * step
    d, _ = cKDTree(cells).query(np.c_[cc, rr], k=2)
    membrane = (d[:, 1] - d[:, 0]) < membrane_um / um
    glass = np.median(a[~ndi.binary_dilation(tis, iterations=20)], axis=0)
    a[rr, cc] = np.clip(glass + rng.normal(0, 2, (len(rr), 3)), 0, 255)
    a[rr[membrane], cc[membrane]] = (215, 140, 195)  # eosin
    fat = np.zeros(a.shape[:2], bool)
    fat[rr, cc] = True
    k = int(np.ceil(max(a.shape[:2]) / 1024))
    h2, w2 = a.shape[0] // k, a.shape[1] // k
    a = a[:h2 * k, :w2 * k].reshape(h2, k, w2, k, 3).mean((1, 3)).round().astype(np.uint8)
    out = copy(sample)
    out.image = HistologyImage.from_array(a, fullres_per_px=k / f)
    out.transform = np.asarray(sample.transform, float).copy()
    out.fat = fat[:h2 * k, :w2 * k].reshape(h2, k, w2, k).mean((1, 3)) > 0.5
    return out


if __name__ == "__main__":  # the figures of issue 17 item 9: spots on the tissue mask, before/after it grew into fat
    import sys
    import warnings
    from pathlib import Path

    from napari_diffst.data.registration import _thumb_frame, fraction_on_tissue, tissue_mask
    from napari_diffst.io.readers import read_legacy_st

    warnings.simplefilter("ignore")
    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
    for sec in sys.argv[1:] or ["C2", "C3", "C4", "C5", "C6"]:
        s = read_legacy_st(root / sec)
        for tag, x in (("as loaded", s), ("fatty copy", fatty_copy(s))):
            th, _ = _thumb_frame(x, 1024)
            old, new = (fraction_on_tissue(x, mask=tissue_mask(th, pale=p)) for p in (False, True))
            print(f"{sec} {tag}: in-tissue spots on the tissue mask {old:.1%} (saturation only) → {new:.1%}")
