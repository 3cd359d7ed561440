"""Small Qt helpers shared by the dock sections."""
from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPixmap, QTextLayout, QTextOption
from qtpy.QtWidgets import (QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QProgressBar, QSizePolicy,
                            QVBoxLayout, QWidget)


class Section(QGroupBox):
    """One numbered step of the dock; subclasses fill ``self.form``."""

    def __init__(self, title: str, viewer, state, parent: QWidget | None = None):
        super().__init__(title, parent)
        self.viewer = viewer
        self.state = state
        self._outer = QVBoxLayout(self)
        self._outer.setContentsMargins(6, 6, 6, 6)
        self.form = QFormLayout()
        # a row whose field does not fit beside its label puts the field under the label: the dock stays
        # readable at its minimum width (nothing clipped) and uses two columns when there is room
        self.form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
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


def progress_bar() -> QProgressBar:
    """The progress bar of a section's run (in the dock, next to its buttons; fixed height, no busy
    animation: the range is never 0…0). Update it with :func:`set_bar`."""
    bar = QProgressBar()
    bar.setRange(0, 1)
    bar.setValue(0)
    bar.setTextVisible(True)
    bar.setFormat("idle")
    bar.setFixedHeight(max(16, bar.fontMetrics().height() + 4))
    bar.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return bar


def set_bar(bar: QProgressBar, value: int | None = None, maximum: int | None = None, text: str | None = None):
    """Change a progress bar with a single *deferred* repaint. ``QProgressBar.setValue`` repaints at once
    (synchronously), and with a GL canvas in the window every repaint is a full window flush (15–60 ms on
    software GL); with updates disabled meanwhile, re-enabling them schedules one ordinary update that Qt
    merges with the other widgets changed in the same event-loop turn."""
    bar.setUpdatesEnabled(False)
    try:
        if maximum is not None and int(maximum) != bar.maximum():
            bar.setMaximum(max(1, int(maximum)))
        if value is not None:
            bar.setValue(max(bar.minimum(), min(int(value), bar.maximum())))
        if text is not None and text != bar.format():
            bar.setFormat(text)
    finally:
        bar.setUpdatesEnabled(True)


def _text_option() -> QTextOption:
    opt = QTextOption()
    opt.setWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
    opt.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
    return opt


class StatusText(QWidget):
    """A grey, word-wrapped status line for text that changes during a run (QLabel-like: ``text()``,
    ``setText()``).

    A ``QLabel.setText`` always asks the dock's layout to recompute (``updateGeometry``), which costs a
    second window flush per change. This widget paints its text itself and keeps a fixed height of at
    least ``lines`` lines; only a text that needs more lines than it has (a long error message) changes
    its height."""

    COLOR = "#b0b0b0"

    def __init__(self, text: str = "", lines: int = 2, parent: QWidget | None = None):
        super().__init__(parent)
        self._text = ""
        self._lines = max(1, int(lines))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setText(text)

    def text(self) -> str:
        return self._text

    def setText(self, text) -> None:  # noqa: N802 - QLabel's name
        text = str(text).replace("\n", "\u2028")
        if text == self._text:
            return
        self._text = text
        self._fit()
        self.update()

    def _n_lines(self, width: int) -> int:
        if not self._text:
            return 0
        lay = QTextLayout(self._text, self.font())
        lay.setTextOption(_text_option())
        lay.beginLayout()
        n = 0
        while True:
            line = lay.createLine()
            if not line.isValid():
                break
            line.setLineWidth(max(10, width))
            n += 1
        lay.endLayout()
        return n

    def _fit(self) -> None:
        w = self.width() if self.isVisible() and self.width() > 50 else 420
        h = max(self._lines, self._n_lines(w)) * self.fontMetrics().lineSpacing() + 4
        if self.minimumHeight() != h or self.maximumHeight() != h:
            self.setFixedHeight(h)

    def resizeEvent(self, event):  # noqa: N802 - Qt name
        super().resizeEvent(event)
        if event.size().width() != event.oldSize().width():
            self._fit()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt name
        return QSize(60, self.minimumHeight())

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt name
        return QSize(300, self.minimumHeight())

    def paintEvent(self, event):  # noqa: N802 - Qt name
        p = QPainter(self)
        try:
            p.setPen(QColor(self.COLOR))
            p.drawText(QRectF(self.rect()).adjusted(0, 2, 0, 0), self._text, _text_option())
        finally:
            p.end()


class ImageView(QWidget):
    """A fixed-height area showing a pixmap centred (or a grey placeholder text): ``setPixmap`` only
    repaints this widget (a ``QLabel`` would relayout the dock for every new image)."""

    def __init__(self, height: int, placeholder: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self._pixmap = None
        self._placeholder = placeholder
        self.setFixedHeight(int(height))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def pixmap(self):
        return self._pixmap

    def setPixmap(self, pm: QPixmap) -> None:  # noqa: N802 - QLabel's name
        self._pixmap = pm
        self.update()

    def setText(self, text: str) -> None:  # noqa: N802 - QLabel's name
        """Placeholder shown while there is no pixmap."""
        self._placeholder = str(text)
        if self._pixmap is None:
            self.update()

    def clear(self) -> None:
        self._pixmap = None
        self.update()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt name
        return QSize(self.height(), self.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt name
        return QSize(60, self.height())

    def paintEvent(self, event):  # noqa: N802 - Qt name
        p = QPainter(self)
        try:
            pm = self._pixmap
            if pm is not None and not pm.isNull():
                x = (self.width() - pm.width()) / 2
                y = (self.height() - pm.height()) / 2
                p.drawPixmap(QPointF(max(0.0, x), max(0.0, y)), pm)
            elif self._placeholder:
                p.setPen(QColor(StatusText.COLOR))
                p.drawText(QRectF(self.rect()), int(Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap),
                           self._placeholder)
        finally:
            p.end()


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


def save_later(pairs) -> None:
    """Save ``(key, value)`` settings right after the current event: each :func:`.settings.save` writes and
    syncs the settings file (1–20 ms, more under I/O load), which a click that starts a run should not wait
    for."""
    from qtpy.QtCore import QTimer

    from . import settings

    items = list(pairs)

    def run():
        for k, v in items:
            settings.save(k, v)

    QTimer.singleShot(0, run)


def row(*widgets, stretch=None) -> QWidget:
    """Widgets side by side in one form row (``stretch``: index of the one that takes the extra width)."""
    w = QWidget()
    h = QHBoxLayout(w)
    h.setContentsMargins(0, 0, 0, 0)
    for i, x in enumerate(widgets):
        h.addWidget(x, 1 if i == stretch else 0)
    return w
