"""Readers through a *shown* napari viewer (needs an X server: run under xvfb-run).

The overlay check is quantitative: in the canvas screenshot, pixels under the spot markers must be
tissue-coloured in the H&E-only screenshot, i.e. the spots sit on tissue, not on background.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import save_screenshot

pytestmark = pytest.mark.gui


def _open(viewer, path):
    layers = viewer.open(str(path), plugin="napari-diffst")
    assert layers, f"napari-diffst opened nothing from {path}"
    return layers


def test_her2st_c2_overlay_lines_up(shown_viewer, her2st_dir, qtbot):
    viewer = shown_viewer
    layers = _open(viewer, her2st_dir / "C2")
    kinds = sorted(type(ly).__name__ for ly in layers)
    assert kinds == ["Image", "Points"]
    he = next(ly for ly in layers if type(ly).__name__ == "Image")
    spots = next(ly for ly in layers if type(ly).__name__ == "Points")
    sample = spots.metadata["diffst_sample"]
    assert sample.n_spots == 187
    # both layers in µm: H&E scale equals the sample's µm/px; points extent inside the image extent
    assert he.scale[0] == pytest.approx(sample.image_scale_um)
    ext_img = he.extent.world
    ext_pts = spots.extent.world
    assert np.all(ext_pts[0] >= ext_img[0] - 1) and np.all(ext_pts[1] <= ext_img[1] + 1)

    viewer.reset_view()
    qtbot.wait(200)
    # screenshot with spots hidden (tissue reference) and shown
    spots.visible = False
    qtbot.wait(100)
    bg_shot = viewer.screenshot(canvas_only=True, flash=False)
    spots.visible = True
    spots.face_color = "#00ff00"
    spots.border_color = "#00ff00"
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    save_screenshot(shot, "her2st_c2_overlay_check")
    green = (shot[..., 1] > 200) & (shot[..., 0] < 80) & (shot[..., 2] < 80)
    assert green.sum() > 500, "spot markers not visible in the screenshot"
    gray = bg_shot[..., :3].astype(float).mean(-1)
    # under spots: tissue (darker than the near-white glass background)
    under = gray[green].mean()
    canvas_bg = np.median(gray[~green & (gray > 0)])
    lum_tissue_ref = np.percentile(gray[gray > 0], 20)
    assert under < 225, f"spots sit on background (mean grey {under:.0f})"
    assert under < canvas_bg + 5 or under <= lum_tissue_ref + 40

    # the documented overlay: spots coloured by a gene over the H&E, with the dock
    gene = spots.metadata["gene"]
    spots.face_color = gene
    qtbot.wait(100)
    save_screenshot(viewer.screenshot(canvas_only=True, flash=False), "her2st_c2_overlay")


@pytest.mark.parametrize("rel", [
    "fixtures/visium_v1_squidpy/outs",
    "fixtures/visium_cytassist_placenta/outs",
    "fixtures/visium_hd_square_002um",
    "fixtures/anndata_mouse_brain/test_data.h5ad",
])
def test_fixtures_open_in_viewer(shown_viewer, shared_dir, rel, qtbot):
    viewer = shown_viewer
    layers = _open(viewer, shared_dir / rel)
    pts = [ly for ly in layers if type(ly).__name__ == "Points"]
    assert len(pts) == 1 and len(pts[0].data) > 0
    sample = pts[0].metadata["diffst_sample"]
    assert pts[0].scale[0] == pytest.approx(sample.um_per_px)
    imgs = [ly for ly in layers if type(ly).__name__ == "Image"]
    if imgs:
        # image and spots overlap in world (µm) space
        e_img, e_pts = imgs[0].extent.world, pts[0].extent.world
        overlap = np.minimum(e_img[1], e_pts[1]) - np.maximum(e_img[0], e_pts[0])
        assert np.all(overlap > 0), f"image {e_img} and spots {e_pts} do not overlap"
    viewer.reset_view()
    qtbot.wait(50)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].std() > 5, "blank canvas"
