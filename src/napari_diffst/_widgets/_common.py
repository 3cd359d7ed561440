"""Small Qt helpers shared by the dock sections."""
from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget


class Section(QGroupBox):
    """One numbered step of the dock; subclasses fill ``self.form``."""

    def __init__(self, title: str, viewer, state, parent: QWidget | None = None):
        super().__init__(title, parent)
        self.viewer = viewer
        self.state = state
        self._outer = QVBoxLayout(self)
        self._outer.setContentsMargins(6, 6, 6, 6)
        self.form = QFormLayout()
        self._outer.addLayout(self.form)

    def add_row(self, label: str | None, widget: QWidget):
        if isinstance(widget, QComboBox):
            narrow_combo(widget)
        if label is None:
            self.form.addRow(widget)
        else:
            # a plain "&" in a form label is a Qt mnemonic ("H&E" would show as "HE"): escape it
            self.form.addRow(label.replace("&", "&&"), widget)
        return widget

    def add_widget(self, widget: QWidget):
        self._outer.addWidget(widget)
        return widget


def narrow_combo(combo: QComboBox, min_chars: int = 8) -> QComboBox:
    """Let a combo box shrink below its longest item (long layer names must not widen the dock)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(min_chars)
    return combo


def info_label(text: str = "") -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    lab.setStyleSheet("color: #b0b0b0;")
    return lab


def notify_error(exc: BaseException | str) -> None:
    """Show an error as a napari notification (never a silent failure)."""
    from napari.utils.notifications import show_error

    show_error(str(exc))


def notify_info(msg: str) -> None:
    from napari.utils.notifications import show_info

    show_info(msg)


def notify_warning(msg: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(msg)


def row(*widgets, stretch=None) -> QWidget:
    """Widgets side by side in one form row (``stretch``: index of the one that takes the extra width)."""
    w = QWidget()
    h = QHBoxLayout(w)
    h.setContentsMargins(0, 0, 0, 0)
    for i, x in enumerate(widgets):
        h.addWidget(x, 1 if i == stretch else 0)
    return w
