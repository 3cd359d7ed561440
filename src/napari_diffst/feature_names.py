"""Names of the histology feature extractors (model config ``hist_features``), without importing torch.

The napari dock lists these in its "Histology features" box; the extractors themselves live in
:mod:`napari_diffst.model.features` (which registers every name here, and adds names registered with
:func:`napari_diffst.model.features.register_feature_extractor`).

* ``learned`` — the tissue-level conv encoder trained from scratch with the denoiser (default);
* ``handcrafted`` — fixed colour (RGB, H/E/DAB stain deconvolution) and texture features;
* ``file`` — ``file:/path/to/model.pt``: the user's own pretrained pathology model (TorchScript, or a
  ``.pt2`` torch.export program), loaded from the local file and frozen;
* ``timm`` — ``timm:ARCH:/path/weights.pt``: only listed when the optional package ``timm`` is installed.
"""
from __future__ import annotations

import importlib.util

__all__ = ["available_feature_extractors", "describe_feature_extractor", "FEATURE_EXTRACTORS",
           "DEFAULT_FEATURES"]

DEFAULT_FEATURES = "learned"

#: name -> (one-line description, takes an argument after ``name:``)
FEATURE_EXTRACTORS: dict[str, tuple[str, bool]] = {
    "learned": ("strided conv encoder trained from scratch with the denoiser (default)", False),
    "handcrafted": ("fixed colour (RGB, H/E/DAB stain deconvolution) and texture (local std, gradient magnitude at "
                    "3 scales) features", False),
    "file": ("your own pretrained pathology model: a local TorchScript (.pt) or torch.export (.pt2) file, frozen",
             True),
    "timm": ("a timm architecture with a local state dict (frozen; needs timm): timm:ARCH:PATH", True),
}


def available_feature_extractors() -> list[str]:
    """Names usable in the model config ``hist_features`` (``file`` takes ``file:PATH``, ``timm``
    ``timm:ARCH:PATH``; ``timm`` only when it is installed)."""
    return [n for n in FEATURE_EXTRACTORS if n != "timm" or importlib.util.find_spec("timm") is not None]


def describe_feature_extractor(name: str) -> str:
    """One line about an extractor (``name`` or a full spec such as ``file:/a/b.pt``), for tooltips."""
    entry = FEATURE_EXTRACTORS.get(str(name).split(":", 1)[0])
    return entry[0] if entry else ""
