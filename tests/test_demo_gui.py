"""The README's launch command: `napari-diffst demo` opens napari with the synthetic sample and the dock."""
from __future__ import annotations

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
    assert "synthetic H&E" in names and "synthetic spots" in names
    docks = viewer.window._dock_widgets
    assert any("Super-resolve ST" in k for k in docks), list(docks)
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot[..., :3].std() > 10
    save_screenshot(shot, "demo_window")
