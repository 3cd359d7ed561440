"""Compute-device selection and out-of-memory handling (Qt-free)."""
from __future__ import annotations

import contextlib

import torch

from .errors import DiffSTError

__all__ = ["resolve_device", "device_label", "is_oom", "oom_guard", "OutOfMemoryError", "autocast"]


class OutOfMemoryError(DiffSTError, MemoryError):
    """The accelerator ran out of memory; the message says what to reduce."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``'auto'`` → CUDA if available, then Apple MPS, then CPU; ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ``'mps'``
    are checked and raise :class:`DiffSTError` (with what to use instead) when not available."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DiffSTError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffSTError("device 'cuda' was requested but CUDA is not available (no NVIDIA GPU, or a "
                              "CPU-only torch build); use device 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffSTError(f"device {name!r} does not exist: only {torch.cuda.device_count()} CUDA "
                              f"device(s) visible")
    elif dev.type == "mps":
        if not _mps_available():
            raise DiffSTError("device 'mps' was requested but Apple MPS is not available; use 'auto' or 'cpu'")
    elif dev.type != "cpu":
        raise DiffSTError(f"unsupported device {name!r}; use 'auto', 'cpu', 'cuda' or 'mps'")
    return dev


def device_label(device: str | torch.device | None = None) -> str:
    """Human-readable name: the GPU's name (e.g. ``'NVIDIA H100 80GB HBM3'``), ``'Apple MPS'`` or ``'CPU'``."""
    dev = resolve_device(device if device is not None else "auto")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        return "Apple MPS"
    return "CPU"


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (``torch.OutOfMemoryError`` or an 'out of memory' RuntimeError)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_message(what: str = "training", batch_size: int | None = None, tile: int | None = None,
                tile_name: str = "patch size", device: str | None = None) -> str:
    """A concrete suggestion for an out-of-memory failure."""
    parts = [f"Out of memory on {device or 'the GPU'} during {what}."]
    tips = []
    if batch_size and batch_size > 1:
        tips.append(f"reduce the batch size from {batch_size} to {max(1, batch_size // 2)}")
    if tile:
        tips.append(f"reduce the {tile_name} from {tile} to {max(1, tile // 2)}")
    tips.append("or close other programs using the GPU / use device 'cpu'")
    parts.append("Try to " + ", ".join(tips) + ".")
    return " ".join(parts)


@contextlib.contextmanager
def oom_guard(what: str = "training", batch_size: int | None = None, tile: int | None = None,
              tile_name: str = "patch size", device=None):
    """Re-raise out-of-memory errors inside the block as :class:`OutOfMemoryError` (a DiffSTError) with a
    concrete suggestion (halve the batch size / tile), after freeing the CUDA cache."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - filtered below
        if not is_oom(exc) or isinstance(exc, DiffSTError):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        label = None
        if device is not None:
            try:
                label = device_label(device)
            except DiffSTError:
                label = str(device)
        raise OutOfMemoryError(oom_message(what, batch_size, tile, tile_name, label)) from exc


def autocast(device: torch.device, enabled: bool | str = "auto"):
    """bf16 autocast on CUDA only (``enabled='auto'``); a no-op context elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and (enabled == "auto" or enabled is True):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
