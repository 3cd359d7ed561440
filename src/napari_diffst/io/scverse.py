"""Super-resolved maps as scverse objects: an AnnData in the section's own frame (Qt-free).

The AnnData that :func:`sr_anndata` builds (and :func:`napari_diffst.io.writers.write_h5ad` writes)
is what scanpy and squidpy expect of a Visium-like section, with one observation per HR pixel:

* ``X`` (pixels × genes) float32, log1p(CP10k) as written by the caller;
* ``obsm['spatial']`` pixel centres (x, y) in **full-resolution pixels of the section's image** — the
  same frame as the input section's ``obsm['spatial']`` and ``uns['spatial']`` (registration
  applied); ``obsm['spatial_um']`` the same points in µm (full-res px × µm/px);
  ``obsm['spatial_px']`` the (col, row) grid indices;
* ``uns['spatial'][library_id]`` the section's hires image and scale factors, with
  ``spot_diameter_fullres`` = the HR pixel size in full-res pixels (so ``sc.pl.spatial`` draws
  each pixel as a spot of its own size over the H&E);
* ``obs``: ``row``, ``col`` (grid), ``barcode`` (the spot whose lattice cell holds the pixel, ``''``
  if none), ``in_tissue`` (the pixel lies in an in-tissue spot's cell);
* ``layers[name]`` for extra channels (``'uncertainty'``), ``uns['napari_diffst']`` the grid metadata
  and the self-check figures (``self_check``).

:class:`SectionFrame` says where an HR grid sits in its section; :meth:`SectionFrame.from_field`
takes it from an :class:`~napari_diffst.data.pairs.SRField` and its :class:`~napari_diffst.data.sample.Sample`.
:func:`aggregate_to_spots` averages the pixels back onto the input's spots by barcode (the round trip).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

__all__ = ["SectionFrame", "sr_anndata", "aggregate_to_spots", "spot_consistency"]


@dataclass
class SectionFrame:
    """Where an HR pixel grid sits in its section.

    hr_affine : 3×3 map from HR pixel index (col, row, 1) to (x, y, 1) full-res pixels of the image.
    um_per_px : µm per full-resolution image pixel.
    library_id : key of ``uns['spatial']``.
    uns_spatial : the section's ``uns['spatial'][library_id]`` (``images``, ``scalefactors``, ``metadata``)
        or None.
    spot_barcode : (H, W) barcode of the spot whose cell holds each pixel ('' outside), or None.
    in_tissue : (H, W) bool, or None.
    spots_xy / spots_barcode / spot_diameter_px : the in-tissue input spots (image frame, full-res px),
        for writers that store the spots too (SpatialData).
    spot_values / spot_genes : the spots' log1p(CP10k) of the mapped genes (spots × genes), for the
        self-check.
    image : the section's :class:`~napari_diffst.data.sample.HistologyImage`, or None.
    """

    hr_affine: np.ndarray
    um_per_px: float
    library_id: str = "section"
    uns_spatial: dict | None = None
    spot_barcode: np.ndarray | None = None
    in_tissue: np.ndarray | None = None
    spots_xy: np.ndarray | None = None
    spots_barcode: np.ndarray | None = None
    spot_diameter_px: float | None = None
    spot_values: np.ndarray | None = None
    spot_genes: list = field(default_factory=list)
    image: object = None

    @classmethod
    def from_placement(cls, place) -> "SectionFrame":
        """A frame known only by a :class:`~napari_diffst.io.writers.Placement` (full-res pixels = µm): its
        (row, col) → (y, x) affine, written as (col, row) → (x, y)."""
        Ayx = np.asarray(place.affine, float)
        A = np.eye(3)
        A[:2, :2] = Ayx[:2, :2][::-1, ::-1]
        A[:2, 2] = Ayx[:2, 2][::-1]
        return cls(hr_affine=A, um_per_px=1.0)

    @classmethod
    def from_field(cls, fld, sample=None) -> "SectionFrame":
        """The frame of an :class:`SRField` (HR grid) in ``sample`` (image, ``uns['spatial']``, spots)."""
        from ..data.grids import normalise_counts

        A = np.asarray(fld.extra.get("hr_affine", np.eye(3)), float)
        names = np.asarray(fld.extra.get("spot_obs_names", []), dtype=object).astype(str)
        idx = np.asarray(fld.hr_spot_index) if fld.hr_spot_index is not None else None
        bc = None
        if idx is not None and "pseudo_spot_of_spot" not in fld.extra and len(names):
            bc = np.where(idx >= 0, names[np.clip(idx, 0, len(names) - 1)], "").astype(str)
        lib = fld.name
        uns = None
        spots_xy = spot_d = image = None
        if sample is not None:
            lib = sample.library_id
            sp = sample.adata.uns.get("spatial", {})
            if isinstance(sp, Mapping) and lib in sp:
                uns = _plain(sp[lib])
            elif sample.image is not None:
                from ..data.sample import build_uns_spatial

                thumb, sc = sample.image.thumbnail(2000)
                uns = build_uns_spatial(lib, hires=thumb, hires_scalef=sc / sample.image.fullres_per_px,
                                        spot_diameter_fullres=sample.spot_diameter_px)[lib]
            keep = np.asarray(fld.extra.get("spot_obs_index", np.arange(sample.n_spots)))
            spots_xy = np.asarray(sample.spots_xy_px, float)[keep]
            spot_d = float(sample.spot_diameter_px)
            image = sample.image
        vals = None
        if fld.hr_counts is not None and "hr_library_size" in fld.extra and "pseudo_spot_of_spot" not in fld.extra:
            vals = np.asarray(normalise_counts(fld.hr_counts, np.asarray(fld.extra["hr_library_size"], float)))
        return cls(hr_affine=A, um_per_px=float(fld.um_per_px), library_id=str(lib), uns_spatial=uns,
                   spot_barcode=bc, in_tissue=np.asarray(fld.hr_mask, bool) if fld.hr_mask is not None else None,
                   spots_xy=spots_xy, spots_barcode=names if len(names) else None, spot_diameter_px=spot_d,
                   spot_values=vals, spot_genes=list(fld.genes), image=image)

    def pixel_xy(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(x, y) full-res pixel centres of HR pixels (rows, cols)."""
        A = np.asarray(self.hr_affine, float)
        cr = np.column_stack([np.asarray(cols, float), np.asarray(rows, float)])
        return cr @ A[:2, :2].T + A[:2, 2]

    @property
    def hr_px(self) -> float:
        """HR pixel size in full-res pixels (the mean of the two axes' lengths)."""
        A = np.asarray(self.hr_affine, float)
        return float(np.sqrt(abs(np.linalg.det(A[:2, :2]))))


