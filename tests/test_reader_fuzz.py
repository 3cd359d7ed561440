"""Fuzzing the tabular readers: garbled input must give a Sample or a DataFormatError, nothing else.

Small inputs and ``max_examples=50`` per test keep the file to a few seconds.
"""
from __future__ import annotations

import gzip
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from napari_diffst.data.sample import Sample
from napari_diffst.errors import DataFormatError
from napari_diffst.io import detect_format, read, read_legacy_st, read_visium

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)

_int_cell = st.integers(0, 50).map(str)
_cell = st.one_of(  # mostly valid counts, so that many examples get past parsing
    _int_cell, _int_cell, _int_cell, _int_cell, _int_cell, _int_cell,
    st.integers(-5, 5).map(str),
    st.sampled_from(["nan", "NaN", "", "inf", "-inf", "1.5", "abc", "1e400", '"3"', " 7 ", "0x1", "None"]),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: f"{v:g}"),
)
_ok_label = st.tuples(st.integers(0, 4), st.integers(0, 4)).map(lambda t: f"{t[0]}x{t[1]}")
_label = st.one_of(
    _ok_label, _ok_label, _ok_label, _ok_label,
    st.sampled_from(["", "x", "1x", "x1", "1x1x1", "10X2", "2.5x3", "-1x2", "spot", "nan"]),
    st.text(alphabet="0123456789xX.\t ,\"", max_size=6),
)
_gene = st.one_of(st.sampled_from(["A", "B", "A", "", "nan", "G 1", "1x1"]), st.text(max_size=4))
_sep = st.sampled_from(["\t", ",", " "])


def _outcome(fn, *args):
    """Run a reader; only a Sample or a DataFormatError is acceptable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fn(*args)
        except DataFormatError as exc:
            assert exc.path is not None or "um_per_px" in str(exc)
            return exc
    assert isinstance(res, Sample)
    assert res.n_spots > 0 and res.adata.obsm["spatial"].shape == (res.n_spots, 2)
    assert np.isfinite(res.um_per_px) and res.um_per_px > 0
    X = res.counts()
    assert X.dtype.kind == "i" and (X.data >= 0).all()
    return res


def _valid_selection(n=4) -> str:
    rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    for x in range(n):
        for y in range(n):
            rows.append(f"{x}\t{y}\t{x}\t{y}\t{20 + 10 * x}\t{20 + 10 * y}\t1")
    return "\n".join(rows) + "\n"


def _valid_counts(n=4) -> str:
    rows = ["\tA\tB"]
    for x in range(n):
        for y in range(n):
            rows.append(f"{x}x{y}\t{x}\t{y}")
    return "\n".join(rows) + "\n"


def _write_legacy(d: Path, counts: str, selection: str, gz: bool, image: bool):
    if gz:
        with gzip.open(d / "S.tsv.gz", "wt") as fh:
            fh.write(counts)
    else:
        (d / "S.tsv").write_text(counts)
    (d / "S_selection.tsv").write_text(selection)
    if image:
        Image.new("RGB", (64, 64), (200, 180, 200)).save(d / "S_HE.png")


@st.composite
def counts_tables(draw):
    if draw(st.integers(0, 4)) == 0:  # arbitrary text
        return draw(st.text(max_size=200))
    sep = draw(_sep)
    n_genes = draw(st.integers(0, 4))
    n_rows = draw(st.integers(0, 8))
    header = sep.join([""] + [draw(_gene) for _ in range(n_genes)])
    rows = []
    for _ in range(n_rows):
        ncell = n_genes + draw(st.sampled_from([0, 0, 0, 0, 0, 0, -1, 1]))
        rows.append(sep.join([draw(_label)] + [draw(_cell) for _ in range(max(ncell, 0))]))
    return "\n".join([header] + rows) + draw(st.sampled_from(["", "\n", "\n\n"]))


_spot_cols = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected", "X", "Pixel X", "pixel y", "foo",
              "in_tissue", "array_row", "imagecol", ""]


@st.composite
def selection_tables(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=200))
    sep = draw(_sep)
    header = draw(st.integers(0, 3)) > 0
    if draw(st.booleans()):  # the standard columns, maybe shuffled / with extras
        cols = draw(st.permutations(["x", "y", "pixel_x", "pixel_y", "selected"]))
        cols = cols + draw(st.lists(st.sampled_from(_spot_cols), max_size=2))
    else:
        cols = draw(st.lists(st.sampled_from(_spot_cols), min_size=0, max_size=8))
    ncol = len(cols) if header else draw(st.integers(1, 8))
    lines = [sep.join(cols)] if header else []
    ok = st.one_of(st.integers(0, 3).map(str), st.integers(0, 3).map(str), st.integers(0, 60).map(str))
    bad = st.sampled_from(["0", "1", "nan", "", "a", "1e9", "-1", "2.5"])
    for x in range(4):
        for y in range(draw(st.integers(0, 4))):
            cells = []
            for j in range(ncol + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))):
                name = cols[j] if j < len(cols) else ""
                if name in ("x", "X") and draw(st.integers(0, 5)):
                    cells.append(str(x))
                elif name == "y" and draw(st.integers(0, 5)):
                    cells.append(str(y))
                elif name == "selected" and draw(st.integers(0, 5)):
                    cells.append(draw(st.sampled_from(["1", "1", "0"])))
                else:
                    cells.append(draw(st.one_of(ok, ok, ok, bad)))
            lines.append(sep.join(cells))
    return "\n".join(lines) + "\n"


@SETTINGS
@given(counts=counts_tables(), gz=st.booleans(), image=st.booleans())
def test_fuzz_legacy_counts(counts, gz, image):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_legacy(d, counts, _valid_selection(), gz, image)
        _outcome(read_legacy_st, d)


@SETTINGS
@given(selection=selection_tables(), image=st.booleans())
def test_fuzz_legacy_selection(selection, image):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_legacy(d, _valid_counts(), selection, False, image)
        _outcome(read_legacy_st, d)


def test_valid_small_legacy_reads():
    """The fuzzers' fixed halves are themselves valid (so the fuzz reaches the other file)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_legacy(d, _valid_counts(), _valid_selection(), True, True)
        assert detect_format(d) == "legacy_st"
        s = _outcome(read, d)
        assert isinstance(s, Sample) and s.n_spots == 16
        assert s.um_per_px == pytest.approx(20.0)  # 200 µm / 10 px


