"""SpatialData in and out (optional: ``pip install napari-diffst[spatialdata]``). Qt-free.

* :func:`read_spatialdata` reads a SpatialData zarr holding an image, spot circles and a table that
  annotates them (the Visium layout spatialdata-io writes) into a :class:`~napari_diffst.data.sample.Sample`.
* :func:`write_spatialdata` writes super-resolved maps as SpatialData: the H&E image (``he``), the
  input spots as circles (``spots``), the maps as a multichannel image (``maps``, channels = genes;
  ``maps_<extra>`` for extra channel groups), all in one coordinate system ``global`` in
  full-resolution pixels of the section image, and the per-pixel AnnData of
  :func:`napari_diffst.io.scverse.sr_anndata` as the table ``maps_table``.

Coordinates: as spatialdata-io does for Visium, image pixel indices and point coordinates are used
as they are (pixel ``[r, c]`` at (x, y) = (c, r) in its image's intrinsic frame); the maps carry the
HR grid's affine (pixel index → full-res px) and the H&E a scale (stored px → full-res px).

``spatialdata`` is imported only inside these functions.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import DataFormatError

__all__ = ["is_spatialdata", "read_spatialdata", "write_spatialdata", "read_spatialdata_maps", "CS"]

#: The coordinate system the writer uses (full-resolution pixels of the section image).
CS = "global"

_EXPECT = ("a SpatialData zarr with an image, spot circles (shapes with a radius) and a table annotating "
           "them (as spatialdata-io writes Visium)")


FORMAT = "spatialdata"
DESCRIPTION = "SpatialData zarr (image + spot circles + table)"


def detect(path) -> bool:
    """A folder that is a SpatialData zarr (see :func:`is_spatialdata`)."""
    return Path(os.fspath(path)).is_dir() and is_spatialdata(path)


def read(path, **kwargs):
    return read_spatialdata(path, **kwargs)


def is_spatialdata(path) -> bool:
    """True when ``path`` is a folder whose root Zarr attributes carry ``spatialdata_attrs``. Never raises."""
    try:
        p = Path(os.fspath(path))
        if not p.is_dir():
            return False
        for meta in ("zarr.json", ".zattrs"):
            f = p / meta
            if f.is_file():
                d = json.loads(f.read_text())
                attrs = d.get("attributes", d) if meta == "zarr.json" else d
                if isinstance(attrs, dict) and "spatialdata_attrs" in attrs:
                    return True
        return False
    except Exception:
        return False


def _import(path):
    try:
        import spatialdata as sd
    except ImportError as exc:
        raise DataFormatError(path, f"the optional package spatialdata is not installed ({exc})",
                              "pip install 'napari-diffst[spatialdata]'") from exc
    return sd


def _affine_xy(t) -> np.ndarray:
    """3×3 (x, y, 1) matrix of a spatialdata transformation."""
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), float)


def _level0(element):
    """(c, y, x) DataArray of an image element (level 0 of a multiscale)."""
    if hasattr(element, "dims") and "y" in getattr(element, "dims", ()):
        return element
    node = element["scale0"]
    return next(iter(node.ds.data_vars.values()))


def read_spatialdata(path, *, table: str | None = None, image: str | None = None,
                     coordinate_system: str | None = None, name: str | None = None,
                     um_per_px: float | None = None, spot_diameter_um: float = 65.0):
    """Read a SpatialData zarr (image + spot circles + table) into a :class:`Sample`.

    table : the table to read (default: the first that annotates a shapes element with radii).
    image : the image element (default: the largest image in the coordinate system).
    coordinate_system : shared by spots and image (default: the first the spots have that an image has).
    um_per_px : µm per full-res pixel (default: the spot diameter ↔ ``spot_diameter_um``; 65 µm is Space
        Ranger's ``spot_diameter_fullres`` convention, which spatialdata-io stores as the circles' radius × 2).

    Full-resolution pixels are the image's stored pixels times the image→coordinate-system scale
    (``HistologyImage.fullres_per_px``); ``obsm['spatial']`` holds the spot centres in them.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from ..data.sample import HistologyImage, Sample, _to_uint8, build_uns_spatial
    from .h5ad import _h5ad_values

    p = Path(os.fspath(path))
    sd = _import(p)
    from spatialdata.transformations import get_transformation

    try:
        sdata = sd.read_zarr(p)
    except Exception as exc:
        raise DataFormatError(p, f"cannot read SpatialData ({type(exc).__name__}: {exc})", _EXPECT) from exc
    tables = dict(sdata.tables)
    if not tables:
        raise DataFormatError(p, "no table element", _EXPECT)

    def circles(region):
        regs = [region] if isinstance(region, str) else list(region or [])
        return [r for r in regs if r in sdata.shapes and "radius" in sdata.shapes[r].columns]

    cands = [table] if table else list(tables)
    picked = None
    for t in cands:
        if t not in tables:
            raise DataFormatError(p, f"no table {t!r} (tables: {sorted(tables)})", _EXPECT)
        attrs = tables[t].uns.get("spatialdata_attrs", {})
        regs = circles(attrs.get("region"))
        if regs:
            picked = (t, regs[0], attrs)
            break
    if picked is None:
        raise DataFormatError(p, f"no table annotates spot circles (tables {sorted(tables)}, shapes "
                                 f"{sorted(sdata.shapes)})", _EXPECT)
    tname, region, attrs = picked
    tab = tables[tname]
    shapes = sdata.shapes[region]
    shp_t = get_transformation(shapes, get_all=True)
    images = dict(sdata.images)
    if not images:
        raise DataFormatError(p, "no image element", _EXPECT)
    css = [coordinate_system] if coordinate_system else list(shp_t)
    cs = next((c for c in css if c in shp_t and any(c in get_transformation(im, get_all=True)
                                                     for im in images.values())), None)
    if cs is None:
        raise DataFormatError(p, f"the spots ({region}) and no image share a coordinate system "
                                 f"(spots: {sorted(shp_t)})", _EXPECT)
    in_cs = {k: v for k, v in images.items() if cs in get_transformation(v, get_all=True)}
    if image is not None:
        if image not in in_cs:
            raise DataFormatError(p, f"no image {image!r} in coordinate system {cs!r} (have {sorted(in_cs)})",
                                  _EXPECT)
        iname = image
    else:
        iname = max(in_cs, key=lambda k: int(np.prod(_level0(in_cs[k]).shape[-2:])))
    arr = _level0(in_cs[iname])
    M_img = _affine_xy(get_transformation(in_cs[iname], cs))
    M_shp = _affine_xy(shp_t[cs])
    s = float(np.sqrt(abs(np.linalg.det(M_img[:2, :2]))))
    # spot frame → image stored px → full-res px (stored px × s)
    to_full = np.diag([s, s, 1.0]) @ np.linalg.inv(M_img) @ M_shp
    geo = shapes.geometry
    xy0 = np.column_stack([geo.x.to_numpy(), geo.y.to_numpy()]).astype(float)
    xy = xy0 @ to_full[:2, :2].T + to_full[:2, 2]
    diam_px = 2.0 * float(np.median(shapes["radius"].to_numpy())) * float(np.sqrt(abs(np.linalg.det(to_full[:2, :2]))))
    # table rows ↔ shapes rows by the instance key
    rkey, ikey = attrs.get("region_key"), attrs.get("instance_key")
    obs = tab.obs
    rows = np.ones(tab.n_obs, bool) if rkey not in obs else (obs[rkey].astype(str).to_numpy() == region)
    inst = obs[ikey].to_numpy() if ikey in obs else tab.obs_names.to_numpy()
    pos = pd.Index(shapes.index)
    where = pos.get_indexer(pd.Index(inst[rows]))
    if (where < 0).any():
        raise DataFormatError(p, f"{int((where < 0).sum())} table rows have no spot in {region!r} "
                                 f"(e.g. {inst[rows][where < 0][:3].tolist()})", _EXPECT)
    sub = tab[rows].copy()
    X = sub.X if sp.issparse(sub.X) else sp.csr_matrix(np.asarray(sub.X))
    tmp = ad.AnnData(X=X.tocsr(), obs=sub.obs.copy(), var=sub.var.copy(),
                     layers={k: v for k, v in sub.layers.items()})
    if sub.raw is not None:
        tmp.raw = sub.raw.to_adata()
    tmp, values, _ = _h5ad_values(tmp, p)
    tmp.obs_names = pd.Index([str(b) for b in inst[rows]])
    tmp.obsm["spatial"] = xy[where]
    if "in_tissue" not in tmp.obs:
        tmp.obs["in_tissue"] = 1
    # the image, as (y, x, 3) uint8, lazily where it is already uint8
    dims = list(arr.dims)
    a = arr.transpose("y", "x", "c").data if "c" in dims else arr.transpose("y", "x").data[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(np.asarray(a), 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = _to_uint8(np.asarray(a))
    img = HistologyImage([a], fullres_per_px=s, path=p)
    um_source = "given"
    if um_per_px is None:
        um_source = f"spot diameter {diam_px:.4g} px = {spot_diameter_um:g} µm"
        if not (np.isfinite(diam_px) and diam_px > 0):
            raise DataFormatError(p, f"spot radius {diam_px / 2} px gives no pixel size", "pass um_per_px=")
        um_per_px = float(spot_diameter_um) / diam_px
    lib = name or (region if region else p.stem)
    thumb, sc = img.thumbnail(2000)
    tmp.uns["spatial"] = build_uns_spatial(lib, hires=thumb, hires_scalef=sc / s, spot_diameter_fullres=diam_px,
                                           metadata={"source": f"SpatialData {p.name}: image {iname!r}, "
                                                               f"spots {region!r}, table {tname!r}"})
    nm = name or p.name.split(".")[0]
    return Sample(adata=tmp, image=img, um_per_px=float(um_per_px), spot_diameter_um=55.0, technology="visium",
                  name=nm, provenance={"path": str(p), "reader": "read_spatialdata", "table": tname,
                                       "image": iname, "shapes": region, "coordinate_system": cs,
                                       "values": values, "um_per_px_source": um_source})


def write_spatialdata(path, maps, genes=None, um_per_px: float = 1.0, origin_um=(0.0, 0.0), *, mask=None,
                      extra_channels: Mapping[str, object] | None = None, metadata: dict | None = None,
                      frame=None) -> Path:
    """Write maps (G, Y, X) as SpatialData (see the module docstring), atomically.

    ``frame`` (:class:`~napari_diffst.io.scverse.SectionFrame`) supplies the H&E, the spots and the grid's
    place in the section; without it only the maps and their table are written (full-res px = µm)."""
    from .scverse import SectionFrame, sr_anndata
    from .writers import META_KEY, _check, _meta, atomic_path, pixel_mask

    path = Path(path)
    sd = _import(path)
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Scale

    maps, genes, place, extra = _check(path, maps, genes, um_per_px, origin_um, extra_channels)
    maps = np.asarray(maps, np.float32)
    G, H, W = maps.shape
    mask = pixel_mask(path, maps, mask)
    if frame is None:
        frame = SectionFrame.from_placement(place)
    A = np.asarray(frame.hr_affine, float)
    to_cs = Affine(A, input_axes=("x", "y"), output_axes=("x", "y"))
    images = {"maps": Image2DModel.parse(np.where(mask[None], maps, np.nan).astype(np.float32), dims=("c", "y", "x"),
                                         c_coords=list(genes), transformations={CS: to_cs})}
    for k, v in extra.items():
        images[f"maps_{k}"] = Image2DModel.parse(np.where(mask[None], np.asarray(v, np.float32), np.nan),
                                                 dims=("c", "y", "x"), c_coords=list(genes),
                                                 transformations={CS: Affine(A, input_axes=("x", "y"),
                                                                             output_axes=("x", "y"))})
    he = None
    if frame.uns_spatial and (frame.uns_spatial.get("images") or {}).get("hires") is not None:
        he = np.asarray(frame.uns_spatial["images"]["hires"])
        f = 1.0 / float(frame.uns_spatial["scalefactors"]["tissue_hires_scalef"])
    elif frame.image is not None:
        he, sc = frame.image.thumbnail(4096)
        f = frame.image.fullres_per_px / sc
    if he is not None:
        if he.dtype != np.uint8:
            he = np.clip(he * (255.0 if he.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        images["he"] = Image2DModel.parse(np.moveaxis(he[..., :3], -1, 0), dims=("c", "y", "x"),
                                          c_coords=["r", "g", "b"], transformations={CS: Scale([f, f], axes=("x", "y"))})
    shapes = {}
    if frame.spots_xy is not None and len(frame.spots_xy):
        idx = (frame.spots_barcode if frame.spots_barcode is not None
               else np.array([f"spot{i}" for i in range(len(frame.spots_xy))]))
        r = float(frame.spot_diameter_px or frame.hr_px) / 2.0
        import pandas as pd

        shapes["spots"] = ShapesModel.parse(np.asarray(frame.spots_xy, float), geometry=0,
                                            radius=np.full(len(frame.spots_xy), r),
                                            index=pd.Index([str(b) for b in idx]), transformations={CS: Scale([1.0, 1.0], axes=("x", "y"))})
    meta = _meta(genes, place, list(extra), metadata)
    adata = sr_anndata(maps, genes, mask, frame, extra=extra, meta=meta, meta_key=META_KEY)
    adata.obs["region"] = "maps"
    adata.obs["region"] = adata.obs["region"].astype("category")
    adata.obs["pixel_id"] = np.arange(adata.n_obs)
    tables = {"maps_table": TableModel.parse(adata, region="maps", region_key="region", instance_key="pixel_id")}
    sdata = sd.SpatialData(images=images, shapes=shapes, tables=tables)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(tmp)
    return path


def read_spatialdata_maps(path):
    """The maps of a SpatialData written by :func:`write_spatialdata` as a
    :class:`~napari_diffst.io.writers.MapsFile` (image ``maps``, extra groups ``maps_<name>``)."""
    from .writers import META_KEY, MapsFile

    p = Path(os.fspath(path))
    sd = _import(p)
    sdata = sd.read_zarr(p)
    if "maps" not in sdata.images:
        raise DataFormatError(p, f"no image element 'maps' (images: {sorted(sdata.images)})",
                              "a SpatialData written by napari-diffst (sample --format spatialdata)")
    arr = _level0(sdata.images["maps"])
    genes = [str(c) for c in arr.coords["c"].values]
    tab = sdata.tables.get("maps_table")
    meta = dict(tab.uns.get(META_KEY, {})) if tab is not None else {}
    meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()}
    extra = {k[len("maps_"):]: np.asarray(_level0(v).values, np.float32) for k, v in sdata.images.items()
             if k.startswith("maps_")}
    return MapsFile(np.asarray(arr.values, np.float32), genes, float(meta.get("um_per_px", 1.0)),
                    tuple(float(v) for v in meta.get("origin_um", (0.0, 0.0))), extra, meta)