def _plain(d):
    """A copy of an ``uns['spatial']`` entry as plain dicts/arrays (h5ad-writable)."""
    if isinstance(d, Mapping):
        return {str(k): _plain(v) for k, v in d.items()}
    return np.array(d) if isinstance(d, np.ndarray) else d


def sr_anndata(maps: np.ndarray, genes: Sequence[str], mask: np.ndarray, frame: SectionFrame, *,
               extra: Mapping[str, np.ndarray] | None = None, meta: dict | None = None,
               meta_key: str = "napari_diffst"):
    """The per-pixel AnnData of ``maps`` (G, Y, X) at the pixels of ``mask`` (see the module docstring)."""
    import anndata as ad
    import pandas as pd

    maps = np.asarray(maps, np.float32)
    G, H, W = maps.shape
    rr, cc = np.nonzero(np.asarray(mask, bool))
    X = maps[:, rr, cc].T.copy()
    obs = pd.DataFrame({"row": rr.astype(np.int32), "col": cc.astype(np.int32)},
                       index=pd.Index([f"r{r}_c{c}" for r, c in zip(rr, cc)], name="pixel"))
    if frame.spot_barcode is not None and np.shape(frame.spot_barcode) == (H, W):
        obs["barcode"] = pd.Categorical(np.asarray(frame.spot_barcode)[rr, cc].astype(str))
    if frame.in_tissue is not None and np.shape(frame.in_tissue) == (H, W):
        obs["in_tissue"] = np.asarray(frame.in_tissue, bool)[rr, cc].astype(np.int8)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")))
    xy = frame.pixel_xy(rr, cc)
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.obsm["spatial_um"] = (xy * float(frame.um_per_px)).astype(np.float64)
    adata.obsm["spatial_px"] = np.column_stack([cc, rr]).astype(np.float64)
    for k, v in dict(extra or {}).items():
        adata.layers[k] = np.asarray(v, np.float32)[:, rr, cc].T.copy()
    entry = _plain(frame.uns_spatial) if frame.uns_spatial else {"images": {}, "scalefactors": {}, "metadata": {}}
    entry.setdefault("images", {})
    entry.setdefault("metadata", {})
    sf = dict(entry.get("scalefactors") or {})
    if not entry["images"]:
        sf.setdefault("tissue_hires_scalef", 1.0)
    sf["spot_diameter_fullres"] = frame.hr_px
    entry["scalefactors"] = sf
    entry["metadata"] = dict(entry["metadata"] or {}, source="napari-diffst super-resolved maps")
    adata.uns["spatial"] = {frame.library_id: entry}
    m = dict(meta or {})
    m["shape"] = [int(H), int(W)]
    m["library_id"] = frame.library_id
    m["um_per_px_fullres"] = float(frame.um_per_px)
    m["hr_affine_px"] = np.asarray(frame.hr_affine, float).tolist()
    m["spatial_units"] = ("obsm['spatial'] = pixel centres (x, y) in full-resolution pixels of the section image; "
                          "obsm['spatial_um'] = the same in µm; obsm['spatial_px'] = (col, row) grid indices")
    if frame.spot_values is not None and "barcode" in adata.obs and frame.spots_barcode is not None:
        m["self_check"] = spot_consistency(adata, frame.spot_values, frame.spots_barcode, frame.spot_genes)
    adata.uns[meta_key] = m
    return adata


