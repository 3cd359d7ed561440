"""Legacy Spatial Transcriptomics sections (her2st, ST spot detector, STUtility)."""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.sample import LATTICE_PITCH_UM, SPOT_DIAMETER_UM, Sample, build_uns_spatial, estimate_um_per_px
from ..data.lattice import lattice_um_per_px
from ..errors import DataFormatError
from ._common import (
    _TABLE_EXT,
    _check_spots_inside,
    _find_images,
    _finite_pos,
    _has_ext,
    _lower_name,
    _make_unique,
    _new_adata,
    _open_binary,
    _open_image,
    _read_text_head,
    _sniff_sep,
    _thumbnail,
    _validate_counts,
    _wrap,
)

#: Format key and name for :func:`napari_diffst.io.readers.detect_format` / ``FORMATS``.
FORMAT = "legacy_st"
DESCRIPTION = "legacy Spatial Transcriptomics (counts .tsv + spot file + H&E)"

_LABEL_RE = re.compile(r"^\s*[A-Za-z_]*?(-?\d+(?:\.\d+)?)\s*[xX]\s*(-?\d+(?:\.\d+)?)\s*$")
_SPOTFILE_RE = re.compile(r"(selection|spot_data|^spots?[_\-.]|_spots?\.|spot_?coord|spot_?pos)", re.I)


# ================================================================================================
# legacy ST (her2st, ST spot detector, STUtility)
# ================================================================================================
#: Accepted (case-insensitive; spaces/dots/dashes read as '_') names for the spot-table columns.
SPOT_COLUMN_ALIASES = {
    "x": ("x", "array_x", "arrayx", "array_col", "spot_x", "col"),
    "y": ("y", "array_y", "arrayy", "array_row", "spot_y", "row"),
    "new_x": ("new_x", "newx", "adj_x", "x_adj", "adjusted_x"),
    "new_y": ("new_y", "newy", "adj_y", "y_adj", "adjusted_y"),
    "pixel_x": ("pixel_x", "pixelx", "px_x", "x_pixel", "pixel_col", "pxl_col_in_fullres", "imagecol", "image_x"),
    "pixel_y": ("pixel_y", "pixely", "px_y", "y_pixel", "pixel_row", "pxl_row_in_fullres", "imagerow", "image_y"),
    "selected": ("selected", "in_tissue", "under_tissue", "tissue", "is_selected"),
}
_HEADERLESS_SPOT_COLS = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
_EXPECT_SPOTS = ("a tab-separated spot table with columns x, y, pixel_x, pixel_y[, new_x, new_y, selected] "
                 "(ST spot detector / her2st *_selection.tsv, STUtility alignment_table_<id>.tsv)")
_EXPECT_LEGACY_COUNTS = ("a spots × genes table: first column spot labels 'XxY' (e.g. 10x21), header of gene "
                         "names, raw integer counts (genes × spots is transposed automatically)")


def _norm_col(c) -> str:
    return re.sub(r"[\s.\-]+", "_", str(c).strip().lower())


def _is_spot_file(p: Path) -> bool:
    """A spot table: a known name (``*selection*``, ``spots_*``, ``*spot_data*``, …) or, whatever its
    name (STUtility's ``alignment_table_<id>.tsv``), a header naming the array and pixel columns."""
    if not _has_ext(p, _TABLE_EXT):
        return False
    return bool(_SPOTFILE_RE.search(p.name)) or _has_spot_header(p)


def _has_spot_header(p: Path) -> bool:
    """True when the first line of a table names x, y, pixel_x, pixel_y (any accepted alias), or is
    the ST spot detector's headerless 6/7 numeric columns. Reads a few kB only; never raises."""
    try:
        head = _read_text_head(p, 4096)
    except Exception:
        return False
    lines = head.lstrip("\n\r").splitlines()
    if not lines or (len(lines) == 1 and len(head) >= 4096):  # a first line this long is a counts header
        return False
    first = lines[0].strip()
    sep = _sniff_sep(first)
    toks = [_unquote(x) for x in re.split(sep, first) if x.strip() != ""]
    if 6 <= len(toks) <= 7 and all(_to_float(x) is not None for x in toks):
        return True
    cols = {_norm_col(x) for x in toks}
    return all(any(a in cols for a in SPOT_COLUMN_ALIASES[c]) for c in ("x", "y", "pixel_x", "pixel_y"))


