"""Tests of the Diff-ST denoiser network (model/): shapes, ablations, CIGC, curriculum, CAM, weights."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from napari_diffst.errors import DataFormatError, DiffSTError
from napari_diffst.model import (
    CrossModalModulation, DiffSTDenoiser, HistologyEncoder, build_model, coexpression_matrix,
    default_config, normalized_adjacency, patch_entropy,
)
from napari_diffst.model.histology import CellTissueAttention, extract_patches
from model_helpers import build_tiny, random_batch

torch.set_num_threads(1)

TINY = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, hist_channels=8, hist_context_blocks=1,
            cigc_dim=2, attn_heads=2, dropout=0.0, he_per_hr=4)


def tiny(**kw) -> DiffSTDenoiser:
    return build_tiny(TINY, **kw)


batch = random_batch


def pnames(m):
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("G,H,W,k,mults", [(1, 8, 8, 4, [1, 2]), (3, 12, 8, 2, [1, 2]), (5, 10, 6, 3, [1, 2, 2]),
                                           (2, 4, 4, 8, [1, 2, 2])])
def test_output_shapes(G, H, W, k, mults):
    m = tiny(n_genes=G, he_per_hr=k, channel_mults=mults)
    x, t, cond = batch(2, G, H, W, k)
    out, aux = m(x, t, cond)
    assert out.shape == (2, G, H, W)
    assert set(aux) == {"disentangle"} and aux["disentangle"].ndim == 0 and torch.isfinite(aux["disentangle"])
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    m = tiny()
    x, t, cond = batch(1, 3, 8, 8, 4)
    with pytest.raises(DataFormatError, match="he"):
        m(x, t, dict(cond, he=torch.rand(1, 3, 16, 16)))
    with pytest.raises(DataFormatError, match="lr_mask"):
        m(x, t, {k: v for k, v in cond.items() if k != "lr_mask"})
    with pytest.raises(DataFormatError, match="x_t"):
        m(x[:, :2], t, cond)


def test_config_json_roundtrip_and_validation():
    m = tiny(predict="x0", residual_lr=True)
    cfg = json.loads(json.dumps(m.config))
    assert cfg["cell_patch_px"] == 2 * cfg["he_per_hr"] == 8
    assert pnames(build_model(cfg)) == pnames(m)
    with pytest.raises(DiffSTError, match="unknown"):
        build_model(dict(TINY, n_gene=3))
    with pytest.raises(DiffSTError, match="residual_lr"):
        default_config(predict="eps", residual_lr=True)
    with pytest.raises(DiffSTError, match="predict"):
        default_config(predict="score")
    assert default_config(predict="v", diffusion={"target": "v", "T": 1000})["diffusion"]["T"] == 1000
    with pytest.raises(DiffSTError, match="agree"):
        default_config(predict="eps", diffusion={"target": "x0"})


def test_residual_lr_adds_lr_up():
    m = tiny(predict="x0", residual_lr=True)
    with torch.no_grad():
        m.out_conv.weight.zero_()
        m.out_conv.bias.zero_()
    x, t, cond = batch(2, 3, 8, 8, 4)
    out, _ = m(x, t, cond)
    assert torch.equal(out, cond["lr_up"])


# ---------------------------------------------------------------- ablations
def test_ablation_switches_change_parameter_sets():
    G, D, C = 3, TINY["cigc_dim"], TINY["hist_channels"]
    full = pnames(tiny())
    groups = {"use_cam": ("cam.",), "use_cigc": ("gene_graph.",),
              "use_hier": ("histology.cell_encoder.", "histology.cross_attn.")}
    for prefixes in groups.values():
        assert any(n.startswith(prefixes) for n in full)
    cin_full = full["in_conv.weight"][1]
    assert cin_full == G + G * D + G + 1
    for switch, prefixes in groups.items():
        ab = pnames(tiny(**{switch: False}))
        assert not any(n.startswith(prefixes) for n in ab), switch
        # everything else is unchanged except the input conv's channel count
        removed = {n for n in full if n.startswith(prefixes)}
        assert set(ab) == set(full) - removed, switch
        assert {n: s for n, s in ab.items() if n != "in_conv.weight"} == \
               {n: s for n, s in full.items() if n not in removed and n != "in_conv.weight"}
        expect = {"use_cam": cin_full + C, "use_cigc": cin_full - G * D, "use_hier": cin_full}[switch]
        assert ab["in_conv.weight"][1] == expect
    off = tiny(use_cam=False, use_cigc=False, use_hier=False)
    names = pnames(off)
    assert not any(n.startswith(p) for n in names for ps in groups.values() for p in ps)
    assert names["in_conv.weight"][1] == G + G + 1 + C  # x_t, lr_up, lr_mask, histology
    x, t, cond = batch(2, 3, 8, 8, 4)
    out, aux = off(x, t, cond)
    assert out.shape == x.shape and float(aux["disentangle"]) == 0.0


# ---------------------------------------------------------------- CIGC
def test_coexpression_matrix_known_answers():
    counts = np.array([[1, 0, 2, 0],
                       [3, 1, 0, 0],
                       [0, 1, 0, 0],
                       [2, 2, 0, 0]])
    # expressed (>0): n0=3, n1=3, n2=1, n3=0; n01=2, n02=1, n12=0
    a = coexpression_matrix(counts)
    want = np.array([[1, 2 / 3, (1 + 1 / 3) / 2, 0],
                     [2 / 3, 1, 0, 0],
                     [(1 + 1 / 3) / 2, 0, 1, 0],
                     [0, 0, 0, 1]], np.float32)
    np.testing.assert_allclose(a, want, atol=1e-6)
    assert a.dtype == np.float32
    # threshold 1 (> 1 is expressed): n0=2 (spots 1,3), n1=1 (spot 3), n2=1; n01=1 -> (1/1 + 1/2)/2
    a1 = coexpression_matrix(counts, threshold=1)
    assert a1[0, 1] == pytest.approx(0.75) and a1[0, 2] == 0 and a1[1, 2] == 0
    import scipy.sparse as sp
    np.testing.assert_allclose(coexpression_matrix(sp.csr_matrix(counts)), want, atol=1e-6)
    with pytest.raises(DataFormatError):
        coexpression_matrix(np.zeros(5))


def test_normalized_adjacency_known_answer():
    a = np.array([[1, 1], [1, 1]], np.float32)   # D = 2 I -> A / 2
    np.testing.assert_allclose(normalized_adjacency(a).numpy(), a / 2, atol=1e-7)
    a = np.array([[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]], np.float32)
    d = np.array([1.5, 1.5, 1.0])
    np.testing.assert_allclose(normalized_adjacency(a).numpy(), a / np.sqrt(d[:, None] * d[None]), atol=1e-6)


def test_gene_graph_is_used_and_validated():
    m = tiny()
    m.eval()
    x, t, cond = batch(1, 3, 8, 8, 4)
    assert torch.equal(m.gene_graph.adj, torch.eye(3))  # default: identity
    with torch.no_grad():
        out0, _ = m(x, t, cond)
        m.set_gene_graph(np.ones((3, 3), np.float32))
        out1, _ = m(x, t, cond)
    np.testing.assert_allclose(m.gene_graph.adj.numpy(), np.full((3, 3), 1 / 3), atol=1e-6)
    assert not torch.allclose(out0, out1)
    assert "gene_graph.adj" in m.state_dict()
    with pytest.raises(DataFormatError, match="shape"):
        m.set_gene_graph(np.eye(4))
    with pytest.raises(DataFormatError):
        m.set_gene_graph(-np.eye(3))
    tiny(use_cigc=False).set_gene_graph(np.eye(3))  # documented no-op


# ---------------------------------------------------------------- histology / curriculum
def test_patch_entropy_known_answers():
    p, bins = 8, 32
    const = torch.full((1, 3, p, p), 0.4)
    # 64 pixels spread evenly over 32 bins (2 each) -> entropy exactly 1
    levels = ((torch.arange(p * p) // 2 + 0.5) / bins).reshape(1, 1, p, p).expand(1, 3, p, p)
    half = torch.cat([torch.full((1, 3, p // 2, p), 0.1), torch.full((1, 3, p // 2, p), 0.9)], dim=2)
    e = patch_entropy(torch.cat([const, levels, half]), bins)
    np.testing.assert_allclose(e.numpy(), [0.0, 1.0, math.log(2) / math.log(bins)], atol=1e-5)


def _graded_he(mh=3, mw=4, p=8, seed=0):
    """H&E whose row-major patches have increasing grey-level spread (entropy rises with index)."""
    g = torch.Generator().manual_seed(seed)
    he = torch.empty(1, 3, mh * p, mw * p)
    for i in range(mh * mw):
        r, c = divmod(i, mw)
        spread = i / (mh * mw - 1)
        v = 0.5 + spread * (torch.rand(1, 1, p, p, generator=g) - 0.5)
        he[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = v.clamp(0, 1)
    return he


def test_curriculum_gamma_rises_and_kept_patches_fall():
    enc = HistologyEncoder(he_per_hr=4, channels=8, cell_patch_px=8, gamma_start=0.0, gamma_end=0.8)
    he = _graded_he()
    _, ent, _ = enc.cell_features(he)
    assert ent.shape == (1, 12) and ent[0, 0] == 0
    enc.train()
    gammas, kept = [], []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        enc.set_progress(frac)
        gammas.append(enc.gamma)
        kept.append(int(enc.keep_mask(ent).sum()))
    assert gammas == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert all(a >= b for a, b in zip(kept, kept[1:])) and kept[0] > kept[-1] >= 1
    assert kept[0] == 11  # every patch but the constant one
    enc.set_progress(0.0)
    enc.eval()
    assert enc.gamma == 0.8  # eval uses the final threshold
    keep = enc.keep_mask(ent, gamma=1.5)  # impossible threshold: the best patch is still kept
    assert keep.sum() == 1 and keep[0, ent[0].argmax()]
    enc.train()
    enc.set_progress(7.0)
    assert enc.progress == 1.0


def test_masked_patches_have_no_influence():
    torch.manual_seed(0)
    att = CellTissueAttention(8, heads=2).eval()
    tissue, cells = torch.randn(2, 8, 4, 5), torch.randn(2, 6, 8)
    keep = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    rc = torch.rand(6, 2) * 4
    out = att(tissue, cells, keep, rc)
    pert = cells.clone()
    pert[~keep] += 10 * torch.randn(int((~keep).sum()), 8)
    assert torch.allclose(att(tissue, pert, keep, rc), out, atol=1e-6)
    pert = cells.clone()
    pert[0, 0] += torch.randn(8)  # a kept patch does matter (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(att(tissue, pert, keep, rc), out, atol=1e-4)

    # end to end through the cell encoder: a constant (entropy 0) patch is dropped at eval,
    # so repainting it (still constant) leaves the cross-attended features unchanged
    enc = HistologyEncoder(he_per_hr=4, channels=8, cell_patch_px=8, gamma_end=0.3).eval()
    he = _graded_he()
    tissue = enc.tissue(he, (6, 8))
    cells, ent, rc = enc.cell_features(he)
    keep = enc.keep_mask(ent)
    assert not keep[0, 0]
    he2 = he.clone()
    he2[:, :, :8, :8] = torch.tensor([0.9, 0.2, 0.6])[:, None, None]
    cells2, ent2, _ = enc.cell_features(he2)
    assert torch.equal(enc.keep_mask(ent2), keep)
    assert not torch.allclose(cells2[0, 0], cells[0, 0])
    with torch.no_grad():
        assert torch.allclose(enc.cross_attn(tissue, cells2, keep, rc), enc.cross_attn(tissue, cells, keep, rc), atol=1e-6)


def test_extract_patches_order_and_padding():
    he = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    patches, (mh, mw) = extract_patches(he, 4)
    assert (mh, mw) == (2, 2) and patches.shape == (2, 4, 3, 4, 4)
    assert torch.equal(patches[1, 1], he[1, :, :4, 4:8])
    assert torch.equal(patches[0, 2, :, :2], he[0, :, 4:6, :4]) and (patches[0, 2, :, 2:] == 1).all()


# ---------------------------------------------------------------- CAM
def test_cam_filter_weights_sum_to_one():
    torch.manual_seed(0)
    cam = CrossModalModulation(8, 8, kernel=3)
    a_y, a_h = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 5, 7)
    for w in cam.filter_weights(a_y, a_h):
        assert w.shape == (2, 9, 5, 7)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(2, 5, 7))
    out, loss = cam(a_y, torch.randn(2, 8, 5, 7))
    assert out.shape == a_y.shape and torch.isfinite(loss)


def test_disentangle_loss_decreases():
    torch.manual_seed(0)
    cam = CrossModalModulation(8, 8)
    a_y, hist = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    opt = torch.optim.Adam(cam.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        _, loss = cam(a_y, hist)
        assert torch.isfinite(loss)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------- gradients
def test_gradients_reach_every_parameter():
    m = tiny(cigc_alpha="learnable")
    m.set_gene_graph(coexpression_matrix(np.random.default_rng(0).poisson(1.0, (20, 3))))
    m.train()
    x, t, cond = batch(2, 3, 8, 8, 4)
    cond["hr_mask"] = torch.ones(2, 1, 8, 8)
    out, aux = m(x, t, cond)
    (out * torch.randn_like(out)).sum().backward(retain_graph=True)
    aux["disentangle"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert not dead


# ---------------------------------------------------------------- encoder weights / caching
def test_encoder_weights_roundtrip_and_errors(tmp_path):
    src = tiny()
    path = tmp_path / "hist.pt"
    torch.save(src.histology.state_dict(), path)
    torch.manual_seed(123)
    dst = build_model(dict(TINY, n_genes=3, encoder_weights=str(path)))
    for (n, a), (_, b) in zip(src.histology.state_dict().items(), dst.histology.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(src.in_conv.weight, dst.in_conv.weight)  # only the encoder was loaded
    assert dst.config["encoder_weights"] == str(path)
    assert build_model(dst.config, load_weights=False) is not None
    with pytest.raises(DiffSTError, match="not found"):
        build_model(dict(TINY, n_genes=3, encoder_weights=str(tmp_path / "missing.pt")))
    flat = tmp_path / "flat.pt"
    torch.save(tiny(use_hier=False).histology.state_dict(), flat)
    with pytest.raises(DiffSTError, match="missing"):
        build_model(dict(TINY, n_genes=3, encoder_weights=str(flat)))
    wide = tmp_path / "wide.pt"
    torch.save(tiny(hist_channels=16).histology.state_dict(), wide)
    with pytest.raises(DiffSTError, match="wrong shape"):
        build_model(dict(TINY, n_genes=3, encoder_weights=str(wide)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(DiffSTError, match="could not read"):
        build_model(dict(TINY, n_genes=3, encoder_weights=str(junk)))


def test_histology_cache_in_eval(monkeypatch):
    m = tiny().eval()
    calls = []
    orig = m.histology.forward
    monkeypatch.setattr(m.histology, "forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    x, t, cond = batch(1, 3, 8, 8, 4)
    with torch.no_grad():
        o1, _ = m(x, t, cond)
        o2, _ = m(x, t, cond)
        assert len(calls) == 1 and torch.equal(o1, o2)
        cond["he"].mul_(0.5)  # in-place change invalidates the cache
        o3, _ = m(x, t, cond)
        assert len(calls) == 2 and not torch.equal(o1, o3)
        m.histology.tissue.proj.bias.add_(0.1)  # weights changed in place (optimiser / EMA step)
        m(x, t, cond)
        assert len(calls) == 3
        assert copy.deepcopy(m)._hist_cache is None and m._hist_cache is not None
    m(x, t, cond)  # grad enabled: never cached
    assert len(calls) == 4 and m._hist_cache is None
