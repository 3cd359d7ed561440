"""What the dock says (issue 17): Open folder on an empty or foreign folder explains what was expected; Sample
shows an ETA and clears its bar after a failure."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_widget import _synthetic_ready, errors, open_dock, wait_idle  # noqa: F401  (fixtures)


@pytest.mark.parametrize("what", ["empty", "foreign"])
def test_open_folder_explains_what_it_expected(shown_viewer, qtbot, tmp_path, isolated_settings, errors, what):
    d = tmp_path / what
    d.mkdir()
    if what == "foreign":
        (d / "notes.txt").write_text("not a dataset")
        (d / "table.csv").write_text("a,b\n1,2\n")
    w = open_dock(shown_viewer)
    n = len(shown_viewer.layers)
    w.sections["data"]._open_paths([str(d)])
    assert errors, "no notification"
    msg = errors[-1]
    assert str(d) in msg and "not a recognised spatial-transcriptomics dataset" in msg
    assert "Space Ranger outs folder" in msg and "refused" not in msg
    assert len(shown_viewer.layers) == n


def test_sample_eta_and_bar_after_failure(shown_viewer, qtbot, tmp_path, isolated_settings, errors):
    from napari_diffst.cli import main as cli_main

    ck = tmp_path / "ck"
    assert cli_main(["train", "--data", "synthetic", "--scale", "5", "--n-genes", "2", "--budget", "tiny",
                     "--steps", "2", "--batch-size", "2", "--lr-size", "2", "--out", str(ck)]) == 0
    w = _synthetic_ready(shown_viewer, qtbot)
    sm = w.sections["sample"]
    sm.ckpt_edit.setText(str(ck))
    sm.steps_spin.setValue(4)
    sm.n_spin.setValue(2)
    sm.run_btn.click()
    wait_idle(qtbot, sm)
    assert sm.result is not None
    # the bar's text during the run ends like this (the last step's): step count and an ETA, as Train has
    assert "step 8/8" in sm.progress.format() and "ETA 0:00" in sm.progress.format(), sm.progress.format()
    # a failing run: the bar says so instead of keeping the last run's step count / "super-resolving"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    sm.ckpt_edit.setText(str(bad))
    sm.run_btn.click()
    wait_idle(qtbot, sm)
    assert "truncated or not a napari-diffst checkpoint" in errors[-1] and "model.pt" in errors[-1]
    fmt = sm.progress.format()
    assert fmt.startswith("failed") and "super-resolving" not in fmt and "ETA" not in fmt
    assert sm.progress.value() == 0


def _drop(w, paths, modifiers=None) -> bool:
    """Deliver a drop of ``paths`` to the dock's event filter on napari's QtViewer, as Qt does for a real drop
    (Qt routes synthetic Drop events only to an active drag's target, so the filter is called directly)."""
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    ev = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                    modifiers if modifiers is not None else Qt.KeyboardModifier.NoModifier)
    return w.eventFilter(w._qt_viewer, ev)


def test_dropping_a_section_folder_opens_it_with_napari_diffst(shown_viewer, qtbot, her2st_dir, isolated_settings,
                                                             errors, monkeypatch):
    """A legacy-ST folder dropped on the canvas (dock open) opens with napari-diffst: no 'Choose reader' dialog
    (napari preselected its builtins there, which fail on a section folder)."""
    import napari._qt.qt_viewer as QV

    asked = []
    monkeypatch.setattr(QV, "handle_gui_reading", lambda *a, **k: asked.append(a))
    w = open_dock(shown_viewer)
    n = len(shown_viewer.layers)
    assert w._qt_viewer is shown_viewer.window._qt_viewer  # the filter sits on napari's QtViewer itself
    assert _drop(w, [her2st_dir / "C2"]) is True  # handled: napari's dropEvent (and its dialog) never runs
    qtbot.waitUntil(lambda: w.state.sample is not None, timeout=30_000)
    assert not asked and not errors
    roles = [ly.metadata.get("diffst_role") for ly in list(shown_viewer.layers)[n:]]
    assert roles == ["histology", "spots"]
    # what napari-diffst cannot read, and Alt-drops (choose the reader), are left to napari
    from qtpy.QtCore import Qt

    assert _drop(w, [her2st_dir]) is False  # a folder of sections, not one section
    assert _drop(w, [her2st_dir.parent / "__not_there__"]) is False
    assert _drop(w, [her2st_dir / "C3"], Qt.KeyboardModifier.AltModifier) is False


def test_reader_patterns_claim_only_what_it_reads():
    import yaml

    from napari_diffst import _reader

    man = yaml.safe_load((Path(_reader.__file__).parent / "napari.yaml").read_text())
    pats = man["contributions"]["readers"][0]["filename_patterns"]
    assert "*" not in pats and all(p.startswith("*.") for p in pats)


def test_combo_boxes_show_their_whole_text(shown_viewer, qtbot, isolated_settings):
    """No combo box in the dock cuts its current text (issue 17: 'auto (truth if known, else nativ')."""
    from qtpy.QtWidgets import QComboBox, QStyle, QStyleOptionComboBox

    w = open_dock(shown_viewer)
    qtbot.wait(200)
    sm = w.sections["sample"]
    checked = 0
    for combo in [sm.target_combo, sm.blend_combo]:
        for i in range(combo.count()):
            combo.setCurrentIndex(i)
            opt = QStyleOptionComboBox()
            combo.initStyleOption(opt)
            field = combo.style().subControlRect(QStyle.ComplexControl.CC_ComboBox, opt,
                                                 QStyle.SubControl.SC_ComboBoxEditField, combo)
            need = combo.fontMetrics().horizontalAdvance(combo.currentText())
            assert need <= field.width(), (combo.currentText(), need, field.width())
            checked += 1
    assert checked >= 5 and isinstance(sm.target_combo, QComboBox)
