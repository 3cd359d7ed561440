"""Results flow into scanpy, squidpy and SpatialData: output format by suffix / --format (read back with each
format's own library), the super-resolved AnnData in the section's frame, SpatialData in and out."""
from __future__ import annotations

import numpy as np
import pytest

from napari_diffst.cli import main as cli_main
from napari_diffst.errors import DataFormatError
from napari_diffst.io import writers as W
from napari_diffst.io.scverse import SectionFrame, aggregate_to_spots


@pytest.fixture(scope="module")
def visium_section():
    """A small synthetic Visium-like section (hexagonal 100 µm lattice, 2 µm/px H&E), a 2× native field on
    it and maps in which every HR pixel holds the value of the spot whose cell contains it."""
    from napari_diffst.data.grids import normalise_counts
    from napari_diffst.data.synthetic import make_synthetic
    from napari_diffst.pipeline import make_fields

    smp = make_synthetic(0, size_um=(1200.0, 1400.0), um_per_px=2.0, n_genes=6, technology="visium")
    genes = smp.genes[:4]
    fld = make_fields([smp], genes, 2, mode="native")[0][0]
    spot_vals = np.asarray(normalise_counts(fld.hr_counts, np.asarray(fld.extra["hr_library_size"], float)))
    idx = np.asarray(fld.hr_spot_index)
    maps = np.zeros((len(genes),) + idx.shape, np.float32)
    maps[:, idx >= 0] = spot_vals[idx[idx >= 0]].T
    return smp, fld, maps, spot_vals


def _frame_and_maps(visium_section):
    smp, fld, maps, _ = visium_section
    return SectionFrame.from_field(fld, smp), maps, np.asarray(fld.hr_mask, bool)


# -- format choice ------------------------------------------------------------------------------------------
def test_choose_format_by_suffix_and_flag(tmp_path):
    assert W.choose_format("a.ome.zarr") == W.choose_format("a.zarr") == "ome-zarr"
    assert W.choose_format("a.ome.tif") == W.choose_format("a.TIFF") == "tiff"
    assert W.choose_format("a.h5ad") == "h5ad"
    assert W.choose_format("a.sdata.zarr") == "spatialdata"
    assert W.choose_format("a.zarr", "spatialdata") == "spatialdata"
    assert W.choose_format("maps.out", "h5ad") == "h5ad"
    with pytest.raises(DataFormatError, match=r"maps\.png: unknown output suffix '\.png'.*\.h5ad"):
        W.choose_format(tmp_path / "maps.png")
    with pytest.raises(DataFormatError, match="unknown output format 'jpeg'"):
        W.choose_format("a.zarr", "jpeg")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck") / "run"
    assert cli_main(["train", "--data", "synthetic", "--scale", "4", "--n-genes", "2", "--budget", "tiny",
                     "--steps", "1", "--batch-size", "1", "--lr-size", "2", "--out", str(ck)]) == 0
    return ck


