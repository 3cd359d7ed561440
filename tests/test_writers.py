"""Writers for super-resolved maps: OME-Zarr (NGFF 0.4/0.5), OME-TIFF, h5ad; atomicity; npe2 hooks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_diffst.errors import DataFormatError
from napari_diffst.io import writers as W

GENES = ["ERBB2", "CD74", "COL1A1"]


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    m = rng.gamma(2.0, 1.0, (3, 37, 53)).astype(np.float32)
    m[:, :5, :7] = np.nan  # outside tissue
    return m


@pytest.fixture
def unc(maps):
    return (np.abs(maps) * 0.1 + 0.01).astype(np.float32)


def _only(dirpath: Path) -> list[str]:
    return sorted(os.listdir(dirpath))


# -- OME-Zarr ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_ome_zarr_round_trip(tmp_path, maps, unc, ngff):
    p = W.write_ome_zarr(tmp_path / "sr.ome.zarr", maps, GENES, 2.5, (5.0, 7.0),
                         extra_channels={"uncertainty": unc}, chunks=(1, 16, 16), ngff_version=ngff)
    m, genes, um = W.read_ome_zarr(p)
    assert genes == GENES and um == 2.5
    np.testing.assert_array_equal(m, maps)  # NaNs in the same places
    full = W.read_maps(p)
    assert full.origin_um == (5.0, 7.0) and list(full.extra) == ["uncertainty"]
    np.testing.assert_array_equal(full.extra["uncertainty"], unc)
    assert full.n_levels == 3  # 53 → 27 → 14 ≤ 16
    # the NGFF metadata itself, read without our reader
    if ngff == "0.4":
        attrs = json.loads((p / ".zattrs").read_text())
        ms, omero = attrs["multiscales"][0], attrs["omero"]
        assert ms["version"] == "0.4"
        zarray = json.loads((p / "0" / ".zarray").read_text())
        assert zarray["dimension_separator"] == "/" and zarray["zarr_format"] == 2
    else:
        meta = json.loads((p / "zarr.json").read_text())
        assert meta["zarr_format"] == 3
        attrs = meta["attributes"]
        ms, omero = attrs["ome"]["multiscales"][0], attrs["ome"]["omero"]
        assert attrs["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][1]["unit"] == "micrometer" and ms["axes"][2]["unit"] == "micrometer"
    t0, t1 = (d["coordinateTransformations"] for d in ms["datasets"][:2])
    assert t0[0] == {"type": "scale", "scale": [1.0, 2.5, 2.5]}
    assert t0[1] == {"type": "translation", "translation": [0.0, 5.0, 7.0]}
    assert t1[0]["scale"] == [1.0, 5.0, 5.0]
    # level-1 pixel (0,0) covers level-0 pixels 0..1: its centre is half a level-0 pixel further
    assert t1[1]["translation"] == [0.0, 5.0 + 1.25, 7.0 + 1.25]
    labels = [c["label"] for c in omero["channels"]]
    assert labels == GENES + [f"{g} [uncertainty]" for g in GENES]
    w = omero["channels"][0]["window"]
    assert w["min"] == pytest.approx(float(np.nanmin(maps[0]))) and w["max"] == pytest.approx(float(np.nanmax(maps[0])))
    # pyramid: NaN-aware 2×2 mean
    lvl1, _, um1 = W.read_ome_zarr(p, level=1)
    assert um1 == 5.0 and lvl1.shape == (3, 19, 27)
    blk = maps[1, 10:12, 20:22]
    assert lvl1[1, 5, 10] == pytest.approx(blk.mean(), rel=1e-6)
    assert np.isnan(lvl1[0, 0, 0])  # all four NaN
    assert lvl1[0, 2, 3] == pytest.approx(np.nanmean(maps[0, 4:6, 6:8]), rel=1e-6)  # 3 of 4 finite
    assert lvl1[2, 18, 26] == pytest.approx(maps[2, 36, 52], rel=1e-6)  # odd edge: one real pixel
    assert _only(tmp_path) == ["sr.ome.zarr"]


def test_ome_zarr_tiled_writer(tmp_path, maps):
    C, H, Wd = maps.shape
    with W.OmeZarrWriter(tmp_path / "tiled.zarr", maps.shape, GENES, 4.0, chunks=(1, 16, 16)) as w:
        for r0 in range(0, H, 20):
            for c0 in range(0, Wd, 20):
                if (r0, c0) == (20, 40):
                    continue  # never written: must read back as NaN
                w.write_tile(r0, c0, maps[:, r0:r0 + 20, c0:c0 + 20])
        w.write_tile(0, 0, np.zeros((2, 2), np.float32), channels=2)  # one channel only
        assert not (tmp_path / "tiled.zarr").exists()  # nothing at the target until close()
    m, genes, um = W.read_ome_zarr(tmp_path / "tiled.zarr")
    exp = maps.copy()
    exp[:, 20:40, 40:60] = np.nan
    exp[2, :2, :2] = 0
    np.testing.assert_array_equal(m, exp)
    assert genes == GENES and um == 4.0
    with W.OmeZarrWriter(tmp_path / "x.zarr", maps.shape, GENES, 4.0) as w:
        with pytest.raises(DataFormatError, match="outside"):
            w.write_tile(30, 50, maps[:, :20, :20])
    assert _only(tmp_path) == ["tiled.zarr", "x.zarr"]


def test_ome_zarr_context_error_discards(tmp_path, maps):
    target = tmp_path / "keep.zarr"
    W.write_ome_zarr(target, maps[:1], GENES[:1], 1.0)
    with pytest.raises(RuntimeError, match="inference failed"):
        with W.OmeZarrWriter(target, maps.shape, GENES, 2.0) as w:
            w.write_tile(0, 0, maps)
            raise RuntimeError("inference failed")
    m, genes, um = W.read_ome_zarr(target)
    assert genes == GENES[:1] and um == 1.0
    assert _only(tmp_path) == ["keep.zarr"]


# -- OME-TIFF ------------------------------------------------------------------------------------
def test_tiff_round_trip(tmp_path, maps, unc):
    import tifffile

    p = W.write_tiff(tmp_path / "sr.ome.tif", maps, GENES, 2.5, (5.0, 7.0), extra_channels={"uncertainty": unc})
    m, genes, um = W.read_tiff_maps(p)
    np.testing.assert_array_equal(m, maps)
    assert genes == GENES and um == 2.5
    full = W.read_maps(p)
    assert full.origin_um == (5.0, 7.0)
    np.testing.assert_array_equal(full.extra["uncertainty"], unc)
    # plain tifffile sees an OME-TIFF with physical sizes and channel names
    with tifffile.TiffFile(p) as tf:
        assert tf.is_ome and tf.series[0].axes == "CYX" and tf.series[0].shape == (6, 37, 53)
        px = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
    assert float(px["PhysicalSizeX"]) == 2.5 and float(px["PhysicalSizeY"]) == 2.5
    assert px["PhysicalSizeXUnit"] == "µm"
    assert [c["Name"] for c in px["Channel"]][:3] == GENES
    assert _only(tmp_path) == ["sr.ome.tif"]


def test_single_map_2d(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    W.write_tiff(tmp_path / "one.tif", a, "ERBB2", 10.0)
    m, genes, um = W.read_tiff_maps(tmp_path / "one.tif")
    assert m.shape == (1, 3, 4) and genes == ["ERBB2"] and um == 10.0
    np.testing.assert_array_equal(m[0], a)


# -- h5ad ----------------------------------------------------------------------------------------
def test_h5ad_round_trip(tmp_path, maps, unc):
    import anndata as ad

    mask = np.zeros(maps.shape[1:], bool)
    mask[10:30, 5:45] = True
    p = W.write_h5ad(tmp_path / "sr.h5ad", maps, GENES, 2.5, mask=mask, origin_um=(5.0, 7.0),
                     extra_channels={"uncertainty": unc})
    a = ad.read_h5ad(p)
    assert a.n_obs == mask.sum() and list(a.var_names) == GENES
    i = int(np.flatnonzero((a.obs["row"] == 12).to_numpy() & (a.obs["col"] == 30).to_numpy())[0])
    assert a.obsm["spatial"][i].tolist() == [7.0 + 30 * 2.5, 5.0 + 12 * 2.5]  # (x, y) µm
    assert a.obsm["spatial_px"][i].tolist() == [30.0, 12.0]
    np.testing.assert_array_equal(a.X[i], maps[:, 12, 30])
    np.testing.assert_array_equal(a.layers["uncertainty"][i], unc[:, 12, 30])
    assert a.uns["napari_diffst"]["um_per_px"] == 2.5
    m, genes, um = W.read_h5ad_maps(p)
    assert genes == GENES and um == 2.5
    np.testing.assert_array_equal(m[:, mask], maps[:, mask])
    assert np.isnan(m[:, ~mask]).all()
    # default mask: pixels with any finite value
    W.write_h5ad(tmp_path / "all.h5ad", maps, GENES, 2.5)
    assert ad.read_h5ad(tmp_path / "all.h5ad").n_obs == 37 * 53 - 5 * 7


# -- validation and atomicity --------------------------------------------------------------------
def test_validation_errors_name_the_file(tmp_path, maps):
    with pytest.raises(DataFormatError, match="2 gene names for 3"):
        W.write_ome_zarr(tmp_path / "a.zarr", maps, GENES[:2], 1.0)
    with pytest.raises(DataFormatError, match="duplicate"):
        W.write_tiff(tmp_path / "a.tif", maps, ["A", "A", "B"], 1.0)
    with pytest.raises(DataFormatError, match="pixel size"):
        W.write_h5ad(tmp_path / "a.h5ad", maps, GENES, -1.0)
    with pytest.raises(DataFormatError, match=r"a\.tif"):
        W.write_tiff(tmp_path / "a.tif", np.zeros((2, 2, 2, 2)), GENES, 1.0)
    assert _only(tmp_path) == []


def _existing(path: Path, writer, maps):
    writer(path, maps[:1] * 0 + 7, ["OLD"], 1.0)
    return W.read_maps(path)


@pytest.mark.parametrize("fmt", ["zarr", "tif", "h5ad"])
def test_failed_write_leaves_target_untouched(tmp_path, maps, monkeypatch, fmt):
    target = tmp_path / f"maps.{fmt}"
    writer = {"zarr": W.write_ome_zarr, "tif": W.write_tiff, "h5ad": W.write_h5ad}[fmt]
    before = _existing(target, writer, maps)
    listing = _only(tmp_path)

    if fmt == "zarr":  # fail after the first channel has been written
        real = W.OmeZarrWriter.write_tile
        calls = []

        def boom(self, *a, **kw):
            calls.append(1)
            if len(calls) > 1:
                raise OSError("disk full")
            return real(self, *a, **kw)
        monkeypatch.setattr(W.OmeZarrWriter, "write_tile", boom)
    elif fmt == "tif":
        import tifffile
        real = tifffile.imwrite

        def boom(path, data, **kw):
            real(path, data[:1], **{k: v for k, v in kw.items() if k not in ("metadata", "ome")})
            raise OSError("disk full")
        monkeypatch.setattr(tifffile, "imwrite", boom)
    else:
        import anndata as ad

        def boom(self, filename, **kw):
            Path(filename).write_bytes(b"partial h5")
            raise OSError("disk full")
        monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)

    with pytest.raises(OSError, match="disk full"):
        writer(target, maps, GENES, 2.0)
    monkeypatch.undo()
    assert _only(tmp_path) == listing  # no temporary left behind
    after = W.read_maps(target)
    assert after.genes == ["OLD"] and after.um_per_px == 1.0
    np.testing.assert_array_equal(after.maps, before.maps)
    # and a successful write replaces it
    writer(target, maps, GENES, 2.0)
    assert W.read_maps(target).genes == GENES and _only(tmp_path) == listing


def test_atomic_path_for_new_file(tmp_path):
    with pytest.raises(ValueError):
        with W.atomic_path(tmp_path / "sub" / "f.txt") as tmp:
            tmp.write_text("half")
            raise ValueError("x")
    assert _only(tmp_path / "sub") == []
    with W.atomic_path(tmp_path / "sub" / "f.txt") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "sub" / "f.txt").read_text() == "whole"


# -- npe2 writer hooks -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def napari_layers():
    pytest.importorskip("napari")
    from napari.layers import Image

    return Image


def test_hooks_with_napari_layer_data(tmp_path, maps, unc, napari_layers):
    from napari_diffst import _writer

    Image = napari_layers
    he = Image(np.zeros((74, 106, 3), np.uint8), rgb=True, scale=(1.25, 1.25), name="H&E",
               metadata={"diffst_role": "histology"})
    layers = [he]
    for i, g in enumerate(GENES):
        layers.append(Image(maps[i], scale=(2.5, 2.5), translate=(5.0, 7.0), name=f"{g} SR",
                            metadata={"diffst_role": "sr_map", "gene": g}))
    for i, g in enumerate(GENES):
        layers.append(Image(unc[i], scale=(2.5, 2.5), translate=(5.0, 7.0), name=f"{g} SR uncertainty",
                            metadata={"diffst_role": "sr_uncertainty", "gene": g}))
    ld = [L.as_layer_data_tuple() for L in layers]

    out = _writer.write_ome_zarr(str(tmp_path / "h.ome.zarr"), ld)
    assert out == [str(tmp_path / "h.ome.zarr")]
    r = W.read_maps(out[0])
    assert r.genes == GENES and r.um_per_px == 2.5 and r.origin_um == (5.0, 7.0)
    np.testing.assert_array_equal(r.maps, maps)
    np.testing.assert_array_equal(r.extra["uncertainty"], unc)

    out = _writer.write_tiff(str(tmp_path / "h.tif"), ld)
    m, genes, um = W.read_tiff_maps(out[0])
    assert genes == GENES and um == 2.5
    np.testing.assert_array_equal(m, maps)

    out = _writer.write_h5ad(str(tmp_path / "h.h5ad"), ld[1:2])
    m, genes, um = W.read_h5ad_maps(out[0])
    assert genes == ["ERBB2"] and um == 2.5
    np.testing.assert_array_equal(m[0], maps[0])


def test_hooks_multichannel_and_multiscale(tmp_path, maps, napari_layers):
    from napari_diffst import _writer

    Image = napari_layers
    multi = Image(maps, scale=(1, 4.0, 4.0), name="SR maps", metadata={"genes": GENES})
    out = _writer.write_tiff(str(tmp_path / "m.tif"), [multi.as_layer_data_tuple()])
    m, genes, um = W.read_tiff_maps(out[0])
    assert genes == GENES and um == 4.0
    np.testing.assert_array_equal(m, maps)
    # unnamed channels fall back to the layer name; multiscale layers save level 0
    pyr = [maps[0], maps[0][::2, ::2]]
    ms = Image(pyr, multiscale=True, scale=(3.0, 3.0), name="ERBB2 pyramid")
    out = _writer.write_ome_zarr(str(tmp_path / "p.zarr"), [ms.as_layer_data_tuple()])
    m, genes, um = W.read_ome_zarr(out[0])
    assert genes == ["ERBB2 pyramid"] and um == 3.0 and m.shape == (1, 37, 53)


def test_hooks_reject_unusable_selections(tmp_path, maps):
    from napari_diffst import _writer

    rgb = (np.zeros((8, 8, 3), np.uint8), {"rgb": True, "name": "H&E", "scale": (1.0, 1.0)}, "image")
    with pytest.raises(DataFormatError, match="no gene-map layers"):
        _writer.write_tiff(str(tmp_path / "x.tif"), [rgb])
    a = (maps[0], {"name": "A", "scale": (2.0, 2.0)}, "image")
    b = (maps[1], {"name": "B", "scale": (3.0, 3.0)}, "image")
    with pytest.raises(DataFormatError, match="pixel sizes / orientations differ"):
        _writer.write_ome_zarr(str(tmp_path / "x.zarr"), [a, b])
    c = (maps[1][:10], {"name": "C", "scale": (2.0, 2.0)}, "image")
    with pytest.raises(DataFormatError, match="different shapes"):
        _writer.write_h5ad(str(tmp_path / "x.h5ad"), [a, c])
    assert _only(tmp_path) == []


def test_napari_save_layers_dispatches_to_plugin(tmp_path, maps, napari_layers):
    import napari
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    if "napari-diffst" not in pm._manifests:
        pytest.skip("napari-diffst is not installed as a napari plugin (pip install -e .)")
    layers = [napari_layers(maps[i], scale=(2.5, 2.5), name=g, metadata={"gene": g}) for i, g in enumerate(GENES)]
    out = napari.save_layers(str(tmp_path / "saved.ome.zarr"), layers, plugin="napari-diffst")
    assert out == [str(tmp_path / "saved.ome.zarr")]
    m, genes, um = W.read_ome_zarr(out[0])
    assert genes == GENES and um == 2.5
