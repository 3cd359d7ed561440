"""Turn core objects into napari LayerDataTuples (plain data; no napari/Qt import).

Every layer lives in µm: ``scale`` carries the pixel size and ``affine`` the registration, so
H&E, spots and super-resolved maps overlay exactly whatever their pixel grids are.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .data.sample import Sample, xy_affine_to_napari

__all__ = ["sample_to_layer_data", "spot_features", "histology_layer_data", "spots_layer_data",
           "default_display_gene", "overlay_colormap", "maps_layer_data", "GENE_COLORMAPS",
           "OVERLAY_BLENDING", "OVERLAY_OPACITY", "fluorescence_layer_data", "molecules_layer_data",
           "molecule_gene_colours", "N_COLOURED_GENES", "OTHER_GENE_COLOUR"]

#: colormaps given to genes in turn (the same gene keeps its colormap in the Sample and Compare views and
#: when a written file is opened again); shown as :func:`overlay_colormap` (low values transparent)
GENE_COLORMAPS = ("inferno", "viridis", "magma", "plasma", "cividis", "turbo", "twilight_shifted", "gray")
#: how gene maps are drawn over the H&E
OVERLAY_BLENDING = "translucent"
OVERLAY_OPACITY = 0.85
#: fraction of the contrast range over which a map fades in from transparent (its alpha ramp)
OVERLAY_FADE = 0.5

#: At most this many genes are carried in a Points layer's ``features`` (plus any asked for).
MAX_FEATURE_GENES = 64


def _lognorm(counts, target: float = 1e4) -> np.ndarray:
    from .data.normalise import log_cp10k

    return log_cp10k(counts, target=target)


def default_display_gene(sample: Sample) -> str | None:
    """The gene a spots layer is coloured by when none is chosen: the most-expressed one."""
    if sample.adata.n_vars == 0:
        return None
    tot = np.asarray(sample.counts().sum(axis=0)).ravel()
    return str(sample.adata.var_names[int(np.argmax(tot))])


def spot_features(sample: Sample, genes: list[str] | None = None, n_top: int = MAX_FEATURE_GENES) -> pd.DataFrame:
    """log1p(CP10k) expression of the chosen genes plus the ``n_top`` most-expressed genes."""
    names = np.asarray(sample.adata.var_names).astype(str)
    tot = np.asarray(sample.counts().sum(axis=0)).ravel()
    idx = list(np.argsort(-tot)[: min(n_top, len(names))])
    lookup = {n.lower(): i for i, n in enumerate(names)}
    for g in genes or []:
        i = lookup.get(str(g).lower())
        if i is not None and i not in idx:
            idx.insert(0, i)
    from .data.normalise import log_cp10k

    vals = log_cp10k(sample.counts(), cols=idx)
    df = pd.DataFrame(vals.astype(np.float32), columns=list(names[idx]))
    df.insert(0, "barcode", np.asarray(sample.adata.obs_names).astype(str))
    return df


#: Points layers of molecules show at most this many (a seeded random subsample; the full table stays in the core).
MAX_DISPLAY_MOLECULES = 200_000


def fluorescence_layer_data(sample: Sample):
    """The morphology stain (channel 0, e.g. DAPI) as a greyscale image in µm, contrast from percentiles."""
    img = sample.image
    raw = getattr(img, "raw_levels", None)
    levels = list(raw[0]) if raw else [lv for lv in img.levels]
    lo, hi = (img.contrast[0] if getattr(img, "contrast", None) else (0.0, 255.0))
    name = (getattr(img, "channel_names", None) or ["fluorescence"])[0]
    s = sample.image_scale_um
    data = levels if len(levels) > 1 else levels[0]
    if len(levels) == 1 and not isinstance(data, np.ndarray) and max(data.shape[:2]) <= 8192:
        data = np.asarray(data[:, :])  # small single-level mosaics: read once (napari needs an array)
    return (
        data,
        {
            "name": f"{sample.name} {name}",
            "rgb": False,
            "multiscale": len(levels) > 1,
            "scale": (s, s),
            "units": ("um", "um"),
            "colormap": "gray",
            "contrast_limits": (float(lo), float(hi)),
            "metadata": {"diffst_role": "histology", "diffst_sample": sample, "um_per_px": s,
                         "modality": "fluorescence", "channel": name},
        },
        "image",
    )


#: the most abundant genes of a molecules layer get distinct colours (tab10 then Dark2/Set1: 20 colours); every
#: other gene is OTHER_GENE_COLOUR (control probes never reach the layer: the readers drop them)
N_COLOURED_GENES = 10
OTHER_GENE_COLOUR = "#8c8c8c"


def molecule_gene_colours(genes, n_top: int = N_COLOURED_GENES) -> dict:
    """{gene: '#rrggbb'} for a molecules table's gene column: the ``n_top`` most frequent genes (ties by name) get
    distinct categorical colours in order of abundance; the rest are left out (drawn in :data:`OTHER_GENE_COLOUR`)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    vc = pd.Series(np.asarray(genes).astype(str)).value_counts()
    order = sorted(vc.index, key=lambda g: (-int(vc[g]), g))[:max(0, int(n_top))]
    palette = [to_hex(c) for c in colormaps["tab10"].colors] + [to_hex(c) for c in colormaps["Dark2"].colors] + \
        [to_hex(c) for c in colormaps["Set1"].colors]
    palette = [c for c in palette if c.lower() not in ("#7f7f7f", "#666666", "#999999")]  # greys read as 'other'
    return {g: palette[i % len(palette)] for i, g in enumerate(order)}