def aggregate_to_spots(adata, key: str = "barcode", layer: str | None = None):
    """Average the per-pixel values of an SR AnnData over the pixels of each spot (``obs[key]``).

    Returns an AnnData (spots × genes) indexed by barcode, ``obsm['spatial']`` the mean pixel position
    (full-res px) and ``obs['n_pixels']``. Pixels with no spot (``''``) are left out."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    if key not in adata.obs:
        raise KeyError(f"obs[{key!r}] is missing: not an SR AnnData written with its section")
    lab = adata.obs[key].astype(str).to_numpy()
    keep = lab != ""
    codes, uniq = pd.factorize(lab[keep])
    M = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniq), len(codes)))
    n = np.asarray(M.sum(axis=1)).ravel()
    X = adata.layers[layer] if layer else adata.X
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    mean = (M @ X[keep]) / n[:, None]
    xy = (M @ np.asarray(adata.obsm["spatial"], float)[keep]) / n[:, None]
    out = ad.AnnData(X=mean.astype(np.float32), obs=pd.DataFrame({"n_pixels": n.astype(np.int32)},
                                                                 index=pd.Index(uniq.astype(str), name=key)),
                     var=adata.var.copy())
    out.obsm["spatial"] = xy
    return out


def spot_consistency(adata, spot_values: np.ndarray, spot_barcodes: Sequence[str], genes: Sequence[str]) -> dict:
    """Self-check: per-gene Pearson r between the input spots' values and the SR pixels averaged back onto
    them (:func:`aggregate_to_spots`). ``{'spot_pcc': {gene: r}, 'spot_pcc_mean', 'n_spots'}``."""
    agg = aggregate_to_spots(adata)
    pos = {b: i for i, b in enumerate(map(str, spot_barcodes))}
    rows = [pos.get(b, -1) for b in agg.obs_names]
    ok = np.asarray(rows) >= 0
    v = np.asarray(spot_values, float)[np.asarray(rows)[ok]]
    a = np.asarray(agg.X, float)[ok]
    gi = {g: i for i, g in enumerate(map(str, genes))}
    per = {}
    for j, g in enumerate(map(str, agg.var_names)):
        if g not in gi or ok.sum() < 3:
            continue
        x, y = a[:, j], v[:, gi[g]]
        r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
        per[g] = r
    vals = [r for r in per.values() if np.isfinite(r)]
    return {"spot_pcc": per, "spot_pcc_mean": float(np.mean(vals)) if vals else float("nan"),
            "n_spots": int(ok.sum()),
            "what": "Pearson r per gene between the input spots' log1p(CP10k) and the SR pixels averaged by barcode"}
