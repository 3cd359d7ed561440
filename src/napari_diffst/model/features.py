"""Pluggable histology feature extractors for the tissue level of the histology encoder (HisToSGE idea).

The model config key ``hist_features`` selects what turns the H&E tile into the tissue-level features
``F_t`` (B, C_h, H, W) on the HR grid:

* ``"learned"`` (default) — the strided conv encoder trained from scratch with the denoiser
  (:class:`~napari_diffst.model.histology.TissueEncoder`); nothing in this module is used;
* ``"handcrafted"`` — fixed, parameter-free features per HR pixel (:class:`HandcraftedFeatures`):
  RGB mean, H/E/DAB stain densities (Ruifrok & Johnston colour deconvolution, the matrix of
  ``skimage.color.rgb2hed``), the standard deviation of grey, H and E inside the pixel (texture) and
  the grey-level gradient magnitude at three scales;
* ``"file:/path/to/model.pt"`` — a user's own pretrained pathology model saved as TorchScript
  (``torch.jit.save(torch.jit.script(net), path)`` or ``torch.jit.trace``), loaded with
  ``torch.jit.load`` from the local file and kept frozen (:class:`FileFeatures`); a ``.pt2`` file is read
  with ``torch.export.load`` instead (export it with a dynamic batch dimension, and with dynamic height /
  width for a feature-map model);
* ``"timm:ARCH:/path/to/weights.pt"`` — only when ``timm`` is installed: ``timm.create_model(ARCH,
  pretrained=False, num_classes=0)`` with the local state dict, frozen. Nothing is ever downloaded.

A file model receives H&E in [0, 1], normalised with ``hist_features_norm`` (``"imagenet"``: the
ImageNet mean / std most pathology models expect; ``"none"``). It may return

* a feature map (N, C, h, w) for the whole tile — resampled to the HR grid, or
* one vector (N, C) per input — it is then run on non-overlapping H&E patches of
  ``hist_features_patch`` px (default: the cell-patch size, 2 HR pixels), each resized to
  ``hist_features_input`` px when set (e.g. 224 for a ViT), and the vectors form a grid.

The extractor's C channels enter the denoiser through a trainable 1×1 projection to ``hist_channels``
followed by the usual context ResBlocks (:class:`ExtractorTissueEncoder`), so the rest of the network
(cell-level branch, cross-attention, CAM, distillation) is unchanged. A missing or unreadable file, a
file that is not TorchScript, an output of the wrong rank, or a channel count that differs from
``hist_features_dim`` (when given) raises :class:`~napari_diffst.errors.DataFormatError` naming the file.

The frozen extractor of a file model is *not* part of the denoiser's state dict (checkpoints stay small):
a checkpoint trained with ``file:PATH`` needs that file again when it is loaded.

Register more extractors with :func:`register_feature_extractor`; :func:`available_feature_extractors`
lists the names (for the napari widget).
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import feature_names as _names
from ..errors import DataFormatError, DiffSTError
from ..feature_names import available_feature_extractors, describe_feature_extractor  # noqa: F401 - re-exported
from .layers import ResBlock

__all__ = ["FeatureExtractor", "HandcraftedFeatures", "FileFeatures", "ExtractorTissueEncoder",
           "available_feature_extractors", "register_feature_extractor", "make_feature_extractor",
           "parse_feature_spec", "describe_feature_extractor", "rgb_to_hed", "RGB_FROM_HED", "IMAGENET_MEAN",
           "IMAGENET_STD"]

#: Ruifrok & Johnston (2001) stain vectors, as in ``skimage.color.rgb_from_hed`` (rows: H, E, DAB).
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)


class FeatureExtractor(nn.Module):
    """Interface: ``forward(he (B, 3, Hh, Wh) in [0, 1], hw=(H, W)) -> (B, out_channels, h, w)``.

    The output may be at any resolution; :class:`ExtractorTissueEncoder` resamples it to ``hw``.
    ``trainable`` False means the extractor is run without gradients (frozen)."""

    out_channels: int = 0
    trainable: bool = False


# ---------------------------------------------------------------------------------------------- handcrafted
def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> stain densities H, E, DAB (same shape), like ``skimage.color.rgb2hed``:
    ``max((log(max(rgb, 1e-6)) / log(1e-6)) @ inv(RGB_FROM_HED), 0)``."""
    m = torch.linalg.inv(torch.tensor(RGB_FROM_HED, dtype=torch.float64)).to(rgb.dtype).to(rgb.device)
    od = torch.log(rgb.clamp_min(1e-6)) / torch.log(torch.tensor(1e-6, dtype=rgb.dtype, device=rgb.device))
    return torch.einsum("...chw,cd->...dhw", od, m).clamp_min(0)


