"""Engine options of issue #8 (HaDM-ST / HisToSGE ideas): semantic distillation, spatial alignment,
channel-aware adversarial training, gene chunks for many-gene panels, pluggable histology features.

All tests run on CPU with tiny networks in seconds."""
from __future__ import annotations

import copy
from functools import partial
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from napari_diffst.errors import DataFormatError, DiffSTError
from napari_diffst.model import build_model
from napari_diffst.model.adversarial import GeneDiscriminator, discriminator_loss, generator_adv_loss
from napari_diffst.model.align import SpatialAlign, smoothness_loss, warp
from napari_diffst.model.features import (HandcraftedFeatures, available_feature_extractors,
                                          describe_feature_extractor, parse_feature_spec, rgb_to_hed)
from model_helpers import build_tiny, random_batch
from napari_diffst.train import Trainer, TrainConfig, load_checkpoint, read_checkpoint, synthetic_batch_fn

torch.set_num_threads(1)

TINY = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, hist_channels=8, hist_context_blocks=1,
            cigc_dim=2, attn_heads=2, dropout=0.0, he_per_hr=2, predict="x0", residual_lr=True)


def tiny(seed=0, **kw):
    return build_tiny(TINY, seed=seed, **kw)


batch = partial(random_batch, hr_mask=True)


def train_cfg(**kw):
    base = dict(steps=4, batch_size=2, lr_size=4, lr=1e-3, log_every=1, checkpoint_every=2, device="cpu",
                ema_decay=0.9, target="x0")
    base.update(kw)
    return TrainConfig(**base)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- defaults / config
def test_options_are_off_by_default_and_json_round_trip():
    m = tiny()
    c = m.config
    assert (c["use_align"], c["gene_chunk"], c["hist_features"], c["distill"]) == (False, 0, "learned", False)
    assert m.align is None and m.chunk_embed is None and m.chunk == 0
    x, t, cond = batch(1, 3, 8, 8, 2)
    assert set(m(x, t, cond)[1]) == {"disentangle"}
    m2 = tiny(use_align=True, gene_chunk=2, gene_chunk_train=1, hist_features="handcrafted", distill=True)
    cfg = json.loads(json.dumps(m2.config))
    assert cfg["hist_features_dim"] == 12
    assert {n: p.shape for n, p in build_model(cfg).named_parameters()} == \
        {n: p.shape for n, p in m2.named_parameters()}
    for bad in (dict(gene_chunk=-1), dict(hist_features="nope"), dict(hist_features="file"),
                dict(hist_features="handcrafted:x"), dict(hist_features_norm="z"), dict(align_hidden=0)):
        with pytest.raises(DiffSTError):
            tiny(**bad)


# ------------------------------------------------------------------------------------- distillation
def test_distillation_head_trains_the_histology_branch():
    """HaDM-ST semantic distillation: the aux loss predicts the HR detail from histology + LR alone, and its
    gradient reaches the histology encoder (the branch learns expression-predictive features)."""
    m = tiny(distill=True)
    x, t, cond = batch(2, 3, 8, 8, 2)
    out, aux = m(x, t, dict(cond, x0_target=x))
    assert aux["distill"] > 0 and m.aux_weights["distill"] == 1.0
    aux["distill"].backward()
    g = [p.grad for n, p in m.named_parameters() if n.startswith("histology.tissue")]
    assert any(v is not None and v.abs().sum() > 0 for v in g)
    assert float(m(x, t, cond)[1]["distill"]) == 0.0  # no target at inference


# ------------------------------------------------------------------------------------- alignment
def test_warp_known_shift_and_smoothness():
    f = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    assert torch.allclose(warp(f, torch.zeros(1, 2, 5, 6)), f, atol=1e-5)
    off = torch.zeros(1, 2, 5, 6)
    off[:, 1] = 1.0  # dx = +1 px: every pixel takes its right neighbour (border replicated)
    w = warp(f, off)
    assert torch.allclose(w[..., :-1], f[..., 1:], atol=1e-4) and torch.allclose(w[..., -1], f[..., -1], atol=1e-4)
    assert float(smoothness_loss(off)) == 0.0
    off[:, 0, 2, 3] = 1.0
    assert float(smoothness_loss(off)) > 0


