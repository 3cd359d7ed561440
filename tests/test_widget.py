"""The "Super-resolve ST" dock driven end to end in a *shown* napari viewer (run under xvfb-run).

Each step asserts on layers and widget state. A QTimer probe (10 ms) measures the longest main-thread
stall from the click on Train / Super-resolve until the run has ended (the dock must stay responsive:
< 100 ms) and, separately, what follows (result layers being added).
Screenshots for docs/user_guide.md are written to docs/images/guide_*.png."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import save_screenshot
from napari_diffst.data.grids import shown_maps

pytestmark = pytest.mark.gui

STALLS: dict = {}


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def errors(monkeypatch):
    """Error notifications the dock shows (napari's show_error, captured)."""
    seen: list[str] = []
    import napari.utils.notifications as N

    orig = N.show_error

    def rec(msg):
        seen.append(str(msg))
        orig(msg)

    monkeypatch.setattr(N, "show_error", rec)
    return seen


def open_dock(viewer, width: int = 470):
    dw, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([dw], [width], Qt.Orientation.Horizontal)
    return w


def _schedstat(tid: int | None = None) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of thread ``tid`` (default: the calling
    thread) from Linux's schedstat; None where that is not available."""
    import threading

    try:
        with open(f"/proc/self/task/{tid or threading.get_native_id()}/schedstat") as f:
            on_cpu, wait = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return None


class StallProbe:
    """Longest gap between 10 ms QTimer ticks = the longest time the main thread did not run its loop.

    ``run(qtbot, button, section)`` starts the probe, clicks (the click handler is inside the measured
    window: it is the first gap) and probes until the section's job has ended — the probe stops when the
    runner calls the section's ``on_done`` (after the worker's last event and the final UI tick). What
    follows (the end-of-run repaint; result layers being added) is measured by ``after``, a second probe that
    runs until the section is idle (:func:`wait_idle`)."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.t = QTimer()
        self.t.setInterval(interval_ms)
        self.t.timeout.connect(self._tick)
        self.last = None
        self.worst = 0.0
        self.worst_at = 0.0
        self.n = 0
        self.click_s = 0.0
        self.t0 = 0.0
        # gaps > 50 ms: (start s, length ms, main thread on a CPU ms, main thread waiting for a CPU ms,
        # worker thread waiting for a CPU ms). The rest of a gap the main thread was blocked: on the GIL
        # (held by the worker), or on the GL rasteriser threads and the X server (a window flush).
        self.gaps = []
        self.worst_rest = 0.0  # the longest gap less the longer of the two threads' waits for a CPU
        self.worker_tid = None  # callable → the worker thread's native id (or None)
        self._main = self._worker = (0.0, 0.0)
        self._wtid = None
        self.after = None

    def _tick(self):
        now = time.perf_counter()
        main = _schedstat() or (0.0, 0.0)
        tid = self.worker_tid() if self.worker_tid else None
        worker = (_schedstat(tid) if tid else None) or self._worker
        if tid != self._wtid:  # the worker thread is known from now on: its counters start here
            self._wtid, self._worker = tid, worker
        if self.last is not None and now - self.last > 0.05:
            gap = (now - self.last) * 1e3
            cpu, wait = ((a - b) * 1e3 for a, b in zip(main, self._main))
            wwait = max(0.0, worker[1] - self._worker[1]) * 1e3
            rest = gap - min(gap, max(wait, wwait))  # (max: the two waits may overlap)
            self.gaps.append((round(self.last - self.t0, 2), round(gap), round(cpu), round(wait), round(wwait)))
            self.worst_rest = max(self.worst_rest, rest / 1e3)
        elif self.last is not None:
            self.worst_rest = max(self.worst_rest, now - self.last)
        if self.last is not None and now - self.last > self.worst:
            self.worst, self.worst_at = now - self.last, self.last - self.t0
        self.last = now
        self._main, self._worker = main, worker
        self.n += 1

    def start(self):
        self.t0 = self.last = time.perf_counter()
        self._main = _schedstat() or (0.0, 0.0)
        self._worker = (0.0, 0.0)
        self.t.start()

    def stop(self, *_):
        if self.t.isActive():
            self._tick()
            self.t.stop()

    def run(self, qtbot, button, section, timeout=120_000):
        self.start()
        t = time.perf_counter()
        button.click()
        self.click_s = time.perf_counter() - t
        runner = section.runner
        self.worker_tid = lambda: runner.job.info.get("tid")
        on_done = runner.on_done
        self.after = StallProbe()

        def stop_then_done():
            self.stop()
            self.after.start()
            if on_done is not None:
                on_done()

        runner.on_done = stop_then_done
        qtbot.waitUntil(lambda: runner.finished, timeout=timeout)
        self.stop()
        wait_idle(qtbot, section, timeout=timeout)
        self.after.stop()
        return self

    def summary(self) -> str:
        a = self.after
        return (f"worst {self.worst * 1e3:.0f} ms (at +{self.worst_at:.2f} s), {self.worst_rest * 1e3:.0f} ms less "
                f"the wait for a CPU; click handler {self.click_s * 1e3:.0f} ms; {self.n} ticks; gaps > 50 ms "
                f"(start s, ms, main on a CPU ms, main waiting for a CPU ms, worker waiting for a CPU ms): "
                f"{self.gaps}. After the run (until idle): worst {a.worst * 1e3:.0f} ms, gaps > 50 ms: {a.gaps}")


def wait_idle(qtbot, section, timeout=120_000):
    """Until the section's job has finished and its queued layers are added."""
    def done():
        r = section.runner
        q = getattr(section, "queue", None)
        assert r is not None and r.finished
        assert q is None or not q.busy
    qtbot.waitUntil(done, timeout=timeout)
    qtbot.wait(50)


def focus(viewer, layer, zoom=1.6, also=()):
    """Centre the camera on ``layer`` (its world extent) and zoom in from the full view."""
    viewer.reset_view(layers=[layer, *also], margin=0.02)
    cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    cam.center = tuple(np.asarray(layer.extent.world, float).mean(0))
    cam.zoom *= zoom


def shot(viewer, qtbot, name, canvas_only=False, scroll_to=None, widget=None):
    """Save a screenshot (full window with the dock scrolled to ``scroll_to``, or the canvas only)."""
    if scroll_to is not None and widget is not None:
        bar = widget.verticalScrollBar()
        bar.setValue(min(bar.maximum(), max(0, scroll_to.y() - 4)))
    qtbot.wait(150)
    img = viewer.screenshot(canvas_only=canvas_only, flash=False)
    save_screenshot(img, name)
    return img


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_full_flow(shown_viewer, qtbot, tmp_path, isolated_settings, errors):
    import torch

    from napari_diffst.data.sample import xy_affine_to_napari
    from napari_diffst.metrics import score_field

    torch.set_num_threads(1)
    viewer = shown_viewer
    w = open_dock(viewer)
    st = w.state
    sec = w.sections

    # 1 · Data ---------------------------------------------------------------------------------
    sec["data"].synth_btn.click()
    qtbot.waitUntil(lambda: st.sample is not None, timeout=60_000)
    sample = st.sample
    assert sample.technology == "legacy_st" and sample.hr_truth is not None
    assert "98 spots" in sec["data"].info.text()
    roles = sorted(ly.metadata.get("diffst_role", "") for ly in viewer.layers)
    assert roles == ["histology", "spots", "truth"]
    viewer.reset_view()
    shot(viewer, qtbot, "guide_1_data", scroll_to=sec["data"], widget=w)

    # 2 · Register: metadata, then landmarks with a known answer, then undo ------------------------
    reg = sec["register"]
    assert reg.meta_btn.isEnabled()
    reg.meta_btn.click()
    wait_idle(qtbot, reg)
    assert np.allclose(sample.transform, np.eye(3))
    assert reg.last_result.method == "metadata"
    assert reg.last_result.frac_on_tissue_after > 0.9
    assert "spots on tissue" in reg.info.text() or "on tissue" in reg.info.text()
    spots = next(ly for ly in viewer.layers if ly.metadata.get("diffst_role") == "spots")

    from napari_diffst.data.registration import similarity_matrix
    from napari_diffst.data.sample import apply_affine

    xy = np.asarray(sample.adata.obsm["spatial"], float)
    pick = xy[[0, len(xy) // 3, 2 * len(xy) // 3, len(xy) - 1]]
    T_true = similarity_matrix(40.0, -25.0, 3.0, 1.0, center=tuple(xy.mean(0)))
    reg.add_landmark_layers()
    lm_names = {ly.name for ly in viewer.layers}
    assert {"landmarks · H&E", "landmarks · spots"} <= lm_names
    # linked layers: a click on the H&E makes the spots layer the one that takes the next click
    he_lm, sp_lm = viewer.layers["landmarks · H&E"], viewer.layers["landmarks · spots"]
    assert viewer.layers.selection.active == he_lm and he_lm.mode == "add"
    he_lm.add([[1500.0, 1500.0]])
    assert viewer.layers.selection.active == sp_lm and sp_lm.mode == "add"
    sp_lm.add([[1490.0, 1510.0]])
    assert viewer.layers.selection.active == he_lm
    assert list(he_lm.features["pair"]) == [1] and "need ≥ 3" in reg.rms_label.text()
    reg.set_landmarks(apply_affine(T_true, pick), pick)
    assert reg.table.rowCount() == 4
    assert reg.lm_result is not None and reg.lm_result.rms_um < 1e-6
    assert reg.rms_label.text().startswith("0.0 µm over 4 pairs")
    # one landmark off by 10 px -> nonzero residuals shown live
    bad = apply_affine(T_true, pick)
    bad[0] += [10.0, 0.0]
    reg.set_landmarks(bad, pick)
    rms = reg.lm_result.rms_um
    assert rms > 1.0 and float(reg.rms_label.text().split()[0]) == pytest.approx(rms, abs=0.06)
    assert float(reg.table.item(0, 1).text()) == pytest.approx(reg.lm_result.residuals_um[0], abs=0.06)
    assert np.sqrt(np.mean(reg.lm_result.residuals_um ** 2)) == pytest.approx(rms)
    viewer.reset_view()
    shot(viewer, qtbot, "guide_2_register", scroll_to=reg, widget=w)
    reg.set_landmarks(apply_affine(T_true, pick), pick)
    reg.apply_lm_btn.click()
    wait_idle(qtbot, reg)
    assert np.allclose(sample.transform, T_true, atol=1e-6)
    assert np.allclose(spots.affine.affine_matrix, xy_affine_to_napari(T_true, sample.um_per_px), atol=1e-6)
    n_undo = len(reg.undo_stack)
    reg.undo_btn.click()
    assert len(reg.undo_stack) == n_undo - 1
    assert np.allclose(sample.transform, np.eye(3))
    assert np.allclose(spots.affine.affine_matrix, np.eye(3))
    for name in ("landmarks · H&E", "landmarks · spots"):
        viewer.layers.remove(name)

    # 3 · Genes & scale ------------------------------------------------------------------------
    gen = sec["genes"]
    listed = gen.genes_in_list()
    assert set(listed) <= set(sample.hr_truth["genes"]) and len(listed) == len(sample.hr_truth["genes"])
    gen.search.setText("erb")
    assert gen.proxy.rowCount() >= 1
    assert all("ERB" in gen.proxy.index(r, 0).data(gen.list.model().filterRole()).upper()
               for r in range(gen.proxy.rowCount()))
    gen.search.setText("")
    gen.top_spin.setValue(3)
    gen.top_btn.click()
    assert len(st.genes) == 3 and st.genes == listed[:3]
    n_err = len(errors)
    assert gen.add_genes(["ERB2"]) is False  # unknown gene: notification with suggestions, nothing changes
    assert len(errors) == n_err + 1 and "ERBB2" in errors[-1]
    assert len(st.genes) == 3
    genes = list(st.genes)
    gen.scale_spin.setValue(5)
    assert st.scale == 5
    assert "HR pixel 40 µm" in gen.hr_label.text()
    shot(viewer, qtbot, "guide_3_genes", scroll_to=sec["genes"], widget=w)

    # 4 · Train (tiny budget, 4 steps) with the stall probe ---------------------------------------
    tr = sec["train"]
    assert tr.device_label.text().find("CPU") >= 0 and "CUDA is not available" in tr.device_label.toolTip()
    import torch as _torch

    choices = [tr.device_combo.itemText(i) for i in range(tr.device_combo.count())]
    assert choices[:2] == ["auto", "cpu"] and tr.device == "auto" == st.device
    assert any(c.startswith("cuda") for c in choices) == _torch.cuda.is_available()
    tr.device_combo.setCurrentText("cpu")
    assert st.device == "cpu" and "CPU" in tr.device_label.text()
    tr.budget_combo.setCurrentIndex(0)
    tr.steps_spin.setValue(4)
    tr.batch_spin.setValue(2)
    tr.patch_spin.setValue(4)
    ck = tmp_path / "ckpt"
    tr.ckpt_edit.setText(str(ck))
    assert tr.train_btn.isEnabled()
    qtbot.waitUntil(lambda: not w.warmup.is_alive(), timeout=60_000)  # the dock pre-imports torch parts
    import os

    load0 = os.getloadavg()[0]
    probe_train = StallProbe()
    probe_train.run(qtbot, tr.train_btn, tr)
    steps = [ev for ev in tr.history if ev.kind == "step"]
    assert [ev.step for ev in steps] == [1, 2, 3, 4]
    assert tr.history[-1].kind == "done" and tr.run_device == "cpu"
    assert (ck / "model.pt").is_file() and st.checkpoint == str(ck)
    assert len(tr.plot.series["loss"][0]) == 4 and "mse" in tr.plot.series
    assert tr.plot.n_draws >= 1 and tr.plot.legend_text().startswith("━ loss")
    assert tr.progress.value() == tr.progress.maximum() == 4
    assert "Finished 4 steps" in tr.eta_label.text()
    assert st.train_fields and st.train_fields[0].hr is not None
    assert not st.busy and tr.train_btn.isEnabled()
    shot(viewer, qtbot, "guide_4_train", scroll_to=sec["train"], widget=w)

    # 5 · Sample with live preview -----------------------------------------------------------------
    sm = sec["sample"]
    assert sm.ckpt_edit.text() == str(ck)
    sm.steps_spin.setValue(4)
    sm.n_spin.setValue(2)
    n_before = len(viewer.layers)
    probe_sample = StallProbe()
    probe_sample.run(qtbot, sm.run_btn, sm)
    assert sm.n_previews >= 2  # at least the first and the last reverse step were previewed
    from napari_diffst._widgets.sample_section import PREVIEW_PX

    hr_shape = sm.result.field.hr_shape
    k = -(-max(hr_shape) // PREVIEW_PX)  # previews are downsampled to at most PREVIEW_PX per side
    assert sm.preview.isVisible() and sm.preview_image.shape[:2] == tuple(-(-n // k) for n in hr_shape)
    assert sm.preview.pixmap() is not None and sm.progress.value() == sm.progress.maximum() == 8
    sr = sm.layers_for("sr")
    unc = sm.layers_for("sr_uncertainty")
    assert [ly.metadata["gene"] for ly in sr] == genes and len(unc) == 3
    assert len(viewer.layers) == n_before + 6
    assert sr[0].visible and not any(ly.visible for ly in sr[1:] + unc)
    fld = sm.result.field
    assert sm.mode == "truth" and fld.hr is not None
    for ly in sr:
        a = np.asarray(ly.data)
        assert a.shape == fld.hr_shape
        shown = ly.metadata["mask"]  # the tissue near the spots (data.grids.display_mask)
        assert np.isnan(a[~shown]).all() and np.isfinite(a[shown]).all()
        assert (shown & fld.hr_mask).sum() >= 0.5 * fld.hr_mask.sum()
        lo, hi = ly.contrast_limits
        assert lo == 0.0 and 0 < hi <= np.nanmax(a) + 1e-6
        assert ly.blending == "translucent" and ly.colormap.name in ("inferno fade", "viridis fade", "magma fade")
        assert ly.colormap.colors[0, 3] == 0.0 and ly.colormap.colors[-1, 3] == 1.0  # low values see-through
    assert len({ly.colormap.name for ly in sr}) == 3
    # SR raster in µm over the H&E: inside the image, covering the spots
    he = next(ly for ly in viewer.layers if ly.metadata.get("diffst_role") == "histology")
    e_sr, e_he, e_sp = sr[0].extent.world, he.extent.world, spots.extent.world
    assert np.all(e_sr[0] >= e_he[0] - 1) and np.all(e_sr[1] <= e_he[1] + 1)
    assert np.all(e_sr[0] <= e_sp[0] + 1) and np.all(e_sr[1] >= e_sp[1] - 1)
    assert st.results["Diff-ST"] is sm.result
    # the SR layer agrees with the truth layer of the same gene where both exist
    viewer.reset_view()
    spots.visible = False
    shot(viewer, qtbot, "guide_5_sample", scroll_to=sec["sample"], widget=w)
    shot(viewer, qtbot, "guide_5_sample_canvas", canvas_only=True)
    spots.visible = True

    # 6 · Compare ----------------------------------------------------------------------------------
    cmp_ = sec["compare"]
    assert cmp_.run_btn.isEnabled()
    cmp_.set_baselines(["nearest", "bicubic"])
    cmp_.budget_combo.setCurrentText("tiny")
    cmp_.run_btn.click()
    wait_idle(qtbot, cmp_)
    vals = cmp_.table_values()
    assert list(vals) == ["Diff-ST", "nearest", "bicubic", "LR (nearest)"]
    assert cmp_.scope.text().startswith(f"Scored on {fld.name}, against its HR truth")
    ref = score_field(sm.result.mean, fld)
    assert vals["Diff-ST"]["PCC"] == pytest.approx(ref["pcc"], abs=6e-4)
    assert vals["Diff-ST"]["RMSE"] == pytest.approx(ref["rmse"], abs=6e-4)
    assert vals["nearest"]["detail-PCC"] == pytest.approx(0.0, abs=1e-3)  # LR copy adds no detail
    assert vals["nearest"]["PCC"] == pytest.approx(vals["LR (nearest)"]["PCC"], abs=1e-3)
    assert cmp_.grid_btn.isChecked()
    from napari_diffst._widgets.compare_section import _grid

    assert _grid(viewer).enabled
    visible = [ly for ly in viewer.layers if ly.visible]
    g0 = cmp_.current_gene()
    assert g0 == genes[0]
    assert sorted(ly.metadata["method"] for ly in visible) == sorted(["truth", "Diff-ST", "nearest", "bicubic", "LR"])
    assert all(ly.metadata["gene"] == g0 for ly in visible)
    assert len({tuple(ly.contrast_limits) for ly in visible}) == 1  # shared contrast per gene
    assert len({ly.colormap.name for ly in visible}) == 1           # shared colormap per gene
    shot(viewer, qtbot, "guide_6_compare", scroll_to=sec["compare"], widget=w)
    shot(viewer, qtbot, "guide_6_compare_canvas", canvas_only=True)
    assert len(cmp_.layers) == 5  # layers of the other genes are added when they are first shown
    cmp_.gene_combo.setCurrentText(genes[1])
    qtbot.waitUntil(lambda: not cmp_.queue.busy and len(cmp_.layers) == 10, timeout=30_000)
    qtbot.wait(50)
    assert {ly.metadata["gene"] for ly in viewer.layers if ly.visible} == {genes[1]}

    # export: the three map formats and the CSV, read back
    from napari_diffst.io.writers import read_maps

    # the partial output of an export that was killed earlier goes first (one notice), a user's dot-file stays
    (tmp_path / ".tmp-0123abcd-maps.ome.zarr").mkdir()
    (tmp_path / ".tmp-0123abcd-maps.ome.zarr" / "0").write_text("partial")
    (tmp_path / ".tmp-mine-maps.ome.zarr").write_text("mine")
    said = []
    cmp_._say = said.append
    for fmt, name in (("ome-zarr", "maps.ome.zarr"), ("tiff", "maps.ome.tif"), ("h5ad", "maps.h5ad"),
                      ("spatialdata", "maps.sdata.zarr")):
        cmp_.export_fmt.setCurrentIndex([cmp_.export_fmt.itemData(i) for i in range(cmp_.export_fmt.count())].index(fmt))
        cmp_.ask_save_path = lambda *a, _n=name: str(tmp_path / _n)
        cmp_.export_btn.click()
        mf = read_maps(tmp_path / name)
        assert list(mf.genes) == genes
        m = np.asarray(mf.maps)
        shown = sr[0].metadata["mask"]
        # what the dock shows: the maps on the tissue, the rim past the lattice cells from the nearest prediction
        expect = shown_maps(sm.result.mean * fld.gene_scale[:, None, None], fld.hr_mask, shown)
        assert m.shape == expect.shape
        assert np.allclose(m[:, shown], expect[:, shown], atol=1e-4)
        assert np.allclose(m[0][shown], np.asarray(sr[0].data)[shown], atol=1e-4)
        assert mf.um_per_px == pytest.approx(fld.hr_um)
        assert np.isnan(m[:, ~shown]).all()  # NaN outside the tissue, as in the CLI and tiled output
    assert not (tmp_path / ".tmp-0123abcd-maps.ome.zarr").exists() and (tmp_path / ".tmp-mine-maps.ome.zarr").is_file()
    assert len(said) == 1 and "removed 1 partial output left by a killed write (.tmp-0123abcd-maps.ome.zarr)" in said[0]
    import anndata as ad

    sr_ad = ad.read_h5ad(tmp_path / "maps.h5ad")      # the h5ad is in the section's frame (full-res px)
    A = np.asarray(fld.extra["hr_affine"], float)
    rc = sr_ad.obs[["col", "row"]].to_numpy(float)
    np.testing.assert_allclose(sr_ad.obsm["spatial"], rc @ A[:2, :2].T + A[:2, 2])
    assert list(sr_ad.uns["spatial"]) == [w.state.sample.library_id] and "barcode" in sr_ad.obs
    # an existing output is replaced only when the user says so (the last export above: maps.h5ad again)
    cmp_.export_fmt.setCurrentIndex([cmp_.export_fmt.itemData(i) for i in range(cmp_.export_fmt.count())].index("h5ad"))
    cmp_.ask_save_path = lambda *a: str(tmp_path / "maps.h5ad")
    asked = []
    cmp_.ask_replace = lambda p: asked.append(p) or False
    stamp = (tmp_path / "maps.h5ad").stat().st_mtime_ns
    cmp_.export_btn.click()
    assert asked == [str(tmp_path / "maps.h5ad")] and "Not exported" in cmp_.status.text()
    assert (tmp_path / "maps.h5ad").stat().st_mtime_ns == stamp
    cmp_.ask_replace = lambda p: True
    cmp_.export_btn.click()
    assert (tmp_path / "maps.h5ad").stat().st_mtime_ns != stamp and "Wrote" in cmp_.status.text()
    # napari's own File ▸ Save Selected Layers path (the npe2 writer) on the SR + σ layers
    from napari_diffst._writer import write_tiff

    write_tiff(str(tmp_path / "layers.ome.tif"), [ly.as_layer_data_tuple() for ly in sr + unc])
    mf = read_maps(tmp_path / "layers.ome.tif")
    assert list(mf.genes) == genes and mf.um_per_px == pytest.approx(fld.hr_um, rel=1e-6)
    assert set(mf.extra) == {"uncertainty"} and np.asarray(mf.extra["uncertainty"]).shape == expect.shape
    from napari_diffst._writer import write_h5ad as npe2_h5ad

    npe2_h5ad(str(tmp_path / "layers.h5ad"), [ly.as_layer_data_tuple() for ly in sr + unc])
    lay_ad = ad.read_h5ad(tmp_path / "layers.h5ad")       # the result layers carry their section's frame
    assert list(lay_ad.uns["spatial"]) == [w.state.sample.library_id] and "uncertainty" in lay_ad.layers
    rc = lay_ad.obs[["col", "row"]].to_numpy(float)
    np.testing.assert_allclose(lay_ad.obsm["spatial"], rc @ A[:2, :2].T + A[:2, 2])
    cmp_.ask_save_path = lambda *a: str(tmp_path / "metrics.csv")
    cmp_.csv_btn.click()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "method,gene,pcc,rmse,ssim,detail_pcc"
    assert len(lines) == 1 + 4 * (3 + 1)
    # leaving the grid restores what was visible before
    cmp_.grid_btn.setChecked(False)
    assert not _grid(viewer).enabled
    # (Compare's Diff-ST cells are Sample's own layers: they keep their visibility from before)
    assert he.visible and sr[0].visible and not any(ly.visible for ly in cmp_.layers.values() if ly not in sr)

    STALLS["train"] = probe_train.worst
    STALLS["sample"] = probe_sample.worst
    load = os.getloadavg()[0]
    print(f"\nmain-thread stalls, load average {load:.1f} on {os.cpu_count()} CPUs")
    print("  training:", probe_train.summary())
    print("  sampling:", probe_sample.summary())
    print("  train events (s after start):", [(ev.kind, ev.step, round(ev.elapsed_s, 2)) for ev in tr.history])
    assert probe_train.n > 20 and probe_sample.n > 20
    # The bound: < 100 ms from the click until the run has ended. Every widget change repaints and
    # flushes the whole viewer window (a GL canvas inside: 15–60 ms per flush under Mesa llvmpipe), so the
    # dock applies what the workers report in one repaint per 250 ms tick, shows no animated activity
    # indicator and no toasts, and does its numpy work in the workers. What the dock cannot control is CPU
    # time taken by other processes: on a shared, loaded machine the main thread (or the worker while it
    # holds the GIL) waits for a CPU. So: (1) always, every stall less the time the main thread or the
    # worker spent waiting for a CPU (Linux schedstat; the longer of the two) is < 100 ms; (2) the
    # wall-clock stall itself is < 100 ms when the machine had a CPU to spare (load average ≤ CPUs).
    bound = 0.1
    for what, p in (("training", probe_train), ("sampling", probe_sample)):
        assert p.worst_rest < bound, (f"main thread stalled {p.worst_rest * 1e3:.0f} ms during {what} (not "
                                      f"counting waits for a CPU): {p.summary()}")
        if max(load0, load) <= (os.cpu_count() or 1):
            assert p.worst < bound, f"main thread stalled {p.worst * 1e3:.0f} ms during {what}: {p.summary()}"
        else:
            print(f"  {what}: load average {max(load0, load):.1f} > {os.cpu_count()} CPUs: the wall-clock "
                  f"bound is not asserted (worst {p.worst * 1e3:.0f} ms)")


# --------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("size", [(1400, 900), (1600, 1000)])
def test_dock_fits_window(make_napari_viewer, qtbot, tmp_path, isolated_settings, size):
    """At napari's default dock width in a 1400×900 and a 1600×1000 window nothing in the dock is cut off:
    every visible widget lies inside the scroll area's viewport and no button is narrower than its text."""
    from conftest import has_display
    from qtpy.QtWidgets import QAbstractButton, QLabel, QWidget

    if not has_display():
        pytest.skip("no X display: run the GUI tests under xvfb-run")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*size)
    _, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    w.sections["data"].synth_btn.click()
    qtbot.waitUntil(lambda: w.state.sample is not None, timeout=60_000)
    g = w.sections["genes"]
    g.top_spin.setValue(3)
    g.top_btn.click()
    qtbot.wait(200)
    vp = w.viewport()
    assert w.width() >= w.minimumWidth() and w.widget().width() <= vp.width()
    bad = []
    for key, sec in w.sections.items():
        for ch in sec.findChildren(QWidget):
            if not ch.isVisibleTo(w.widget()):
                continue
            r = ch.rect().translated(ch.mapTo(w.widget(), ch.rect().topLeft()))
            if r.left() < 0 or r.right() > vp.width():  # beyond the dock's visible area
                bad.append((key, type(ch).__name__, r.left(), r.right(), vp.width()))
            pr = ch.parentWidget().rect()
            if ch.geometry().right() > pr.right() + 1:  # beyond its row
                bad.append((key, type(ch).__name__, ch.geometry().right(), pr.right()))
            text = ch.text() if isinstance(ch, (QAbstractButton, QLabel)) and not getattr(
                ch, "wordWrap", lambda: False)() else ""
            if text and ch.width() < ch.minimumSizeHint().width():  # a button or label cut short
                bad.append((key, text, ch.width(), ch.minimumSizeHint().width()))
    assert not bad, bad
    bar = w.verticalScrollBar()
    bar.setValue(min(bar.maximum(), w.sections["genes"].y()))
    qtbot.wait(100)
    viewer.window._qt_window.grab().save(str(tmp_path / f"dock_{size[0]}x{size[1]}.png"))


# --------------------------------------------------------------------------------------------- persistence
def test_widget_state_persists_between_sessions(shown_viewer, qtbot, isolated_settings):
    from napari_diffst._widgets import SuperResolveWidget

    w = open_dock(shown_viewer)
    tr, sm, gen, cmp_ = (w.sections[k] for k in ("train", "sample", "genes", "compare"))
    tr.budget_combo.setCurrentIndex(2)  # full: also sets its default steps/batch
    assert tr.steps_spin.value() == 40000 and tr.batch_spin.value() == 16
    tr.steps_spin.setValue(1234)
    gen.scale_spin.setValue(7)
    sm.steps_spin.setValue(25)
    sm.n_spin.setValue(3)
    sm.seed_spin.setValue(11)
    cmp_.set_baselines(["bicubic", "tesla"])
    cmp_.budget_combo.setCurrentText("tiny")
    tr.device_combo.setCurrentText("cpu")
    assert any(isolated_settings.rglob("*.conf")) or any(isolated_settings.rglob("*.ini"))
    # a new dock (a new napari session reads the same QSettings)
    w2 = SuperResolveWidget(shown_viewer)
    t2, s2, g2, c2 = (w2.sections[k] for k in ("train", "sample", "genes", "compare"))
    assert t2.budget == "full" and t2.steps_spin.value() == 1234 and t2.batch_spin.value() == 16
    assert g2.scale_spin.value() == 7 and w2.state.scale == 7
    assert (s2.steps_spin.value(), s2.n_spin.value(), s2.seed_spin.value()) == (25, 3, 11)
    assert c2.baselines() == ["bicubic", "tesla"] and c2.budget_combo.currentText() == "tiny"
    assert t2.device == "cpu" and w2.state.device == "cpu"
    w2.deleteLater()


# --------------------------------------------------------------------------------------------- cancel / close / errors
def _synthetic_ready(viewer, qtbot, n_genes=2):
    w = open_dock(viewer)
    w.sections["data"].synth_btn.click()
    qtbot.waitUntil(lambda: w.state.sample is not None, timeout=60_000)
    g = w.sections["genes"]
    g.top_spin.setValue(n_genes)
    g.top_btn.click()
    g.scale_spin.setValue(5)
    tr = w.sections["train"]
    tr.budget_combo.setCurrentIndex(0)
    tr.batch_spin.setValue(2)
    tr.patch_spin.setValue(4)
    return w


def test_cancel_resume_close_and_errors(shown_viewer, qtbot, tmp_path, isolated_settings, errors, monkeypatch):
    import gc

    import torch

    from napari_diffst.train.checkpoint import read_checkpoint

    torch.set_num_threads(1)
    viewer = shown_viewer
    w = _synthetic_ready(viewer, qtbot)
    tr = w.sections["train"]
    ck = tmp_path / "ck"
    tr.ckpt_edit.setText(str(ck))
    tr.steps_spin.setValue(60)
    layers_before = [ly.name for ly in viewer.layers]

    # Cancel stops within one step and keeps the checkpoint ------------------------------------------
    tr.train_btn.click()
    qtbot.waitUntil(lambda: any(ev.kind == "step" for ev in tr.history), timeout=60_000)
    at = tr.history[-1].step
    tr.cancel_btn.click()
    assert not tr.cancel_btn.isEnabled() and "Cancelling" in tr.eta_label.text()
    wait_idle(qtbot, tr)
    last = tr.history[-1]
    assert last.kind == "cancelled" and at <= last.step <= at + 1
    assert read_checkpoint(ck)["step"] == last.step and w.state.checkpoint == str(ck)
    assert "checkpoint kept" in tr.eta_label.text() and not w.state.busy
    gc.collect()
    assert tr.runner.job.info["model_ref"]() is None  # the trainer's model was freed (GPU memory released)
    assert [ly.name for ly in viewer.layers] == layers_before

    # Resume from the checkpoint: the step counter continues (same folder: allowed, it is the run itself) ---
    tr.resume_check.setChecked(True)
    tr.resume_edit.setText(str(ck))
    tr.steps_spin.setValue(last.step + 2)
    tr.train_btn.click()
    wait_idle(qtbot, tr)
    steps = [ev.step for ev in tr.history if ev.kind == "step"]
    assert steps == [last.step + 1, last.step + 2] and tr.history[-1].kind == "done"
    assert read_checkpoint(ck)["step"] == last.step + 2
    tr.resume_check.setChecked(False)

    # Errors become notifications with the fix; nothing is added or lost ----------------------------
    from napari_diffst import pipeline
    from napari_diffst.device import OutOfMemoryError, oom_message

    def oom(*a, **k):
        raise OutOfMemoryError(oom_message("training", batch_size=2, tile=4, tile_name="LR patch size (lr_size)"))

    # ck holds a checkpoint: the dock asks. Cancel starts nothing; Overwrite moves it aside, never deletes it
    asked = []
    tr.ask_existing_checkpoint = lambda out, have: asked.append((out, have["step"])) or "cancel"
    before = (ck / "model.pt").read_bytes()
    tr.train_btn.click()
    assert asked == [(ck, last.step + 2)] and not w.state.busy and "Not started" in tr.eta_label.text()
    assert (ck / "model.pt").read_bytes() == before
    n = len(errors)
    with monkeypatch.context() as mp:
        mp.setattr(pipeline, "make_trainer", oom)
        tr.ask_existing_checkpoint = lambda out, have: "overwrite"
        tr.train_btn.click()
        wait_idle(qtbot, tr)
    assert len(errors) == n + 1 and "reduce the batch size from 2 to 1" in errors[-1]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("ck.old-")]
    assert len(moved) == 1 and (moved[0] / "model.pt").read_bytes() == before and tr.out_dir == ck
    assert not (ck / "model.pt").exists() and read_checkpoint(moved[0])["step"] == last.step + 2
    assert not w.state.busy and tr.train_btn.isEnabled()
    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    sm = w.sections["sample"]
    sm.ckpt_edit.setText(str(bad))
    sm.run_btn.click()
    wait_idle(qtbot, sm)
    assert "cannot read checkpoint" in errors[-1] and "model.pt" in errors[-1]
    sm.ckpt_edit.setText(str(tmp_path / "missing"))
    sm.run_btn.click()
    assert "not found" in errors[-1]
    assert [ly.name for ly in viewer.layers] == layers_before and not w.state.busy

    # Closing the viewer during training asks first, then shuts the worker down cleanly ----------------
    tr.steps_spin.setValue(200)
    ck2 = tmp_path / "ck2"
    tr.ckpt_edit.setText(str(ck2))
    tr.train_btn.click()
    qtbot.waitUntil(lambda: any(ev.kind == "step" for ev in tr.history), timeout=60_000)
    asked = []
    w.confirm_close = lambda jobs: (asked.append([r.status for r in jobs]), False)[1]
    win = viewer.window._qt_window
    win.close()
    qtbot.wait(50)
    assert asked and "training" in asked[0][0] and win.isVisible() and tr.runner.running  # refused: goes on
    w.confirm_close = lambda jobs: (asked.append(len(jobs)), True)[1]
    runner = tr.runner
    viewer.close()  # napari's own close path (File ▸ Close Window): the same question, then a clean stop
    assert asked[-1] == 1 and runner.closed and runner.job.done.is_set() and runner.finished
    assert read_checkpoint(ck2)["step"] >= 1  # cancelled cleanly: the checkpoint was written


# --------------------------------------------------------------------------------------------- her2st C2
def test_her2st_c2_flow(shown_viewer, qtbot, tmp_path, her2st_dir, isolated_settings, errors):
    import torch

    from napari_diffst.data.registration import similarity_matrix, spot_errors_um
    from napari_diffst.data.sample import xy_affine_to_napari

    torch.set_num_threads(1)
    viewer = shown_viewer
    w = open_dock(viewer)
    st, sec = w.state, w.sections

    # 1 · load C2 through the Data section ------------------------------------------------------------
    sec["data"]._open_paths([her2st_dir / "C2"])
    qtbot.waitUntil(lambda: st.sample is not None, timeout=60_000)
    sample = st.sample
    assert sample.name == "C2" and sample.technology == "legacy_st"
    assert "187 spots" in sec["data"].info.text()
    he = st.histology_layer
    spots = st.spots_layer
    assert he is not None and spots is not None and he.rgb

    # 2 · register: metadata; a simulated misregistration fixed by auto-refine and by landmarks ------------
    reg = sec["register"]
    reg.meta_btn.click()
    wait_idle(qtbot, reg)
    good = reg.last_result.frac_on_tissue_after
    assert good > 0.95 and np.allclose(sample.transform, np.eye(3))
    xy = np.asarray(sample.adata.obsm["spatial"], float)
    um = sample.um_per_px
    T_bad = similarity_matrix(200 / um, -150 / um, 3.0, 1.0, center=tuple(xy.mean(0)))  # 250 µm off, 3° turned
    reg.apply_transform(sample, T_bad)
    assert np.allclose(spots.affine.affine_matrix, xy_affine_to_napari(T_bad, um))
    focus(viewer, spots, also=[he])
    shot(viewer, qtbot, "her2st_misregistered_canvas", canvas_only=True)

    reg.refine_btn.click()
    wait_idle(qtbot, reg)
    r = reg.last_result
    assert r.method == "refine"
    assert r.frac_on_tissue_before < good - 0.05 and r.frac_on_tissue_after > 0.9
    assert np.median(spot_errors_um(sample.transform, np.eye(3), xy, um)) < 40
    # the fraction of spots on tissue is reported once, as "before → after"
    assert reg.info.text().count("%") == 2 and "→" in reg.info.text() and not r.kept
    reg.undo_btn.click()
    assert np.allclose(sample.transform, T_bad)

    rng = np.random.default_rng(0)
    idx = [int(np.argmin(xy[:, 0])), int(np.argmax(xy[:, 0])), int(np.argmin(xy[:, 1])), int(np.argmax(xy[:, 1]))]
    spot_pts = xy[idx]
    img_pts = spot_pts + rng.normal(0, 3.0, spot_pts.shape)  # where a user clicks: the true place ± 2 µm
    reg.set_landmarks(img_pts, spot_pts)
    assert reg.table.rowCount() == 4 and reg.lm_result.rms_um < 5.0
    shot(viewer, qtbot, "her2st_landmarks", scroll_to=reg, widget=w)
    reg.apply_lm_btn.click()
    wait_idle(qtbot, reg)
    assert reg.last_result.method == "landmarks"
    assert np.max(spot_errors_um(sample.transform, np.eye(3), xy, um)) < 8.0
    assert reg.last_result.frac_on_tissue_after > 0.95
    for name in ("landmarks · H&E", "landmarks · spots"):
        viewer.layers.remove(name)
    # back to the metadata registration (exact for legacy ST) for the rest
    reg.meta_btn.click()
    wait_idle(qtbot, reg)
    assert np.allclose(sample.transform, np.eye(3))
    focus(viewer, spots, also=[he])
    shot(viewer, qtbot, "her2st_registered_canvas", canvas_only=True)

    # 3 · genes by name, scale 3 --------------------------------------------------------------------------
    gen = sec["genes"]
    assert len(gen.genes_in_list()) == sample.adata.n_vars
    gen.set_selected([])
    assert gen.add_genes(["erbb2", "KRT19", "mgp"])  # case-insensitive
    assert st.genes == ["ERBB2", "KRT19", "MGP"]
    gen.scale_spin.setValue(3)
    assert "HR pixel 66.7 µm" in gen.hr_label.text()
    gen.rank_combo.setCurrentIndex(1)  # Moran's I
    assert gen.ranking == "moran" and st.genes == ["ERBB2", "KRT19", "MGP"]  # checks survive re-ranking

    # 4 · train a few steps on self-supervised pairs ------------------------------------------------------
    tr = sec["train"]
    tr.budget_combo.setCurrentIndex(0)
    tr.steps_spin.setValue(3)
    tr.batch_spin.setValue(2)
    tr.patch_spin.setValue(4)
    tr.ckpt_edit.setText(str(tmp_path / "ck"))
    tr.train_btn.click()
    wait_idle(qtbot, tr)
    assert tr.history[-1].kind == "done"
    f_train = st.train_fields[0]
    assert f_train.extra.get("mode") == "degrade" and f_train.hr_um == pytest.approx(200.0, rel=1e-3)

    # 5 · super-resolve the observed spots (native) -------------------------------------------------------
    sm = sec["sample"]
    sm.steps_spin.setValue(3)
    sm.n_spin.setValue(1)
    sm.run_btn.click()
    wait_idle(qtbot, sm)
    assert sm.mode == "native"
    fld = sm.result.field
    assert fld.hr is None and fld.hr_um == pytest.approx(200 / 3, rel=1e-3) and fld.hr_shape == (51, 60)
    sr = sm.layers_for("sr")
    assert [ly.metadata["gene"] for ly in sr] == ["ERBB2", "KRT19", "MGP"]
    # true to the spots: the report is computed after Sample, shown in the dock and kept with the layers
    rep = sm.result.report
    assert rep is not None and rep["n_spots"] == 187
    assert rep["spot_pcc"] >= 0.95 and abs(rep["spot_bias"]) <= 0.05 and rep["masked_in_spots"] < 0.05
    txt = sm.report_text.text()
    assert txt.startswith("True to the spots (187)") and f"PCC {rep['spot_pcc']:.3f}" in txt and "lattice" in txt
    # and the self-check on this section one level coarser (3×3 blocks of its spots → its spots), shown below it
    sc = rep["self_check"]
    assert len(sc["beta"]) == 3 and "3×3 blocks" in sc["level"]
    assert "Self-check, one level coarser" in txt and f"block copy {sc['pcc']['nearest']:.3f}" in txt
    assert all(ly.metadata["spot_report"] is rep for ly in sr)
    e_sr, e_sp = sr[0].extent.world, spots.extent.world
    # the SR raster covers the spots (± one LR pixel) in µm
    assert np.all(np.abs(e_sr - e_sp) < 200 + sample.spot_diameter_um)
    spots.visible = False
    shot(viewer, qtbot, "her2st_sr_overlay_canvas", canvas_only=True)
    shot(viewer, qtbot, "her2st_sr_overlay", scroll_to=sm, widget=w)
    spots.visible = True

    # 6 · compare without truth (native), then on the benchmark grid (truth = the spots) --------------------
    cmp_ = sec["compare"]
    cmp_.set_baselines(["nearest", "bicubic"])
    cmp_.budget_combo.setCurrentText("tiny")
    cmp_.run_btn.click()
    wait_idle(qtbot, cmp_)
    assert cmp_.table.rowCount() == 0 and "no HR truth" in cmp_.status.text()
    # what the numbers were measured on: no truth here, the self-check one level coarser instead
    assert "No HR truth" in cmp_.scope.text() and "Self-check" in cmp_.scope.text()
    shown = sorted(ly.metadata["method"] for ly in viewer.layers if ly.visible)
    assert shown == ["Diff-ST", "LR", "bicubic", "nearest"]
    cmp_.grid_btn.setChecked(False)
    sm.target_combo.setCurrentIndex(2)  # benchmark: s×s blocks → spots
    sm.run_btn.click()
    wait_idle(qtbot, sm)
    assert sm.mode == "degrade" and sm.result.field.hr is not None
    assert sm.result.report is None and sm.report_text.text() == ""  # no spots to be true to on the benchmark grid
    cmp_.run_btn.click()
    wait_idle(qtbot, cmp_)
    vals = cmp_.table_values()
    assert list(vals) == ["Diff-ST", "nearest", "bicubic", "LR (nearest)"]
    assert all(np.isfinite(v["PCC"]) and -1 <= v["PCC"] <= 1 for v in vals.values())
    # scored on the section the model was trained on, against its own spots: the table says so
    assert "its own spots" in cmp_.scope.text() and "trained on this section" in cmp_.scope.text()
    assert vals["nearest"]["PCC"] == pytest.approx(vals["LR (nearest)"]["PCC"], abs=1e-3)
    assert sorted(ly.metadata["method"] for ly in viewer.layers if ly.visible) == \
        ["Diff-ST", "LR", "bicubic", "nearest", "truth"]
    shot(viewer, qtbot, "her2st_compare", scroll_to=cmp_, widget=w)
    assert not errors, errors
