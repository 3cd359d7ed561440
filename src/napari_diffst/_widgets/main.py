"""The "Super-resolve ST" dock: sections a user walks through top to bottom."""
from __future__ import annotations

from qtpy.QtWidgets import QLabel, QScrollArea, QVBoxLayout, QWidget

from .state import DockState


def _section_classes():
    from .data_section import DataSection

    classes = [DataSection]
    # Later sections register themselves here as they are built.
    for modname, clsname in (
        ("register_section", "RegisterSection"),
        ("genes_section", "GenesSection"),
        ("train_section", "TrainSection"),
        ("sample_section", "SampleSection"),
        ("compare_section", "CompareSection"),
    ):
        try:
            mod = __import__(f"{__package__}.{modname}", fromlist=[clsname])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(modname):
                continue
            raise
        classes.append(getattr(mod, clsname))
    return classes


class SuperResolveWidget(QScrollArea):
    """Dock widget. npe2 passes the viewer as ``napari_viewer``."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = DockState()
        inner = QWidget()
        lay = QVBoxLayout(inner)
        lay.setContentsMargins(4, 4, 4, 4)
        title = QLabel("<b>Super-resolve ST</b> — Diff-ST: histology-guided super-resolution of gene maps")
        title.setWordWrap(True)
        lay.addWidget(title)
        self.sections = {}
        for cls in _section_classes():
            sec = cls(napari_viewer, self.state, parent=inner)
            key = cls.__name__.replace("Section", "").lower()
            self.sections[key] = sec
            lay.addWidget(sec)
        lay.addStretch(1)
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setMinimumWidth(360)

    def section(self, key: str):
        return self.sections[key]
