"""Shared test fixtures: where ../shared lives, small torch thread counts, GUI helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HER2ST = SHARED / "data" / "her2st"
FIXTURES = SHARED / "fixtures"
SCREENSHOTS = REPO / "docs" / "images"


def _torch_threads():
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except Exception:  # pragma: no cover
        pass


_torch_threads()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (expected ../shared beside the repository)")
    return SHARED


@pytest.fixture(scope="session")
def her2st_dir(shared_dir) -> Path:
    d = shared_dir / "data" / "her2st"
    if not d.is_dir():
        pytest.skip(f"her2st sections not found at {d}")
    return d


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    d = shared_dir / "fixtures"
    if not d.is_dir():
        pytest.skip(f"reader fixtures not found at {d}")
    return d


@pytest.fixture
def isolated_settings(tmp_path):
    """QSettings in a temporary folder (never the user's ~/.config)."""
    from qtpy.QtCore import QSettings

    d = tmp_path / "qsettings"
    d.mkdir()
    for fmt in (QSettings.NativeFormat, QSettings.IniFormat):
        QSettings.setPath(fmt, QSettings.UserScope, str(d))
    return d


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@pytest.fixture
def shown_viewer(make_napari_viewer):
    """A napari viewer that is *shown* (a hidden one screenshots black) on a real X server."""
    if not has_display():
        pytest.skip("no X display: run the GUI tests under xvfb-run (see README)")
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        pytest.skip("Qt offscreen platform has no OpenGL; use xvfb-run")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    return viewer


def save_screenshot(img, name: str) -> Path:
    """Save an RGBA array as docs/images/<name>.png (used by docs)."""
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    p = SCREENSHOTS / f"{name}.png"
    Image.fromarray(img).save(p)
    return p


@pytest.fixture
def one_torch_thread():
    """One torch thread in the test process, as in the subprocesses of :func:`single_thread_env`: bit-for-bit
    comparisons need the same thread count on both sides (float sums differ with it)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def single_thread_env(src: str) -> dict:
    """The environment of a one-thread subprocess that imports napari_diffst from ``src``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env