@pytest.mark.slow
def test_cli_sample_writes_each_format_and_its_own_library_reads_it(tiny_checkpoint, tmp_path, capsys):
    """`sample --out` picks the writer by suffix; anndata, tifffile, ome-zarr-py and spatialdata read the files."""
    import anndata as ad
    import tifffile
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    base = ["sample", "--checkpoint", str(tiny_checkpoint), "--data", "synthetic", "--steps", "1",
            "--n-samples", "2"]
    outs = {"h5ad": tmp_path / "maps.h5ad", "tiff": tmp_path / "maps.ome.tif", "ome-zarr": tmp_path / "maps.ome.zarr",
            "spatialdata": tmp_path / "maps.sdata.zarr"}
    for fmt, out in outs.items():
        assert cli_main(base + ["--out", str(out)]) == 0
        assert f"wrote {out} as {fmt}" in capsys.readouterr().out
    ref = W.read_maps(outs["ome-zarr"])
    G, H, Wd = ref.maps.shape
    a = ad.read_h5ad(outs["h5ad"])                       # the file the issue could not open
    assert a.n_vars == G and list(a.var_names) == ref.genes and "uncertainty" in a.layers
    assert a.uns["spatial"] and a.obsm["spatial"].shape == (a.n_obs, 2)
    t = tifffile.imread(outs["tiff"])
    assert t.shape == (2 * G, H, Wd)                      # genes + uncertainty
    np.testing.assert_allclose(t[:G], ref.maps, equal_nan=True)
    nodes = list(Reader(parse_url(str(outs["ome-zarr"])))())
    assert nodes and nodes[0].data[0].shape == (2 * G, H, Wd)
    np.testing.assert_allclose(np.asarray(nodes[0].data[0][:G]), ref.maps, equal_nan=True)
    import spatialdata as sd

    s = sd.read_zarr(outs["spatialdata"])
    assert {"maps", "maps_uncertainty", "he"} <= set(s.images) and "maps_table" in s.tables
    # a suffix no writer knows: one line on stderr, nothing written
    bad = tmp_path / "maps.png"
    assert cli_main(base + ["--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown output suffix '.png'" in err[0] and not bad.exists()
    # --format overrides the suffix
    odd = tmp_path / "maps.out"
    assert cli_main(base + ["--out", str(odd), "--format", "h5ad"]) == 0
    assert ad.read_h5ad(odd).n_vars == G


# -- the super-resolved AnnData --------------------------------------------------------------------------------
def test_sr_anndata_is_in_the_sections_frame(visium_section, tmp_path):
    import anndata as ad

    smp, fld, maps, _ = visium_section
    frame, maps, mask = _frame_and_maps(visium_section)
    p = W.write_h5ad(tmp_path / "sr.h5ad", maps, fld.genes, fld.hr_um, mask, extra_channels={"uncertainty": maps * 0.1},
                     frame=frame)
    sr = ad.read_h5ad(p)
    lib = smp.library_id
    assert list(sr.uns["spatial"]) == [lib]
    np.testing.assert_array_equal(sr.uns["spatial"][lib]["images"]["hires"], smp.adata.uns["spatial"][lib]["images"]["hires"])
    sf_in, sf = smp.adata.uns["spatial"][lib]["scalefactors"], sr.uns["spatial"][lib]["scalefactors"]
    assert sf["tissue_hires_scalef"] == pytest.approx(sf_in["tissue_hires_scalef"])
    assert sf["spot_diameter_fullres"] == pytest.approx(fld.hr_um / smp.um_per_px)      # HR pixel in full-res px
    # obsm['spatial'] in full-res px: the pixel that holds a spot's centre lies within half an HR pixel of it
    xy_in = np.asarray(smp.adata.obsm["spatial"], float)
    pos = {b: i for i, b in enumerate(smp.adata.obs_names)}
    d = np.hypot(*(sr.obsm["spatial"] - xy_in[[pos[b] for b in sr.obs["barcode"]]]).T)
    hr_px = fld.hr_um / smp.um_per_px
    assert d.max() <= (fld.extra["pitch_px"] / np.sqrt(3)) * 1.03           # inside its spot's cell
    assert d.min() <= hr_px / np.sqrt(2) + 1e-6
    np.testing.assert_allclose(sr.obsm["spatial_um"], sr.obsm["spatial"] * smp.um_per_px)
    assert set(sr.obs.columns) >= {"row", "col", "barcode", "in_tissue"} and sr.obs["in_tissue"].all()
    assert sr.layers["uncertainty"].shape == sr.X.shape
    # the grid still reads back
    mf = W.read_maps(p)
    np.testing.assert_allclose(mf.maps[:, mask], maps[:, mask])


def test_sc_pl_spatial_draws_the_maps_over_the_he(visium_section, tmp_path):
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    smp, fld, _, _ = visium_section
    frame, maps, mask = _frame_and_maps(visium_section)
    sr = ad.read_h5ad(W.write_h5ad(tmp_path / "sr.h5ad", maps, fld.genes, fld.hr_um, mask, frame=frame))
    gene = fld.genes[0]
    ax = sc.pl.spatial(sr, color=gene, show=False, img_key="hires")   # no spot_size needed
    ax = ax[0] if isinstance(ax, list) else ax
    imgs = ax.get_images()
    assert imgs and imgs[0].get_array().shape[:2] == smp.adata.uns["spatial"][smp.library_id]["images"]["hires"].shape[:2]
    def centres(a):   # scanpy draws one circle patch per observation, in hires-image pixels
        paths = a.collections[0].get_paths()
        return np.array([(p.vertices.min(0) + p.vertices.max(0)) / 2 for p in paths]), \
            np.array([(p.vertices.max(0) - p.vertices.min(0))[0] for p in paths])

    off, dia = centres(ax)
    sf = sr.uns["spatial"][smp.library_id]["scalefactors"]["tissue_hires_scalef"]
    assert len(off) == sr.n_obs
    from scipy.spatial import cKDTree

    d, j = cKDTree(sr.obsm["spatial"] * sf).query(off)     # scanpy sorts the circles by value
    assert d.max() < 1e-6 * off.max() and len(set(j)) == sr.n_obs
    np.testing.assert_allclose(dia, fld.hr_um / smp.um_per_px * sf, rtol=1e-6)   # one HR pixel wide
    # the pixels are drawn where the input's spots are drawn on the same image
    ax_in = sc.pl.spatial(smp.adata, show=False, img_key="hires")
    ax_in = ax_in[0] if isinstance(ax_in, list) else ax_in
    off_in, _ = centres(ax_in)
    pad = fld.extra["pitch_px"] * sf
    assert (off.min(0) >= off_in.min(0) - pad).all() and (off.max(0) <= off_in.max(0) + pad).all()
    plt.close("all")


def test_squidpy_neighbours_and_autocorrelation_on_the_maps(visium_section, tmp_path):
    import anndata as ad
    import squidpy as sq

    smp, fld, _, _ = visium_section
    frame, maps, mask = _frame_and_maps(visium_section)
    sr = ad.read_h5ad(W.write_h5ad(tmp_path / "sr.h5ad", maps, fld.genes, fld.hr_um, mask, frame=frame))
    sq.gr.spatial_neighbors(sr, coord_type="grid", n_neighs=4)
    deg = np.asarray(sr.obsp["spatial_connectivities"].sum(1)).ravel()
    assert deg.max() == 4 and np.median(deg) == 4              # the HR pixel grid: 4 neighbours inside
    sq.gr.spatial_autocorr(sr, mode="moran", genes=list(fld.genes), n_perms=None, n_jobs=1)
    res = sr.uns["moranI"]
    assert set(res.index) == set(fld.genes)
    assert (res["I"] > 0.3).all()                               # spot-constant maps are strongly autocorrelated
    # shuffling the pixels destroys it
    sh = sr.copy()
    sh.X = sh.X[np.random.default_rng(0).permutation(sh.n_obs)]
    sq.gr.spatial_autocorr(sh, mode="moran", genes=list(fld.genes), n_perms=None, n_jobs=1)
    assert (sh.uns["moranI"]["I"].abs() < 0.1).all()


def test_round_trip_input_to_sr_to_spots_by_barcode(visium_section, tmp_path):
    import anndata as ad

    smp, fld, _, spot_vals = visium_section
    frame, maps, mask = _frame_and_maps(visium_section)
    sr = ad.read_h5ad(W.write_h5ad(tmp_path / "sr.h5ad", maps, fld.genes, fld.hr_um, mask, frame=frame))
    back = aggregate_to_spots(sr)
    names = list(map(str, fld.extra["spot_obs_names"]))
    rows = [names.index(b) for b in back.obs_names]
    np.testing.assert_allclose(back.X, spot_vals[rows], rtol=1e-5, atol=1e-5)
    assert back.obs["n_pixels"].sum() == int((np.asarray(fld.hr_spot_index) >= 0).sum())
    # the mean pixel position of a spot is near the spot's centre
    xy = np.asarray(smp.adata.obsm["spatial"], float)[[list(smp.adata.obs_names).index(b) for b in back.obs_names]]
    assert np.median(np.hypot(*(back.obsm["spatial"] - xy).T)) < 0.25 * fld.extra["pitch_px"]
    chk = sr.uns["napari_diffst"]["self_check"]
    assert chk["spot_pcc_mean"] == pytest.approx(1.0, abs=1e-6) and chk["n_spots"] == back.n_obs
    # shifted maps break the round trip, and the self-check says so
    sr2 = ad.read_h5ad(W.write_h5ad(tmp_path / "sr2.h5ad", np.roll(maps, 5, axis=2), fld.genes, fld.hr_um, mask,
                                    frame=frame))
    assert sr2.uns["napari_diffst"]["self_check"]["spot_pcc_mean"] < 0.9


# -- SpatialData ----------------------------------------------------------------------------------------------
def _visium_style_sdata(smp, path, hires_scale=0.5):
    """A SpatialData zarr laid out as spatialdata-io writes Visium: a downscaled H&E with a Scale to full-res px,
    spot circles (radius = spot_diameter_fullres / 2, 65 µm ↔ diameter) and a table annotating them."""
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from skimage.transform import rescale
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    img = np.asarray(smp.image.levels[0])
    small = (rescale(img, hires_scale, channel_axis=-1, anti_aliasing=True) * 255).astype(np.uint8)
    f = 1.0 / hires_scale
    diam = 65.0 / smp.um_per_px
    ids = [str(b) for b in smp.adata.obs_names]
    shapes = ShapesModel.parse(np.asarray(smp.adata.obsm["spatial"], float), geometry=0,
                               radius=np.full(smp.n_spots, diam / 2), index=pd.Index(ids),
                               transformations={"global": Identity()})
    tab = ad.AnnData(X=smp.counts().copy(), var=smp.adata.var[[]].copy(),
                     obs=pd.DataFrame({"region": pd.Categorical(["spots"] * smp.n_spots), "spot_id": ids},
                                      index=pd.Index(ids)))
    tab = TableModel.parse(tab, region="spots", region_key="region", instance_key="spot_id")
    he = Image2DModel.parse(np.moveaxis(small, -1, 0), dims=("c", "y", "x"),
                            transformations={"global": Scale([f, f], axes=("x", "y"))})
    sd.SpatialData(images={"he_hires": he}, shapes={"spots": shapes}, tables={"table": tab}).write(path)
    return path


def test_read_spatialdata_visium_style(visium_section, tmp_path):
    from napari_diffst.io import detect_format, read

    smp = visium_section[0]
    p = _visium_style_sdata(smp, tmp_path / "section.zarr")
    assert detect_format(p) == "spatialdata"
    got = read(p)
    assert got.n_spots == smp.n_spots and got.genes == smp.genes
    np.testing.assert_allclose(got.adata.obsm["spatial"], smp.adata.obsm["spatial"], atol=1e-6)
    assert (got.counts() != smp.counts()).nnz == 0
    assert got.um_per_px == pytest.approx(smp.um_per_px, rel=1e-6)
    assert got.image.fullres_per_px == pytest.approx(2.0)
    assert got.image.shape == (smp.image.shape[0] // 2, smp.image.shape[1] // 2)
    # the spots sit on the same tissue: the image under each spot matches the original at the same place
    a = np.asarray(got.image.levels[0], float)
    b = np.asarray(smp.image.levels[0], float)[::2, ::2]
    xy = (got.adata.obsm["spatial"] / 2).round().astype(int)
    inside = (xy[:, 0] < a.shape[1]) & (xy[:, 1] < a.shape[0])
    va, vb = a[xy[inside, 1], xy[inside, 0]].mean(1), b[xy[inside, 1], xy[inside, 0]].mean(1)
    assert np.corrcoef(va, vb)[0, 1] > 0.8
    # and the pipeline runs on it
    from napari_diffst.pipeline import make_fields

    fld = make_fields([got], got.genes[:2], 2, mode="native")[0][0]
    assert fld.hr_um == pytest.approx(50.0, rel=0.02)


def test_read_spatialdata_errors(tmp_path):
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    from napari_diffst.io.spatialdata import read_spatialdata

    p = tmp_path / "img_only.zarr"
    sd.SpatialData(images={"he": Image2DModel.parse(np.zeros((3, 8, 8), np.uint8), dims=("c", "y", "x"))}).write(p)
    with pytest.raises(DataFormatError, match=r"img_only\.zarr: no table element"):
        read_spatialdata(p)


def test_write_spatialdata_map_pixel_and_spot_coincide(visium_section, tmp_path):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    smp, fld, _, _ = visium_section
    frame, maps, mask = _frame_and_maps(visium_section)
    p = W.write_maps(tmp_path / "sr.zarr", maps, fld.genes, fld.hr_um, fmt="spatialdata", mask=mask,
                     extra_channels={"uncertainty": maps * 0.1}, frame=frame)
    s = sd.read_zarr(p)
    assert {"he", "maps", "maps_uncertainty"} <= set(s.images) and "spots" in s.shapes
    cs = "global"
    for el in ("he", "maps", "spots"):
        assert cs in get_transformation(s[el], get_all=True)
    A = np.asarray(get_transformation(s["maps"], cs).to_affine_matrix(("x", "y"), ("x", "y")), float)
    spots = s.shapes["spots"]
    sxy = np.column_stack([spots.geometry.x, spots.geometry.y])
    B = np.asarray(get_transformation(spots, cs).to_affine_matrix(("x", "y"), ("x", "y")), float)
    sxy = sxy @ B[:2, :2].T + B[:2, 2]
    tab = s.tables["maps_table"]
    # every map pixel lies inside the cell of the spot its table row names, in the shared coordinate system
    rr, cc = tab.obs["row"].to_numpy(), tab.obs["col"].to_numpy()
    pxy = np.column_stack([cc, rr]) @ A[:2, :2].T + A[:2, 2]
    pos = {b: i for i, b in enumerate(spots.index)}
    d = np.hypot(*(pxy - sxy[[pos[b] for b in tab.obs["barcode"]]]).T)
    assert d.max() <= fld.extra["pitch_px"] / np.sqrt(3) * 1.03
    # the pixel nearest each spot centre is that spot's pixel and holds its value
    img = np.asarray(s.images["maps"].values)
    for k in range(0, len(sxy), 7):
        j = int(np.argmin(np.hypot(*(pxy - sxy[k]).T)))
        assert tab.obs["barcode"].iloc[j] == spots.index[k]
        np.testing.assert_allclose(img[:, rr[j], cc[j]], maps[:, rr[j], cc[j]])
    # the H&E under the maps: the spot's place in the H&E image's own pixels is inside the image
    C = np.asarray(get_transformation(s["he"], cs).to_affine_matrix(("x", "y"), ("x", "y")), float)
    hxy = (sxy - C[:2, 2]) @ np.linalg.inv(C[:2, :2]).T
    he = s.images["he"]
    assert (hxy >= 0).all() and (hxy[:, 0] < he.sizes["x"]).all() and (hxy[:, 1] < he.sizes["y"]).all()
    # the maps read back
    mf = W.read_maps(p)
    assert mf.genes == list(fld.genes) and "uncertainty" in mf.extra
    np.testing.assert_allclose(mf.maps[:, mask], maps[:, mask])


def test_formats_md_scverse_example(visium_section, tmp_path, monkeypatch):
    """The code of docs/formats.md's "use the results in scanpy / squidpy / SpatialData" section runs."""
    import re
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    sec = doc.split("## Use the results in scanpy / squidpy / SpatialData", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", sec, re.S)
    assert blocks
    smp, fld, _, _ = visium_section
    frame, maps, mask = _frame_and_maps(visium_section)
    assert "ERBB2" in fld.genes
    W.write_maps(tmp_path / "maps.h5ad", maps, fld.genes, fld.hr_um, mask=mask, frame=frame)
    W.write_maps(tmp_path / "maps.sdata.zarr", maps, fld.genes, fld.hr_um, mask=mask, frame=frame)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for b in blocks:
        exec(compile(b, "formats.md", "exec"), ns)
    assert set(ns["sr"].uns["moranI"].index) == set(fld.genes)
    assert ns["spots"].n_obs > 0 and "maps" in ns["sdata"].images
    plt.close("all")
