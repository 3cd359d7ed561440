"""Auto-refine in the dock on a correctly registered section (issue 17, item 9): nothing moves, the fraction of
spots on tissue is said once ("already registered (x % of spots on tissue); kept"), and no undo step is pushed."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _wait_idle(qtbot, section, timeout=120_000):
    def done():
        r = section.runner
        assert r is not None and r.finished
    qtbot.waitUntil(done, timeout=timeout)
    qtbot.wait(50)


def test_auto_refine_keeps_her2st_c3(shown_viewer, qtbot, her2st_dir, isolated_settings):
    from napari_diffst.data.registration import similarity_matrix, spot_errors_um

    viewer = shown_viewer
    dw, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    st, sec = w.state, w.sections
    sec["data"]._open_paths([her2st_dir / "C3"])
    qtbot.waitUntil(lambda: st.sample is not None, timeout=60_000)
    sample = st.sample
    spots = st.spots_layer
    A0 = np.asarray(spots.affine.affine_matrix).copy()
    reg = sec["register"]
    reg.refine_btn.click()
    _wait_idle(qtbot, reg)
    text = reg.info.text()
    print(f"\n{text}")
    assert reg.last_result.kept
    assert "already registered" in text and text.count("%") == 1 and "kept" in text
    assert np.allclose(sample.transform, np.eye(3)) and np.allclose(spots.affine.affine_matrix, A0)
    assert not reg.undo_btn.isEnabled()
    # a shifted registration is corrected, with the figure once as "before → after", and can be undone
    um = sample.um_per_px
    reg.apply_transform(sample, similarity_matrix(60 / um, -40 / um))
    reg.refine_btn.click()
    _wait_idle(qtbot, reg)
    text = reg.info.text()
    print(text)
    xy = np.asarray(sample.adata.obsm["spatial"], float)
    assert not reg.last_result.kept and text.count("%") == 2 and "→" in text
    assert spot_errors_um(sample.transform, np.eye(3), xy, um).max() < 20.0
    assert reg.undo_btn.isEnabled()
