"""Vizgen MERSCOPE region folder -> :class:`~napari_diffst.data.sample.Sample`.

Layout (Vizgen's output per region; only ``detected_transcripts.csv`` is required)::

    region_0/
      detected_transcripts.csv                 global_x, global_y (µm), global_z, gene (+ Vizgen's other columns)
      cell_by_gene.csv, cell_metadata.csv      cells × genes and cell centres (center_x, center_y µm), optional
      images/mosaic_<stain>_z<k>.tif           DAPI / PolyT / Cellbound mosaics
      images/micron_to_mosaic_pixel_transform.csv   3×3 affine, pixel = A · (x_µm, y_µm, 1)

The full-resolution frame is the mosaic's pixel grid (``um_per_px`` from the affine); without images it is µm
(``um_per_px = 1``, origin at 0).  ``adata``: cells × genes when ``cell_by_gene.csv`` is there, else the
transcripts binned in ``bin_um`` squares (non-empty bins).  ``Sample.molecules`` holds every transcript
(control probes ``Blank-*`` removed and counted in ``adata.uns['imaging']``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.molecules import drop_controls, molecules_to_bins_adata
from ..data.sample import Sample
from ..errors import DataFormatError

__all__ = ["is_merscope", "read_merscope", "DEFAULT_BIN_UM", "GENE_COLUMNS"]

TRANSCRIPTS = "detected_transcripts.csv"
TRANSFORM = "micron_to_mosaic_pixel_transform.csv"
DEFAULT_BIN_UM = 10.0
#: accepted names of the gene column (Vizgen writes ``gene``)
GENE_COLUMNS = ("gene", "target", "gene_name", "feature_name")
_MOSAIC_RE = re.compile(r"^mosaic_(.+)_z(\d+)\.tiff?$", re.I)
#: fraction of transcripts allowed outside the mosaic before the transform is declared wrong
MAX_OUTSIDE_FRAC = 0.01


def _root(p: Path) -> Path | None:
    if p.is_file() and p.name.lower().endswith(TRANSCRIPTS):
        return p.parent
    if p.is_dir():
        if any(c.name.lower().endswith(TRANSCRIPTS) for c in p.iterdir() if c.is_file()):
            return p
    return None


FORMAT = "merscope"
DESCRIPTION = "Vizgen MERSCOPE region folder (detected_transcripts.csv + images/)"


def detect(path) -> bool:
    return is_merscope(path)


def read(path, **kwargs):
    return read_merscope(path, **kwargs)


def is_merscope(path) -> bool:
    """True for a MERSCOPE region folder (or its ``detected_transcripts.csv``). Never raises."""
    try:
        return _root(Path(os.fspath(path))) is not None
    except OSError:
        return False


def _transcripts_file(root: Path) -> Path:
    exact = root / TRANSCRIPTS
    if exact.is_file():
        return exact
    return sorted(c for c in root.iterdir() if c.is_file() and c.name.lower().endswith(TRANSCRIPTS))[0]


def _read_transcripts(path: Path) -> pd.DataFrame:
    exp = f"Vizgen's {TRANSCRIPTS}: columns global_x, global_y (µm), global_z and gene"
    try:
        head = pd.read_csv(path, nrows=0)
    except Exception as exc:
        raise DataFormatError(path, f"not a readable CSV ({type(exc).__name__}: {exc})", exp) from exc
    cols = {str(c).strip().lower(): c for c in head.columns}
    gcol = next((cols[c] for c in GENE_COLUMNS if c in cols), None)
    missing = [c for c in ("global_x", "global_y") if c not in cols]
    if missing or gcol is None:
        what = f"missing column(s) {missing + ([] if gcol else ['gene'])}"
        raise DataFormatError(path, f"{what}; found {list(map(str, head.columns))[:12]}",
                              f"{exp} (gene column named one of {', '.join(GENE_COLUMNS)})")
    use = [cols["global_x"], cols["global_y"], gcol] + ([cols["global_z"]] if "global_z" in cols else [])
    try:
        df = pd.read_csv(path, usecols=use, dtype={gcol: str})
    except Exception as exc:
        raise DataFormatError(path, f"cannot parse the transcripts ({type(exc).__name__}: {exc})", exp) from exc
    out = pd.DataFrame({"x_um": pd.to_numeric(df[cols["global_x"]], errors="coerce"),
                        "y_um": pd.to_numeric(df[cols["global_y"]], errors="coerce"),
                        "gene": df[gcol].astype(str)})
    if "global_z" in cols:
        out["z"] = pd.to_numeric(df[cols["global_z"]], errors="coerce")
    bad = ~np.isfinite(out["x_um"].to_numpy()) | ~np.isfinite(out["y_um"].to_numpy())
    if bad.any():
        raise DataFormatError(path, f"{int(bad.sum())} transcript(s) with non-numeric global_x/global_y "
                              f"(first at data row {int(np.flatnonzero(bad)[0]) + 1})", exp)
    if len(out) == 0:
        raise DataFormatError(path, "no transcripts", exp)
    return out


def _read_transform(path: Path) -> np.ndarray:
    exp = "Vizgen's 3×3 affine (µm → mosaic px), three rows of three numbers separated by spaces"
    try:
        A = np.loadtxt(path, dtype=np.float64)
    except Exception as exc:
        raise DataFormatError(path, f"cannot parse the transform ({exc})", exp) from exc
    if A.shape != (3, 3) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:2, :2])) < 1e-12:
        raise DataFormatError(path, f"not an invertible 3×3 matrix (shape {A.shape})", exp)
    return A


def _mosaics(images: Path) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    if not images.is_dir():
        return out
    for f in images.iterdir():
        m = _MOSAIC_RE.match(f.name)
        if m and f.is_file():
            out.setdefault(m.group(1), {})[int(m.group(2))] = f
    return out


def _open_plane(path: Path):
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        grp = zarr.open(series.aszarr(), mode="r")
    except Exception as exc:
        raise DataFormatError(path, f"cannot open the mosaic TIFF ({type(exc).__name__}: {exc})",
                              "a readable single-channel TIFF mosaic") from exc
    if hasattr(grp, "shape"):
        levels = [grp]
    else:
        keys = sorted(grp.array_keys(), key=lambda k: int(k) if str(k).isdigit() else k)
        levels = [grp[k] for k in keys]
    if len(levels[0].shape) != 2:
        raise DataFormatError(path, f"mosaic has shape {levels[0].shape}", "a 2-D single-channel mosaic")
    return levels, tif


def _read_cells(root: Path, genes_keep_fn) -> tuple | None:
    cbg, meta = root / "cell_by_gene.csv", root / "cell_metadata.csv"
    if not cbg.is_file():
        return None
    exp_c = "cell_by_gene.csv: first column the cell id, one column per gene, integer counts"
    try:
        df = pd.read_csv(cbg, index_col=0)
    except Exception as exc:
        raise DataFormatError(cbg, f"cannot parse ({exc})", exp_c) from exc
    if not meta.is_file():
        raise DataFormatError(meta, "cell_by_gene.csv is present but cell_metadata.csv is missing",
                              "cell_metadata.csv with center_x, center_y (µm) per cell, from the same region")
    exp_m = "cell_metadata.csv: first column the cell id, columns center_x and center_y in µm"
    try:
        md = pd.read_csv(meta, index_col=0)
    except Exception as exc:
        raise DataFormatError(meta, f"cannot parse ({exc})", exp_m) from exc
    if not {"center_x", "center_y"} <= set(md.columns):
        raise DataFormatError(meta, f"no center_x/center_y columns (found {list(md.columns)[:10]})", exp_m)
    df.index = df.index.astype(str)
    md.index = md.index.astype(str)
    missing = df.index.difference(md.index)
    if len(missing):
        raise DataFormatError(meta, f"{len(missing)} cell(s) of cell_by_gene.csv have no metadata "
                              f"(e.g. {missing[0]})", exp_m)
    md = md.loc[df.index]
    keep, info = drop_controls(df.columns)
    X = df.loc[:, keep].to_numpy()
    if not np.issubdtype(X.dtype, np.number) or (X.size and (np.nanmin(X) < 0 or not np.all(np.isfinite(X)))):
        raise DataFormatError(cbg, "counts are not finite non-negative numbers", exp_c)
    return X, list(map(str, df.columns[keep])), md, info


def read_merscope(path, *, stain: str = "DAPI", z: int | None = None, bin_um: float = DEFAULT_BIN_UM,
                  name: str | None = None) -> Sample:
    """Read a MERSCOPE region folder (see the module docstring).

    ``stain``: the nuclear mosaic (``DAPI``); a ``PolyT`` mosaic at the same z becomes the second channel.
    ``z``: the plane (default: the middle of the planes present).  ``bin_um``: bin side for the AnnData when
    there is no ``cell_by_gene.csv``."""
    import anndata as ad
    import scipy.sparse as sp

    from ..data.fluorescence import fluorescence_image

    p = Path(os.fspath(path))
    root = _root(p)
    if root is None:
        raise DataFormatError(p, f"no {TRANSCRIPTS}", "a MERSCOPE region folder holding detected_transcripts.csv")
    tfile = _transcripts_file(root)
    tx = _read_transcripts(tfile)
    images = root / "images"
    mosaics = _mosaics(images)
    A = None
    if mosaics:
        tpath = images / TRANSFORM
        if not tpath.is_file():
            raise DataFormatError(tpath, f"missing; the mosaics {sorted(mosaics)} cannot be placed without it",
                                  "Vizgen's images/micron_to_mosaic_pixel_transform.csv (3×3 µm → px affine) "
                                  "from the same region, or remove/rename the images folder to read the "
                                  "transcripts alone")
        A = _read_transform(tpath)
    image = None
    tifs = []
    if A is not None:
        um_per_px = float(1.0 / np.sqrt(abs(np.linalg.det(A[:2, :2]))))
        key = next((k for k in mosaics if k.lower() == stain.lower()), None)
        if key is None:
            raise DataFormatError(images, f"no mosaic_{stain}_z*.tif (stains present: {sorted(mosaics)})",
                                  f"images/mosaic_{stain}_z<k>.tif, or pass stain= one of {sorted(mosaics)}")
        zs = sorted(mosaics[key])
        zz = zs[len(zs) // 2] if z is None else int(z)
        if zz not in mosaics[key]:
            raise DataFormatError(images, f"no mosaic_{key}_z{zz}.tif (planes present: {zs})", f"z in {zs}")
        chans, names = [], [key]
        lv, tif = _open_plane(mosaics[key][zz])
        chans.append(lv)
        tifs.append(tif)
        second = next((k for k in mosaics if k.lower() == "polyt" and k != key and zz in mosaics[k]), None)
        if second is not None:
            lv2, tif2 = _open_plane(mosaics[second][zz])
            if lv2[0].shape == lv[0].shape:
                chans.append(lv2)
                tifs.append(tif2)
                names.append(second)
        image = fluorescence_image(chans, names, path=mosaics[key][zz])
        image._tiffs = tifs
        xy = np.c_[tx["x_um"].to_numpy(), tx["y_um"].to_numpy(), np.ones(len(tx))] @ A[:2].T
        Hh, Ww = image.shape
        tol = 2.0 / um_per_px  # 2 µm
        out = (xy[:, 0] < -tol) | (xy[:, 0] > Ww + tol) | (xy[:, 1] < -tol) | (xy[:, 1] > Hh + tol)
        if out.mean() > MAX_OUTSIDE_FRAC:
            raise DataFormatError(
                tfile, f"{int(out.sum())} of {len(tx)} transcripts ({out.mean():.0%}) lie outside the "
                f"{Ww}×{Hh} px mosaic {mosaics[key][zz].name} under {TRANSFORM}",
                "transcripts and images from the same region; check that the transform is Vizgen's µm → mosaic "
                "pixel matrix (not its inverse)")
    else:
        um_per_px = 1.0
        xy = tx[["x_um", "y_um"]].to_numpy(np.float64)
    keep, info = drop_controls(pd.unique(tx["gene"]))
    genes_all = pd.unique(tx["gene"])
    genes = [str(g) for g, k in zip(genes_all, keep) if k]
    is_gene = tx["gene"].isin(genes).to_numpy()
    info["n_control_molecules"] = int((~is_gene).sum())
    mol = pd.DataFrame({"x": xy[is_gene, 0], "y": xy[is_gene, 1],
                        "gene": pd.Categorical(tx["gene"].to_numpy()[is_gene], categories=sorted(genes))})
    if "z" in tx:
        mol["z"] = tx["z"].to_numpy()[is_gene]
    genes = list(mol["gene"].cat.categories)
    imaging = {"platform": "merscope", "n_molecules": int(len(mol)), **info,
               "frame": "mosaic px" if A is not None else "µm", "stains": sorted(mosaics)}
    cells = _read_cells(root, None)
    if cells is not None:
        X, cgenes, md, cinfo = cells
        cxy = md[["center_x", "center_y"]].to_numpy(np.float64)
        if A is not None:
            cxy = np.c_[cxy, np.ones(len(cxy))] @ A[:2].T
        obs = pd.DataFrame({"in_tissue": np.ones(len(md), np.int64)}, index=md.index)
        for c in ("volume", "fov"):
            if c in md.columns:
                obs[c] = md[c].to_numpy()
        adata = ad.AnnData(X=sp.csr_matrix(np.rint(X).astype(np.int64)), obs=obs, var=pd.DataFrame(index=cgenes))
        adata.obsm["spatial"] = cxy
        imaging.update(unit="cells", n_control_probes_cells=cinfo["n_control_probes"])
        spot_um, pitch = 10.0, None
    else:
        adata = molecules_to_bins_adata(mol, genes, bin_px=float(bin_um) / um_per_px, um_per_px=um_per_px)
        imaging.update(unit="bins", bin_um=float(bin_um))
        spot_um, pitch = float(bin_um), float(bin_um)
    adata.uns["imaging"] = imaging
    nm = name or (root.name if root.name else "merscope")
    prov = {"path": str(root), "reader": "merscope", "transcripts": str(tfile), "technology": "merscope",
            "um_to_px": None if A is None else A.tolist()}
    if image is not None:
        prov["image"] = str(image.path)
    return Sample(adata=adata, image=image, um_per_px=um_per_px, spot_diameter_um=spot_um, technology="merscope",
                  name=nm, provenance=prov, lattice_pitch_um=pitch, molecules=mol)
