"""The dock tiles automatically above the memory budget (issue 17, blocker 3), in a shown viewer."""
from __future__ import annotations

import numpy as np


def test_dock_sample_tiles_automatically(shown_viewer, qtbot, tmp_path, isolated_settings, monkeypatch):
    import napari_diffst.tiling as T
    from napari_diffst.cli import main as cli_main

    ck = tmp_path / "run"
    assert cli_main(["train", "--data", "synthetic", "--scale", "4", "--n-genes", "2", "--budget", "tiny",
                     "--steps", "1", "--batch-size", "2", "--lr-size", "2", "--out", str(ck)]) == 0
    monkeypatch.setattr(T, "untiled_budget_mb", lambda: 0.001)  # any section is "too large" untiled
    viewer = shown_viewer
    _, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    w.sections["data"].synth_btn.click()
    qtbot.waitUntil(lambda: w.state.sample is not None, timeout=60_000)
    sm = w.sections["sample"]
    sm.ckpt_edit.setText(str(ck))
    sm.steps_spin.setValue(2)
    sm.n_spin.setValue(1)
    descs = []
    orig = sm._on_event

    def spy(d):
        if d["kind"] == "progress":
            descs.append(d.get("desc"))
        orig(d)

    monkeypatch.setattr(sm, "_on_event", spy)
    qtbot.waitUntil(lambda: sm.run_btn.isEnabled(), timeout=30_000)
    sm.run_btn.click()
    qtbot.waitUntil(lambda: sm.result is not None and not sm.queue.busy and not w.state.busy, timeout=120_000)
    assert descs and all(d.startswith("napari-diffst: tiles ") for d in descs)
    sr = sm.layers_for("sr")
    fld = sm.result.field
    assert len(sr) == 2 and sm.mode == "native" and fld.extra["tiled"]["auto"]
    a = np.asarray(sr[0].data)
    assert a.shape == fld.hr_shape and np.isfinite(a[fld.hr_mask]).all() and np.isnan(a[~fld.hr_mask]).all()
    qtbot.waitUntil(lambda: "Added 2 gene layers" in sm.status.text(), timeout=30_000)
    from PIL import Image

    shot = viewer.screenshot(canvas_only=False)  # looked at during development: the tiled maps lie on the tissue
    Image.fromarray(shot).save(tmp_path / "autotile_dock.png")
    assert shot.shape[0] > 0