def molecules_layer_data(sample: Sample, max_points: int = MAX_DISPLAY_MOLECULES, seed: int = 0,
                         n_coloured: int = N_COLOURED_GENES):
    """Transcripts as a Points layer in µm with ``gene`` in features (a seeded subsample above ``max_points``),
    coloured by gene: the ``n_coloured`` most abundant genes of the whole table get distinct colours, the others
    grey (:func:`molecule_gene_colours`; the legend is in ``metadata['gene_colours']``, and ``features['colour_gene']``
    holds each point's legend entry: its gene, or 'other')."""
    from matplotlib.colors import to_rgba

    mol = sample.molecules
    n = len(mol)
    idx = np.arange(n)
    if n > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    yx = np.c_[mol["y"].to_numpy()[idx], mol["x"].to_numpy()[idx]]
    genes = mol["gene"].iloc[idx].reset_index(drop=True)
    colours = molecule_gene_colours(mol["gene"], n_coloured)
    g_str = genes.astype(str).to_numpy()
    legend = np.where(np.isin(g_str, list(colours)), g_str, "other")
    feats = pd.DataFrame({"gene": genes, "colour_gene": pd.Categorical(legend)})
    lut = {g: to_rgba(c) for g, c in colours.items()}
    other = to_rgba(OTHER_GENE_COLOUR, 0.6)
    face = np.array([lut.get(g, other) for g in g_str], np.float32).reshape(-1, 4)
    return (
        yx,
        {
            "name": f"{sample.name} transcripts",
            "size": 1.5 / sample.um_per_px,
            "scale": (sample.um_per_px, sample.um_per_px),
            "affine": xy_affine_to_napari(sample.transform, sample.um_per_px),
            "units": ("um", "um"),
            "features": feats,
            "face_color": face,
            "border_width": 0.0,
            "opacity": 0.9,
            "metadata": {"diffst_role": "molecules", "diffst_sample": sample, "n_total": int(n),
                         "n_shown": int(len(idx)), "gene_colours": dict(colours),
                         "other_colour": OTHER_GENE_COLOUR},
        },
        "points",
    )


def histology_layer_data(sample: Sample):
    if sample.image is None:
        return None
    if getattr(sample.image, "modality", None) == "fluorescence":
        return fluorescence_layer_data(sample)
    data, multiscale = sample.image.napari_data()
    s = sample.image_scale_um
    return (
        data,
        {
            "name": f"{sample.name} H&E",
            "rgb": True,
            "multiscale": multiscale,
            "scale": (s, s),
            "units": ("um", "um"),
            "metadata": {"diffst_role": "histology", "diffst_sample": sample, "um_per_px": s},
        },
        "image",
    )


def spots_layer_data(sample: Sample, gene: str | None = None):
    gene = gene or default_display_gene(sample)
    feats = spot_features(sample, [gene] if gene else None)
    yx = np.asarray(sample.adata.obsm["spatial"], float)[:, ::-1]  # raw spot px; registration in affine
    kwargs = {
        "name": f"{sample.name} spots · {gene}" if gene else f"{sample.name} spots",  # the gene that colours them
        "size": sample.spot_diameter_px,
        "scale": (sample.um_per_px, sample.um_per_px),
        "affine": xy_affine_to_napari(sample.transform, sample.um_per_px),
        "units": ("um", "um"),
        "features": feats,
        "border_width": 0.05,
        "opacity": 0.85,
        "metadata": {"diffst_role": "spots", "diffst_sample": sample, "gene": gene},
    }
    if gene and gene in feats.columns:
        kwargs["face_color"] = gene
        kwargs["face_colormap"] = "viridis"
    return (yx, kwargs, "points")


