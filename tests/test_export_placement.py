"""Exports come back where they were: per-axis pixel size and rotation in every writer, and the plugin's
reader opens its own OME-Zarr (and any NGFF image in µm) as one layer per gene + uncertainty, in µm."""
from __future__ import annotations

import math

import numpy as np
import pytest

from napari_diffst.io import writers as W

# a rotated (7°), anisotropic (0.95 × 1.06) HR grid in µm: (row, col, 1) → (y, x, 1)
TH = math.radians(7.0)
ROT_ANISO = np.array([[47.45 * math.cos(TH), -52.69 * math.sin(TH), 1200.0],
                      [47.45 * math.sin(TH), 52.69 * math.cos(TH), 800.0],
                      [0.0, 0.0, 1.0]])


def _maps(G=2, H=9, W_=11, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.random((G, H, W_)).astype(np.float32)
    m[:, 0, :3] = np.nan
    return m


@pytest.mark.parametrize("fmt", ["zarr", "zarr05", "tif", "h5ad"])
@pytest.mark.parametrize("aff", ["aniso", "rotated"])
def test_placement_round_trips_in_every_format(tmp_path, fmt, aff):
    A = ROT_ANISO.copy() if aff == "rotated" else np.array([[47.45, 0, 10.0], [0, 52.69, -5.0], [0, 0, 1]])
    m = _maps()
    if fmt.startswith("zarr"):
        p = W.write_ome_zarr(tmp_path / "m.ome.zarr", m, ["A", "B"], affine_um=A, levels=2,
                             ngff_version="0.5" if fmt == "zarr05" else "0.4")
    elif fmt == "tif":
        p = W.write_tiff(tmp_path / "m.ome.tif", m, ["A", "B"], affine_um=A)
    else:
        p = W.write_h5ad(tmp_path / "m.h5ad", m, ["A", "B"], affine_um=A)
    mf = W.read_maps(p)
    np.testing.assert_allclose(mf.affine_um, A, rtol=1e-9, atol=1e-9)
    assert mf.pixel_um == pytest.approx((47.45, 52.69))
    assert mf.metadata["pixel_um"] == pytest.approx([47.45, 52.69])
    assert ("affine_um" in mf.metadata) == (aff == "rotated")
    if fmt == "h5ad":  # pixel centres in µm follow the affine, (x, y) order
        import anndata as ad

        a = ad.read_h5ad(p)
        rc = np.c_[a.obs["row"], a.obs["col"], np.ones(a.n_obs)]
        np.testing.assert_allclose(a.obsm["spatial"], (rc @ A.T)[:, [1, 0]], atol=1e-9)


def test_ngff_scale_is_per_axis(tmp_path):
    import zarr

    A = np.array([[47.45, 0, 10.0], [0, 52.69, -5.0], [0, 0, 1]])
    p = W.write_ome_zarr(tmp_path / "m.zarr", _maps(H=40, W_=40), ["A", "B"], affine_um=A, chunks=(1, 16, 16))
    ms = dict(zarr.open_group(str(p), mode="r").attrs)["multiscales"][0]
    for k, ds in enumerate(ms["datasets"]):
        sc, tr = (t[t["type"]] for t in ds["coordinateTransformations"])
        assert sc == pytest.approx([1.0, 47.45 * 2 ** k, 52.69 * 2 ** k])
        # the level keeps the image footprint: its pixel (0, 0) centre sits (2^k − 1)/2 level-0 pixels in
        assert tr == pytest.approx([0.0, 10.0 + 47.45 * (2 ** k - 1) / 2, -5.0 + 52.69 * (2 ** k - 1) / 2])


@pytest.fixture(scope="module")
def skewed_field():
    """A synthetic section whose spot lattice is rotated 7° and stretched 0.95 × 1.06 (like a real
    legacy-ST array scanned at slightly different x/y pixel sizes), at 2× native."""
    from napari_diffst import pipeline as P
    from napari_diffst.data.grids import make_field

    smp = P.load_data("synthetic", size_um=(1600, 1600))
    xy = np.asarray(smp.adata.obsm["spatial"], float)
    R = np.array([[math.cos(TH), -math.sin(TH)], [math.sin(TH), math.cos(TH)]])
    smp.adata.obsm["spatial"] = (xy - xy.mean(0)) @ (R @ np.diag([0.95, 1.06])).T + xy.mean(0)
    genes = list(smp.adata.var_names[:2])
    fld = make_field(smp, genes, 2, mode="native", with_he=False)
    return smp, fld


def _spot_world_um(smp, fld):
    """(true spot centres (y, x) µm, the same spots' continuous (row, col) on the HR grid)."""
    from napari_diffst.data.sample import apply_affine

    keep = fld.extra["spot_obs_index"]
    xy = np.asarray(smp.adata.obsm["spatial"], float)[keep]
    true_yx = apply_affine(np.asarray(smp.transform, float), xy)[:, ::-1] * smp.um_per_px
    A = np.asarray(fld.extra["hr_affine"], float)  # (col, row) → image px (registration included)
    cr = apply_affine(np.linalg.inv(A), apply_affine(np.asarray(smp.transform, float), xy))
    return true_yx, cr[:, ::-1]


def test_spots_land_on_their_maps_after_export_and_reopen(tmp_path, skewed_field):
    from napari_diffst._reader import get_reader
    from napari_diffst.data.grids import field_napari_affine

    smp, fld = skewed_field
    pitch_um = fld.extra["pitch_um"]
    G = len(fld.genes)
    maps = np.where(fld.hr_mask[None], np.ones((G, *fld.hr_shape), np.float32), np.nan)
    p = W.write_ome_zarr(tmp_path / "maps.ome.zarr", maps, fld.genes, extra_channels={"uncertainty": maps},
                         affine_um=field_napari_affine(fld, "hr"))
    layers = get_reader(str(p))(str(p))
    true_yx, rc = _spot_world_um(smp, fld)
    for data, kw, kind in layers:
        A = np.asarray(kw["affine"], float)
        got = rc @ A[:2, :2].T + A[:2, 2]
        err = np.hypot(*(got - true_yx).T)
        assert err.max() < 0.01 * pitch_um, (kw["name"], err.max(), pitch_um)
    # one isotropic pixel size (the old file) puts the same spots up to a good part of a pitch away
    iso = W.Placement.from_scale(W.Placement(field_napari_affine(fld, "hr")).um_per_px,
                                 W.Placement(field_napari_affine(fld, "hr")).origin).affine
    old = rc @ iso[:2, :2].T + iso[:2, 2]
    assert np.hypot(*(old - true_yx).T).max() > 0.2 * pitch_um


def test_plugin_reader_opens_its_ome_zarr_as_gene_layers(tmp_path, skewed_field):
    from napari.components import ViewerModel

    from napari_diffst.data.grids import field_napari_affine

    _, fld = skewed_field
    G = len(fld.genes)
    rng = np.random.default_rng(1)
    maps = np.where(fld.hr_mask[None], rng.random((G, *fld.hr_shape)).astype(np.float32), np.nan)
    unc = maps * 0.1
    p = W.write_ome_zarr(tmp_path / "maps.ome.zarr", maps, fld.genes, extra_channels={"uncertainty": unc},
                         affine_um=field_napari_affine(fld, "hr"), metadata={"napari_diffst": {"method": "Diff-ST"}},
                         chunks=(1, 4, 4))
    from napari.plugins import _initialize_plugins

    _initialize_plugins()
    v = ViewerModel()
    added = v.open(str(p), plugin="napari-diffst")
    names = [ly.name for ly in added]
    assert names == [f"{g} · Diff-ST" for g in fld.genes] + [f"{g} · Diff-ST σ" for g in fld.genes]
    assert [ly.visible for ly in added] == [True] + [False] * (2 * G - 1)
    for i, ly in enumerate(added):
        assert ly.data.ndim == 2 if not ly.multiscale else ly.data[0].ndim == 2
        assert tuple(str(u) for u in ly.units) == ("micrometer", "micrometer")
        np.testing.assert_allclose(ly.affine.affine_matrix, field_napari_affine(fld, "hr"), atol=1e-9)
        lvl0 = np.asarray(ly.data[0] if ly.multiscale else ly.data)
        ref = maps[i] if i < G else unc[i - G]
        np.testing.assert_array_equal(np.isnan(lvl0), np.isnan(ref))
        np.testing.assert_allclose(lvl0[np.isfinite(lvl0)], ref[np.isfinite(ref)], rtol=1e-6)
        assert ly.colormap.colors[0, 3] == 0.0 and ly.colormap.colors[-1, 3] == 1.0  # low values fade out
    # and the layers save again through the plugin's writer, placement and uncertainty intact
    from napari_diffst import _writer

    out = tmp_path / "again.ome.zarr"
    _writer.write_ome_zarr(str(out), [ly.as_layer_data_tuple() for ly in added])
    mf = W.read_maps(out)
    assert mf.genes == list(fld.genes) and list(mf.extra) == ["uncertainty"]
    np.testing.assert_allclose(mf.affine_um, field_napari_affine(fld, "hr"), atol=1e-9)


def test_plugin_reader_opens_a_foreign_ngff_image_in_um(tmp_path):
    """An NGFF image without napari-diffst's metadata: one layer per channel, named by its omero labels,
    placed by the NGFF scale + translation (converted to µm)."""
    import zarr

    from napari_diffst._reader import get_reader

    p = tmp_path / "foreign.zarr"
    root = zarr.open_group(str(p), mode="w", zarr_format=2)
    a = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    root.create_array("0", shape=a.shape, dtype="float32", chunks=(1, 6, 5))[...] = a
    root.attrs.update({"multiscales": [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "millimeter"},
        {"name": "x", "type": "space", "unit": "millimeter"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.002, 0.003]},
                                                                  {"type": "translation",
                                                                   "translation": [0, 0.1, 0.2]}]}]}],
        "omero": {"channels": [{"label": "DAPI"}, {"label": "GFAP"}]}})
    layers = get_reader(str(p))(str(p))
    assert [kw["name"] for _, kw, _ in layers] == ["DAPI", "GFAP"]
    np.testing.assert_allclose(layers[1][1]["affine"], [[2.0, 0, 100.0], [0, 3.0, 200.0], [0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(layers[1][0]), a[1])


def test_dock_layer_placement_is_what_the_writer_stores(skewed_field):
    """The dock places maps by scale/translate/rotate/shear; the npe2 writer composes them back into the
    field's affine (the old writer took only ``scale`` and refused non-square pixels)."""
    from napari_diffst._widgets.workers import raster_layer_kwargs
    from napari_diffst._writer import layer_affine
    from napari_diffst.data.grids import field_napari_affine

    _, fld = skewed_field
    np.testing.assert_allclose(layer_affine(raster_layer_kwargs(fld, "hr")), field_napari_affine(fld, "hr"),
                               atol=1e-9)
