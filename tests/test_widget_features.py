"""The Train section's "Histology features" box (model config ``hist_features``; issue #8).

Run under an X server: ``xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest tests/test_widget_features.py -q``."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def _train_section(viewer):
    _, w = viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    return w.sections["train"]


def test_histology_features_box_and_choice_reaches_training(make_napari_viewer, qtbot, tmp_path, isolated_settings,
                                                            monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    from napari_diffst._widgets import train_section as ts
    from napari_diffst.data.synthetic import make_synthetic
    from napari_diffst.feature_names import available_feature_extractors

    sec = _train_section(make_napari_viewer())
    combo = sec.features_combo
    keys = [combo.itemData(i) for i in range(combo.count())]
    assert keys == [k for k in available_feature_extractors() if k in ("learned", "handcrafted", "file")]
    assert keys[:3] == ["learned", "handcrafted", "file"] and sec.hist_features == "learned"
    assert combo.itemData(2, 3)  # a tooltip per item (Qt.ToolTipRole)

    # "file…" opens a file dialog; cancelling without an earlier file goes back to the previous choice
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: ("", "")))
    combo.setCurrentIndex(2)
    combo.activated.emit(2)
    assert sec.hist_features == "learned"
    model = tmp_path / "encoder.pt"
    model.write_bytes(b"x")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(model), "")))
    combo.setCurrentIndex(2)
    combo.activated.emit(2)
    assert sec.hist_features == f"file:{model}" and "encoder.pt" in combo.currentText()
    combo.setCurrentIndex(1)
    combo.activated.emit(1)
    assert sec.hist_features == "handcrafted"

    # Train passes the choice into the model config (model_overrides of the training worker)
    calls = []

    def fake_train_job(job, sample, genes, scale, *, model_overrides=None, **kw):
        calls.append(dict(kw, model_overrides=model_overrides))
        return iter(())

    class FakeRunner:
        def __init__(self, *a, **k):
            self.running = False

    monkeypatch.setattr(ts, "train_job", fake_train_job)
    monkeypatch.setattr(ts, "JobRunner", FakeRunner)
    sec.state.set_sample(make_synthetic(seed=0, size_um=(800, 800)))
    sec.state.set_genes(list(sec.state.sample.hr_truth["genes"][:2]))
    sec.ckpt_edit.setText(str(tmp_path / "run"))
    sec.start()
    assert calls and calls[-1]["model_overrides"] == {"hist_features": "handcrafted"}
    sec.state.set_busy(False)

    # the choice is remembered for the next session
    sec2 = _train_section(make_napari_viewer())
    assert sec2.hist_features == "handcrafted"
