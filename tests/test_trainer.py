"""Training loop, config, checkpoints, resume, cancel, device / OOM handling (CPU, tiny stand-in model)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import napari_diffst
from napari_diffst.data.pairs import SRField, random_patches
from napari_diffst.device import OutOfMemoryError, device_label, oom_guard, resolve_device
from napari_diffst.diffusion import GaussianDiffusion
from napari_diffst.errors import DataFormatError, DiffSTError
from napari_diffst.train import (TrainConfig, Trainer, load_checkpoint, patches_to_batch, read_checkpoint,
                                 synthetic_batch_fn)
from napari_diffst.train import checkpoint as ckmod

torch.set_num_threads(1)


class StandIn(nn.Module):
    """Tiny denoiser following the engine contract ``model(x_t, t, cond) -> (out, aux)``."""

    def __init__(self, config=None):
        super().__init__()
        c = {"genes": 2, "hidden": 8, "he_per_hr": 2, "dropout": 0.0, "oom": False}
        c.update(config or {})
        self.config = c
        G, h = c["genes"], c["hidden"]
        self.inp = nn.Conv2d(2 * G + 4, h, 3, padding=1)
        self.temb = nn.Linear(4, h)
        self.mid = nn.Conv2d(h, h, 3, padding=1)
        self.out = nn.Conv2d(h, G, 3, padding=1)
        self.drop = nn.Dropout(c["dropout"])
        self.progress = []

    def set_progress(self, frac):
        self.progress.append(float(frac))

    def forward(self, x_t, t, cond):
        if self.config["oom"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        he = F.avg_pool2d(cond["he"], self.config["he_per_hr"])
        h = torch.cat([x_t, cond["lr_up"], he, cond["lr_mask"]], 1)
        tt = t.float()[:, None] / 1000 * torch.tensor([1.0, 3.0, 10.0, 30.0], device=x_t.device)
        h = F.silu(self.inp(h) + self.temb(torch.sin(tt))[:, :, None, None])
        h = self.drop(F.silu(self.mid(h)))
        return self.out(h), {"disentangle": h.pow(2).mean()}


def make_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return StandIn(cfg)


def cfg(**kw):
    base = dict(steps=12, batch_size=3, lr_size=4, lr=1e-3, log_every=2, checkpoint_every=4, device="cpu",
                ema_decay=0.9, target="eps", aux_weights={"disentangle": 0.01})
    base.update(kw)
    return TrainConfig(**base)


def toy_field(name="f", seed=0):
    rng = np.random.default_rng(seed)
    lr = rng.random((2, 6, 6)).astype(np.float32)
    hr = np.repeat(np.repeat(lr, 2, 1), 2, 2) + 0.05 * rng.random((2, 12, 12)).astype(np.float32)
    he = np.repeat(np.repeat(rng.random((3, 12, 12)).astype(np.float32), 2, 1), 2, 2)
    return SRField(name=name, genes=["GENE_A", "GENE_B"], scale=2, lr=lr, lr_mask=np.ones((6, 6), bool), hr=hr,
                   hr_mask=np.ones((12, 12), bool), he=he, he_per_hr=2, hr_um=27.5,
                   gene_scale=np.array([2.5, 3.0]))


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- config / data
def test_config_json_round_trip_and_presets(tmp_path):
    c = TrainConfig.from_preset("quick", seed=3, aux_weights={"disentangle": 0.1}, model={"width": 16})
    p = tmp_path / "cfg.json"
    c.to_json(p)
    c2 = TrainConfig.from_json(p)
    assert c2 == c and c2.preset == "quick" and c2.lr == 2e-4 and c2.model == {"width": 16}
    full = TrainConfig.from_preset("full")
    assert full.steps > 10 * c.steps and full.weight_decay == 1e-4
    assert TrainConfig().lr == 1e-4 and TrainConfig().weight_decay == 1e-4
    p.write_text(json.dumps({"steps": 10, "stepz": 3}))
    with pytest.raises(DataFormatError, match="stepz") as e:
        TrainConfig.from_json(p)
    assert str(p) in str(e.value)
    with pytest.raises(DataFormatError, match="target"):
        TrainConfig(target="noise")
    with pytest.raises(DataFormatError, match="preset"):
        TrainConfig.from_preset("huge")


def test_patches_to_batch_upsamples_and_maps_to_unit_range():
    f = toy_field()
    p = random_patches([f], 2, 4, np.random.default_rng(0))
    b = patches_to_batch(p, "nearest")
    assert b["x0"].shape == (2, 2, 8, 8) and b["lr_up"].shape == (2, 2, 8, 8) and b["lr_mask"].shape == (2, 1, 8, 8)
    assert b["he"].shape == (2, 3, 16, 16)
    want = np.repeat(np.repeat(p.lr, 2, 2), 2, 3) * 2 - 1
    np.testing.assert_allclose(b["lr_up"].numpy(), want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(b["x0"].numpy(), p.hr * 2 - 1, rtol=0, atol=1e-7)
    bl = patches_to_batch(p, "bilinear")
    assert bl["lr_up"].shape == (2, 2, 8, 8) and not torch.equal(bl["lr_up"], b["lr_up"])


# ------------------------------------------------------------------------------------------- training
def test_loss_falls_on_toy_problem():
    c = cfg(steps=80, batch_size=8, lr_size=4, lr=3e-3, target="x0", log_every=20, ema_decay=0.0)
    fn = synthetic_batch_fn(batch_size=8, genes=2, lr_size=4, scale=2, he_per_hr=2)
    tr = Trainer(make_model(), c, batch_fn=fn)
    d = GaussianDiffusion.from_config({"target": "x0"})
    batch = tr._to_device(fn(0, np.random.default_rng(99)))
    x0 = batch.pop("x0")
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)

    def held_out():
        with torch.no_grad():
            return d.training_losses(tr.model, x0, batch, t, noise=noise)["mse"].item()

    before = held_out()
    events = list(tr.iter_train())
    after = held_out()
    assert after < 0.5 * before, (before, after)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and kinds.count("step") == 5  # first step, then every 20
    last = [e for e in events if e.kind == "step"][-1]
    assert set(last.losses) >= {"loss", "mse", "disentangle", "grad_norm"} and last.samples_per_s > 0
    assert tr.model.progress[0] == 0.0 and tr.model.progress[-1] == pytest.approx(79 / 80)


def test_checkpoint_round_trip(tmp_path):
    f = toy_field()
    tr = Trainer(make_model(), cfg(steps=5), fields=[f], out_dir=tmp_path / "ck", provenance={"source": "toy"})
    evs = list(tr.iter_train())
    assert evs[-1].kind == "done" and evs[-1].checkpoint == str(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.pt"]  # no temp files left
    model, ema, meta = load_checkpoint(tmp_path / "ck", builder=StandIn)
    assert states_equal(model.state_dict(), tr.model.state_dict())
    assert states_equal(ema.state_dict(), tr.ema.state_dict())
    assert not states_equal(ema.state_dict(), model.state_dict())
    assert meta["step"] == 5 and meta["genes"] == ["GENE_A", "GENE_B"] and meta["gene_scale"] == [2.5, 3.0]
    assert meta["package_version"] == napari_diffst.__version__
    assert meta["provenance"] == {"fields": ["f"], "source": "toy"}
    assert meta["diffusion"]["target"] == "eps" and model.diffusion_config == meta["diffusion"]
    assert meta["train_config"]["steps"] == 5 and meta["model_config"]["hidden"] == 8
    assert set(meta["rng"]) >= {"torch", "numpy", "python", "torch_gen"}
    js = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert js["step"] == 5 and js["genes"] == ["GENE_A", "GENE_B"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(make_model(), cfg(steps=4), batch_fn=synthetic_batch_fn(3, 2, 4), out_dir=tmp_path)
    list(tr.iter_train())
    before = (tmp_path / "model.pt").read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckmod.torch, "save", broken_save)
    with pytest.raises(OSError):
        tr.save_checkpoint()
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.pt"]
    monkeypatch.undo()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad", builder=StandIn)
    # a truncated checkpoint: the message names the file and says what is wrong in whole sentences
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(DataFormatError) as ei:
        load_checkpoint(tmp_path / "cut", builder=StandIn)
    msg = str(ei.value)
    assert str(tmp_path / "cut" / "model.pt") in msg
    assert "truncated or not a napari-diffst checkpoint" in msg
    assert msg.endswith(")") and "PytorchStreamReader" not in msg  # no torch text cut mid-sentence
    with pytest.raises(DataFormatError, match="not found"):
        read_checkpoint(tmp_path / "nothing")


def test_resume_is_bit_for_bit(tmp_path):
    fn = synthetic_batch_fn(batch_size=3, genes=2, lr_size=4)
    c = cfg(steps=12, lr_schedule="cosine", warmup_steps=3)
    a = Trainer(make_model(dropout=0.2), c, batch_fn=fn)
    list(a.iter_train())

    b = Trainer(make_model(dropout=0.2), c, batch_fn=fn, out_dir=tmp_path / "b")
    evs = list(b.iter_train(stop_at=6))
    assert evs[-1].kind == "done" and b.step == 6
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    np.random.seed(1)
    r = Trainer.from_checkpoint(tmp_path / "b", batch_fn=fn, builder=StandIn)
    assert r.step == 6
    list(r.iter_train())
    assert r.step == 12
    assert states_equal(a.model.state_dict(), r.model.state_dict())
    assert states_equal(a.ema.state_dict(), r.ema.state_dict())
    assert not states_equal(a.model.state_dict(), make_model(dropout=0.2).state_dict())
    sa, sr = a.optimizer.state_dict()["state"], r.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sr[i]["exp_avg_sq"]) for i in sa)


def test_cancel_mid_training_leaves_loadable_checkpoint(tmp_path):
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 7  # polled before each step → 7 steps done

    tr = Trainer(make_model(), cfg(steps=50, checkpoint_every=4), batch_fn=synthetic_batch_fn(3, 2, 4),
                 out_dir=tmp_path, should_stop=stop)
    evs = list(tr.iter_train())
    assert [e.kind for e in evs if e.kind == "checkpoint"] == ["checkpoint"]  # at step 4
    assert evs[-1].kind == "cancelled" and evs[-1].step == 7 and evs[-1].checkpoint == str(tmp_path)
    model, ema, meta = load_checkpoint(tmp_path, builder=StandIn)
    assert meta["step"] == 7 and states_equal(model.state_dict(), tr.model.state_dict())

    # trainer.cancel() from the consumer, without a cancel checkpoint: the step-4 one stays valid
    tr2 = Trainer(make_model(), cfg(steps=50, checkpoint_every=4, checkpoint_on_cancel=False),
                  batch_fn=synthetic_batch_fn(3, 2, 4), out_dir=tmp_path / "c2")
    kinds = []
    for ev in tr2.iter_train():
        kinds.append(ev.kind)
        if ev.kind == "step" and ev.step >= 6:
            tr2.cancel()
    assert kinds[-1] == "cancelled" and tr2.step == 6
    assert load_checkpoint(tmp_path / "c2", builder=StandIn)[2]["step"] == 4


def test_cuda_oom_becomes_actionable_error():
    tr = Trainer(make_model(oom=True), cfg(batch_size=4, lr_size=8), batch_fn=synthetic_batch_fn(4, 2, 8))
    gen = tr.iter_train()
    ev = next(gen)
    assert ev.kind == "error" and isinstance(ev.error, OutOfMemoryError)
    with pytest.raises(DiffSTError, match="batch size from 4 to 2") as e:
        next(gen)
    assert "lr_size" in str(e.value) and "from 8 to 4" in str(e.value)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    # other errors pass through unchanged
    with pytest.raises(ZeroDivisionError):
        with oom_guard():
            1 / 0
    with pytest.raises(OutOfMemoryError, match="reduce the batch size from 16 to 8"):
        with oom_guard(batch_size=16):
            raise RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")


def test_resolve_device_and_label():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert device_label("cpu") == "CPU"
    if not torch.cuda.is_available():
        with pytest.raises(DiffSTError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu") or resolve_device("auto").type == "mps"
    with pytest.raises(DiffSTError, match="unknown device"):
        resolve_device("tpu7")


def test_bad_batch_is_reported():
    tr = Trainer(make_model(), cfg(), batch_fn=lambda step, rng: {"hr": np.zeros((1, 2, 8, 8), np.float32)})
    with pytest.raises(DataFormatError, match="'x0'"):
        list(tr.iter_train())


def test_network_target_and_aux_weight_suggestions(tmp_path):
    fn = synthetic_batch_fn(3, 2, 4)
    m = make_model()
    m.config["predict"] = "x0"
    with pytest.raises(DiffSTError, match="predict='x0'"):
        Trainer(m, cfg(target="eps"), batch_fn=fn)
    m = make_model()
    m.aux_weights = {"disentangle": 0.25}  # the network's suggestion is used unless the config sets one
    assert Trainer(m, cfg(aux_weights={}), batch_fn=fn).diffusion.aux_weights == {"disentangle": 0.25}
    tr = Trainer(m, cfg(aux_weights={"disentangle": 0.5}, steps=2), batch_fn=fn, out_dir=tmp_path)
    assert tr.diffusion.aux_weights == {"disentangle": 0.5}
    list(tr.iter_train())
    assert load_checkpoint(tmp_path, builder=StandIn)[2]["diffusion"]["aux_weights"] == {"disentangle": 0.5}
