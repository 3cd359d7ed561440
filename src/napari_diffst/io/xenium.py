"""10x Xenium output bundle -> :class:`~napari_diffst.data.sample.Sample`.

Layout (Xenium Onboard Analysis; only ``experiment.xenium`` is required to recognise the folder)::

    output-XETG.../
      experiment.xenium                   JSON: pixel_size (µm/px of the morphology image), panel_name, ...
      cells.parquet | cells.csv.gz        cell_id, x_centroid, y_centroid (µm)
      cell_feature_matrix.h5 | cell_feature_matrix/ (MTX)   cells × features (Gene Expression + controls)
      transcripts.parquet | transcripts.csv.gz   feature_name, x_location, y_location, z_location (µm), qv
      morphology_focus.ome.tif | morphology_focus/morphology_focus_000N.ome.tif   DAPI (+ boundary stains)
      cell_boundaries.parquet | .csv.gz   optional, not read

The full-resolution frame is the morphology image's pixel grid: pixel (0, 0) sits at µm (0, 0) and
``um_per_px`` is the OME ``PhysicalSizeX`` (else ``experiment.xenium``'s ``pixel_size``).  ``adata``: cells ×
genes when cells and the matrix are there (names as spatialdata-io: ``obs['cell_id']``, ``obsm['spatial']``
= centroids, here in px of the image, with ``obs['x_centroid']``/``['y_centroid']`` in µm kept); else the
transcripts binned in ``bin_um`` squares.  Control probes and codewords (NegControl*, BLANK*, Unassigned*,
Deprecated*, antisense) are skipped, with counts in ``adata.uns['imaging']``; transcripts below ``min_qv`` are
dropped (counted too).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.molecules import drop_controls, is_control_probe, molecules_to_bins_adata
from ..data.sample import Sample
from ..errors import DataFormatError

__all__ = ["is_xenium", "read_xenium", "MIN_QV", "XENIUM_DEFAULT_BIN_UM"]

EXPERIMENT = "experiment.xenium"
MIN_QV = 20.0
XENIUM_DEFAULT_BIN_UM = 10.0


def _root(p: Path) -> Path | None:
    if p.is_file() and p.name.lower() == EXPERIMENT:
        return p.parent
    if p.is_dir() and (p / EXPERIMENT).is_file():
        return p
    return None


FORMAT = "xenium"
DESCRIPTION = "10x Xenium output bundle (experiment.xenium)"


def detect(path) -> bool:
    return is_xenium(path)


def read(path, **kwargs):
    return read_xenium(path, **kwargs)


def is_xenium(path) -> bool:
    """True for a Xenium output folder (or its ``experiment.xenium``). Never raises."""
    try:
        return _root(Path(os.fspath(path))) is not None
    except OSError:
        return False


def _read_experiment(path: Path) -> dict:
    exp = "Xenium's experiment.xenium (JSON with pixel_size in µm, panel_name, ...)"
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except Exception as exc:
        raise DataFormatError(path, f"not readable JSON ({type(exc).__name__}: {exc})", exp) from exc
    if not isinstance(meta, dict):
        raise DataFormatError(path, "not a JSON object", exp)
    return meta


def _read_table(path: Path, what: str, expected: str) -> pd.DataFrame:
    try:
        if path.name.lower().endswith(".parquet"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:
        raise DataFormatError(path, f"cannot read the {what} ({type(exc).__name__}: {str(exc)[:160]}); the file "
                              "may be truncated or incomplete — copy it again from the instrument/output bundle",
                              expected) from exc


def _first(root: Path, names) -> Path | None:
    for n in names:
        if (root / n).exists():
            return root / n
    return None


def _as_str(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


# ------------------------------------------------------------------------------------------------ image
def _ome_channels_and_size(tif) -> tuple[list[str], float | None]:
    import xml.etree.ElementTree as ET

    xml = getattr(tif, "ome_metadata", None)
    if not xml:
        return [], None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return [], None
    names, size = [], None
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels" and size is None and el.get("PhysicalSizeX"):
            try:
                size = float(el.get("PhysicalSizeX"))
                unit = el.get("PhysicalSizeXUnit", "µm")
                size *= {"nm": 1e-3, "mm": 1e3}.get(unit, 1.0)
            except ValueError:
                size = None
        if tag == "Channel":
            names.append(el.get("Name") or "")
    return names, size


def _open_morphology(root: Path):
    """(image or None, µm/px from OME or None, file) — DAPI channel, pyramid read lazily."""
    import tifffile
    import zarr

    from ..data.fluorescence import fluorescence_image

    single = _first(root, ("morphology_focus.ome.tif", "morphology_focus.ome.tiff"))
    files = [single] if single is not None else []
    folder = root / "morphology_focus"
    if not files and folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.name.lower().endswith((".ome.tif", ".ome.tiff")))
    if not files:
        return None, None, None
    exp = "an OME-TIFF morphology image (Y, X) or (C, Y, X) with a DAPI channel"
    best = None
    for f in files:
        try:
            tif = tifffile.TiffFile(f)
            series = tif.series[0]
            grp = zarr.open(series.aszarr(), mode="r")
        except Exception as exc:
            raise DataFormatError(f, f"cannot open the morphology image ({type(exc).__name__}: {exc})",
                                  exp + "; the file may be truncated — copy it again") from exc
        names, size = _ome_channels_and_size(tif)
        axes = series.axes.upper()
        if hasattr(grp, "shape"):
            arrays = [grp]
        else:
            keys = sorted(grp.array_keys(), key=lambda k: int(k) if str(k).isdigit() else k)
            arrays = [grp[k] for k in keys]
        ci = axes.index("C") if "C" in axes else None
        nch = arrays[0].shape[ci] if ci is not None else 1
        dapi = next((i for i, n in enumerate(names[:nch] if nch > 1 else names[:1]) if "dapi" in n.lower()), None)
        cand = (f, tif, arrays, axes, dapi if dapi is not None else 0, names, size)
        if dapi is not None:
            best = cand
            break
        if best is None:
            best = cand
    f, tif, arrays, axes, ch, names, size = best

    def plane(arr):
        sel = []
        for ax in axes:
            if ax in "YX":
                sel.append(slice(None))
            elif ax == "C":
                sel.append(int(ch))
            else:
                sel.append(0)
        return _Plane(arr, tuple(sel))

    levels = [plane(a) for a in arrays]
    cname = names[ch] if ch < len(names) and names[ch] else "DAPI"
    img = fluorescence_image([levels], [cname], path=f)
    img._tiffs = [tif]
    return img, size, f


class _Plane:
    """A 2-D (Y, X) view of one channel of an n-D zarr array (reads only what is indexed)."""

    def __init__(self, arr, sel: tuple):
        self._arr = arr
        self._sel = sel
        self._yx = [i for i, s in enumerate(sel) if isinstance(s, slice)]
        self.shape = tuple(arr.shape[i] for i in self._yx)
        self.dtype = arr.dtype
        self.ndim = 2

    @property
    def size(self) -> int:  # napari's LayerDataProtocol (multiscale levels) asks for it
        return int(self.shape[0]) * int(self.shape[1])

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key) + (slice(None),) * (2 - len(key))
        sel = list(self._sel)
        sel[self._yx[0]], sel[self._yx[1]] = key[0], key[1]
        return np.asarray(self._arr[tuple(sel)])

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


# ---------------------------------------------------------------------------------------------- tables
def _read_transcripts(path: Path, min_qv: float) -> tuple[pd.DataFrame, dict]:
    exp = "Xenium transcripts: columns feature_name, x_location, y_location (µm), z_location, qv"
    df = _read_table(path, "transcripts", exp)
    cols = {str(c).lower(): c for c in df.columns}
    gcol = next((cols[c] for c in ("feature_name", "gene", "target") if c in cols), None)
    missing = [c for c in ("x_location", "y_location") if c not in cols]
    if missing or gcol is None:
        raise DataFormatError(path, f"missing column(s) {missing + ([] if gcol else ['feature_name'])}; found "
                              f"{list(map(str, df.columns))[:12]}", exp)
    genes = pd.Series(_as_str(df[gcol].to_numpy()))
    out = pd.DataFrame({"x_um": pd.to_numeric(df[cols["x_location"]], errors="coerce").to_numpy(np.float64),
                        "y_um": pd.to_numeric(df[cols["y_location"]], errors="coerce").to_numpy(np.float64),
                        "gene": genes.to_numpy()})
    if "z_location" in cols:
        out["z"] = pd.to_numeric(df[cols["z_location"]], errors="coerce").to_numpy()
    info = {"n_low_qv": 0}
    if "qv" in cols:
        qv = pd.to_numeric(df[cols["qv"]], errors="coerce").to_numpy(np.float64)
        out["qv"] = qv
        low = ~(qv >= float(min_qv))
        info["n_low_qv"] = int(low.sum())
        out = out.loc[~low].reset_index(drop=True)
    info["min_qv"] = float(min_qv)
    bad = ~np.isfinite(out["x_um"].to_numpy()) | ~np.isfinite(out["y_um"].to_numpy())
    if bad.any():
        raise DataFormatError(path, f"{int(bad.sum())} transcript(s) with non-numeric x/y_location", exp)
    return out, info


def _read_matrix(root: Path):
    from .visium import _read_10x_h5, _read_10x_mtx

    h5 = root / "cell_feature_matrix.h5"
    mtx = root / "cell_feature_matrix"
    if h5.is_file():
        return _read_10x_h5(h5), h5
    if mtx.is_dir():
        return _read_10x_mtx(mtx), mtx
    return None, None


def read_xenium(path, *, bin_um: float = XENIUM_DEFAULT_BIN_UM, min_qv: float = MIN_QV,
                name: str | None = None) -> Sample:
    """Read a Xenium output folder (see the module docstring)."""
    import anndata as ad
    import scipy.sparse as sp

    p = Path(os.fspath(path))
    root = _root(p)
    if root is None:
        raise DataFormatError(p, f"no {EXPERIMENT}", "a Xenium output folder holding experiment.xenium")
    meta = _read_experiment(root / EXPERIMENT)
    image, ome_um, img_file = _open_morphology(root)
    meta_um = meta.get("pixel_size")
    try:
        meta_um = float(meta_um) if meta_um is not None else None
    except (TypeError, ValueError):
        meta_um = None
    um_per_px = ome_um or meta_um
    if not um_per_px or um_per_px <= 0:
        raise DataFormatError(root / EXPERIMENT, "no pixel size: neither 'pixel_size' in experiment.xenium nor "
                              "OME PhysicalSizeX in the morphology image",
                              "experiment.xenium with \"pixel_size\": <µm per morphology pixel> (0.2125 for Xenium)")
    imaging: dict = {"platform": "xenium", "panel": meta.get("panel_name"), "pixel_size_um": float(um_per_px),
                     "software": meta.get("analysis_sw_version"), "frame": "morphology px"}
    # transcripts
    mol = None
    tpath = _first(root, ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"))
    if tpath is not None:
        tx, tinfo = _read_transcripts(tpath, min_qv)
        keep, cinfo = drop_controls(pd.unique(tx["gene"]))
        genes = sorted(str(g) for g, k in zip(pd.unique(tx["gene"]), keep) if k)
        is_gene = tx["gene"].isin(genes).to_numpy()
        mol = pd.DataFrame({"x": tx["x_um"].to_numpy()[is_gene] / um_per_px,
                            "y": tx["y_um"].to_numpy()[is_gene] / um_per_px,
                            "gene": pd.Categorical(tx["gene"].to_numpy()[is_gene], categories=genes)})
        for c in ("z", "qv"):
            if c in tx:
                mol[c] = tx[c].to_numpy()[is_gene]
        imaging.update(n_molecules=int(len(mol)), n_control_molecules=int((~is_gene).sum()), **tinfo, **cinfo)
        if image is not None:
            Hh, Ww = image.shape
            out = (mol["x"] < -10) | (mol["x"] > Ww + 10) | (mol["y"] < -10) | (mol["y"] > Hh + 10)
            if out.mean() > 0.01:
                raise DataFormatError(tpath, f"{int(out.sum())} of {len(mol)} transcripts lie outside the "
                                      f"{Ww}×{Hh} px morphology image {img_file.name} at {um_per_px:g} µm/px",
                                      "transcripts and morphology image of the same Xenium run (x/y_location in µm "
                                      "from the image's top-left corner)")
    # cells
    cpath = _first(root, ("cells.parquet", "cells.csv.gz", "cells.csv"))
    (mat, mpath) = _read_matrix(root)
    adata = None
    if cpath is not None and mat is not None:
        cexp = "Xenium cells table: cell_id, x_centroid, y_centroid (µm)"
        cells = _read_table(cpath, "cells table", cexp)
        if not {"cell_id", "x_centroid", "y_centroid"} <= set(cells.columns):
            raise DataFormatError(cpath, f"missing cell_id/x_centroid/y_centroid (found {list(cells.columns)[:10]})",
                                  cexp)
        X, barcodes, names, ids, ftype = mat
        names = _as_str(names)
        keep = np.array([not is_control_probe(n) for n in names], bool)
        if ftype is not None:
            keep &= np.array([str(t) == "Gene Expression" for t in _as_str(ftype)], bool)
        imaging["n_control_features"] = int((~keep).sum())
        cid = _as_str(cells["cell_id"].to_numpy())
        pos = pd.Series(np.arange(len(cid)), index=cid)
        bc = _as_str(barcodes)
        missing = [b for b in bc if b not in pos.index]
        if missing:
            raise DataFormatError(cpath, f"{len(missing)} cell(s) of {mpath.name} are not in {cpath.name} "
                                  f"(e.g. {missing[0]})", "cells table and matrix of the same run")
        rows = pos.loc[bc].to_numpy()
        cx = cells["x_centroid"].to_numpy(np.float64)[rows]
        cy = cells["y_centroid"].to_numpy(np.float64)[rows]
        obs = pd.DataFrame({"cell_id": bc, "x_centroid": cx, "y_centroid": cy,
                            "in_tissue": np.ones(len(bc), np.int64)}, index=bc)
        for c in ("transcript_counts", "cell_area", "nucleus_area"):
            if c in cells.columns:
                obs[c] = cells[c].to_numpy()[rows]
        Xg = sp.csr_matrix(X)[:, np.flatnonzero(keep)]
        from ._common import _make_unique

        adata = ad.AnnData(X=Xg.astype(np.int64), obs=obs,
                           var=pd.DataFrame({"gene_ids": _as_str(ids)[keep]}, index=_make_unique(names[keep])))
        adata.obsm["spatial"] = np.c_[cx, cy] / um_per_px
        imaging["unit"] = "cells"
        spot_um, pitch = 10.0, None
    elif mol is not None:
        adata = molecules_to_bins_adata(mol, list(mol["gene"].cat.categories), bin_px=float(bin_um) / um_per_px,
                                        um_per_px=um_per_px)
        imaging.update(unit="bins", bin_um=float(bin_um))
        spot_um, pitch = float(bin_um), float(bin_um)
    else:
        what = ("no cells table (cells.parquet / cells.csv.gz)" if cpath is None else
                "no cell_feature_matrix.h5 or cell_feature_matrix/ folder")
        raise DataFormatError(root, f"{what} and no transcripts (transcripts.parquet / transcripts.csv.gz)",
                              "a Xenium output folder with cells + cell_feature_matrix, or transcripts")
    adata.uns["imaging"] = imaging
    prov = {"path": str(root), "reader": "xenium", "technology": "xenium",
            "image": None if img_file is None else str(img_file)}
    if ome_um and meta_um and abs(ome_um / meta_um - 1) > 0.01:
        prov["note"] = f"OME PhysicalSizeX {ome_um:g} µm used over experiment.xenium pixel_size {meta_um:g} µm"
    return Sample(adata=adata, image=image, um_per_px=float(um_per_px), spot_diameter_um=spot_um,
                  technology="xenium", name=name or meta.get("region_name") or root.name, provenance=prov,
                  lattice_pitch_um=pitch, molecules=mol)