def sample_to_layer_data(sample: Sample, gene: str | None = None) -> list[tuple]:
    """H&E image layer (if any) + spots Points layer, both in µm."""
    out = []
    h = histology_layer_data(sample)
    if h is not None:
        out.append(h)
    if sample.n_spots:
        out.append(spots_layer_data(sample, gene))
    if getattr(sample, "molecules", None) is not None and len(sample.molecules):
        out.append(molecules_layer_data(sample))
    return out


def map_layer_name(gene: str, method: str = "Diff-ST", extra: str | None = None) -> str:
    """The one name of a gene-map layer, in the Sample and Compare sections and when reading exported maps:
    ``<gene> · <method>`` (``ERBB2 · Diff-ST``, ``ERBB2 · bicubic``), ``<gene> · <method> σ`` for the
    uncertainty."""
    name = f"{gene} · {method}"
    if extra:
        name += " σ" if extra == "uncertainty" else f" {extra}"
    return name


#: ``diffst_role`` of gene-map layers (``sr_uncertainty`` and the readers' ``sr_<kind>`` start with ``sr``).
MAP_ROLE_PREFIXES = ("sr", "compare")


def find_map_layer(layers, name: str):
    """The gene-map layer called ``name`` in ``layers`` (a napari layer list), or None."""
    for ly in layers:
        if ly.name == name and str(ly.metadata.get("diffst_role", "")).startswith(MAP_ROLE_PREFIXES):
            return ly
    return None


def overlay_colormap(name: str = "inferno", fade: float = OVERLAY_FADE):
    """napari Colormap ``<name> fade``: ``name``'s colours with an alpha ramp — 0 at the bottom of the contrast
    range, rising linearly to 1 at ``fade`` of it — so low expression shows the H&E through instead of an
    opaque dark layer (NaN outside the tissue is transparent as always). Imports napari when called."""
    from napari.utils.colormaps import Colormap, ensure_colormap

    base = ensure_colormap(name)
    t = np.linspace(0.0, 1.0, 64)
    rgba = np.asarray(base.map(t), np.float32).copy()
    rgba[:, 3] = np.clip(t / max(float(fade), 1e-6), 0.0, 1.0)
    return Colormap(colors=rgba, controls=t, name=f"{base.name} fade", interpolation="linear")


def maps_layer_data(path) -> list[tuple]:
    """Image layers for gene maps written by napari-diffst (or any OME-NGFF image in µm): one layer per gene
    (``<gene> · <method>``, visible for the first) and one per extra channel group (uncertainty:
    ``<gene> · <method> σ``, hidden), lazy multiscale, placed in µm by the file's affine (per-axis pixel size,
    rotation) over the H&E, each with its gene's fading colormap and contrast limits (0, p99.5)."""
    from .io.writers import META_KEY, open_ome_zarr_levels

    mf, levels = open_ome_zarr_levels(path)
    meta = dict(mf.metadata or {})
    own = dict(meta.get(META_KEY) or {}) if meta.get("genes") else {}
    method = str(own.get("method") or "Diff-ST")
    units = own.get("units") or ("log1p(CP10k)" if own else None)
    G = len(mf.genes)
    A = np.asarray(mf.affine_um, float)
    out = []
    groups = [(None, 0)] + [(k, i + 1) for i, k in enumerate(mf.extra)]
    for kind, gi in groups:
        for j, g in enumerate(mf.genes):
            ch = gi * G + j
            data = [lv[ch] for lv in levels]
            small = np.asarray(data[-1], np.float32)
            md = {"diffst_role": "sr" if kind is None else f"sr_{kind}", "gene": str(g), "genes": [str(g)],
                  "source": str(path), "units": units}
            if kind is not None:
                md["diffst_extra"] = kind
            # a foreign image: its channel labels
            name = map_layer_name(str(g), method, kind) if own else \
                (str(g) + (f" {'σ' if kind == 'uncertainty' else kind}" if kind is not None else ""))
            out.append((data if len(data) > 1 else data[0],
                        {"name": name, "multiscale": len(data) > 1, "affine": A, "units": ("um", "um"),
                         "colormap": overlay_colormap(GENE_COLORMAPS[j % len(GENE_COLORMAPS)]),
                         "contrast_limits": _clims(small), "blending": OVERLAY_BLENDING,
                         "opacity": OVERLAY_OPACITY, "visible": kind is None and j == 0, "metadata": md},
                        "image"))
    return out


def _clims(a: np.ndarray, q: float = 99.5) -> tuple[float, float]:
    """(min(0, lowest), q-th percentile) of the finite values."""
    v = np.asarray(a, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return (0.0, 1.0)
    lo = min(0.0, float(v.min()))
    hi = float(np.percentile(v, q))
    return (lo, hi if hi > lo + 1e-6 else max(float(v.max()), lo + 1e-6))
