"""The README's launch command: `napari-diffst demo` opens napari with the synthetic sample and the dock."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import has_display, save_screenshot

pytestmark = pytest.mark.gui


def test_demo_opens_sample_and_dock(make_napari_viewer, monkeypatch, qtbot):
    if not has_display():
        pytest.skip("no X display: run under xvfb-run (see README)")
    import napari

    from napari_diffst.cli import main

    made = []

    def viewer_factory(**kw):  # the demo's viewer, created (and torn down) by napari's test fixture
        v = make_napari_viewer(show=True, **kw)
        made.append(v)
        return v

    monkeypatch.setattr(napari, "Viewer", viewer_factory)
    assert main(["demo", "--no-run"]) == 0
    assert len(made) == 1
    viewer = made[0]
    names = [ly.name for ly in viewer.layers]
    spots = next(ly for ly in viewer.layers if ly.metadata.get("diffst_role") == "spots")
    gene = spots.metadata["gene"]
    assert "synthetic H&E" in names and spots.name == f"synthetic spots · {gene}"
    assert gene in viewer.text_overlay.text and viewer.text_overlay.visible
    docks = viewer.window._dock_widgets
    assert any("Super-resolve ST" in k for k in docks), list(docks)
    qtbot.wait(500)  # the demo's deferred reset_view runs
    # the window takes most of the screen (the demo does not leave Qt's default 1089 × 630)
    win = viewer.window._qt_window
    geo = win.screen().availableGeometry()
    frac_w, frac_h = win.width() / geo.width(), win.height() / geo.height()
    print(f"\ndemo window {win.width()} × {win.height()} on a {geo.width()} × {geo.height()} screen "
          f"({frac_w:.0%} × {frac_h:.0%})")
    assert frac_w >= 0.8 and frac_h >= 0.8
    # the whole H&E is inside the canvas view once the dock is in
    he = viewer.layers["synthetic H&E"]
    ch, cw = _canvas_hw(viewer)
    z = viewer.camera.zoom
    cy, cx = viewer.camera.center[-2:]
    (y0, x0), (y1, x1) = np.asarray(he.extent.world)[:, -2:]
    vy0, vy1, vx0, vx1 = cy - ch / 2 / z, cy + ch / 2 / z, cx - cw / 2 / z, cx + cw / 2 / z
    print(f"H&E y {y0:.0f}..{y1:.0f} x {x0:.0f}..{x1:.0f} µm; view y {vy0:.0f}..{vy1:.0f} x {vx0:.0f}..{vx1:.0f} µm; "
          f"canvas {cw} × {ch} px")
    tol = 0.01 * max(y1 - y0, x1 - x0)
    assert vy0 <= y0 + tol and vy1 >= y1 - tol and vx0 <= x0 + tol and vx1 >= x1 - tol
    # ... and fills a good part of it (not a thumbnail in a corner)
    assert max((y1 - y0) / (vy1 - vy0), (x1 - x0) / (vx1 - vx0)) > 0.7
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot[..., :3].std() > 10
    save_screenshot(shot, "demo_window")


def _canvas_hw(viewer):
    """(height, width) of the canvas in screen pixels."""
    size = viewer.window._qt_viewer.canvas.size  # (height, width) in napari ≥ 0.5
    return int(size[0]), int(size[1])