class HandcraftedFeatures(FeatureExtractor):
    """Fixed features per HR pixel (12 channels), no parameters.

    0–2 RGB mean; 3–5 H, E, DAB mean (:func:`rgb_to_hed`); 6–8 standard deviation of grey, H and E inside the
    pixel (texture at the cell scale); 9–11 mean grey-level gradient magnitude (central differences) after
    average-pooling the H&E by 1, 2 and 4 px (edges at three scales). Values are roughly in [0, 1]."""

    out_channels = 12
    trainable = False

    def __init__(self, scales=(1, 2, 4)):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.out_channels = 9 + len(self.scales)
        self.register_buffer("_gray", torch.tensor(_GRAY).reshape(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _grad_mag(g: torch.Tensor) -> torch.Tensor:
        gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
        dx = (gp[..., 1:-1, 2:] - gp[..., 1:-1, :-2]) / 2
        dy = (gp[..., 2:, 1:-1] - gp[..., :-2, 1:-1]) / 2
        return torch.sqrt(dx * dx + dy * dy + 1e-12)

    def forward(self, he: torch.Tensor, hw) -> torch.Tensor:
        hw = tuple(int(v) for v in hw)
        he = he.clamp(0, 1)
        gray = (he * self._gray.to(he.dtype)).sum(1, keepdim=True)
        hed = rgb_to_hed(he)
        pool = lambda x: F.adaptive_avg_pool2d(x, hw)  # noqa: E731 - block means on the HR grid
        tex = torch.cat([gray, hed[:, :2]], 1)
        std = (pool(tex * tex) - pool(tex) ** 2).clamp_min(0).sqrt()
        grads = []
        for s in self.scales:
            g = F.avg_pool2d(gray, s) if s > 1 and min(gray.shape[-2:]) >= s else gray
            grads.append(pool(self._grad_mag(g)) * (2.0 if s == 1 else 1.0))
        return torch.cat([pool(he), pool(hed), std] + grads, 1)


# ---------------------------------------------------------------------------------------------- file models
class _Frozen:
    """Holds a frozen module outside the parent's parameters / state dict; shared by deep copies (EMA)."""

    def __init__(self, module):
        self.module = module

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):  # pickling carries no TorchScript module; rebuilt from the config instead
        return {"module": None}


_FILE_EXPECTED = ("a TorchScript file (torch.jit.save of a scripted or traced model) or a torch.export program "
                  "(.pt2, torch.export.save) that maps (N, 3, h, w) H&E to a (N, C, h', w') feature map or "
                  "(N, C) vectors")


class FileFeatures(FeatureExtractor):
    """A frozen, user-supplied pretrained model (TorchScript file, or a ``timm`` architecture with a local state
    dict). See the module docstring for the input normalisation and the map / vector output modes."""

    trainable = False

    def __init__(self, path, *, norm: str = "imagenet", patch_px: int = 32, input_px: int | None = None,
                 expected_dim: int | None = None, arch: str | None = None, probe_px: int = 64):
        super().__init__()
        self.path = Path(path)
        self.norm = norm
        self.patch_px = int(patch_px)
        self.input_px = int(input_px) if input_px else None
        self.arch = arch
        net = _load_timm(arch, self.path) if arch else _load_torchscript(self.path)
        try:
            net.eval()
        except Exception:  # noqa: BLE001 - exported (.pt2) programs do not support eval(); they are traced in eval
            pass
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = _Frozen(net)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        # probe the output: rank and channels
        px = self.input_px or max(int(probe_px), self.patch_px)
        out = self._run(torch.full((1, 3, px, px), 0.5))
        if out.ndim not in (2, 4) or not out.is_floating_point():
            raise DataFormatError(self.path, f"the model returned a {out.ndim}-D {out.dtype} tensor of shape "
                                  f"{tuple(out.shape)} for a (1, 3, {px}, {px}) input", _FILE_EXPECTED)
        self.mode = "map" if out.ndim == 4 else "vector"
        self.out_channels = int(out.shape[1])
        if expected_dim is not None and int(expected_dim) != self.out_channels:
            raise DataFormatError(self.path, f"the model outputs {self.out_channels} feature channels",
                                  f"{int(expected_dim)} channels (model config hist_features_dim)")

    @property
    def net(self):
        return self._net.module

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "imagenet":
            return (x - self._mean.to(x)) / self._std.to(x)
        return x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if net is None:
            raise DiffSTError("the file feature extractor was not restored after pickling; rebuild the model "
                              "with build_model(config)")
        try:
            p = next(iter(net.parameters()), None)
        except Exception:  # noqa: BLE001 - some scripted modules have no parameters()
            p = None
        if p is not None and p.device != x.device:
            net.to(x.device)
        try:
            with torch.no_grad():
                out = net(self._prep(x).to(p.dtype if p is not None else x.dtype))
        except Exception as exc:  # noqa: BLE001 - anything the user's model raises
            raise DataFormatError(self.path, f"the model failed on a {tuple(x.shape)} input "
                                  f"({type(exc).__name__}: {str(exc)[:200]})", _FILE_EXPECTED) from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        if not torch.is_tensor(out):
            raise DataFormatError(self.path, f"the model returned {type(out).__name__}", _FILE_EXPECTED)
        return out.float()

    def forward(self, he: torch.Tensor, hw) -> torch.Tensor:
        if self.mode == "map":
            out = self._run(he)
            if out.ndim != 4 or out.shape[1] != self.out_channels:
                raise DataFormatError(self.path, f"the model returned shape {tuple(out.shape)} for an H&E tile of "
                                      f"{tuple(he.shape)}", f"(N, {self.out_channels}, h, w)")
            return out
        # one vector per patch: cut, (resize), run in batches, arrange as a grid
        B, C, Hh, Wh = he.shape
        p = self.patch_px
        mh, mw = -(-Hh // p), -(-Wh // p)
        if mh * p != Hh or mw * p != Wh:
            he = F.pad(he, (0, mw * p - Wh, 0, mh * p - Hh), value=1.0)
        x = he.reshape(B, C, mh, p, mw, p).permute(0, 2, 4, 1, 3, 5).reshape(B * mh * mw, C, p, p)
        if self.input_px and self.input_px != p:
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False)
        outs = [self._run(x[i:i + 256]) for i in range(0, x.shape[0], 256)]
        v = torch.cat(outs, 0)
        if v.ndim != 2 or v.shape[1] != self.out_channels:
            raise DataFormatError(self.path, f"the model returned shape {tuple(v.shape)} for patches",
                                  f"(N, {self.out_channels}) vectors")
        return v.reshape(B, mh, mw, -1).permute(0, 3, 1, 2)


def _load_torchscript(path: Path):
    if not path.is_file():
        raise DataFormatError(path, "feature extractor file not found", _FILE_EXPECTED)
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; loading still works
            warnings.simplefilter("ignore", DeprecationWarning)
            if path.suffix == ".pt2":  # torch.export.save(torch.export.export(net, ...), path)
                return torch.export.load(str(path)).module()
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        hint = ""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                hint = ("; it holds a state dict: save the model with torch.jit.save(torch.jit.script(model)), or "
                        "use 'timm:ARCH:PATH' with timm installed")
        except Exception:  # noqa: BLE001
            pass
        raise DataFormatError(path, f"could not load the feature extractor as TorchScript "
                              f"({type(exc).__name__}: {str(exc)[:160]}){hint}", _FILE_EXPECTED) from None


def _load_timm(arch: str, path: Path):
    if importlib.util.find_spec("timm") is None:
        raise DiffSTError(f"hist_features 'timm:{arch}:{path}' needs the optional package timm, which is not "
                          "installed; save the model as TorchScript and use 'file:PATH' instead")
    import timm

    if not path.is_file():
        raise DataFormatError(path, "feature extractor weights not found", f"a state dict for timm model {arch!r}")
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as exc:  # noqa: BLE001
        raise DiffSTError(f"timm has no model {arch!r} ({exc})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        net.load_state_dict(sd, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(path, f"could not load weights into timm model {arch!r} "
                              f"({type(exc).__name__}: {str(exc)[:160]})", f"a state dict for {arch!r}") from None
    return net


# ---------------------------------------------------------------------------------------------- registry
@dataclass
class _Entry:
    factory: Callable  # (arg: str | None, config: dict) -> FeatureExtractor | None
    description: str
    needs_arg: bool = False


_REGISTRY: dict[str, _Entry] = {}


def register_feature_extractor(name: str, factory: Callable, description: str = "", needs_arg: bool = False) -> None:
    """Add an extractor: ``factory(arg, model_config) -> FeatureExtractor`` (``arg`` is the text after
    ``name:`` in the spec, None without one). The name is also listed by :func:`available_feature_extractors`."""
    if not name or ":" in name:
        raise ValueError(f"bad feature extractor name {name!r}")
    _REGISTRY[name] = _Entry(factory, description, needs_arg)
    _names.FEATURE_EXTRACTORS[name] = (description, bool(needs_arg))


def parse_feature_spec(spec) -> tuple[str, str | None]:
    """``'file:/a/b.pt'`` -> ``('file', '/a/b.pt')``; ``'handcrafted'`` -> ``('handcrafted', None)``. Raises
    :class:`DiffSTError` for unknown names or a missing argument."""
    if not isinstance(spec, str) or not spec:
        raise DiffSTError(f"model config 'hist_features' must be a string such as 'learned', got {spec!r}")
    name, sep, arg = spec.partition(":")
    if name not in _REGISTRY:
        raise DiffSTError(f"unknown hist_features {spec!r}; choose from {', '.join(_REGISTRY)} "
                          "(file:PATH for a TorchScript model)")
    entry = _REGISTRY[name]
    if entry.needs_arg and not arg:
        raise DiffSTError(f"hist_features {name!r} needs an argument: '{name}:PATH'"
                          + (" or 'timm:ARCH:PATH'" if name == "timm" else ""))
    if not entry.needs_arg and sep:
        raise DiffSTError(f"hist_features {name!r} takes no argument, got {spec!r}")
    return name, (arg or None)


def make_feature_extractor(spec: str, config: dict) -> FeatureExtractor | None:
    """The extractor for a ``hist_features`` spec (None for ``'learned'``)."""
    name, arg = parse_feature_spec(spec)
    return _REGISTRY[name].factory(arg, config)


def _file_factory(arg, cfg):
    return FileFeatures(Path(arg).expanduser(), norm=cfg.get("hist_features_norm", "imagenet"),
                        patch_px=cfg.get("hist_features_patch") or cfg.get("cell_patch_px")
                        or 2 * cfg.get("he_per_hr", 16),
                        input_px=cfg.get("hist_features_input"), expected_dim=cfg.get("hist_features_dim"))


def _timm_factory(arg, cfg):
    arch, sep, path = arg.partition(":")
    if not sep or not path:
        raise DiffSTError(f"hist_features 'timm:{arg}': expected 'timm:ARCH:PATH'")
    return FileFeatures(Path(path).expanduser(), norm=cfg.get("hist_features_norm", "imagenet"),
                        patch_px=cfg.get("hist_features_patch") or cfg.get("cell_patch_px")
                        or 2 * cfg.get("he_per_hr", 16),
                        input_px=cfg.get("hist_features_input"), expected_dim=cfg.get("hist_features_dim"),
                        arch=arch)


_FACTORIES = {"learned": lambda arg, cfg: None, "handcrafted": lambda arg, cfg: HandcraftedFeatures(),
              "file": _file_factory, "timm": _timm_factory}
for _n, (_desc, _arg) in list(_names.FEATURE_EXTRACTORS.items()):
    if _n in _FACTORIES:
        register_feature_extractor(_n, _FACTORIES[_n], _desc, needs_arg=_arg)


# ---------------------------------------------------------------------------------------------- encoder
class ExtractorTissueEncoder(nn.Module):
    """Tissue-level encoder on top of a feature extractor: extractor -> resample to (H, W) -> trainable 1×1
    projection to ``channels`` -> ``context_blocks`` ResBlocks. Same interface as
    :class:`~napari_diffst.model.histology.TissueEncoder`: ``forward(he, hw) -> (B, channels, H, W)``."""

    def __init__(self, extractor: FeatureExtractor, channels: int, context_blocks: int = 2):
        super().__init__()
        self.extractor = extractor
        self.proj = nn.Conv2d(int(extractor.out_channels), channels, 1)
        self.context = nn.ModuleList([ResBlock(channels, channels) for _ in range(context_blocks)])

    def forward(self, he: torch.Tensor, hw) -> torch.Tensor:
        hw = tuple(int(v) for v in hw)
        if getattr(self.extractor, "trainable", False):
            f = self.extractor(he, hw)
        else:
            with torch.no_grad():
                f = self.extractor(he, hw)
        f = f.to(he.dtype)
        if tuple(f.shape[-2:]) != hw:
            if f.shape[-2] >= hw[0] and f.shape[-1] >= hw[1]:
                f = F.adaptive_avg_pool2d(f, hw)
            else:
                f = F.interpolate(f, size=hw, mode="bilinear", align_corners=False)
        h = self.proj(f)
        for blk in self.context:
            h = blk(h)
        return h
