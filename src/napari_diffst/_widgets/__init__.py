"""Qt widget layer of napari-diffst. Imports the core; the core never imports this package."""
from .main import SuperResolveWidget

__all__ = ["SuperResolveWidget"]