def _visium_dir(d: Path, positions: str, header: bool):
    outs = d / "outs"
    m = outs / "filtered_feature_bc_matrix"
    m.mkdir(parents=True)
    (m / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n2 3 3\n1 1 4\n2 2 1\n1 3 2\n")
    (m / "features.tsv").write_text("G1\tGeneA\tGene Expression\nG2\tGeneB\tGene Expression\n")
    (m / "barcodes.tsv").write_text("AAA-1\nCCC-1\nGGG-1\n")
    (outs / "spatial").mkdir()
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    (outs / "spatial" / name).write_text(positions)
    (outs / "spatial" / "scalefactors_json.json").write_text(
        '{"spot_diameter_fullres": 10.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.25}')
    Image.new("RGB", (40, 40), (200, 150, 200)).save(outs / "spatial" / "tissue_lowres_image.png")
    return outs


_pos_cell = st.one_of(st.integers(-3, 90).map(str), st.sampled_from(["", "nan", "1.5", "x", "inf", "1e308"]))
_bc = st.sampled_from(["AAA-1", "CCC-1", "GGG-1", "TTT-1", "AAA-1", "", "barcode"])


@SETTINGS
@given(rows=st.lists(st.tuples(_bc, st.lists(_pos_cell, min_size=3, max_size=7)), max_size=6),
       header=st.booleans(), garbage=st.one_of(st.none(), st.text(max_size=80)))
def test_fuzz_visium_positions(rows, header, garbage):
    if garbage is not None:
        text = garbage
    else:
        lines = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"] if header else []
        lines += [",".join([bc] + cells) for bc, cells in rows]
        text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        outs = _visium_dir(Path(tmp), text, header)
        _outcome(read_visium, outs)


def test_visium_fuzz_base_is_valid():
    text = ("AAA-1,1,0,0,20,20\nCCC-1,1,0,2,20,40\nGGG-1,1,1,1,37.32,30\n")
    with tempfile.TemporaryDirectory() as tmp:
        outs = _visium_dir(Path(tmp), text, False)
        s = _outcome(read_visium, outs)
        assert isinstance(s, Sample) and s.n_spots == 3
        assert s.counts().toarray().tolist() == [[4, 0], [0, 1], [2, 0]]
        assert s.um_per_px == pytest.approx(6.5)  # 65 µm / 10 px
