"""The dock's "7 · Domains" section in a *shown* napari viewer (run under xvfb-run).

The SR result is bicubic maps of the synthetic sample handed to the Sample section (no training), so the
test is fast. Asserts on the Labels layer (grid, placement equal to the SR layers', labels), the legend, the
ARI/NMI against the LR-spot domains, the AnnData export and an error path. Writes docs/images/domains.png."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import save_screenshot

pytestmark = pytest.mark.gui


@pytest.fixture
def notes(monkeypatch):
    """Error and info notifications the dock shows."""
    import napari.utils.notifications as N

    seen = {"error": [], "info": [], "warning": []}
    for kind in seen:
        orig = getattr(N, f"show_{kind}")

        def rec(msg, _k=kind, _o=orig):
            seen[_k].append(str(msg))
            _o(msg)

        monkeypatch.setattr(N, f"show_{kind}", rec)
    return seen


def open_dock(viewer, width: int = 470):
    from qtpy.QtCore import Qt

    dw, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    viewer.window._qt_window.resizeDocks([dw], [width], Qt.Orientation.Horizontal)
    return w


def wait_done(qtbot, sec, timeout=60_000):
    qtbot.waitUntil(lambda: sec.runner is not None and sec.runner.finished and not sec.state.busy, timeout=timeout)
    qtbot.wait(50)


def test_domains_section(shown_viewer, qtbot, isolated_settings, notes):
    import pandas as pd

    from napari_diffst.baselines import Bicubic
    from napari_diffst.domains import compare_domains, domain_colours, lr_domains, sr_domains
    from napari_diffst.pipeline import SRResult, make_fields

    viewer = shown_viewer
    w = open_dock(viewer)
    st, sec = w.state, w.sections
    dom = sec["domains"]
    assert dom.title() == "7 · Domains" and not dom.run_btn.isEnabled() and not dom.export_btn.isEnabled()

    sec["data"].synth_btn.click()
    qtbot.waitUntil(lambda: st.sample is not None, timeout=60_000)
    sample = st.sample
    genes = list(sample.hr_truth["genes"])[:10]
    fld = make_fields([sample], genes, 5, mode="truth")[0][0]
    pred = Bicubic().predict(fld)
    res = SRResult(pred, np.zeros_like(pred), genes, fld.hr_um, fld, steps=0, n_samples=1)
    sec["sample"]._show_result(res)  # as if section 5 had sampled: SR layers, then state.results
    qtbot.waitUntil(lambda: "Diff-ST" in st.results and not sec["sample"].queue.busy, timeout=30_000)
    sr_layers = sec["sample"].layers_for("sr")
    assert len(sr_layers) == len(genes)

    # the latest result is offered as the source
    assert dom.source_combo.count() >= 1 and dom.source_combo.currentData() == "__latest_result__"
    assert dom.run_btn.isEnabled()
    dom.k_spin.setValue(4)
    dom.smooth_spin.setValue(0.5)
    dom.hist_check.setChecked(True)
    dom.run_btn.click()
    wait_done(qtbot, dom)
    assert not notes["error"], notes["error"]

    # Labels layer: on the HR grid, placed like the SR maps, 0 off tissue, domains 1..4
    lab = dom.layer
    from napari.layers import Labels

    assert isinstance(lab, Labels) and lab in viewer.layers and lab.metadata["diffst_role"] == "domains"
    assert lab.data.shape == tuple(fld.hr_shape)
    ref = sr_layers[0]
    np.testing.assert_allclose(lab.scale, ref.scale)
    np.testing.assert_allclose(lab.translate, ref.translate)
    np.testing.assert_allclose(lab.rotate, ref.rotate)
    np.testing.assert_allclose(lab.shear, ref.shear)
    np.testing.assert_allclose(lab.affine.affine_matrix, ref.affine.affine_matrix)
    np.testing.assert_allclose(lab.extent.world, ref.extent.world)
    assert set(np.unique(lab.data)) == {0, 1, 2, 3, 4}
    assert np.all(lab.data[~fld.hr_mask] == 0) and np.all(lab.data[fld.hr_mask] > 0)
    # the labels cover the tissue: the H&E under the labelled pixels is darker than off-tissue
    he = np.asarray(fld.he).mean(0)
    k_he = fld.he_per_hr
    on = np.kron(lab.data > 0, np.ones((k_he, k_he), bool))
    assert he[on].mean() < he[~on].mean() - 0.05
    # colours of the layer = legend colours
    cols = domain_colours(4)
    for d in range(1, 5):
        np.testing.assert_allclose(lab.colormap.map(d)[:3], np.array([int(cols[d - 1][i:i + 2], 16)
                                                                      for i in (1, 3, 5)]) / 255, atol=1e-3)

    # same labels as the core with the same settings
    want = sr_domains(fld, pred, 4, include_histology=True, smooth_lr_px=0.5, seed=0)
    np.testing.assert_array_equal(lab.data, want.labels)

    # legend: colour swatch, domain and share, top genes
    rows = dom.legend_rows()
    assert [r[0] for r in rows] == cols
    assert [r[1].split(" · ")[0] for r in rows] == ["1", "2", "3", "4"]
    shares = [float(r[1].split(" · ")[1].rstrip(" %")) for r in rows]
    assert abs(sum(shares) - 100) <= 2 and shares == sorted(shares, reverse=True)
    for r in rows:
        top = r[2].split(", ")
        assert len(top) == 3 and set(top) <= set(genes)

    # ARI / NMI vs the LR-spot domains (same procedure)
    lr = lr_domains(fld, 4, include_histology=True, smooth_lr_px=0.5, seed=0)
    agree = compare_domains(want.labels, lr.labels, fld.scale)
    txt = dom.agree_label.text()
    assert f"ARI {agree['ari']:.3f}" in txt and f"NMI {agree['nmi']:.3f}" in txt
    assert 0 < agree["ari"] <= 1

    # screenshot: the domains over the H&E
    for ly in viewer.layers:  # (the dock's viewer is napari's plugin proxy: compare layers by name)
        ly.visible = ly.name == lab.name or ly.metadata.get("diffst_role") == "histology"
    viewer.reset_view(layers=[lab], margin=0.05)
    bar = w.verticalScrollBar()
    bar.setValue(bar.maximum())
    qtbot.wait(200)
    img = viewer.screenshot(canvas_only=False, flash=False)
    save_screenshot(img, "domains")
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    save_screenshot(canvas, "domains_canvas")
    # the labels change the canvas where the H&E shows tissue (not the white background)
    lab.visible = False
    qtbot.wait(200)
    bare = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    lab.visible = True
    qtbot.wait(100)
    changed = np.abs(canvas[..., :3].astype(float) - bare).sum(-1) > 30
    tissue = bare.mean(-1) < 215  # H&E stain; background is ~0.96 grey, the canvas outside black
    tissue &= bare.mean(-1) > 20
    assert changed.mean() > 0.2
    assert (changed & tissue).sum() > 0.8 * changed.sum()
    assert (changed & tissue).sum() > 0.8 * tissue.sum()

    # export to AnnData: obs column (categorical, majority per spot) + uns + the spots layer's features
    assert dom.export_btn.isEnabled()
    dom.export_btn.click()
    assert not notes["error"], notes["error"]
    assert any("diffst_domain" in m for m in notes["info"])
    obs = sample.adata.obs["diffst_domain"]
    assert isinstance(obs.dtype, pd.CategoricalDtype) and list(obs.cat.categories) == ["1", "2", "3", "4"]
    assert obs.notna().sum() >= 0.9 * len(fld.extra["spot_obs_index"])
    assert "diffst_domain_lr" in sample.adata.obs
    u = sample.adata.uns["diffst_domain"]
    np.testing.assert_array_equal(u["labels"], lab.data)
    assert u["ari_vs_lr"] == pytest.approx(agree["ari"]) and u["histology"] is True
    spots = st.spots_layer
    assert "diffst_domain" in spots.features.columns

    # a gene-stack image layer is a source too (placement from that layer; no field → no ARI)
    stack = viewer.add_image(np.where(fld.hr_mask[None], pred, np.nan), name="stack", scale=(7.0, 7.0),
                             translate=(100.0, 50.0), visible=False, metadata={"genes": genes})
    qtbot.wait(50)
    dom.set_source("stack")
    dom.hist_check.setChecked(False)
    dom.k_spin.setValue(3)
    dom.run_btn.click()
    wait_done(qtbot, dom)
    lab2 = dom.layer
    assert lab2 is not lab and lab2.data.shape == tuple(fld.hr_shape)
    np.testing.assert_allclose(lab2.scale, (7.0, 7.0))
    np.testing.assert_allclose(lab2.translate, (100.0, 50.0))
    # on the SR result's grid, so its field is used: LR agreement and export still available
    assert "ARI" in dom.agree_label.text()

    # errors become notifications: an all-NaN stack has no tissue
    viewer.add_image(np.full((3, 8, 9), np.nan, np.float32), name="empty", visible=False)
    qtbot.wait(50)
    dom.set_source("empty")
    dom.run_btn.click()
    wait_done(qtbot, dom)
    assert notes["error"] and "too few" in notes["error"][-1]
    assert dom.layer is lab2 and not st.busy
