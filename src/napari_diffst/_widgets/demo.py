"""The ``napari-diffst demo`` window (Qt): sized to the screen, the spots' gene named, the view fitted."""
from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

#: The demo window takes this fraction of the screen's available width and height.
DEMO_SCREEN_FRACTION = 0.9


def fit_demo_window(viewer, fraction: float = DEMO_SCREEN_FRACTION) -> None:
    """Size the demo window to the screen, say which gene colours the spots, and fit the view to the canvas
    that is left once the dock is in (again when the event loop has laid the window out)."""
    win = viewer.window._qt_window
    screen = win.screen() if hasattr(win, "screen") and win.screen() is not None else QApplication.primaryScreen()
    if screen is not None:
        geo = screen.availableGeometry()
        w, h = int(geo.width() * fraction), int(geo.height() * fraction)
        win.resize(w, h)
        win.move(geo.x() + (geo.width() - w) // 2, geo.y() + (geo.height() - h) // 2)
    spots = [ly for ly in viewer.layers if ly.metadata.get("diffst_role") == "spots"]
    gene = spots[0].metadata.get("gene") if spots else None
    if gene:
        viewer.text_overlay.text = f"spots coloured by {gene} (log1p CP10k)"
        viewer.text_overlay.visible = True
    viewer.window._qt_window.show()
    QApplication.processEvents()
    viewer.reset_view()
    QTimer.singleShot(0, viewer.reset_view)  # after the dock and the window size have settled
