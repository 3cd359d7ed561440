"""MERSCOPE and Xenium readers on small bundles written here, and exact molecule binning."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_diffst.data.molecules import aggregate_bins, bin_counts, is_control_probe
from napari_diffst.errors import DataFormatError
from napari_diffst.io import detect_format, read

UM_PX = 0.5  # µm per mosaic / morphology pixel in the toy bundles
GENES = ["Gad1", "Slc17a7", "Mbp"]


def _molecules(rng, n=600, w_um=60.0, h_um=40.0, x0=1000.0, y0=2000.0):
    x = x0 + rng.uniform(0, w_um, n)
    y = y0 + rng.uniform(0, h_um, n)
    g = rng.choice(GENES + ["Blank-1", "Blank-7"], n, p=[0.3, 0.3, 0.3, 0.05, 0.05])
    return x, y, g


def _write_merscope(root, rng, *, images=True, transform=True, cells=False, gene_col="gene", invert=False):
    root.mkdir(parents=True, exist_ok=True)
    x, y, g = _molecules(rng)
    df = pd.DataFrame({"Unnamed: 0": np.arange(len(x)), "barcode_id": 3, "global_x": x, "global_y": y,
                       "global_z": rng.integers(0, 2, len(x)), "x": 0.0, "y": 0.0, "fov": 7, gene_col: g,
                       "transcript_id": "t"})
    df.to_csv(root / "detected_transcripts.csv", index=False)
    if images:
        import tifffile

        (root / "images").mkdir()
        A = np.array([[1 / UM_PX, 0, -1000 / UM_PX], [0, 1 / UM_PX, -2000 / UM_PX], [0, 0, 1]])
        if invert:
            A = np.linalg.inv(A)
        if transform:
            np.savetxt(root / "images" / "micron_to_mosaic_pixel_transform.csv", A, delimiter=" ")
        H, W = int(40 / UM_PX), int(60 / UM_PX)
        for stain in ("DAPI", "PolyT"):
            for z in (0, 1):
                tifffile.imwrite(root / "images" / f"mosaic_{stain}_z{z}.tif",
                                 rng.integers(0, 4000, (H, W)).astype(np.uint16))
    if cells:
        n = 5
        cg = pd.DataFrame(rng.integers(0, 9, (n, 4)), columns=GENES + ["Blank-1"],
                          index=pd.Index([f"c{i}" for i in range(n)], name="cell"))
        cg.to_csv(root / "cell_by_gene.csv")
        pd.DataFrame({"fov": 0, "volume": 100.0, "center_x": 1000 + rng.uniform(5, 55, n),
                      "center_y": 2000 + rng.uniform(5, 35, n)}, index=cg.index).to_csv(root / "cell_metadata.csv")
    return x, y, g


# --------------------------------------------------------------------------------------------- MERSCOPE
def test_merscope_full_region_reads_image_transcripts_and_bins(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "region_0"
    x, y, g = _write_merscope(root, rng)
    assert detect_format(root) == "merscope"
    assert detect_format(root / "detected_transcripts.csv") == "merscope"
    s = read(root)
    assert s.technology == "merscope" and s.um_per_px == pytest.approx(UM_PX)
    n_genes = int(np.isin(g, GENES).sum())
    assert len(s.molecules) == n_genes
    assert sorted(s.molecules["gene"].cat.categories) == sorted(GENES)
    im = s.adata.uns["imaging"]
    assert im["n_control_probes"] == 2 and im["n_control_molecules"] == len(g) - n_genes
    # molecules in mosaic px: x_px = (x_um − 1000) / 0.5
    keep = np.isin(g, GENES)
    np.testing.assert_allclose(np.sort(s.molecules["x"].to_numpy()), np.sort((x[keep] - 1000) / UM_PX))
    # 10 µm bins (default): every gene molecule counted once
    assert int(s.adata.X.sum()) == n_genes
    assert s.adata.uns["imaging"]["unit"] == "bins"
    assert s.image.modality == "fluorescence" and s.image.channel_names == ["DAPI", "PolyT"]
    assert s.image.shape == (80, 120)
    rgb = s.image.read_region(0, 10, 0, 10)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # (DAPI, PolyT, DAPI)
    assert "molecules" in s.summary() and "control probes skipped" in s.summary()


def test_merscope_without_images_and_with_cells(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "r"
    _write_merscope(root, rng, images=False, cells=True)
    s = read(root)
    assert s.image is None and s.um_per_px == 1.0
    assert s.adata.n_obs == 5 and list(s.adata.var_names) == GENES  # Blank-1 column skipped
    assert s.adata.uns["imaging"]["unit"] == "cells"
    assert s.adata.obsm["spatial"][:, 0].min() > 1000  # µm frame without a mosaic


def test_merscope_bad_inputs_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    r1 = tmp_path / "a"
    _write_merscope(r1, rng, transform=False)
    with pytest.raises(DataFormatError, match="micron_to_mosaic_pixel_transform.csv"):
        read(r1)
    r2 = tmp_path / "b"
    _write_merscope(r2, rng, gene_col="probe")
    with pytest.raises(DataFormatError, match="detected_transcripts.csv.*gene"):
        read(r2)
    r3 = tmp_path / "c"
    _write_merscope(r3, rng, invert=True)  # px → µm matrix given instead of µm → px
    with pytest.raises(DataFormatError, match="outside the .*mosaic"):
        read(r3)


def test_merscope_real_region(shared_dir):
    d = shared_dir / "data" / "merscope_mouse_brain_mini"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    s = read(d)
    assert len(s.molecules) == 80343 - 337 and s.adata.n_vars == 450
    assert s.adata.uns["imaging"]["n_control_probes"] == 109
    assert s.image.shape == (4143, 4603)


# ----------------------------------------------------------------------------------------------- Xenium
def _write_xenium(root, rng, *, matrix="mtx", transcripts="parquet", image="single", truncate=False):
    import tifffile

    root.mkdir(parents=True)
    px = 0.2125
    (root / "experiment.xenium").write_text(json.dumps({"pixel_size": px, "panel_name": "toy panel",
                                                        "analysis_sw_version": "xenium-2.0", "region_name": "toy"}))
    feats = GENES + ["NegControlProbe_00042", "BLANK_0006", "UnassignedCodeword_0001"]
    ftypes = ["Gene Expression"] * 3 + ["Negative Control Probe", "Blank Codeword", "Unassigned Codeword"]
    n_cells = 6
    cid = [f"aaa{i}-1" for i in range(n_cells)]
    X = rng.integers(0, 7, (n_cells, len(feats)))
    pd.DataFrame({"cell_id": cid, "x_centroid": rng.uniform(2, 20, n_cells), "y_centroid": rng.uniform(2, 10, n_cells),
                  "transcript_counts": X.sum(1)}).to_csv(root / "cells.csv.gz", index=False)
    if matrix == "mtx":
        import scipy.io

        m = root / "cell_feature_matrix"
        m.mkdir()
        with gzip.open(m / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sp.coo_matrix(X.T))
        with gzip.open(m / "features.tsv.gz", "wt") as fh:
            for i, (f, t) in enumerate(zip(feats, ftypes)):
                fh.write(f"ENS{i}\t{f}\t{t}\n")
        with gzip.open(m / "barcodes.tsv.gz", "wt") as fh:
            fh.write("\n".join(cid) + "\n")
    elif matrix == "h5":
        import h5py

        C = sp.csc_matrix(X.T)
        with h5py.File(root / "cell_feature_matrix.h5", "w") as f:
            g = f.create_group("matrix")
            g["data"], g["indices"], g["indptr"] = C.data, C.indices, C.indptr
            g["shape"] = np.array(C.shape)
            g["barcodes"] = np.array(cid, dtype="S")
            fg = g.create_group("features")
            fg["id"] = np.array([f"ENS{i}" for i in range(len(feats))], dtype="S")
            fg["name"] = np.array(feats, dtype="S")
            fg["feature_type"] = np.array(ftypes, dtype="S")
    n = 400
    tx = pd.DataFrame({"transcript_id": np.arange(n), "cell_id": "UNASSIGNED", "overlaps_nucleus": 0,
                       "feature_name": rng.choice(feats + ["antisense_Gad1"], n),
                       "x_location": rng.uniform(0, 24, n), "y_location": rng.uniform(0, 12, n),
                       "z_location": rng.uniform(5, 15, n), "qv": rng.uniform(5, 40, n)})
    if transcripts == "parquet":
        tx.to_parquet(root / "transcripts.parquet")
        if truncate:
            b = (root / "transcripts.parquet").read_bytes()
            (root / "transcripts.parquet").write_bytes(b[: len(b) // 2])
    elif transcripts == "csv":
        tx.to_csv(root / "transcripts.csv.gz", index=False)
    H, W = 64, 120
    ome = {"axes": "CYX", "Channel": {"Name": ["Boundary", "DAPI"]}, "PhysicalSizeX": px, "PhysicalSizeY": px}
    data = rng.integers(0, 3000, (2, H, W)).astype(np.uint16)
    data[1, :32] += 5000  # DAPI bright in the top half, so the pick is checkable
    if image == "single":
        with tifffile.TiffWriter(root / "morphology_focus.ome.tif", ome=True) as tw:
            tw.write(data, metadata=ome, subifds=1)
            tw.write(data[:, ::2, ::2], subfiletype=1)
    elif image == "folder":
        (root / "morphology_focus").mkdir()
        for i, nm in enumerate(["DAPI", "Boundary"]):
            tifffile.imwrite(root / "morphology_focus" / f"morphology_focus_000{i}.ome.tif",
                             data[1 - i][None], ome=True,
                             metadata={"axes": "CYX", "Channel": {"Name": [nm]}, "PhysicalSizeX": px})
    return tx, X, feats


@pytest.mark.parametrize("matrix,transcripts,image", [("mtx", "parquet", "single"), ("h5", "csv", "folder"),
                                                       ("h5", None, None), (None, "parquet", None)])
def test_xenium_layouts(tmp_path, matrix, transcripts, image):
    rng = np.random.default_rng(3)
    root = tmp_path / "out"
    tx, X, feats = _write_xenium(root, rng, matrix=matrix, transcripts=transcripts, image=image)
    assert detect_format(root) == "xenium"
    s = read(root)
    assert s.technology == "xenium" and s.um_per_px == pytest.approx(0.2125)
    im = s.adata.uns["imaging"]
    if matrix is not None:
        assert list(s.adata.var_names) == GENES and s.adata.n_obs == 6
        np.testing.assert_array_equal(s.adata.X.toarray(), X[:, :3])
        assert im["n_control_features"] == 3
        np.testing.assert_allclose(s.adata.obsm["spatial"][:, 0] * 0.2125, s.adata.obs["x_centroid"])
    else:
        assert im["unit"] == "bins"
    if transcripts is not None:
        good = (tx["qv"] >= 20) & tx["feature_name"].isin(GENES)
        assert len(s.molecules) == int(good.sum())
        assert im["n_low_qv"] == int((tx["qv"] < 20).sum())
        assert im["n_control_molecules"] == int(((tx["qv"] >= 20) & ~tx["feature_name"].isin(GENES)).sum())
        np.testing.assert_allclose(np.sort(s.molecules["x"]), np.sort(tx.loc[good, "x_location"] / 0.2125))
    else:
        assert s.molecules is None
    if image is not None:
        assert s.image.modality == "fluorescence" and s.image.channel_names == ["DAPI"]
        a = np.asarray(s.image.levels[0][:, :])[..., 0].astype(float)
        assert a[:32].mean() > a[32:].mean() + 50  # the DAPI channel, not the boundary stain
        if image == "single":
            assert len(s.image.levels) == 2  # pyramid kept (read lazily)
    else:
        assert s.image is None


def test_xenium_truncated_parquet_and_missing_tables(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "out"
    _write_xenium(root, rng, truncate=True)
    with pytest.raises(DataFormatError, match=r"transcripts\.parquet.*truncated"):
        read(root)
    r2 = tmp_path / "out2"
    _write_xenium(r2, rng, matrix=None, transcripts=None, image=None)
    with pytest.raises(DataFormatError, match="cell_feature_matrix"):
        read(r2)


def test_control_probe_names():
    for n in ("Blank-12", "BLANK_0006", "NegControlProbe_00042", "NegControlCodeword_0500",
              "UnassignedCodeword_0001", "DeprecatedCodeword_0", "antisense_Gad1"):
        assert is_control_probe(n), n
    for n in ("Gad1", "Slc17a7", "Blk", "Negr1"):
        assert not is_control_probe(n), n


# ---------------------------------------------------------------------------------------------- binning
def test_binning_hr_sums_equal_lr_sums_exactly():
    rng = np.random.default_rng(5)
    n, G = 5000, 4
    x, y = rng.uniform(-3, 103, n), rng.uniform(-3, 83, n)
    g = rng.integers(0, G, n)
    for s in (2, 5, 10):
        hr, inside = bin_counts(x, y, g, G, origin=(0.0, 0.0), bin_size=10.0 / s, shape=(8 * s, 10 * s))
        lr_direct, inside_lr = bin_counts(x, y, g, G, origin=(0.0, 0.0), bin_size=10.0, shape=(8, 10))
        lr, shape = aggregate_bins(hr, (8 * s, 10 * s), s)
        assert shape == (8, 10)
        np.testing.assert_array_equal(lr.toarray(), lr_direct.toarray())
        np.testing.assert_array_equal(inside, inside_lr)
        assert int(hr.sum()) == int(inside.sum())  # every molecule inside the grid counted exactly once
    # a molecule exactly on a bin edge goes to the bin on its right/below (half-open bins)
    M, _ = bin_counts([10.0], [0.0], [0], 1, origin=(0, 0), bin_size=10.0, shape=(1, 2))
    assert M.toarray()[:, 0].tolist() == [0, 1]


def test_info_describes_both_formats(tmp_path, capsys):
    """``napari-diffst info`` on a MERSCOPE region and a Xenium bundle: format, what the observations are,
    molecules, skipped controls and low-qv molecules, the morphology stains."""
    from napari_diffst.cli import main

    _write_merscope(tmp_path / "region", np.random.default_rng(0))
    _write_xenium(tmp_path / "xenium", np.random.default_rng(0))
    assert main(["info", str(tmp_path / "region")]) == 0
    out = capsys.readouterr().out
    assert "merscope" in out and "bins × 3 genes" in out and "molecules of 3 genes" in out
    assert "2 control probes skipped" in out and "obs = 10 µm bins" in out and "morphology DAPI/PolyT" in out
    assert "spot Ø" not in out
    assert main(["info", str(tmp_path / "xenium")]) == 0
    out = capsys.readouterr().out
    assert "xenium" in out and "6 cells × 3 genes" in out and "control probes skipped" in out
    assert "below qv 20 dropped" in out and "obs = cells" in out and "morphology DAPI" in out
