"""A live loss plot (one line per loss term) on matplotlib's Qt canvas, cheap enough for the main thread.

A full matplotlib draw of even a small figure costs 50–150 ms on a loaded CPU (mostly text), so the plot
is *blitted*: the axes, ticks and labels are drawn once — x spans the whole run (0…total steps), y is a
fixed logarithmic range (10⁻³…10¹, widened by whole decades if a loss leaves it) — and cached; an update
only restores that background and draws the lines (a few ms). A full redraw happens only when the run
starts, a value leaves the y-range, or the canvas is resized. Updates are coalesced by a timer to at most
every ``min_interval_ms``.
The legend is a Qt label under the canvas (no matplotlib text to re-render)."""
from __future__ import annotations

import math
import time

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

#: logged values that are not loss terms (not plotted)
SKIP_TERMS = ("grad_norm",)


class LossPlot(QWidget):
    """Training losses vs step. ``add(step, losses)`` only stores values; a timer updates the canvas."""

    COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176")
    YLIM = (1e-3, 1e1)

    def __init__(self, parent=None, min_interval_ms: int = 250, height_px: int = 150):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

        self.fig = Figure(figsize=(3.6, 1.5), dpi=100, facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.fig)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.canvas.setFixedHeight(height_px)
        ax = self.ax = self.fig.add_subplot(111)
        ax.set_facecolor("#262930")
        for s in ax.spines.values():
            s.set_color("#8a8f98")
        ax.tick_params(colors="#d0d0d0", labelsize=7)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("step", color="#d0d0d0", fontsize=7, labelpad=1)
        ax.set_ylabel("loss", color="#d0d0d0", fontsize=7, labelpad=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(*self.YLIM)
        self.fig.subplots_adjust(left=0.13, right=0.98, top=0.95, bottom=0.25)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.legend = QLabel("")
        self.legend.setStyleSheet("font-size: 11px;")
        lay.addWidget(self.legend)

        self.series: dict[str, tuple[list, list]] = {}
        self._lines: dict = {}
        self._bg = None
        self._dirty = False
        self._full = True
        self.n_draws = 0       # updates shown (full or blitted)
        self.n_full = 0        # full redraws
        self.last_update_s = 0.0
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self._timer = QTimer(self)
        self._timer.setInterval(int(min_interval_ms))
        self._timer.timeout.connect(self._maybe_update)
        self._timer.start()

    # -- data ----------------------------------------------------------------------------------
    def set_total(self, total: int) -> None:
        """The x axis spans the whole run."""
        self.ax.set_xlim(0, max(1, int(total)))
        self._full = self._dirty = True

    def clear(self):
        self.series.clear()
        for ln in self._lines.values():
            ln.remove()
        self._lines.clear()
        self.legend.setText("")
        self.ax.set_ylim(*self.YLIM)
        self._full = self._dirty = True

    def add(self, step: int, losses: dict) -> None:
        for k, v in (losses or {}).items():
            if k in SKIP_TERMS or v is None or not math.isfinite(float(v)):
                continue
            xs, ys = self.series.setdefault(k, ([], []))
            xs.append(int(step))
            ys.append(float(v))
        self._dirty = True

    # -- drawing -------------------------------------------------------------------------------
    def _on_draw(self, event):
        """After any full draw (ours or a resize): cache the background, draw the lines on top."""
        self._bg = self.canvas.copy_from_bbox(self.ax.bbox)
        for ln in self._lines.values():
            self.ax.draw_artist(ln)

    def _maybe_update(self):
        if self._dirty and self.isVisible():
            self.update_now()

    def update_now(self):
        t0 = time.perf_counter()
        self._dirty = False
        ax = self.ax
        for k, (xs, ys) in self.series.items():
            if k not in self._lines:  # animated lines are blitted: no full redraw needed for a new one
                c = self.COLORS[len(self._lines) % len(self.COLORS)]
                (self._lines[k],) = ax.plot(xs, ys, lw=1.2, color=c, label=k, animated=True)
            else:
                self._lines[k].set_data(xs, ys)
        pos = [y for _, ys in self.series.values() for y in ys if y > 0]
        if pos:
            lo, hi = ax.get_ylim()
            if min(pos) < lo or max(pos) > hi:
                ax.set_ylim(min(lo, 10 ** math.floor(math.log10(min(pos)))),
                            max(hi, 10 ** math.ceil(math.log10(max(pos)))))
                self._full = True
            xmax = max(xs[-1] for xs, _ in self.series.values() if xs)
            if xmax > ax.get_xlim()[1]:
                ax.set_xlim(0, xmax * 2)
                self._full = True
        self.legend.setText("  ".join(f"<span style='color:{ln.get_color()}'>━ {k} {self.series[k][1][-1]:.3g}</span>"
                                      for k, ln in self._lines.items() if self.series[k][1]))
        if self._full or self._bg is None:
            self._full = False
            self.canvas.draw()  # → _on_draw caches the background and draws the lines
            self.canvas.blit(ax.bbox)
            self.n_full += 1
        else:
            self.canvas.restore_region(self._bg)
            for ln in self._lines.values():
                ax.draw_artist(ln)
            self.canvas.blit(ax.bbox)
        self.n_draws += 1
        self.last_update_s = time.perf_counter() - t0

    # backwards-compatible name
    redraw = update_now
