"""Imaging-based bundles through a *shown* napari viewer (run under xvfb-run): a small Xenium bundle written by
the readers' test helper opens with its DAPI morphology image in µm and the transcripts as Points coloured by
gene; the canvas screenshot is docs/images/xenium_bundle.png."""
from __future__ import annotations

import numpy as np
import pytest
from test_imaging_readers import GENES, _write_xenium

from conftest import save_screenshot

pytestmark = pytest.mark.gui


def test_xenium_bundle_in_a_shown_viewer(shown_viewer, tmp_path, qtbot):
    viewer = shown_viewer
    root = tmp_path / "xenium_out"
    tx, X, feats = _write_xenium(root, np.random.default_rng(3))
    layers = viewer.open(str(root), plugin="napari-diffst")
    by_role = {ly.metadata.get("diffst_role"): ly for ly in layers}
    assert {"histology", "molecules"} <= set(by_role), [ly.name for ly in layers]
    img, pts = by_role["histology"], by_role["molecules"]
    # the morphology image: the DAPI channel, greyscale, in µm (0.2125 µm/px from the OME metadata)
    assert type(img).__name__ == "Image" and not img.rgb and img.colormap.name == "gray"
    assert img.metadata["channel"] == "DAPI" and img.scale[-1] == pytest.approx(0.2125)
    assert tuple(img.units) == ("um", "um") or str(img.units[0]) in ("um", "micrometer")
    (y0, x0), (y1, x1) = np.asarray(img.extent.world)[:, -2:]
    assert x1 - x0 == pytest.approx(120 * 0.2125, abs=0.3) and y1 - y0 == pytest.approx(64 * 0.2125, abs=0.3)
    # the transcripts: qv ≥ 20, control probes dropped, gene in features, at their µm positions, coloured by gene
    good = (tx["qv"] >= 20) & tx["feature_name"].isin(GENES)
    assert type(pts).__name__ == "Points" and len(pts.data) == int(good.sum())
    assert set(pts.features["gene"].astype(str)) == set(GENES)
    world = np.asarray([pts.data_to_world(p) for p in pts.data])
    np.testing.assert_allclose(np.sort(world[:, -1]), np.sort(tx.loc[good, "x_location"]), atol=1e-3)
    cols = pts.metadata["gene_colours"]
    assert set(cols) == set(GENES)  # 3 genes: every one gets its own colour
    assert len(np.unique(np.round(np.asarray(pts.face_color)[:, :3], 3), axis=0)) == len(GENES)

    cells = [ly for ly in layers if ly.metadata.get("diffst_role") == "spots"]
    assert len(cells) == 1 and len(cells[0].data) == 6          # the 6 cells of cells.csv.gz at their centroids
    cells[0].opacity = 0.3  # the cells' 10 µm discs would hide a 25 µm field
    pts.size = 0.5
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=True)
    assert shot.shape[0] > 100 and shot[..., :3].std() > 5       # not a black canvas
    save_screenshot(shot, "xenium_bundle")
    # the DAPI-bright top half of the image is brighter in the screenshot than the bottom half
    for ly in (pts, *cells):
        ly.visible = False
    qtbot.wait(100)
    bare = viewer.screenshot(canvas_only=True)[..., :3].astype(float)
    rows = np.where(bare.mean(axis=(1, 2)) > 1)[0]
    top, bot = rows[: len(rows) // 2], rows[len(rows) // 2:]
    assert bare[top].mean() > bare[bot].mean() + 20
