"""A live loss plot (one line per loss term) painted with QPainter, cheap enough for the main thread.

matplotlib's Qt canvas cost 50–150 ms for a full draw of a small figure on a loaded CPU (mostly text) and
needed a cached background; this widget paints axes, decade ticks, the legend and the lines with
QPainter in a few milliseconds and has no state to keep in sync with a renderer. x spans the whole run
(0…total steps), y is a fixed logarithmic range (10⁻³…10¹, widened by whole decades if a loss leaves it).
Long runs are decimated to about two points per pixel column when painted.

``add(step, losses)`` only stores values; the owner calls :meth:`update_now` when it refreshes the dock
(the Train section does so from its single UI timer, so the plot, the status text and the progress bar are
repainted together, in one window update)."""
from __future__ import annotations

import math
import time

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QFontMetrics, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

#: logged values that are not loss terms (not plotted)
SKIP_TERMS = ("grad_norm",)
_SUP = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def nice_step(span: float, max_ticks: int = 5) -> int:
    """An integer tick step 1, 2, 5 × 10^k giving at most ``max_ticks`` intervals over ``span``."""
    span = max(float(span), 1.0)
    raw = span / max(1, max_ticks)
    k = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if m * k >= raw:
            return max(1, int(round(m * k)))
    return max(1, int(round(10 * k)))


