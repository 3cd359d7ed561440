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
* the pixel size comes from ``scale`` (µm, must be square and equal across layers) and the
  origin from ``translate``; multiscale layers are saved from their full-resolution level;
* a layer's ``metadata['diffst_frame']`` (a :class:`~napari_diffst.io.scverse.SectionFrame`, set on the
  dock's result layers) places the h5ad in its section's frame (full-res px, ``uns['spatial']``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataFormatError
from .io import writers as _w

__all__ = ["write_ome_zarr", "write_tiff", "write_h5ad", "stack_layer_data"]


def _last2(v, default: float) -> tuple[float, float]:
    if v is None:
        return (default, default)
    v = [float(x) for x in np.ravel(np.asarray(v, float))]
    if len(v) < 2:
        return (default, default)
    return (v[-2], v[-1])


def stack_layer_data(path, layer_data) -> dict:
    """Combine napari layer data tuples into ``maps, genes, um_per_px, origin_um, extra, mask``."""
    main: list[tuple[str, np.ndarray]] = []
    extra: dict[str, dict[str, np.ndarray]] = {}
    scales, origins, masks, frames = [], [], [], []
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
        scales.append(_last2(attrs.get("scale"), 1.0))
        origins.append(_last2(attrs.get("translate"), 0.0))
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
    sc = np.array(scales)
    if not np.allclose(sc, sc[0], rtol=1e-6) or not np.isclose(sc[0][0], sc[0][1], rtol=1e-6):
        raise DataFormatError(path, f"layer scales {sorted(set(map(tuple, sc.tolist())))}",
                              "the same square pixel size (µm) on every layer")
    org = np.array(origins)
    if not np.allclose(org, org[0], atol=1e-6 * max(1.0, float(sc[0][0]))):
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
    return {"maps": maps, "genes": genes, "um_per_px": float(sc[0][0]),
            "origin_um": (float(org[0][0]), float(org[0][1])), "extra": extra_stacks, "mask": mask, "frame": frame}


def write_ome_zarr(path: str, layer_data: list) -> list[str]:
    """npe2 writer: selected gene-map image layers → OME-Zarr (NGFF 0.4)."""
    s = stack_layer_data(path, layer_data)
    _w.write_ome_zarr(path, s["maps"], s["genes"], s["um_per_px"], s["origin_um"], extra_channels=s["extra"])
    return [str(Path(path))]


def write_tiff(path: str, layer_data: list) -> list[str]:
    """npe2 writer: selected gene-map image layers → OME-TIFF."""
    s = stack_layer_data(path, layer_data)
    _w.write_tiff(path, s["maps"], s["genes"], s["um_per_px"], s["origin_um"], extra_channels=s["extra"])
    return [str(Path(path))]


def write_h5ad(path: str, layer_data: list) -> list[str]:
    """npe2 writer: selected gene-map image layers → per-pixel AnnData (.h5ad)."""
    s = stack_layer_data(path, layer_data)
    _w.write_h5ad(path, s["maps"], s["genes"], s["um_per_px"], s["mask"], s["origin_um"],
                  extra_channels=s["extra"], frame=s["frame"])
    return [str(Path(path))]
