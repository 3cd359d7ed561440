"""Screenshot of the shared MERSCOPE region in napari (docs/images/merscope_dapi_transcripts.png).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/merscope_screenshot.py [--data DIR] [--out PNG]

Opens the region through the plugin's reader in a shown viewer: the DAPI mosaic (greyscale, percentile contrast)
and the transcripts as Points coloured by gene (the 10 most abundant genes distinct, the others grey; control
probes are dropped by the reader).  Two canvas screenshots (the whole region, and a 100 µm window at its centre)
are put side by side with the layer's gene legend (``metadata['gene_colours']``) by matplotlib.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" /
                                          "merscope_mouse_brain_mini"))
    ap.add_argument("--out", default="docs/images/merscope_dapi_transcripts.png")
    ap.add_argument("--zoom-um", type=float, default=100.0)
    a = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import napari
    from matplotlib.patches import Patch

    from napari_diffst._reader import read_paths

    v = napari.Viewer(show=True)
    v.window.resize(1100, 1000)
    for data, kw, kind in read_paths(a.data):
        if kw["name"].endswith("spots"):
            continue
        getattr(v, f"add_{kind}")(data, **kw)
    pts = [ly for ly in v.layers if ly.metadata.get("diffst_role") == "molecules"][0]
    img = [ly for ly in v.layers if ly.metadata.get("diffst_role") == "histology"][0]
    colours = dict(pts.metadata["gene_colours"])
    n_col = int(np.isin(np.asarray(pts.features["gene"]).astype(str), list(colours)).sum())
    # the layer's own colours (not the ones we asked for): the screenshot must show what napari drew
    fc = np.asarray(pts.face_color)
    assert len(np.unique(np.round(fc[:, :3], 3), axis=0)) == len(colours) + 1, "points are not coloured by gene"
    v.reset_view()
    full = v.screenshot(canvas_only=True)
    (y0, x0), (y1, x1) = np.asarray(img.extent.world)[:, -2:]
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    pts.size = pts.size * 0.6
    v.camera.center = (cy, cx)
    v.camera.zoom = full.shape[0] / a.zoom_um * 0.95
    zoom = v.screenshot(canvas_only=True)
    layers = [ly.name for ly in v.layers]
    v.close()

    fig, axs = plt.subplots(1, 2, figsize=(14, 7.4), gridspec_kw=dict(wspace=0.03))
    axs[0].imshow(full)
    axs[0].set_title(f"{layers[0]} + {pts.metadata['n_shown']:,} transcripts (whole region, 500 × 450 µm)",
                     fontsize=10)
    axs[1].imshow(zoom)
    axs[1].set_title(f"centre, {a.zoom_um:g} µm across (points drawn smaller)", fontsize=10)
    for ax in axs:
        ax.set_axis_off()
    handles = [Patch(color=c, label=g) for g, c in colours.items()]
    n_other = len(pts.features["gene"].cat.categories) - len(colours)
    handles.append(Patch(color=pts.metadata["other_colour"], label=f"other {n_other} genes"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=9, frameon=False)
    fig.suptitle("napari (shown viewer, Xvfb): MERSCOPE region opened by napari-diffst — DAPI with transcripts "
                 "coloured by gene", fontsize=11)
    fig.savefig(a.out, dpi=100, bbox_inches="tight")
    print(layers, f"{n_col} of {len(pts.features)} points in the {len(colours)} coloured genes", "->", a.out)


if __name__ == "__main__":
    main()