def test_alignment_is_identity_at_init_and_learns():
    al = SpatialAlign(4, 3, hidden=8)
    hist = torch.randn(2, 4, 8, 8)
    out, d = al(hist, torch.randn(2, 3, 8, 8), torch.ones(2, 1, 8, 8))
    assert torch.equal(d, torch.zeros_like(d)) and torch.allclose(out, hist, atol=1e-5)

    base = tiny()
    m = tiny(use_align=True)
    missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("align.") for k in missing)
    x, t, cond = batch(2, 3, 8, 8, 2)
    o1, a1 = base.eval()(x, t, cond)
    o2, a2 = m.eval()(x, t, cond)
    assert torch.allclose(o1, o2, atol=1e-5) and float(a2["align_smooth"]) == 0.0
    assert m.aux_weights["align_smooth"] == 0.1
    # gradient flow: the zero-initialised offset conv gets a gradient, a step moves the offsets
    m.train()
    out, aux = m(x, t, dict(cond, x0_target=x))
    ((out - x) ** 2).mean().backward()
    g = m.align.offset.weight.grad
    assert g is not None and g.abs().sum() > 0
    with torch.no_grad():
        for p in m.align.parameters():
            if p.grad is not None:
                p -= 10.0 * p.grad
    m.eval()
    hist = m.encode_histology(cond["he"], (8, 8))
    _, d = m.align(hist, cond["lr_up"], cond["lr_mask"])
    assert d.abs().max() > 0 and d.abs().max() <= m.config["align_max_offset"]


# ------------------------------------------------------------------------------------- adversarial
def test_discriminator_is_channel_aware_and_losses():
    torch.manual_seed(0)
    D = GeneDiscriminator(5, hidden=4)
    x = torch.randn(3, 1, 8, 8)
    lr = torch.randn(3, 1, 8, 8)
    a = D(x, lr, None, torch.tensor([0, 0, 0]))
    b = D(x, lr, torch.ones(3, 1, 8, 8), torch.tensor([4, 4, 4]))
    assert a.shape == (3, 1, 4, 4) and not torch.allclose(a, b)
    big = torch.full((1, 1, 2, 2), 20.0)
    assert float(discriminator_loss(big, -big)) < 1e-6 and float(generator_adv_loss(-big)) > 10


def test_adversarial_training_step(tmp_path):
    fn = synthetic_batch_fn(2, 3, 4, 2, 2)
    m = tiny()
    tr = Trainer(m, train_cfg(adv_weight=0.05, adv_hidden=4, adv_max_genes=2), batch_fn=fn)
    assert tr.discriminator is not None and tr.disc_optimizer is not None
    d0 = copy.deepcopy(tr.discriminator.state_dict())
    losses = tr.train_step()
    assert {"adv_g", "adv_d"} <= set(losses)
    assert not states_equal(d0, tr.discriminator.state_dict())  # the discriminator step moved it
    assert all(p.requires_grad for p in tr.discriminator.parameters())
    # the generator loss includes adv_weight * adv_g on top of the diffusion + aux losses
    rest = losses["mse"] + sum(tr.diffusion.aux_weights.get(k, 1.0) * losses[k] for k in ("disentangle",))
    assert float(losses["loss"]) == pytest.approx(float(rest + 0.05 * losses["adv_g"]), rel=1e-5, abs=1e-6)
    # off by default: no discriminator, no adv terms
    tr0 = Trainer(tiny(), train_cfg(), batch_fn=fn)
    assert tr0.discriminator is None and "adv_g" not in tr0.train_step()
    with pytest.raises(DataFormatError, match="adv_weight"):
        train_cfg(adv_weight=-1)


def test_adversarial_checkpoint_resume_and_cancel(tmp_path):
    fn = synthetic_batch_fn(2, 3, 4, 2, 2)
    kw = dict(adv_weight=0.05, adv_hidden=4, steps=4, checkpoint_every=2)
    full = Trainer(tiny(), train_cfg(**kw), batch_fn=fn)
    list(full.iter_train())
    # cancel after 2 steps (checkpoint written), then resume to 4
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    part = Trainer(tiny(), train_cfg(**kw), batch_fn=fn, out_dir=tmp_path / "ck", should_stop=stop)
    evs = list(part.iter_train())
    assert evs[-1].kind == "cancelled" and part.step == 2
    state = read_checkpoint(tmp_path / "ck")
    assert states_equal(state["discriminator"], part.discriminator.state_dict())
    assert state["disc_optimizer"]["state"]
    model, ema, meta = load_checkpoint(tmp_path / "ck")
    assert "discriminator" not in meta and model.config["n_genes"] == 3
    res = Trainer.from_checkpoint(tmp_path / "ck", batch_fn=fn)
    assert res.step == 2 and states_equal(res.discriminator.state_dict(), part.discriminator.state_dict())
    list(res.iter_train())
    assert states_equal(res.model.state_dict(), full.model.state_dict())
    assert states_equal(res.discriminator.state_dict(), full.discriminator.state_dict())