def _strip_table_ext(name: str) -> str:
    n = name
    for e in (".gz", ".tsv", ".csv", ".txt"):
        if n.lower().endswith(e):
            n = n[: -len(e)]
    return n


def _section_tokens(name: str) -> set[str]:
    stem = _strip_table_ext(name)
    toks = set(t for t in re.split(r"[_\-.\s]+", stem) if t)
    return toks - {"selection", "spot", "spots", "data", "stdata", "counts", "count", "tsv", "all", "matrix",
                   "alignment", "table"}


def _legacy_pairs(folder: Path, counts_hint: Path | None = None) -> list[tuple[Path, Path]]:
    """(counts, spot file) pairs in a folder, matched by shared name tokens (C2.tsv.gz ↔ C2_selection.tsv,
    stdata_A1.tsv ↔ spots_A1.tsv, A1.tsv ↔ alignment_table_A1.tsv). Spot tables are recognised by name or
    by their header (:func:`_is_spot_file`); nothing beyond the first few kB of a table is read."""
    if not folder.is_dir():
        return []
    files = [q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")]
    spots = [q for q in files if _is_spot_file(q)]
    counts = [q for q in files if _has_ext(q, _TABLE_EXT) and q not in spots
              and not _lower_name(q).startswith(("readme", "metadata", "meta_", "info"))]
    if counts_hint is not None:
        if counts_hint in spots:
            if len(counts) == 1:
                return [(counts[0], counts_hint)]
            tok = _section_tokens(counts_hint.name)
            m = [c for c in counts if _section_tokens(c.name) & tok]
            return [(m[0], counts_hint)] if len(m) == 1 else []
        counts = [c for c in counts if c == counts_hint]
    if not spots or not counts:
        return []
    if len(spots) == 1 and len(counts) == 1:
        return [(counts[0], spots[0])]
    pairs = []
    for c in counts:
        tok = _section_tokens(c.name)
        m = [s for s in spots if _section_tokens(s.name) & tok]
        if len(m) == 1:
            pairs.append((c, m[0]))
        elif len(m) == 0 and len(spots) == 1 and len(counts) == 1:
            pairs.append((c, spots[0]))
    return pairs if (counts_hint is not None or len(pairs) == 1) else []


def _read_table_str(path: Path) -> tuple[pd.DataFrame, str]:
    head = _read_text_head(path, 8192)
    if not head.strip():
        raise DataFormatError(path, "file is empty", _EXPECT_SPOTS)
    sep = _sniff_sep(head.splitlines()[0])
    with _open_binary(path) as fh:
        df = pd.read_csv(fh, sep=sep, header=None, dtype=str, keep_default_na=False, engine="python"
                         if sep == r"\s+" else "c", skip_blank_lines=True)
    return df, sep


def _to_float(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v


def _read_spot_table(path: Path) -> pd.DataFrame:
    """Spot table with canonical columns x, y, pixel_x, pixel_y, selected[, new_x, new_y]."""
    with _wrap(path, "cannot parse spot table", _EXPECT_SPOTS):
        raw, _ = _read_table_str(path)
    if raw.shape[0] == 0:
        raise DataFormatError(path, "no rows", _EXPECT_SPOTS)
    first = [str(v) for v in raw.iloc[0].tolist()]
    numeric_first = all(_to_float(v) is not None for v in first if v != "")
    if numeric_first:  # headerless ST spot detector output: x y new_x new_y pixel_x pixel_y [selected]
        if raw.shape[1] not in (6, 7):
            raise DataFormatError(path, f"no header and {raw.shape[1]} columns", _EXPECT_SPOTS)
        df = raw.copy()
        df.columns = _HEADERLESS_SPOT_COLS[: raw.shape[1]]
    else:
        cols = [_norm_col(c) for c in first]
        df = raw.iloc[1:].reset_index(drop=True)
        # R-style tables: header one shorter than the rows (row names in the first column)
        if len(cols) == df.shape[1] - 1:
            cols = ["_rowname"] + cols
        df.columns = cols[: df.shape[1]] + [f"_c{i}" for i in range(len(cols), df.shape[1])]
        rename = {}
        for canon, aliases in SPOT_COLUMN_ALIASES.items():
            for a in aliases:
                if a in df.columns and canon not in rename.values():
                    rename[a] = canon
                    break
        df = df.rename(columns=rename)
        df = df.loc[:, ~df.columns.duplicated()]
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise DataFormatError(path, f"missing columns {missing} (found {[c for c in df.columns][:10]})",
                              _EXPECT_SPOTS)
    if len(df) == 0:
        raise DataFormatError(path, "no spot rows", _EXPECT_SPOTS)
    out = pd.DataFrame(index=range(len(df)))
    for c in ("x", "y", "pixel_x", "pixel_y", "new_x", "new_y", "selected"):
        if c not in df.columns:
            continue
        v = pd.to_numeric(df[c].astype(str).str.strip(), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataFormatError(path, f"non-numeric, missing or infinite value {df[c].iloc[i]!r} in column "
                                  f"{c!r} (row {i + 1})", _EXPECT_SPOTS)
        out[c] = v
    if "selected" not in out:
        out["selected"] = 1.0
    elif not np.isin(out["selected"].to_numpy(), (0.0, 1.0)).all():
        raise DataFormatError(path, "column 'selected' has values other than 0/1", _EXPECT_SPOTS)
    return out


def _parse_labels(labels) -> np.ndarray:
    """'XxY' spot labels -> (N, 2) float array (NaN where unparsable)."""
    out = np.full((len(labels), 2), np.nan)
    for i, lab in enumerate(labels):
        m = _LABEL_RE.match(str(lab))
        if m:
            out[i] = float(m.group(1)), float(m.group(2))
    return out


def _unquote(t: str) -> str:
    t = t.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1]
    return t


def _fast_table(text: str, sep: str):
    """Fast path for a plain rectangular numeric table with row labels (np.loadtxt on the body):
    returns (row labels, column labels, float array) or None (then pandas parses it)."""
    if sep not in ("\t", ","):
        return None
    try:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) < 2 or '"' in lines[1].split(sep, 1)[-1]:
            return None
        header = [_unquote(t) for t in lines[0].split(sep)]
        parts = [ln.split(sep, 1) for ln in lines[1:]]
        if any(len(pp) != 2 for pp in parts):
            return None
        labels = [_unquote(pp[0]) for pp in parts]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vals = np.loadtxt(io.StringIO("\n".join(pp[1] for pp in parts)), delimiter=sep, dtype=np.float64,
                              ndmin=2, comments=None)
        if vals.shape[0] != len(labels):
            return None
        if len(header) == vals.shape[1] + 1:
            cols = header[1:]
        elif len(header) == vals.shape[1]:
            cols = header
        else:
            return None
        return labels, cols, vals
    except Exception:
        return None


def _read_legacy_counts(path: Path):
    """Counts table -> (CSR int spots × genes, spot labels, (N,2) label coords, gene names)."""
    with _wrap(path, "cannot parse counts table", _EXPECT_LEGACY_COUNTS):
        with _open_binary(path) as fh:
            text = fh.read().decode("utf-8", errors="replace")
        if not text.strip():
            raise DataFormatError(path, "file is empty", _EXPECT_LEGACY_COUNTS)
        sep = _sniff_sep(text.lstrip("\n\r").splitlines()[0])
        fast = _fast_table(text, sep)
        if fast is not None:
            rows, cols, vals = fast
            df = None
        else:
            df = pd.read_csv(io.StringIO(text), sep=sep, index_col=0, header=0,
                             engine="python" if sep == r"\s+" else "c")
            rows, cols, vals = [str(i) for i in df.index], [str(c) for c in df.columns], None
    if len(rows) == 0 or len(cols) == 0:
        raise DataFormatError(path, f"empty count matrix ({len(rows)} rows × {len(cols)} columns)",
                              _EXPECT_LEGACY_COUNTS)
    if vals is None:  # slow path: locate non-numeric cells for the message
        raw = df.to_numpy()
        if raw.dtype.kind not in "biuf":
            num = df.apply(pd.to_numeric, errors="coerce")
            badm = num.isna().to_numpy() & ~df.isna().to_numpy()
            if badm.any():
                r, c = np.argwhere(badm)[0]
                raise DataFormatError(path, f"non-numeric value {df.iat[r, c]!r} in row {rows[r]!r}, column "
                                      f"{cols[c]!r}", _EXPECT_LEGACY_COUNTS)
            raw = num.to_numpy(float)
        vals = np.asarray(raw, dtype=np.float64)
    row_xy = _parse_labels(rows)
    col_xy = _parse_labels(cols)
    r_ok, c_ok = np.isfinite(row_xy).all(1), np.isfinite(col_xy).all(1)
    if r_ok.sum() == 0 and c_ok.sum() > 0 and c_ok.mean() > 0.5:  # genes × spots: transpose
        rows, cols, vals = cols, rows, vals.T
        row_xy, r_ok = col_xy, c_ok
    if r_ok.sum() == 0:
        raise DataFormatError(path, f"no spot labels like '10x21' in the first column (found e.g. {rows[0]!r})",
                              _EXPECT_LEGACY_COUNTS)
    if not r_ok.all():
        warnings.warn(f"{path.name}: {int((~r_ok).sum())} rows without an 'XxY' spot label ignored "
                      f"(e.g. {rows[int(np.flatnonzero(~r_ok)[0])]!r})", stacklevel=3)
        keep = np.flatnonzero(r_ok)
        vals, row_xy = vals[keep], row_xy[keep]
        rows = [rows[i] for i in keep]
    labels = np.asarray([str(i).strip() for i in rows], dtype=object)
    if len(set(labels)) != len(labels):
        dup = pd.Series(labels)[pd.Series(labels).duplicated()].iloc[0]
        raise DataFormatError(path, f"duplicated spot label {dup!r}", "one row per spot")
    if np.isnan(vals).any():
        r, c = np.argwhere(np.isnan(vals))[0]
        raise DataFormatError(path, f"missing/NaN count at spot {labels[r]!r}, gene {cols[c]!r}",
                              _EXPECT_LEGACY_COUNTS)
    X, _ = _validate_counts(sp.csr_matrix(vals), path)
    return X, labels, row_xy, [str(g) for g in cols]


def _pick_legacy_image(folder: Path, section: str, image) -> Path | None:
    if image is not None:
        return Path(image)
    imgs = [q for q in _find_images(folder) if not any(x in _lower_name(q) for x in ("thumb", "mask", "small"))]
    if not imgs:
        return None
    if len(imgs) == 1:
        return imgs[0]
    by_id = [q for q in imgs if section.lower() in _lower_name(q)]
    if len(by_id) == 1:
        return by_id[0]
    he = [q for q in imgs if re.search(r"(^|[_\-.])he([_\-.]|$)", _lower_name(q))]
    pool = he or imgs
    return max(pool, key=lambda q: q.stat().st_size)


def read_legacy_st(path, *, image=None, name: str | None = None, um_per_px: float | None = None) -> Sample:
    """Read a legacy Spatial Transcriptomics section (Ståhl et al. 2016 arrays; her2st, STUtility).

    ``path``: the section folder, or its counts / spot file. The folder holds a counts table
    (spots × genes, ``XxY`` labels), a spot table (``*_selection.tsv``, ``spots_*.tsv``, STUtility's
    ``alignment_table_<id>.tsv`` or any table whose header names the x/y/pixel columns,
    ``*spot_data*.tsv``; columns see :data:`SPOT_COLUMN_ALIASES`) and the H&E image (found by
    extension). Only ``selected == 1`` spots that have counts are kept. ``obsm['spatial']`` =
    (pixel_x, pixel_y) full-res px, ``obs.array_col/array_row`` = x/y. µm/px is fitted from the
    200 µm lattice: the array index → pixel affine, applied to the index sites the spots occupy, so
    that the nearest-neighbour spacing is 200 µm (one index step on 1k arrays, the diagonal step on
    offset arrays whose x + y is always even; :mod:`napari_diffst.data.lattice`). The image is opened
    lazily; ``uns['spatial']`` gets a ≤2000 px hires thumbnail from a JPEG draft decode (the full image is not decoded here)."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataFormatError(p, "path does not exist", "a legacy ST section folder")
    folder = p if p.is_dir() else p.parent
    pairs = _legacy_pairs(folder, counts_hint=None if p.is_dir() else p)
    if not pairs:
        raise DataFormatError(
            p, "cannot find exactly one (counts table, spot table) pair",
            "a folder with one counts table ('<id>.tsv.gz', spots × genes) and one spot table "
            "('<id>_selection.tsv', 'spots_<id>.tsv', '*spot_data*.tsv', or any table whose header has columns "
            "x, y, pixel_x, pixel_y such as STUtility's 'alignment_table_<id>.tsv'); pass the counts file when a "
            "folder holds several sections")
    if len(pairs) > 1:
        raise DataFormatError(p, f"{len(pairs)} sections in one folder ({', '.join(c.name for c, _ in pairs)})",
                              "the counts file of the section to open")
    counts_path, spots_path = pairs[0]
    section = _strip_table_ext(counts_path.name)
    for suf in ("_stdata", "_counts", "_count", "_matrix"):
        if section.lower().endswith(suf):
            section = section[: -len(suf)]
    for pre in ("stdata_", "counts_", "count_"):
        if section.lower().startswith(pre):
            section = section[len(pre):]
    name = name or section or folder.name

    spots = _read_spot_table(spots_path)
    X, labels, lab_xy, genes = _read_legacy_counts(counts_path)
    sel = spots[spots["selected"] == 1].reset_index(drop=True)
    if len(sel) == 0:
        raise DataFormatError(spots_path, "no spot has selected == 1", "spots under tissue marked selected = 1")

    def keys(a):
        return [(round(float(u), 3), round(float(v), 3)) for u, v in a]

    skeys = keys(sel[["x", "y"]].to_numpy())
    if len(set(skeys)) != len(skeys):
        raise DataFormatError(spots_path, "duplicated (x, y) array positions among selected spots",
                              "one row per array spot")
    lookup = {k: i for i, k in enumerate(skeys)}
    lkeys = keys(lab_xy)
    idx = np.asarray([lookup.get(k, -1) for k in lkeys])
    if (idx >= 0).sum() == 0 and {"new_x", "new_y"} <= set(sel.columns):
        nkeys = keys(sel[["new_x", "new_y"]].to_numpy())
        lookup = {k: i for i, k in enumerate(nkeys)}
        idx = np.asarray([lookup.get(k, -1) for k in lkeys])
    keep = np.flatnonzero(idx >= 0)
    if len(keep) == 0:
        raise DataFormatError(
            counts_path,
            f"spot mismatch: none of the {len(labels)} spot labels of {counts_path.name} (e.g. {labels[0]!r}) "
            f"match a selected spot (x, y) in {spots_path.name}",
            "counts labels 'XxY' equal to the x, y columns of the spot table of the same section")
    X = X[keep]
    labels = labels[keep]
    srow = sel.iloc[idx[keep]].reset_index(drop=True)
    n_unmatched = int(len(sel) - len(keep))
    xy = srow[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    array_cr = srow[["x", "y"]].to_numpy(np.float64)

    # -- scale: 200 µm lattice -------------------------------------------------------------------
    # The pitch is the nearest-neighbour spacing of the lattice the spots occupy, derived from the indices
    # and positions: one index step on a 1k array, the diagonal step on offset arrays (x + y even).
    pitch = LATTICE_PITCH_UM["legacy_st"]
    um_fit, ilat = lattice_um_per_px(sel[["x", "y"]].to_numpy(float), sel[["pixel_x", "pixel_y"]].to_numpy(float),
                                     pitch)
    um_nn = estimate_um_per_px(sel[["pixel_x", "pixel_y"]].to_numpy(float), pitch)
    if um_per_px is not None:
        if not _finite_pos(um_per_px):
            raise DataFormatError(None, f"um_per_px={um_per_px!r} is not a positive number", "a positive float")
        um, um_src = float(um_per_px), "user"
    elif _finite_pos(um_fit):
        um, um_src = um_fit, "200 µm lattice fit (array index → pixel affine, nearest-neighbour pitch)"
    elif _finite_pos(um_nn):
        um, um_src = um_nn, "200 µm lattice (median nearest-neighbour distance)"
    else:
        raise DataFormatError(spots_path, f"cannot estimate µm per pixel from {len(sel)} selected spot(s) "
                              "(need ≥ 3 non-collinear spots at distinct pixel positions)",
                              "a spot table covering the section, or pass um_per_px=")
    if not (1e-3 < um < 1e3):
        raise DataFormatError(spots_path, f"implausible pixel size {um:.3g} µm/px from the spot lattice "
                              "(pixel_x/pixel_y inconsistent with x/y?)", _EXPECT_SPOTS)

    # -- image -----------------------------------------------------------------------------------
    img_path = _pick_legacy_image(folder, section, image)
    img = None
    uns = None
    spot_d_px = SPOT_DIAMETER_UM["legacy_st"] / um
    if img_path is not None:
        img = _open_image(img_path, 1.0)
        _check_spots_inside(spots_path, xy, img, spot_d_px, "image")
        thumb, scale = _thumbnail(img, 2000)
        uns = {"spatial": build_uns_spatial(name, hires=thumb, hires_scalef=scale, spot_diameter_fullres=spot_d_px,
                                            metadata={"source_image_path": str(img_path),
                                                      "reader": "napari_diffst.read_legacy_st"})}
    else:
        warnings.warn(f"{name}: no H&E image (.jpg/.tif/.png) found in {folder}; spots only", stacklevel=2)
    obs = pd.DataFrame({"in_tissue": np.ones(len(labels), np.int64),
                        "array_row": srow["y"].to_numpy(), "array_col": srow["x"].to_numpy()}, index=labels)
    for c in ("new_x", "new_y"):
        if c in srow:
            obs[c] = srow[c].to_numpy()
    for c in ("array_row", "array_col"):
        if np.all(np.mod(obs[c].to_numpy(), 1) == 0):
            obs[c] = obs[c].astype(np.int64)
    var = pd.DataFrame(index=_make_unique(genes))
    adata = _new_adata(X, obs, var, xy, uns)
    return Sample(
        adata=adata, image=img, um_per_px=float(um), spot_diameter_um=SPOT_DIAMETER_UM["legacy_st"],
        technology="legacy_st", name=name, lattice_pitch_um=pitch,
        provenance={"reader": "read_legacy_st", "format": "legacy_st", "values": "counts",
                    "files": {"counts": str(counts_path), "spots": str(spots_path),
                              "image": str(img_path) if img_path else None},
                    "image_source": img_path.name if img_path else "none",
                    "um_per_px_source": um_src, "um_per_px_lattice": um_fit, "um_per_px_nn": um_nn,
                    "n_selected_without_counts": n_unmatched, "array_coords_for_fit": "x, y",
                    "lattice_kind": ilat.kind if ilat is not None else None,
                    "index_cells_per_site": ilat.index_cells_per_site if ilat is not None else None},
    )


def detect(p: Path) -> bool:
    """A section folder with one (counts table, spot table) pair, or either table of such a pair."""
    if p.is_dir():
        return bool(_legacy_pairs(p))
    if _has_ext(p, _TABLE_EXT) and not _lower_name(p).startswith("tissue_positions"):
        return bool(_legacy_pairs(p.parent, counts_hint=p))
    return False


read = read_legacy_st