class LossPlot(QWidget):
    """Training losses vs step (log y). ``series``: term → (steps, values)."""

    COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176")
    YLIM = (1e-3, 1e1)
    BG, AXIS, TEXT = "#262930", "#8a8f98", "#d0d0d0"

    def __init__(self, parent=None, height_px: int = 150):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(int(height_px))
        self.setMinimumWidth(160)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent, True)
        self._font = QFont(self.font())
        self._font.setPointSizeF(max(6.5, self._font.pointSizeF() * 0.8))
        self._fm = QFontMetrics(self._font)
        self.series: dict[str, tuple[list, list]] = {}
        self.colors: dict[str, str] = {}
        self.xmax = 1
        self.ylim = list(self.YLIM)
        self._dirty = False
        self.n_draws = 0       # updates requested with new data (update_now)
        self.n_full = 0        # axis-range changes (x or y)
        self.n_paints = 0      # paint events (only while the plot is on screen)
        self.last_update_s = 0.0   # duration of the last paint

    # -- data ----------------------------------------------------------------------------------
    def set_total(self, total: int) -> None:
        """The x axis spans the whole run."""
        self.xmax = max(1, int(total))
        self.n_full += 1
        self._dirty = True

    def clear(self):
        self.series.clear()
        self.colors.clear()
        self.ylim = list(self.YLIM)
        self._dirty = True

    def add(self, step: int, losses: dict) -> None:
        for k, v in sorted((losses or {}).items(), key=lambda kv: kv[0] != "loss"):  # the total first
            if k in SKIP_TERMS or v is None or not math.isfinite(float(v)):
                continue
            if k not in self.series:
                self.colors[k] = self.COLORS[len(self.colors) % len(self.COLORS)]
            xs, ys = self.series.setdefault(k, ([], []))
            xs.append(int(step))
            ys.append(float(v))
        self._dirty = True

    def _fit_ranges(self) -> None:
        pos = [y for _, ys in self.series.values() for y in ys[-64:] if y > 0]  # new values only matter
        lo, hi = self.ylim
        if pos:
            if min(pos) < lo or max(pos) > hi:
                self.ylim = [min(lo, 10 ** math.floor(math.log10(min(pos)))),
                             max(hi, 10 ** math.ceil(math.log10(max(pos))))]
                self.n_full += 1
            xmax = max(xs[-1] for xs, _ in self.series.values() if xs)
            if xmax > self.xmax:
                self.xmax = int(xmax * 2)
                self.n_full += 1

    def update_now(self) -> None:
        """Schedule a repaint if anything changed since the last one (cheap; painting happens in Qt's next
        window update, together with the other widgets changed in the same event-loop turn)."""
        if not self._dirty:
            return
        self._dirty = False
        self._fit_ranges()
        self.n_draws += 1
        self.update()

    # backwards-compatible name
    redraw = update_now

    def legend_text(self) -> str:
        return "  ".join(f"━ {k} {ys[-1]:.3g}" for k, (_, ys) in self.series.items() if ys)

    # -- painting ------------------------------------------------------------------------------
    def _plot_rect(self) -> QRectF:
        lh = self._fm.height()
        left = self._fm.horizontalAdvance("10⁻³") + 10
        return QRectF(left, lh + 4, max(10.0, self.width() - left - 14), max(10.0, self.height() - 2 * lh - 10))

    def paintEvent(self, event):  # noqa: N802 - Qt name
        t0 = time.perf_counter()
        p = QPainter(self)
        try:
            p.fillRect(self.rect(), QColor(self.BG))
            p.setFont(self._font)
            r = self._plot_rect()
            fm = self._fm
            lo, hi = (math.log10(v) for v in self.ylim)
            xspan = float(max(1, self.xmax))

            def ymap(v):
                return r.bottom() - (math.log10(v) - lo) / max(hi - lo, 1e-9) * r.height()

            # y: one tick per decade
            axis_pen = QPen(QColor(self.AXIS))
            grid_pen = QPen(QColor(self.AXIS))
            grid_pen.setStyle(Qt.PenStyle.DotLine)
            for d in range(int(math.floor(lo)), int(math.ceil(hi)) + 1):
                y = ymap(10.0 ** d)
                if y < r.top() - 0.5 or y > r.bottom() + 0.5:
                    continue
                p.setPen(grid_pen)
                p.drawLine(QPointF(r.left(), y), QPointF(r.right(), y))
                p.setPen(QColor(self.TEXT))
                lab = "1" if d == 0 else ("10" if d == 1 else f"10{str(d).translate(_SUP)}")
                p.drawText(QRectF(0, y - fm.height() / 2, r.left() - 4, fm.height()),
                           int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), lab)
            # x: integer steps
            step = nice_step(xspan)
            p.setPen(QColor(self.TEXT))
            for x in range(0, int(xspan) + 1, step):
                px = r.left() + x / xspan * r.width()
                p.setPen(axis_pen)
                p.drawLine(QPointF(px, r.bottom()), QPointF(px, r.bottom() + 3))
                p.setPen(QColor(self.TEXT))
                p.drawText(QRectF(px - 40, r.bottom() + 3, 80, fm.height()),
                           int(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop), f"{x:d}")
            p.setPen(axis_pen)
            p.drawRect(r)
            # lines (decimated to ~2 points per pixel column), clipped to the axes
            p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
            p.setClipRect(r)
            ncol = max(2, int(2 * r.width()))
            for k, (xs, ys) in self.series.items():
                if not xs:
                    continue
                xa = np.asarray(xs, float)
                ya = np.asarray(ys, float)
                if xa.size > ncol:
                    idx = np.unique(np.linspace(0, xa.size - 1, ncol).astype(int))
                    xa, ya = xa[idx], ya[idx]
                ya = np.clip(ya, 10.0 ** (lo - 1), 10.0 ** (hi + 1))
                px = r.left() + xa / xspan * r.width()
                py = r.bottom() - (np.log10(ya) - lo) / max(hi - lo, 1e-9) * r.height()
                pen = QPen(QColor(self.colors.get(k, self.COLORS[0])))
                pen.setWidthF(1.4)
                p.setPen(pen)
                if px.size == 1:
                    p.drawEllipse(QPointF(px[0], py[0]), 1.5, 1.5)
                else:
                    p.drawPolyline(QPolygonF([QPointF(a, b) for a, b in zip(px, py)]))
            p.setClipping(False)
            # legend (top strip) and axis titles
            x = r.left()
            for k, (_, ys) in self.series.items():
                if not ys:
                    continue
                s = f"━ {k} {ys[-1]:.3g}   "
                p.setPen(QColor(self.colors.get(k, self.COLORS[0])))
                p.drawText(QPointF(x, fm.ascent() + 1), s)
                x += fm.horizontalAdvance(s)
            title = "loss (log) vs step"
            if x + fm.horizontalAdvance(title) < r.right():
                p.setPen(QColor(self.AXIS))
                p.drawText(QRectF(r.left(), 0, r.width(), fm.height() + 2),
                           int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), title)
            if not self.series:
                msg = "the training losses appear here"
                box = QRectF(0, 0, fm.horizontalAdvance(msg) + 12, fm.height() + 6)
                box.moveCenter(r.center())
                p.fillRect(box, QColor(self.BG))
                p.setPen(QColor(self.TEXT))
                p.drawText(box, int(Qt.AlignmentFlag.AlignCenter), msg)
        finally:
            p.end()
        self.n_paints += 1
        self.last_update_s = time.perf_counter() - t0
