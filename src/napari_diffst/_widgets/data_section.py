"""Section 1 — Data: pick the H&E and ST layers already in the viewer, or open files."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QPushButton, QWidget

from . import settings
from ._common import Section, info_label, notify_error


def sample_of(layer):
    """The core Sample a layer was made from (readers store it in layer metadata)."""
    if layer is None:
        return None
    from .state import unwrap

    return unwrap(layer.metadata.get("diffst_sample"))


class DataSection(Section):
    def __init__(self, viewer, state, parent=None):
        super().__init__("1 · Data", viewer, state, parent)
        self.he_combo = self.add_row("H&E layer", QComboBox())
        self.st_combo = self.add_row("ST layer", QComboBox())
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        self.open_btn = QPushButton("Open files…")
        self.open_dir_btn = QPushButton("Open folder…")
        self.synth_btn = QPushButton("Synthetic")
        self.synth_btn.setToolTip("Open the seeded synthetic H&E + ST sample (File › Open Sample)")
        for b in (self.open_btn, self.open_dir_btn, self.synth_btn):
            h.addWidget(b)
        self.add_row(None, row)
        self.info = self.add_row(None, info_label("No ST data yet: drop a Visium/ST folder, an .h5ad, or open the synthetic sample."))

        self.open_btn.clicked.connect(self._open_files)
        self.open_dir_btn.clicked.connect(self._open_folder)
        self.synth_btn.clicked.connect(self._open_synthetic)
        self.st_combo.currentIndexChanged.connect(self._on_choice)
        self.he_combo.currentIndexChanged.connect(self._on_choice)
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.connect(self._refresh)
        self._refresh()

    # -- layer lists -------------------------------------------------------------------------
    def _refresh(self, *_):
        from napari.layers import Image, Points

        def fill(combo, layers):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            for ly in layers:
                combo.addItem(ly.name)
            idx = combo.findText(cur)
            if idx >= 0:
                combo.setCurrentIndex(idx)
            combo.blockSignals(False)

        fill(self.he_combo, [ly for ly in self.viewer.layers if isinstance(ly, Image) and ly.rgb])
        fill(self.st_combo, [ly for ly in self.viewer.layers if isinstance(ly, Points) and sample_of(ly) is not None])
        self._on_choice()

    def _layer(self, name):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_choice(self, *_):
        st = self._layer(self.st_combo.currentText())
        he = self._layer(self.he_combo.currentText())
        sample = sample_of(st) or sample_of(he)
        if sample is self.state.sample and st is self.state.spots_layer and he is self.state.histology_layer:
            return
        if sample is not None and he is None:
            # prefer the H&E layer made from the same sample
            for ly in self.viewer.layers:
                if ly.metadata.get("diffst_role") == "histology" and sample_of(ly) is sample:
                    he = ly
                    self.he_combo.setCurrentText(ly.name)
        self.state.set_sample(sample, he, st)
        self.info.setText(self.describe(sample))

    @staticmethod
    def describe(sample) -> str:
        if sample is None:
            return "No ST layer selected."
        return (f"<b>{sample.name}</b> — {sample.technology}<br>{sample.n_spots} spots × {sample.adata.n_vars} genes"
                f"<br>{sample.um_per_px:.3f} µm/px, spot Ø {sample.spot_diameter_um:g} µm"
                + (f", pitch {sample.lattice_pitch_um:g} µm" if sample.lattice_pitch_um else ""))

    # -- opening ------------------------------------------------------------------------------
    def _open_paths(self, paths):
        paths = [str(p) for p in paths if p]
        if not paths:
            return
        settings.save("last_data_dir", str(Path(paths[0]).parent))
        from .._reader import get_reader

        try:
            for p in paths:
                if get_reader(p) is None:
                    # napari would only say it "refused the file": the reader says what it expected instead
                    from ..io import read

                    read(p)
                self.viewer.open(p, plugin="napari-diffst")
        except Exception as exc:  # reader errors carry the file, problem and expected form
            notify_error(getattr(exc, "original_error", None) or exc)  # napari's ReaderPluginError wraps ours
            return
        self._select_newest_spots()

    def _select_newest_spots(self):
        """Refresh the layer lists and choose the most recently added spots layer."""
        self._refresh()
        for ly in reversed(list(self.viewer.layers)):
            if ly.metadata.get("diffst_role") == "spots":
                self.st_combo.setCurrentText(ly.name)
                break

    def _open_files(self):
        start = settings.load("last_data_dir", str(Path.home()))
        paths, _ = QFileDialog.getOpenFileNames(self, "Open ST data or histology", start,
                                                "ST / histology (*.h5ad *.h5 *.tsv *.gz *.tif *.tiff *.svs *.jpg *.png);;All files (*)")
        self._open_paths(paths)

    def _open_folder(self):
        start = settings.load("last_data_dir", str(Path.home()))
        p = QFileDialog.getExistingDirectory(self, "Open a Space Ranger outs / ST section folder", start)
        self._open_paths([p])

    def _open_synthetic(self):
        try:
            self.viewer.open_sample("napari-diffst", "synthetic")
        except Exception as exc:
            notify_error(exc)
            return
        self._select_newest_spots()
