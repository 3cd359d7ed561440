"""Widget state that persists between napari sessions (last folders, scale, steps), via QSettings."""
from __future__ import annotations

from qtpy.QtCore import QSettings


def settings() -> QSettings:
    return QSettings("napari-diffst", "napari-diffst")


def load(key: str, default=None, type_=str):
    v = settings().value(key, default)
    if v is None:
        return default
    try:
        return type_(v)
    except (TypeError, ValueError):
        return default


def save(key: str, value) -> None:
    s = settings()
    s.setValue(key, value)
    s.sync()