# ------------------------------------------------------------------------------------- gene chunks
def test_gene_chunks_equivalences():
    m = tiny(n_genes=7, gene_chunk=3, distill=True).eval()
    assert (m.chunk, m.n_chunks, list(m.chunk_genes(2))) == (3, 3, [6])
    x, t, cond = batch(2, 7, 8, 8, 2)
    with torch.no_grad():
        full, aux = m(x, t, cond)
        m.chunk_parallel = 3  # all chunks stacked in one batch: the same numbers
        par, _ = m(x, t, cond)
        m.chunk_parallel = 1
        sub, _ = m(x, t, dict(cond, gene_chunks=torch.tensor([1])))
    assert full.shape == (2, 7, 8, 8) and torch.isfinite(full).all()
    assert torch.allclose(full, par, atol=1e-5)
    # computing only chunk 1 gives exactly its rows of the full output (other genes: the residual LR)
    assert torch.allclose(sub[:, 3:6], full[:, 3:6], atol=1e-5)
    assert torch.equal(sub[:, :3], cond["lr_up"][:, :3]) and torch.equal(sub[:, 6:], cond["lr_up"][:, 6:])
    # the training path (gradients on, other genes' CIGC nodes without gradients) computes the same values
    m.train()
    a, _ = m(x, t, cond)
    b, _ = m(x, t, dict(cond, gene_chunks=torch.tensor([0, 2])))
    assert torch.allclose(a[:, [0, 1, 2, 6]], b[:, [0, 1, 2, 6]], atol=1e-5)
    b[:, [0, 1, 2, 6]].sum().backward()
    emb = m.chunk_embed.weight.grad
    assert emb[0].abs().sum() > 0 and emb[2].abs().sum() > 0 and float(emb[1].abs().sum()) == 0.0
    with pytest.raises(DataFormatError, match="gene_chunks"):
        m(x, t, dict(cond, gene_chunks=torch.tensor([3])))
    assert tiny(n_genes=3, gene_chunk=8).chunk == 0  # a chunk as large as the panel: no chunking


def test_trainer_trains_random_gene_chunks():
    fn = synthetic_batch_fn(2, 5, 4, 2, 2)
    m = tiny(n_genes=5, gene_chunk=2, gene_chunk_train=1)
    g = torch.Generator().manual_seed(0)
    picks = {tuple(m.sample_train_chunks(g).tolist()) for _ in range(20)}
    assert picks == {(0,), (1,), (2,)}
    assert m.gene_mask(torch.tensor([2])).reshape(-1).tolist() == [0, 0, 0, 0, 1]
    tr = Trainer(m, train_cfg(steps=3, adv_weight=0.05, adv_hidden=4), batch_fn=fn)
    seen = []
    orig = m.forward

    def spy(x_t, t, cond):
        seen.append(cond.get("gene_chunks"))
        return orig(x_t, t, cond)

    m.forward = spy
    for _ in range(3):
        losses = tr.train_step()
        assert np.isfinite(float(losses["loss"]))
    assert all(s is not None and s.numel() == 1 for s in seen)


def test_gene_chunk_sampling_reuses_one_histology_encoding(monkeypatch):
    m = tiny(n_genes=6, gene_chunk=2).eval()
    calls = {"n": 0}
    orig = m.histology.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(m.histology, "forward", counting)
    x, t, cond = batch(1, 6, 8, 8, 2)
    with torch.no_grad():
        for _ in range(3):
            m(x, t, cond)
    assert calls["n"] == 1  # three chunks × three sampler steps, one histology pass


# ------------------------------------------------------------------------------------- feature extractors
class _MapNet(nn.Module):
    def __init__(self, c=5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class _VecNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 6)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3)))


class _BadNet(nn.Module):
    def forward(self, x):
        return x[:, 0]


