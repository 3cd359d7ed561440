"""Sample then Compare in a shown viewer: one layer per (method, gene), one naming scheme (issue 17, item 16).

Before, Compare added "Diff-ST · ERBB2" next to Sample's "ERBB2 · Diff-ST" (the same map twice), and a second
comparison or a second Sample run added every map again."""
from __future__ import annotations

from collections import Counter

import pytest

from conftest import save_screenshot

pytestmark = pytest.mark.gui


def _wait_idle(qtbot, section, timeout=180_000):
    def done():
        r = section.runner
        assert r is not None and r.finished and not section.queue.busy
    qtbot.waitUntil(done, timeout=timeout)
    qtbot.wait(50)


def _maps(viewer):
    """(gene, method) of every gene-map layer, by layer name."""
    out = []
    for ly in viewer.layers:
        role = str(ly.metadata.get("diffst_role", ""))
        if role in ("sr", "compare"):
            gene, method = ly.name.split(" · ", 1)
            out.append((gene, method))
    return out


def test_sample_then_compare_one_layer_per_method_and_gene(shown_viewer, qtbot, tmp_path, isolated_settings):
    import torch

    from napari_diffst._widgets import workers as W
    from napari_diffst.layer_data import map_layer_name

    torch.set_num_threads(1)
    viewer = shown_viewer
    dw, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    st, sec = w.state, w.sections
    sec["data"].synth_btn.click()
    qtbot.waitUntil(lambda: st.sample is not None, timeout=60_000)
    gen = sec["genes"]
    gen.top_spin.setValue(2)
    gen.top_btn.click()
    genes = list(st.genes)
    assert len(genes) == 2
    # a tiny checkpoint, trained headless (the Train section is tested elsewhere)
    ck = tmp_path / "ck"
    list(W.train_job(W.Job("train"), st.sample, genes, st.scale, budget="tiny", steps=2, batch_size=2, lr_size=4,
                     out_dir=ck))
    sm = sec["sample"]
    sm.ckpt_edit.setText(str(ck))
    sm.steps_spin.setValue(2)
    sm.n_spin.setValue(1)
    qtbot.waitUntil(lambda: sm.run_btn.isEnabled(), timeout=30_000)
    sm.run_btn.click()
    _wait_idle(qtbot, sm)
    assert sorted(ly.name for ly in sm.layers_for("sr")) == sorted(map_layer_name(g) for g in genes)

    cmp_ = sec["compare"]
    cmp_.set_baselines(["nearest", "bicubic"])
    cmp_.budget_combo.setCurrentText("tiny")
    for run in range(2):  # a second comparison updates the layers, it does not add them again
        qtbot.waitUntil(lambda: cmp_.run_btn.isEnabled(), timeout=30_000)
        cmp_.run_btn.click()
        _wait_idle(qtbot, cmp_)
        cmp_.gene_combo.setCurrentText(genes[1])  # the other gene's layers are added when first shown
        qtbot.waitUntil(lambda: not cmp_.queue.busy and len(cmp_.layers) == 2 * len(cmp_.methods()),
                        timeout=60_000)
        qtbot.wait(50)
        maps = _maps(viewer)
        dup = {k: n for k, n in Counter(maps).items() if n > 1}
        print(f"\nrun {run + 1}: {len(maps)} map layers: {sorted(set(maps))}")
        assert not dup, f"duplicated (gene, method) layers: {dup}"
        methods = set(cmp_.methods())
        assert {(g, m) for g in genes for m in methods} <= set(maps)
        assert "Diff-ST" in methods
        # the Diff-ST cell of the grid is the Sample section's own layer
        d = cmp_.layers[(genes[1], "Diff-ST")]
        assert d in sm.layers_for("sr") and d.name == map_layer_name(genes[1])
        # every name follows "<gene> · <method>"
        assert all(ly.name == map_layer_name(ly.metadata["gene"], ly.metadata["method"])
                   for ly in cmp_.layers.values())
    visible = [ly for ly in viewer.layers if ly.visible]
    assert sorted(ly.name for ly in visible) == sorted(map_layer_name(genes[1], m) for m in cmp_.methods())
    save_screenshot(viewer.screenshot(canvas_only=False, flash=False), "compare_one_layer_per_method")
    # a second Sample run replaces its layers too
    qtbot.waitUntil(lambda: sm.run_btn.isEnabled(), timeout=30_000)
    cmp_.grid_btn.setChecked(False)
    sm.run_btn.click()
    _wait_idle(qtbot, sm)
    maps = _maps(viewer)
    assert not {k: n for k, n in Counter(maps).items() if n > 1}
    names = [ly.name for ly in viewer.layers]
    assert len(names) == len(set(names))
