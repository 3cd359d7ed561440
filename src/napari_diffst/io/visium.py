"""10x Visium Space Ranger ``outs`` (v1 ``tissue_positions_list.csv`` / v2+ ``tissue_positions.csv``),
counts from ``filtered_feature_bc_matrix.h5`` or the MTX folder."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.sample import LATTICE_PITCH_UM, SPOT_DIAMETER_UM, Sample, build_uns_spatial
from ..errors import DataFormatError
from ._common import (
    _SQUARE_RE,
    _as_str_array,
    _check_spots_inside,
    _decoded,
    _find_images,
    _finite_pos,
    _guard_downscaled_coordinates,
    _spaceranger_image_shapes,
    _lattice_fit_um_per_px,
    _lower_name,
    _make_unique,
    _margin_px,
    _new_adata,
    _open_binary,
    _open_image,
    _read_text_head,
    _spots_inside,
    _validate_counts,
    _warn_scale,
    _wrap,
)

#: Format key and name for :func:`napari_diffst.io.readers.detect_format` / ``FORMATS``.
FORMAT = "visium"
DESCRIPTION = "10x Visium Space Ranger outs"

#: Space Ranger defines ``spot_diameter_fullres`` as the pixels spanning a *theoretical 65 µm* spot
#: (the physical capture area is 55 µm). Using 55 here would make µm/px 18 % too small; on the
#: fixtures 65 µm agrees with the 100 µm spot lattice to <0.5 % (V1 mouse brain / squidpy).
VISIUM_SPOT_DIAMETER_FULLRES_UM = 65.0
_FULLRES_EXCLUDE = ("cytassist", "fiducial", "detected_tissue", "aligned", "lowres", "hires", "spot", "mask")


# ================================================================================================
# 10x matrices
# ================================================================================================
def _read_10x_h5(path: Path):
    """10x feature-barcode HDF5 (CSC, features × barcodes) -> (CSR barcodes × features, barcodes,
    names, ids, feature_types)."""
    import h5py

    exp = "a 10x Genomics feature-barcode matrix .h5 (matrix/data, indices, indptr, shape, barcodes, features)"
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise DataFormatError(path, f"not a readable HDF5 file ({exc})", exp) from exc
    with f, _wrap(path, "malformed 10x HDF5 matrix", exp):
        if "matrix" in f:
            g = f["matrix"]
        else:  # Cell Ranger 2 layout: one group per genome
            groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
            if len(groups) != 1:
                raise DataFormatError(path, "no 'matrix' group", exp)
            g = f[groups[0]]
        missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in g]
        if missing:
            raise DataFormatError(path, f"missing datasets {missing} in the HDF5 matrix", exp)
        data = g["data"][()]
        indices = g["indices"][()].astype(np.int64)
        indptr = g["indptr"][()].astype(np.int64)
        shape = tuple(int(s) for s in g["shape"][()])
        barcodes = _as_str_array(g["barcodes"][()])
        if "features" in g:
            fg = g["features"]
            ids = _as_str_array(fg["id"][()]) if "id" in fg else None
            names = _as_str_array(fg["name"][()]) if "name" in fg else ids
            ftype = _as_str_array(fg["feature_type"][()]) if "feature_type" in fg else None
        else:
            ids = _as_str_array(g["genes"][()]) if "genes" in g else None
            names = _as_str_array(g["gene_names"][()]) if "gene_names" in g else ids
            ftype = None
        if names is None:
            raise DataFormatError(path, "no feature names (features/name or gene_names)", exp)
        if ids is None:
            ids = names
    n_feat, n_bc = shape
    if len(indptr) != n_bc + 1 or len(barcodes) != n_bc or len(names) != n_feat or len(data) != len(indices) \
            or (len(indptr) and indptr[-1] != len(data)) or (len(indices) and (indices.max() >= n_feat
                                                                               or indices.min() < 0)):
        raise DataFormatError(path, f"inconsistent matrix: shape {shape}, {len(barcodes)} barcodes, "
                              f"{len(names)} features, indptr {len(indptr)}, data {len(data)}", exp)
    X = sp.csc_matrix((data, indices, indptr), shape=shape).T.tocsr()
    return X, barcodes, names, ids, ftype


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        q = folder / n
        if q.is_file():
            return q
    return None


def _read_10x_mtx(folder: Path):
    """10x MTX folder (matrix.mtx[.gz] features × barcodes, features.tsv[.gz], barcodes.tsv[.gz])."""
    import scipy.io

    mtx = _first_existing(folder, ("matrix.mtx.gz", "matrix.mtx"))
    feats = _first_existing(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    bcs = _first_existing(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    exp = "a 10x MTX folder with matrix.mtx.gz, features.tsv.gz and barcodes.tsv.gz"
    for q, n in ((mtx, "matrix.mtx.gz"), (feats, "features.tsv.gz"), (bcs, "barcodes.tsv.gz")):
        if q is None:
            raise DataFormatError(folder, f"{n} is missing", exp)
    with _wrap(mtx, "cannot parse Matrix Market file", "a MatrixMarket coordinate matrix (features × barcodes)"):
        with _open_binary(mtx) as fh:
            M = scipy.io.mmread(fh)
        M = sp.csr_matrix(M)
    with _wrap(feats, "cannot parse features table", "tab-separated: feature id, name[, type]"):
        with _open_binary(feats) as fh:
            fdf = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)
    with _wrap(bcs, "cannot parse barcodes table", "one barcode per line"):
        with _open_binary(bcs) as fh:
            bdf = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)
    ids = fdf.iloc[:, 0].to_numpy(object)
    names = fdf.iloc[:, 1].to_numpy(object) if fdf.shape[1] > 1 else ids
    ftype = fdf.iloc[:, 2].to_numpy(object) if fdf.shape[1] > 2 else None
    barcodes = bdf.iloc[:, 0].to_numpy(object)
    if M.shape != (len(ids), len(barcodes)):
        raise DataFormatError(mtx, f"matrix shape {M.shape} does not match {len(ids)} features × "
                              f"{len(barcodes)} barcodes in {feats.name}/{bcs.name}", exp)
    return M.T.tocsr(), barcodes, names, ids, ftype


def _load_matrix(root: Path):
    """Counts in a Space Ranger folder: filtered h5 > filtered MTX > raw h5 > raw MTX.

    Returns (X, barcodes, names, ids, ftype, source_path, filtered: bool)."""
    for kind in ("filtered", "raw"):
        h5 = sorted(root.glob(f"*{kind}_feature_bc_matrix.h5"))
        if h5:
            return (*_read_10x_h5(h5[0]), h5[0], kind == "filtered")
        mdir = root / f"{kind}_feature_bc_matrix"
        if mdir.is_dir():
            return (*_read_10x_mtx(mdir), mdir, kind == "filtered")
    raise DataFormatError(root, "no count matrix found",
                          "filtered_feature_bc_matrix.h5 or a filtered_feature_bc_matrix/ MTX folder")


def _gene_var(names, ids, ftype) -> tuple[pd.DataFrame, np.ndarray | None]:
    """var with unique gene symbols; keeps only 'Gene Expression' features when types are mixed."""
    names = np.asarray([str(n) for n in names], dtype=object)
    ids = np.asarray([str(i) for i in ids], dtype=object)
    keep = None
    if ftype is not None:
        ftype = np.asarray([str(t) for t in ftype], dtype=object)
        ge = ftype == "Gene Expression"
        if ge.any() and not ge.all():
            keep = np.flatnonzero(ge)
            names, ids, ftype = names[keep], ids[keep], ftype[keep]
    var = pd.DataFrame({"gene_ids": ids}, index=_make_unique(names))
    if ftype is not None:
        var["feature_types"] = ftype
    return var, keep


# ================================================================================================
# Visium
# ================================================================================================
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _resolve_outs(p: Path, strict: bool = True) -> Path | None:
    """The Space Ranger ``outs`` folder for a path given as outs, its parent, spatial/, or a file in them."""
    cands = []
    if p.is_file():
        p = p.parent
    if p.name == "spatial":
        cands.append(p.parent)
    cands += [p / "outs", p]
    for c in cands:
        spatial = c / "spatial"
        if spatial.is_dir() and _positions_file(spatial) is not None:
            return c
    if strict:
        raise DataFormatError(p, "no Space Ranger spatial/tissue_positions file found",
                              "the 'outs' folder (or its parent, or outs/spatial) of a Space Ranger run")
    return None


def _is_hd_outs(outs: Path) -> bool:
    sf = outs / "spatial" / "scalefactors_json.json"
    if (outs / "spatial" / "tissue_positions.parquet").is_file() or _SQUARE_RE.search(outs.name):
        return True
    if sf.is_file():
        try:
            return "bin_size_um" in json.loads(sf.read_text())
        except Exception:
            return False
    return False


def _positions_file(spatial: Path) -> Path | None:
    return _first_existing(spatial, ("tissue_positions.parquet", "tissue_positions.csv",
                                     "tissue_positions_list.csv"))


def _read_positions(path: Path) -> pd.DataFrame:
    """Space Ranger tissue positions (v1 headerless CSV, v2 CSV with header, parquet) indexed by barcode."""
    exp = ("columns barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres "
           "(tissue_positions_list.csv has no header)")
    with _wrap(path, "cannot parse tissue positions", exp):
        if _lower_name(path).endswith(".parquet"):
            df = pd.read_parquet(path)
        else:
            head = _read_text_head(path, 4096)
            first = head.splitlines()[0] if head.strip() else ""
            has_header = "barcode" in first.lower() or "in_tissue" in first.lower()
            with _open_binary(path) as fh:
                df = pd.read_csv(fh, header=0 if has_header else None, dtype={0: str} if not has_header else None)
            if not has_header:
                if df.shape[1] != 6:
                    raise DataFormatError(path, f"{df.shape[1]} columns without a header", exp)
                df.columns = _POS_COLS
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in _POS_COLS if c not in df.columns]
    if missing:
        raise DataFormatError(path, f"missing columns {missing} (found {list(df.columns)[:8]})", exp)
    if len(df) == 0:
        raise DataFormatError(path, "no spots listed", exp)
    df = df[_POS_COLS].copy()
    df["barcode"] = df["barcode"].astype(str)
    for c in _POS_COLS[1:]:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            i = int(np.flatnonzero(v.isna().to_numpy())[0])
            raw = df[c].iloc[i]
            shown = "an empty/NaN value" if pd.isna(raw) else f"non-numeric value {str(raw)!r}"
            raise DataFormatError(path, f"{shown} in column {c!r} (row {i + 1})", exp)
        if not np.all(np.isfinite(v.to_numpy(float))):
            raise DataFormatError(path, f"infinite value in column {c!r}", exp)
        df[c] = v
    for c in ("in_tissue", "array_row", "array_col"):
        df[c] = df[c].astype(np.int64)
    if df["barcode"].duplicated().any():
        raise DataFormatError(path, f"duplicated barcode {df['barcode'][df['barcode'].duplicated()].iloc[0]!r}",
                              "one row per barcode")
    return df.set_index("barcode", drop=True)


def _read_scalefactors(spatial: Path) -> tuple[dict, Path | None]:
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        return {}, None
    with _wrap(sf_path, "cannot parse scale factors JSON", "a JSON object of numeric scale factors"):
        sf = json.loads(sf_path.read_text())
    if not isinstance(sf, dict):
        raise DataFormatError(sf_path, "not a JSON object", "a JSON object of numeric scale factors")
    out = {}
    for k, v in sf.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    for k in ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres", "microns_per_pixel"):
        if k in sf and not _finite_pos(sf[k]):
            raise DataFormatError(sf_path, f"scale factor {k}={sf[k]!r} is not a positive number",
                                  "positive numeric scale factors")
    return out, sf_path


def _fullres_candidates(dirs: Iterable[Path]) -> list[Path]:
    out = []
    for d in dirs:
        for q in _find_images(d):
            n = _lower_name(q)
            if q.suffix.lower() == ".png":
                continue
            if any(x in n for x in _FULLRES_EXCLUDE):
                continue
            if "full" in n or "image" in n or n.startswith("he") or "_he" in n or "h&e" in n:
                out.append(q)
    return out


def _pick_visium_image(*, coord_file, xy, sf: dict, spatial: Path, search_dirs, image, name: str,
                       spot_diameter_px: float):
    """Choose the Sample image: user image > full-res beside outs > hires PNG > lowres PNG.

    Returns (HistologyImage | None, source string, {key: decoded PNG array}, {key: (H, W)})."""
    hires_s, lowres_s = sf.get("tissue_hires_scalef"), sf.get("tissue_lowres_scalef")
    arrays, imgs, shapes = {}, {}, {}
    for key, fname, s in (("hires", "tissue_hires_image.png", hires_s),
                          ("lowres", "tissue_lowres_image.png", lowres_s)):
        q = spatial / fname
        if q.is_file() and _finite_pos(s):
            im = _open_image(q, fullres_per_px=1.0 / s)
            arr = _decoded(im)
            arrays[key] = arr
            imgs[key] = im
            shapes[key] = arr.shape[:2]
    expected_full = None
    for key, s in (("hires", hires_s), ("lowres", lowres_s)):
        if key in shapes:
            expected_full = (shapes[key][0] / s, shapes[key][1] / s)
            break

    if image is not None:
        im = _open_image(Path(image), 1.0)
        _check_spots_inside(coord_file, xy, im, spot_diameter_px, "image")
        return im, f"user image {Path(image).name}", arrays, shapes

    for cand in _fullres_candidates(search_dirs):
        try:
            im = _open_image(cand, 1.0)
        except DataFormatError as exc:
            warnings.warn(f"{name}: skipping {cand.name}: {exc}", stacklevel=3)
            continue
        H, W = im.shape
        if expected_full is not None:
            if abs(H / expected_full[0] - 1) > 0.03 or abs(W / expected_full[1] - 1) > 0.03:
                warnings.warn(f"{name}: {cand} is {W}×{H} px but the scale factors imply a "
                              f"{expected_full[1]:.0f}×{expected_full[0]:.0f} px full-resolution image; not used",
                              stacklevel=3)
                continue
        if _spots_inside(xy, im, _margin_px(im, spot_diameter_px)).all():
            return im, f"full-resolution {cand.name}", arrays, shapes

    for key in ("hires", "lowres"):
        if key not in imgs:
            continue
        arr = arrays[key]
        if arr.size == 0 or int(arr.max()) == int(arr.min()):
            warnings.warn(f"{name}: tissue_{key}_image.png is blank (one colour); not used as histology",
                          stacklevel=3)
            continue
        _check_spots_inside(coord_file, xy, imgs[key], spot_diameter_px, f"{key} image")
        return imgs[key], f"tissue_{key}_image.png", arrays, shapes
    warnings.warn(f"{name}: no usable histology image found (spots only)", stacklevel=3)
    return None, "none", arrays, shapes


def _visium_lattice_um(pos: pd.DataFrame) -> float:
    """Visium hexagonal lattice: one array_col step is 50 µm, one array_row step 50·√3 µm."""
    return _lattice_fit_um_per_px(pos[["array_col", "array_row"]].to_numpy(float),
                                  pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                  (50.0, 50.0 * math.sqrt(3.0)))


def _join_counts_positions(X, barcodes, pos: pd.DataFrame, matrix_path: Path, pos_path: Path,
                           filtered: bool, name: str):
    barcodes = np.asarray([str(b) for b in barcodes], dtype=object)
    if len(set(barcodes)) != len(barcodes):
        raise DataFormatError(matrix_path, "duplicated barcodes in the count matrix", "unique barcodes")
    in_pos = pd.Index(pos.index).get_indexer(barcodes)
    keep = np.flatnonzero(in_pos >= 0)
    if not filtered:
        keep = keep[pos["in_tissue"].to_numpy()[in_pos[keep]] == 1]
    if len(keep) == 0:
        raise DataFormatError(
            matrix_path,
            f"barcode mismatch: none of the {len(barcodes)} barcodes of the count matrix ({matrix_path.name}) "
            f"appear in {pos_path} (e.g. {barcodes[0] if len(barcodes) else '—'!s} vs {pos.index[0]!s})",
            "the count matrix and spatial/tissue_positions of the same run (same barcode suffix, e.g. -1)")
    n_drop = len(barcodes) - len(keep)
    if n_drop:
        warnings.warn(f"{name}: {n_drop} of {len(barcodes)} barcodes in {matrix_path.name} have no position in "
                      f"{pos_path.name} (or are off tissue) and were dropped", stacklevel=3)
    return X[keep], barcodes[keep], pos.iloc[in_pos[keep]], n_drop


def _sample_name(outs: Path) -> str:
    return outs.parent.name if outs.name == "outs" else outs.name


def read_visium(path, *, image=None, name: str | None = None, library_id: str | None = None) -> Sample:
    """Read 10x Visium Space Ranger output.

    ``path``: the ``outs`` folder, its parent, ``outs/spatial`` or a file inside them. ``image``:
    optional full-resolution H&E (the one Space Ranger was run with); otherwise a ``*full*``/``*image*``
    TIFF/JPEG beside ``outs`` is used when its size matches the scale factors, else the hires PNG
    (``fullres_per_px = 1/tissue_hires_scalef``), else the lowres PNG. Spot positions stay in
    full-resolution pixels. µm/px: ``microns_per_pixel`` if present, else
    ``spot_diameter_fullres`` ↔ 65 µm (Space Ranger's definition), else the 100 µm lattice;
    cross-checked against the lattice fit (warning above 10 %)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "a Space Ranger outs folder")
    from .visium_hd import _resolve_hd_dir, read_visium_hd  # HD outs are read by their own module

    if _resolve_hd_dir(p, strict=False) is not None:
        return read_visium_hd(p, image=image, name=name)
    outs = _resolve_outs(p)
    if _is_hd_outs(outs):
        return read_visium_hd(outs, image=image, name=name)
    spatial = outs / "spatial"
    pos_path = _positions_file(spatial)
    pos = _read_positions(pos_path)
    sf, sf_path = _read_scalefactors(spatial)
    name = name or _sample_name(outs)

    X, barcodes, names, ids, ftype, mpath, filtered = _load_matrix(outs)
    X, values = _validate_counts(X, mpath)
    var, keep_f = _gene_var(names, ids, ftype)
    if keep_f is not None:
        X = X[:, keep_f]
    X, barcodes, pos_k, n_drop = _join_counts_positions(X, barcodes, pos, mpath, pos_path, filtered, name)

    # -- scale ------------------------------------------------------------------------------------
    um_lattice = _visium_lattice_um(pos)
    if "microns_per_pixel" in sf:
        um, um_src = sf["microns_per_pixel"], "scalefactors microns_per_pixel"
    elif "spot_diameter_fullres" in sf:
        um = VISIUM_SPOT_DIAMETER_FULLRES_UM / sf["spot_diameter_fullres"]
        um_src = f"scalefactors spot_diameter_fullres ↔ {VISIUM_SPOT_DIAMETER_FULLRES_UM:g} µm"
    elif math.isfinite(um_lattice):
        um, um_src = um_lattice, "100 µm spot lattice fit"
    else:
        raise DataFormatError(sf_path or spatial / "scalefactors_json.json",
                              "cannot determine µm per pixel (no scale factors, too few spots for the lattice)",
                              "scalefactors_json.json with spot_diameter_fullres")
    xy = pos_k[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    scalefs = {k: sf.get(f"tissue_{k}_scalef") for k in ("hires", "lowres")}

    # -- image ------------------------------------------------------------------------------------
    spot_d_px = SPOT_DIAMETER_UM["visium"] / um
    # guard first: downscaled coordinates would otherwise fail the image checks confusingly
    _guard_downscaled_coordinates(pos_path, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float),
                                  um, um_lattice, scalefs, _spaceranger_image_shapes(spatial))
    _warn_scale(name, um, um_lattice, 100.0, um_src)
    img, img_src, arrays, shapes = _pick_visium_image(
        coord_file=pos_path, xy=xy, sf=sf, spatial=spatial, search_dirs=[outs, outs.parent], image=image,
        name=name, spot_diameter_px=spot_d_px)

    lib = library_id or name
    hs = scalefs["hires"] or (scalefs["lowres"] or 1.0)
    uns = {"spatial": build_uns_spatial(
        lib, hires=arrays.get("hires"), hires_scalef=hs,
        spot_diameter_fullres=sf.get("spot_diameter_fullres", VISIUM_SPOT_DIAMETER_FULLRES_UM / um),
        lowres=arrays.get("lowres"), lowres_scalef=scalefs["lowres"],
        metadata={"source": str(outs), "reader": "napari_diffst.read_visium"})}
    for k in ("fiducial_diameter_fullres", "regist_target_img_scalef"):
        if k in sf:
            uns["spatial"][lib]["scalefactors"][k] = sf[k]
    obs = pos_k[["in_tissue", "array_row", "array_col"]].copy()
    obs.index = barcodes
    adata = _new_adata(X, obs, var, xy, uns)
    return Sample(
        adata=adata, image=img, um_per_px=float(um), spot_diameter_um=SPOT_DIAMETER_UM["visium"],
        technology="visium", name=name, lattice_pitch_um=LATTICE_PITCH_UM["visium"],
        provenance={"reader": "read_visium", "format": "visium", "values": values,
                    "files": {"matrix": str(mpath), "positions": str(pos_path),
                              "scalefactors": str(sf_path) if sf_path else None,
                              "image": str(img.path) if img is not None and img.path else None},
                    "image_source": img_src, "um_per_px_source": um_src, "um_per_px_lattice": um_lattice,
                    "n_dropped_barcodes": int(n_drop)},
    )


def tenx_kind(p: Path) -> str | None:
    """'visium' / 'visium_hd' for a Space Ranger outs / HD bin folder (or a file inside one), else None."""
    from .visium_hd import _resolve_hd_dir

    if p.is_dir():
        if _resolve_hd_dir(p, strict=False) is not None:
            return "visium_hd"
        outs = _resolve_outs(p, strict=False)
        return None if outs is None else ("visium_hd" if _is_hd_outs(outs) else "visium")
    name = _lower_name(p)
    if name.startswith("tissue_positions") or name == "scalefactors_json.json":
        outs = _resolve_outs(p, strict=False)
        return None if outs is None else ("visium_hd" if _is_hd_outs(outs) else "visium")
    if name.endswith(".h5") and "feature_bc_matrix" in name:
        return tenx_kind(p.parent)
    return None


def detect(p: Path) -> bool:
    """A Space Ranger (non-HD) outs folder, its parent or spatial/, or a positions/scalefactors/matrix file in it."""
    return tenx_kind(p) == FORMAT


read = read_visium
