"""npe2 writer hooks: save selected image layers (gene maps) as OME-Zarr, OME-TIFF or h5ad.

Each hook receives ``layer_data``, a list of ``(data, attributes, layer_type)`` tuples for the
selected ``image`` layers, and returns the list of paths written. Layers are combined into one
``(genes, Y, X)`` stack:

* a multichannel layer ``(C, Y, X)`` contributes C genes named by ``metadata['genes']`` (or
  ``"<layer name>[i]"``); a 2-D layer contributes one gene named by ``metadata['gene']``,
  a one-element ``metadata['genes']``, or the layer name;
* RGB layers and layers whose ``metadata['diffst_role']`` is ``'histology'`` are skipped;
* layers whose ``metadata['diffst_role']`` contains ``'uncertainty'`` (or that carry
  ``metadata['diffst_extra'] = name``) are saved as that extra channel group, matched by gene;
* the placement is each layer's whole data → world transform (``scale`` per axis, ``translate``,
  ``rotate``, ``shear`` and ``affine``, in µm), which must be equal across layers; the files store the
  per-axis pixel size and, for a rotated or sheared grid, the affine in this package's metadata
  (:class:`napari_diffst.io.writers.Placement`); multiscale layers are saved from their full-resolution level.
* a layer's ``metadata['diffst_frame']`` (a :class:`~napari_diffst.io.scverse.SectionFrame`, set on the
  dock's result layers) places the h5ad in its section's frame (full-res px, ``uns['spatial']``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataFormatError
from .io import writers as _w

__all__ = ["write_ome_zarr", "write_tiff", "write_h5ad", "stack_layer_data", "layer_affine"]


def _last2(v, default: float) -> tuple[float, float]:
    if v is None:
        return (default, default)
    v = [float(x) for x in np.ravel(np.asarray(v, float))]
    if len(v) < 2:
        return (default, default)
    return (v[-2], v[-1])


def _last_square(m, n: int = 2) -> np.ndarray | None:
    if m is None:
        return None
    a = np.asarray(m, float)
    if a.ndim != 2 or a.shape[0] < n or a.shape[0] != a.shape[1]:
        return None
    return a[-n:, -n:]


def layer_affine(attrs: dict) -> np.ndarray:
    """3×3 (row, col, 1) → (y, x, 1) world affine of a 2-D layer from its data-tuple attributes: napari's
    ``affine @ (translate + rotate · shear · scale)``."""
    from napari.utils.transforms.transform_utils import compose_linear_matrix

    scale = _last2(attrs.get("scale"), 1.0)
    translate = _last2(attrs.get("translate"), 0.0)
    rot = attrs.get("rotate")
    if rot is not None and np.ndim(rot) == 2:
        rot = _last_square(rot)
    shear = attrs.get("shear")
    if shear is not None and np.ndim(shear) == 2:
        shear = _last_square(shear)
    elif shear is not None:
        shear = np.ravel(np.asarray(shear, float))[-1:] if np.size(shear) else None
    L = compose_linear_matrix(rot if rot is not None else 0.0, np.asarray(scale), shear if shear is not None
                              else np.zeros(1))
    A = np.eye(3)
    A[:2, :2] = np.asarray(L, float)[-2:, -2:]
    A[:2, 2] = translate
    aff = attrs.get("affine")
    if aff is not None:
        M = np.asarray(getattr(aff, "affine_matrix", aff), float)
        if M.ndim == 2 and M.shape[0] == M.shape[1] and M.shape[0] >= 3:
            M2 = np.eye(3)
            M2[:2, :2] = M[-3:-1, -3:-1]
            M2[:2, 2] = M[-3:-1, -1]
            A = M2 @ A
    return A


def stack_layer_data(path, layer_data) -> dict:
    """Combine napari layer data tuples into ``maps, genes, um_per_px, origin_um, affine_um, extra, mask``."""
    main: list[tuple[str, np.ndarray]] = []
    extra: dict[str, dict[str, np.ndarray]] = {}
    affines, masks, frames = [], [], []
    for item in layer_data:
        data, attrs, *rest = item
        ltype = rest[0] if rest else "image"
        attrs = dict(attrs or {})
        md = dict(attrs.get("metadata") or {})
        role = str(md.get("diffst_role", "") or "")
        if ltype != "image" or attrs.get("rgb") or role == "histology":
            continue
        if attrs.get("multiscale") or (isinstance(data, (list, tuple)) and len(data) and hasattr(data[0], "shape")):
            data = data[0]
        name = str(attrs.get("name") or f"layer{len(main)}")
        arr = data if hasattr(data, "ndim") else np.asarray(data)
        if arr.ndim == 2:
            g = md.get("gene")
            if g is None and isinstance(md.get("genes"), (list, tuple)) and len(md["genes"]) == 1:
                g = md["genes"][0]
            entries = [(str(g if g is not None else name), np.asarray(arr, np.float32))]
        elif arr.ndim == 3:
            genes = md.get("genes")
            if not (isinstance(genes, (list, tuple)) and len(genes) == arr.shape[0]):
                genes = [f"{name}[{i}]" for i in range(arr.shape[0])]
            entries = [(str(g), np.asarray(arr[i], np.float32)) for i, g in enumerate(genes)]
        else:
            raise DataFormatError(path, f"layer {name!r} has {arr.ndim} dimensions",
                                  "2-D gene maps or one (genes, Y, X) layer")
        kind = md.get("diffst_extra") or ("uncertainty" if "uncertainty" in role else None)
        if kind:
            extra.setdefault(str(kind), {}).update(dict(entries))
        else:
            main.extend(entries)
        affines.append(layer_affine(attrs))
        if md.get("mask") is not None:
            masks.append(np.asarray(md["mask"], bool))
        if md.get("diffst_frame") is not None:
            frames.append(md["diffst_frame"])
    if not main:
        raise DataFormatError(path, "no gene-map layers among the selected layers",
                              "one or more single-channel image layers (not the H&E)")
    shapes = {m.shape for _, m in main} | {m.shape for grp in extra.values() for m in grp.values()}
    if len(shapes) != 1:
        raise DataFormatError(path, f"selected layers have different shapes {sorted(shapes)}",
                              "maps on one pixel grid")
    A0 = affines[0]
    size = float(np.abs(A0[:2, :2]).max())
    if not all(np.allclose(a[:2, :2], A0[:2, :2], rtol=1e-6, atol=1e-9 * size) for a in affines):
        sc = sorted({tuple(np.round(np.hypot(a[0, :2], a[1, :2]), 6).tolist()) for a in affines})
        raise DataFormatError(path, f"layer pixel sizes / orientations differ ({sc})",
                              "the same scale, rotation and shear on every layer")
    if not all(np.allclose(a[:2, 2], A0[:2, 2], atol=1e-6 * max(1.0, size)) for a in affines):
        raise DataFormatError(path, "layers have different translations", "maps on one pixel grid")
    genes = [g for g, _ in main]
    if len(set(genes)) != len(genes):
        genes = [f"{g}_{i}" if genes.count(g) > 1 else g for i, g in enumerate(genes)]
    maps = np.stack([m for _, m in main])
    extra_stacks = {}
    for kind, grp in extra.items():
        missing = [g for g, _ in main if g not in grp]
        if missing:
            raise DataFormatError(path, f"{kind} layers missing for genes {missing}",
                                  f"one {kind} layer per selected gene map")
        extra_stacks[kind] = np.stack([grp[g] for g, _ in main])
    mask = masks[0] if masks and masks[0].shape == maps.shape[1:] else None
    frame = frames[0] if frames else None
    if frame is not None and frame.in_tissue is not None and np.shape(frame.in_tissue) != maps.shape[1:]:
        frame = None
    place = _w.placement_of(path, affine_um=A0)
    return {"maps": maps, "genes": genes, "um_per_px": place.um_per_px, "origin_um": place.origin,
            "affine_um": place.affine, "extra": extra_stacks, "mask": mask, "frame": frame}


def write_ome_zarr(path: str, layer_data: list) -> list[str]:
    """npe2 writer: selected gene-map image layers → OME-Zarr (NGFF 0.4)."""
    s = stack_layer_data(path, layer_data)
    _w.write_ome_zarr(path, s["maps"], s["genes"], extra_channels=s["extra"], affine_um=s["affine_um"])
    return [str(Path(path))]


def write_tiff(path: str, layer_data: list) -> list[str]:
    """npe2 writer: selected gene-map image layers → OME-TIFF."""
    s = stack_layer_data(path, layer_data)
    _w.write_tiff(path, s["maps"], s["genes"], extra_channels=s["extra"], affine_um=s["affine_um"])
    return [str(Path(path))]


def write_h5ad(path: str, layer_data: list) -> list[str]:
    """npe2 writer: selected gene-map image layers → per-pixel AnnData (.h5ad)."""
    s = stack_layer_data(path, layer_data)
    _w.write_h5ad(path, s["maps"], s["genes"], mask=s["mask"], extra_channels=s["extra"], affine_um=s["affine_um"],
                  frame=s["frame"])
    return [str(Path(path))]
