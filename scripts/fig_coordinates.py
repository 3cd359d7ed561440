"""Figure for docs/coordinates.md: frames, lattices and the LR / HR / H&E grids.

    python scripts/fig_coordinates.py            # writes docs/images/coordinates.png

Uses only the seeded synthetic sample (no data download), so it is reproducible anywhere.
(a) image frame with a registration (3° rotation + shift): spot-frame positions, registered
    positions, lattice vectors a1/a2, the LR (s=2 blocks) and HR grids, origin_px;
(b) pixel conventions of one LR pixel: s×s HR pixels, k×k H&E pixels, centres and corners;
(c) a hexagonal (Visium) lattice rasterised on the square grid at the pitch.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402

from napari_diffst.data.grids import make_field, rasterise_spots  # noqa: E402
from napari_diffst.data.registration import similarity_matrix  # noqa: E402
from napari_diffst.data.sample import apply_affine  # noqa: E402
from napari_diffst.data.synthetic import make_synthetic  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "coordinates.png"


def grid_lines(ax, A, shape, **kw):
    """Draw the pixel edges of a (rows, cols) grid whose index → image-px affine is A."""
    H, W = shape
    for r in range(H + 1):
        p = apply_affine(A, np.array([[-0.5, r - 0.5], [W - 0.5, r - 0.5]]))
        ax.plot(p[:, 0], p[:, 1], **kw)
    for c in range(W + 1):
        p = apply_affine(A, np.array([[c - 0.5, -0.5], [c - 0.5, H - 0.5]]))
        ax.plot(p[:, 0], p[:, 1], **kw)


def panel_frames(ax):
    s = make_synthetic(0, size_um=(1400.0, 1400.0), um_per_px=2.0, n_genes=2)
    xy = np.asarray(s.adata.obsm["spatial"], float)
    T = similarity_matrix(25.0, -15.0, 3.0, 1.0, center=tuple(xy.mean(0)))
    s.transform = T
    f = make_field(s, s.genes[:1], scale=2, mode="degrade", he_per_hr=1)
    img = np.asarray(s.image.levels[0])
    ax.imshow(img, extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    grid_lines(ax, f.extra["hr_affine"], f.hr_mask.shape, color="cyan", lw=0.9, ls="--")
    grid_lines(ax, f.extra["lr_affine"], f.lr_mask.shape, color="yellow", lw=1.6)
    reg = apply_affine(T, xy)
    ax.scatter(xy[:, 0], xy[:, 1], s=14, facecolors="none", edgecolors="0.35", lw=0.8,
               label="obsm['spatial'] (spot frame)")
    ax.scatter(reg[:, 0], reg[:, 1], s=14, c="tab:blue", label="transform · spot (image frame)")
    for a, b in zip(xy[::3], reg[::3]):
        ax.annotate("", b, a, arrowprops=dict(arrowstyle="->", color="tab:blue", lw=0.6))
    k = int(np.argmin(np.hypot(*(xy - xy.mean(0)).T)))
    lat = rasterise_spots(xy).lattice
    o = apply_affine(T, xy[k:k + 1])[0]
    for v, name in ((lat.a1, "a1"), (lat.a2, "a2")):
        w = T[:2, :2] @ v
        ax.annotate("", o + w, o, arrowprops=dict(arrowstyle="-|>", color="red", lw=2))
        ax.text(*(o + 1.08 * w), name, color="red", fontsize=10, weight="bold")
    ox, oy = f.origin_px
    ax.plot(ox, oy, "s", color="yellow", ms=7, mec="k")
    ax.text(ox + 14, oy + 4, "origin_px", color="k", fontsize=9, weight="bold",
            bbox=dict(fc="yellow", ec="none", alpha=0.8, pad=1))
    ax.annotate("", (150, 40), (40, 40), arrowprops=dict(arrowstyle="-|>", color="k", lw=1.5))
    ax.annotate("", (40, 150), (40, 40), arrowprops=dict(arrowstyle="-|>", color="k", lw=1.5))
    ax.text(160, 45, "x (col)", fontsize=9)
    ax.text(45, 175, "y (row)", fontsize=9)
    ax.set_title(f"(a) image frame: full-res px ({s.um_per_px:g} µm/px)\n"
                 f"registration 3° + shift; LR {f.extra['lr_um']:.0f} µm (yellow), HR {f.hr_um:.0f} µm (cyan)",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.85)
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xlabel("x [full-res px]")
    ax.set_ylabel("y [full-res px]")


def panel_pixels(ax):
    s, k = 2, 3
    ax.add_patch(Rectangle((-0.5, -0.5), s, s, fill=False, lw=3, ec="goldenrod"))
    for r in range(s):
        for c in range(s):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.5, ec="tab:blue"))
            ax.plot(c, r, "o", color="tab:blue")
            ax.text(c + 0.05, r - 0.12, f"HR [{r},{c}]\ncentre ({c},{r})", fontsize=7, color="tab:blue")
    for i in range(s * k):
        for j in range(s * k):
            x, y = (j + 0.5) / k - 0.5, (i + 0.5) / k - 0.5
            ax.plot(x, y, ".", color="0.55", ms=3)
    for t in range(s * k + 1):
        v = t / k - 0.5
        ax.plot([-0.5, s - 0.5], [v, v], color="0.8", lw=0.5, zorder=0)
        ax.plot([v, v], [-0.5, s - 0.5], color="0.8", lw=0.5, zorder=0)
    ax.plot(-0.5, -0.5, "s", color="goldenrod", ms=9, mec="k")
    ax.text(-0.45, -0.62, "corner (−0.5, −0.5) = origin_px", fontsize=8)
    ax.text(0.1, s - 0.35, f"one LR pixel = {s}×{s} HR pixels = {s * k}×{s * k} H&E pixels\n"
                           f"(scale s = {s}, he_per_hr k = {k})", fontsize=8, color="goldenrod")
    ax.set_xlim(-0.75, s - 0.25)
    ax.set_ylim(s - 0.2, -0.8)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("(b) pixel conventions: pixel [r, c] is centred at (x, y) = (c, r)\n"
                 "hr_affine / lr_affine / he_affine: (col, row, 1) → image px", fontsize=9)


def panel_hex(ax):
    p = 100.0
    pts, rc = [], []
    for r in range(7):
        for c in range(8):
            pts.append(((c + 0.5 * (r % 2)) * p, r * p * math.sqrt(3) / 2))
            rc.append((r, 2 * c + r % 2))
    xy = np.array(pts)
    R = rasterise_spots(xy)
    A = R.affine(1.0)
    cmap = plt.get_cmap("tab20")
    H, W = R.index.shape
    for r in range(H):
        for c in range(W):
            k = R.index[r, c]
            corners = apply_affine(A, np.array([[c - 0.5, r - 0.5], [c + 0.5, r - 0.5], [c + 0.5, r + 0.5],
                                                [c - 0.5, r + 0.5]]))
            ax.add_patch(Polygon(corners, closed=True, fc=cmap(k % 20) if k >= 0 else "white",
                                 ec="k", lw=0.6, alpha=0.55 if k >= 0 else 1.0))
            if k >= 0:
                cen = apply_affine(A, np.array([[c, r]]))[0]
                ax.plot([cen[0], xy[k, 0]], [cen[1], xy[k, 1]], color="k", lw=0.6)
    shown = np.zeros(len(xy), bool)
    shown[R.index[R.index >= 0]] = True
    ax.scatter(xy[shown, 0], xy[shown, 1], s=30, c=[cmap(i % 20) for i in np.flatnonzero(shown)], ec="k", zorder=3)
    ax.scatter(xy[~shown, 0], xy[~shown, 1], s=40, marker="x", c="red", zorder=3,
               label=f"not the nearest spot of any pixel ({(~shown).sum()}/{len(xy)})")
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    ax.set_title("(c) hexagonal (Visium) lattice → square raster at the pitch:\n"
                 "each pixel takes the nearest spot within its cell (≤ pitch/√3)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def main(out: Path = OUT) -> Path:
    fig, axs = plt.subplots(1, 3, figsize=(17, 6.2), gridspec_kw={"width_ratios": [1.15, 0.9, 1.0]})
    panel_frames(axs[0])
    panel_pixels(axs[1])
    panel_hex(axs[2])
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
