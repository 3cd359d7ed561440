"""Real layouts and lattices (issue 17, blockers 1 and 2).

* STUtility's own section layout — ``<id>.tsv`` counts with versioned Ensembl ids,
  ``alignment_table_<id>.tsv`` (``x y new_x new_y pixel_x pixel_y selected``) and ``<id>.jpg`` — is
  read, its spot table recognised by its columns, whatever its name.
* Offset lattices (every used array site has x + y even) are a square lattice at 45° with pitch
  √2 index steps: µm/px uses that pitch, and the grids have no checkerboard holes. Square (1k),
  hexagonal (Visium numbering), offset and rotated lattices, complete and with missing spots, all
  give one raster cell per spot and fully covered spot disks.
"""
from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image, ImageDraw

from napari_diffst.data.grids import lattice_for, make_field
from napari_diffst.data.lattice import fit_index_lattice, index_sublattice
from napari_diffst.data.sample import Sample
from napari_diffst.errors import DataFormatError
from napari_diffst.io import detect_format, read

GENES = [f"ENSMUSG{22548 + 7 * k:011d}.{14 - k % 4}" for k in range(6)]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _rot(deg):
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def write_stutility(folder, sid="A1", *, nx=30, ny=34, step=(22.8, 22.8), angle=0.0, origin=(120.0, 90.0),
                    jitter=0.0, seed=0, image=True, spot_name=None):
    """STUtility's example layout on an offset lattice (x + y even), tissue = an ellipse of spots."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, labels, counts = [], [], []
    R = _rot(angle)
    cx, cy = (nx + 1) / 2, (ny + 1) / 2
    for x in range(1, nx + 1):
        for y in range(1, ny + 1):
            if (x + y) % 2:
                continue
            p = np.asarray(origin) + R @ (np.array([x * step[0], y * step[1]])) + rng.normal(0, jitter, 2)
            sel = int(((x - cx) / (0.45 * nx)) ** 2 + ((y - cy) / (0.45 * ny)) ** 2 <= 1)
            rows.append((x, y, x + rng.normal(0, 0.02), y + rng.normal(0, 0.02), round(p[0], 3), round(p[1], 3), sel))
            if sel:
                labels.append(f"{x}x{y}")
                counts.append(rng.poisson(4 + 3 * np.arange(len(GENES)) % 7))
    sdf = pd.DataFrame(rows, columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"])
    sdf.to_csv(folder / (spot_name or f"alignment_table_{sid}.tsv"), sep="\t", index=False)
    pd.DataFrame(np.asarray(counts), index=labels, columns=GENES).to_csv(folder / f"{sid}.tsv", sep="\t")
    if image:
        W = int(sdf.pixel_x.max() + 2 * step[0] + origin[0])
        H = int(sdf.pixel_y.max() + 2 * step[1] + origin[1])
        im = Image.new("RGB", (W, H), (240, 240, 240))
        d = ImageDraw.Draw(im)
        r = 0.5 * step[0]
        for px, py in sdf.loc[sdf.selected == 1, ["pixel_x", "pixel_y"]].to_numpy():
            d.ellipse([px - r, py - r, px + r, py + r], fill=(120, 60, 130))
        im.save(folder / f"{sid}.jpg", quality=90)
    return sdf


def lattice_sample(kind, *, angle=0.0, missing=0.0, seed=0, um_per_px=2.0):
    """A section on a known lattice with array indices, nominal pitch 200 µm (legacy ST) or 100 µm
    (Visium); ``missing`` drops that fraction of the spots at random."""
    rng = np.random.default_rng(seed)
    if kind == "hex":  # Visium numbering: array_col = 2k + row parity
        pitch_um, tech = 100.0, "visium"
        rc = np.array([(r, 2 * k + r % 2) for r in range(16) for k in range(14)], float)
        xy_um = np.c_[rc[:, 1] * pitch_um / 2, rc[:, 0] * pitch_um * math.sqrt(3) / 2]
    else:
        pitch_um, tech = 200.0, "legacy_st"
        if kind == "square":
            cr = np.array([(x, y) for x in range(14) for y in range(16)], float)
            xy_um = cr * pitch_um
        else:  # offset: x + y even, nearest neighbours on the diagonals
            cr = np.array([(x, y) for x in range(22) for y in range(24) if (x + y) % 2 == 0], float)
            xy_um = cr * pitch_um / math.sqrt(2)
        rc = cr[:, ::-1]
    if missing:
        keep = rng.random(len(rc)) >= missing
        rc, xy_um = rc[keep], xy_um[keep]
    xy = (xy_um / um_per_px) @ _rot(angle).T + [400.0, 300.0]
    n = len(xy)
    X = rng.poisson(rng.uniform(2, 20, (n, 4))).astype(np.int32)
    obs = pd.DataFrame({"in_tissue": 1, "array_row": rc[:, 0].astype(int), "array_col": rc[:, 1].astype(int)},
                       index=[f"s{i}" for i in range(n)])
    a = ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{g}" for g in range(4)]))
    a.obsm["spatial"] = xy
    diam = 100.0 if tech == "legacy_st" else 55.0
    return Sample(a, None, um_per_px, diam, tech, name=f"{kind}{angle:g}", lattice_pitch_um=pitch_um), pitch_um


def masked_disk_fraction(fld, sample, radius_um):
    """Fraction of HR pixels whose centre lies within ``radius_um`` of a spot and that the HR mask leaves
    empty (the issue's "spot disks masked"); 0 when every spot is fully represented."""
    from scipy.spatial import cKDTree

    A = fld.extra["hr_affine"]
    H, W = fld.hr_mask.shape
    rr, cc = np.mgrid[0:H, 0:W]
    pts = (A @ np.c_[cc.ravel(), rr.ravel(), np.ones(H * W)].T).T[:, :2]
    d, _ = cKDTree(np.asarray(sample.adata.obsm["spatial"], float)).query(pts)
    inside = d * sample.um_per_px <= radius_um
    return float((~fld.hr_mask.ravel()[inside]).mean())


def hull_hole_fraction(fld, sample):
    """Fraction of HR pixels inside the convex hull of the spots that the HR mask leaves empty: on a
    complete lattice every such pixel belongs to some spot's cell, so this is ~0 (only ties on the
    hull's edge); a checkerboard leaves about half of them empty."""
    from scipy.spatial import Delaunay

    A = fld.extra["hr_affine"]
    H, W = fld.hr_mask.shape
    rr, cc = np.mgrid[0:H, 0:W]
    pts = (A @ np.c_[cc.ravel(), rr.ravel(), np.ones(H * W)].T).T[:, :2]
    inside = Delaunay(np.asarray(sample.adata.obsm["spatial"], float)).find_simplex(pts) >= 0
    return float((~fld.hr_mask.ravel()[inside]).mean())


# ------------------------------------------------------------------------------------------------
# STUtility layout (blocker 1)
# ------------------------------------------------------------------------------------------------
def test_stutility_layout_is_read(tmp_path):
    sdf = write_stutility(tmp_path / "A1")
    folder = tmp_path / "A1"
    assert detect_format(folder) == "legacy_st"
    assert detect_format(folder / "A1.tsv") == detect_format(folder / "alignment_table_A1.tsv") == "legacy_st"
    s = read(folder)
    s_counts, s_spots = read(folder / "A1.tsv"), read(folder / "alignment_table_A1.tsv")
    n_sel = int(sdf.selected.sum())
    assert s.n_spots == s_counts.n_spots == s_spots.n_spots == n_sel > 300
    assert s.name == "A1" and s.image.path.name == "A1.jpg"
    assert list(s.adata.var_names) == GENES
    assert s.provenance["files"]["spots"].endswith("alignment_table_A1.tsv")
    assert np.all((s.adata.obs.array_col + s.adata.obs.array_row) % 2 == 0)
    # µm/px: 200 µm between nearest spots = the diagonal index step (22.8·√2 px), not one index step
    assert s.um_per_px == pytest.approx(200.0 / (22.8 * math.sqrt(2)), rel=1e-6)
    assert s.provenance["lattice_kind"] == "square" and s.provenance["index_cells_per_site"] == 2


def test_stutility_info_cli(tmp_path, capsys):
    from napari_diffst.cli import main

    write_stutility(tmp_path / "A1")
    rc = main(["info", str(tmp_path / "A1")])
    out = capsys.readouterr().out
    assert not rc and "legacy" in out.lower() and "not a recognised" not in out


def test_spot_table_recognised_by_columns_whatever_its_name(tmp_path):
    write_stutility(tmp_path / "S", sid="B2", spot_name="B2_coordinates_from_aligner.csv".replace(".csv", ".tsv"))
    assert detect_format(tmp_path / "S") == "legacy_st"
    assert read(tmp_path / "S").n_spots > 300
    # renamed columns (aliases) are recognised too
    f = tmp_path / "S" / "B2_coordinates_from_aligner.tsv"
    df = pd.read_csv(f, sep="\t").rename(columns={"x": "array_x", "y": "array_y", "pixel_x": "imagecol",
                                                   "pixel_y": "imagerow"})
    df.to_csv(f, sep="\t", index=False)
    assert detect_format(tmp_path / "S") == "legacy_st"


def test_counts_without_spot_table_error_names_the_expected_files(tmp_path):
    write_stutility(tmp_path / "C")
    (tmp_path / "C" / "alignment_table_A1.tsv").write_text("barcode\tsomething\nA\t1\n")  # not a spot table
    assert detect_format(tmp_path / "C") is None
    with pytest.raises(DataFormatError) as ei:
        read(tmp_path / "C")
    msg = str(ei.value)
    assert "not a recognised" in msg and "alignment_table_<id>.tsv" in msg and "_selection.tsv" in msg


def test_her2st_square_layout_still_read(her2st_dir):
    s = read(her2st_dir / "C2")
    assert s.n_spots == 187
    assert s.um_per_px == pytest.approx(0.687, abs=0.003)  # the 200 µm 1k-array fit, unchanged
    assert s.provenance["lattice_kind"] == "square" and s.provenance["index_cells_per_site"] == 1
    fld = make_field(s, ["ERBB2"], scale=2, mode="native", with_he=False)
    assert fld.extra["pitch_um"] == pytest.approx(200.0, rel=0.01)
    assert len(np.unique(fld.extra["lr_spot_index"][fld.lr_mask])) == s.n_spots


# ------------------------------------------------------------------------------------------------
# lattices (blocker 2)
# ------------------------------------------------------------------------------------------------
def test_index_sublattice():
    full = np.array([(x, y) for x in range(5) for y in range(5)])
    offset = np.array([(x, y) for x in range(6) for y in range(6) if (x + y) % 2 == 0])
    visium = np.array([(2 * k + r % 2, r) for r in range(6) for k in range(5)])
    assert abs(np.linalg.det(index_sublattice(full))) == pytest.approx(1)
    assert abs(np.linalg.det(index_sublattice(offset))) == pytest.approx(2)
    assert abs(np.linalg.det(index_sublattice(visium))) == pytest.approx(2)
    assert index_sublattice(np.array([(0, 0), (1, 1), (2, 2), (5, 5)])) is None  # collinear
    lat = fit_index_lattice(offset, offset * 10.0)
    assert lat.kind == "square" and lat.pitch_px == pytest.approx(10 * math.sqrt(2))
    assert sorted(map(tuple, np.abs(lat.basis_ij.T))) == [(1, 1), (1, 1)]


CASES = [("square", 0.0), ("hex", 0.0), ("offset", 0.0), ("offset", 17.0), ("square", -24.0), ("hex", 11.0)]


@pytest.mark.parametrize("missing", [0.0, 0.15])
@pytest.mark.parametrize("kind,angle", CASES)
def test_lattice_grids_have_no_holes(kind, angle, missing):
    s, pitch_um = lattice_sample(kind, angle=angle, missing=missing, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "pitch is not the nominal" / "indices disagree" warning
        lat = lattice_for(s)
        nat = make_field(s, ["G0", "G1"], scale=4, mode="native", with_he=False)
        deg = make_field(s, ["G0", "G1"], scale=2, mode="degrade", with_he=False)
    assert lat.kind == ("hex" if kind == "hex" else "square")
    assert lat.pitch_px * s.um_per_px == pytest.approx(pitch_um, rel=1e-6)
    assert nat.extra["pitch_um"] == pytest.approx(pitch_um, rel=1e-6)
    assert nat.hr_um == pytest.approx(pitch_um / 4, rel=1e-6)
    n = s.n_spots
    if kind != "hex":  # square rasters: every spot its own cell, none shared, none lost
        assert len(np.unique(nat.extra["lr_spot_index"][nat.lr_mask])) == n == int(nat.lr_mask.sum())
        assert int(deg.hr_mask.sum()) == n
        # a complete lattice fills its raster inside the tissue: no checkerboard of empty cells
        occupied = nat.lr_mask.sum() / nat.lr_mask.size
        if not missing and angle == 0:
            assert occupied > (0.45 if kind == "offset" else 0.99)  # offset: a diamond in a 45° raster
    # every spot disk (0.45 pitch) is covered by the HR mask, and a complete lattice has no holes at all
    assert masked_disk_fraction(nat, s, 0.45 * pitch_um) == 0.0
    if not missing:
        assert hull_hole_fraction(nat, s) < 0.02


def test_offset_lattice_used_to_be_a_checkerboard():
    """The numbers of the issue, reproduced on the offset lattice: with one pitch per index step half
    the raster would be empty; now each site is one cell and the pitch is √2 index steps."""
    s, _ = lattice_sample("offset", seed=1)
    lat = lattice_for(s)
    step_px = 200.0 / math.sqrt(2) / s.um_per_px
    assert lat.pitch_px == pytest.approx(step_px * math.sqrt(2), rel=1e-6)
    assert abs(lat.angle_deg) % 90 == pytest.approx(45.0, abs=1e-6)


def test_offset_stutility_section_end_to_end(tmp_path):
    write_stutility(tmp_path / "A1", angle=8.0, jitter=0.6, seed=2)
    s = read(tmp_path / "A1")
    assert s.um_per_px == pytest.approx(200.0 / (22.8 * math.sqrt(2)), rel=0.01)
    bare = GENES[1].split(".")[0]
    fld = make_field(s, [bare], scale=4, mode="native", with_he=True, he_um_per_px=10.0)
    assert fld.extra["lattice_kind"] == "square"
    assert fld.extra["pitch_um"] == pytest.approx(200.0, rel=0.01)
    assert len(np.unique(fld.extra["lr_spot_index"][fld.lr_mask])) == s.n_spots
    assert masked_disk_fraction(fld, s, 90.0) == 0.0
    assert hull_hole_fraction(fld, s) < 0.02