def _script(net, path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def test_registry_and_spec_parsing():
    import subprocess
    import sys

    import napari_diffst

    # the widget's list of names comes without importing torch
    code = "import sys, napari_diffst.feature_names as f; f.available_feature_extractors(); print('torch' in sys.modules)"
    src = str(__import__("pathlib").Path(napari_diffst.__file__).parents[1])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": src})
    assert res.stdout.strip() == "False", res.stderr
    names = available_feature_extractors()
    assert names[:3] == ["learned", "handcrafted", "file"]
    assert parse_feature_spec("file:/a/b.pt") == ("file", "/a/b.pt")
    assert parse_feature_spec("handcrafted") == ("handcrafted", None)
    assert "TorchScript" in describe_feature_extractor("file")
    for bad in ("", "nope", "file", "learned:x"):
        with pytest.raises(DiffSTError):
            parse_feature_spec(bad)


def test_stain_deconvolution_matches_skimage():
    skc = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(0)
    rgb = rng.random((6, 7, 3)).astype(np.float64)
    ours = rgb_to_hed(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.allclose(ours, skc.rgb2hed(rgb), atol=1e-6)


def test_handcrafted_features_in_the_denoiser():
    f = HandcraftedFeatures()
    he = torch.rand(2, 3, 16, 24)
    out = f(he, (8, 12))
    assert out.shape == (2, 12, 8, 12) and torch.isfinite(out).all()
    assert torch.allclose(out[:, :3], torch.nn.functional.avg_pool2d(he, 2), atol=1e-6)
    m = tiny(hist_features="handcrafted")
    assert not any("extractor" in k for k in m.state_dict())
    x, t, cond = batch(2, 3, 8, 8, 2)
    out, _ = m(x, t, cond)
    out.sum().backward()
    assert m.histology.tissue.proj.weight.grad.abs().sum() > 0


def test_torchscript_file_extractor(tmp_path):
    p = _script(_MapNet(5), tmp_path / "map.pt")
    m = tiny(hist_features=f"file:{p}", use_hier=False)
    assert m.config["hist_features_dim"] == 5
    ext = m.histology.tissue.extractor
    assert ext.mode == "map" and not any("extractor" in k for k in m.state_dict())
    w0 = ext.net.conv.weight.detach().clone()
    x, t, cond = batch(2, 3, 8, 8, 2)
    out, aux = m(x, t, cond)
    (out.sum() + aux["disentangle"]).backward()
    assert ext.net.conv.weight.grad is None and torch.equal(ext.net.conv.weight, w0)  # frozen
    assert m.histology.tissue.proj.weight.grad.abs().sum() > 0
    # EMA copies share the frozen extractor; the config rebuilds the same network
    assert copy.deepcopy(m).histology.tissue.extractor.net is ext.net
    m2 = build_model(json.loads(json.dumps(m.config)))
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.allclose(m.eval()(x, t, cond)[0], m2.eval()(x, t, cond)[0], atol=1e-6)
    # one vector per input: run on H&E patches, arranged as a grid
    pv = _script(_VecNet(), tmp_path / "vec.pt")
    mv = tiny(hist_features=f"file:{pv}", hist_features_patch=4, hist_features_input=8, hist_features_norm="none")
    assert mv.histology.tissue.extractor.mode == "vector" and mv.config["hist_features_dim"] == 6
    assert mv(x, t, cond)[0].shape == (2, 3, 8, 8)
    # a torch.export program (.pt2) with a dynamic batch dimension works the same way
    pe = tmp_path / "vec.pt2"
    torch.manual_seed(0)
    torch.export.save(torch.export.export(_VecNet(), (torch.rand(4, 3, 8, 8),),
                                          dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=4096)}}), pe)
    me = tiny(hist_features=f"file:{pe}", hist_features_patch=4, hist_features_input=8)
    assert me.config["hist_features_dim"] == 6 and me(x, t, cond)[0].shape == (2, 3, 8, 8)


def test_file_extractor_errors(tmp_path):
    with pytest.raises(DataFormatError, match="not found") as e:
        tiny(hist_features=f"file:{tmp_path / 'missing.pt'}")
    assert e.value.path == tmp_path / "missing.pt"
    sd = tmp_path / "sd.pt"
    torch.save(_MapNet().state_dict(), sd)
    with pytest.raises(DataFormatError, match="state dict"):
        tiny(hist_features=f"file:{sd}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataFormatError, match="TorchScript"):
        tiny(hist_features=f"file:{junk}")
    bad = _script(_BadNet(), tmp_path / "bad.pt")
    with pytest.raises(DataFormatError, match="3-D"):
        tiny(hist_features=f"file:{bad}")
    p = _script(_MapNet(5), tmp_path / "map.pt")
    with pytest.raises(DataFormatError, match="5 feature channels"):
        tiny(hist_features=f"file:{p}", hist_features_dim=7)
    if "timm" not in available_feature_extractors():
        with pytest.raises(DiffSTError, match="timm"):
            tiny(hist_features=f"timm:resnet18:{p}")


def test_file_extractor_checkpoint_round_trip(tmp_path):
    p = _script(_MapNet(5), tmp_path / "map.pt")
    fn = synthetic_batch_fn(2, 3, 4, 2, 2)
    tr = Trainer(tiny(hist_features=f"file:{p}"), train_cfg(steps=2), batch_fn=fn, out_dir=tmp_path / "ck")
    list(tr.iter_train())
    model, ema, meta = load_checkpoint(tmp_path / "ck")
    assert meta["model_config"]["hist_features"] == f"file:{p}"
    assert states_equal(ema.state_dict(), tr.ema.state_dict())
    p.unlink()  # the extractor is not in the checkpoint: a clear error names the file
    with pytest.raises(DataFormatError, match="not found"):
        load_checkpoint(tmp_path / "ck")
