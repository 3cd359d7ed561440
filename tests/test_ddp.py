"""DistributedDataParallel training: 2 CPU processes on gloo keep identical replicas (tiny stand-in model)."""
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from napari_diffst.train import TrainConfig, Trainer, load_checkpoint, synthetic_batch_fn
from napari_diffst.train import ddp

from standin import StandIn

torch.set_num_threads(1)


def _worker(rank, world_size, port, out):
    torch.set_num_threads(1)
    info = ddp.init_distributed(rank, world_size, master_port=port, device="cpu")
    assert info.backend == "gloo" and dist.get_world_size() == world_size
    torch.manual_seed(100 + rank)  # different init per rank on purpose: DDP must broadcast rank 0's
    own_init = {k: v.clone() for k, v in StandIn().state_dict().items()}
    torch.manual_seed(100 + rank)
    model = StandIn()
    seen = []
    base = synthetic_batch_fn(batch_size=2, genes=2, lr_size=4)

    def batch_fn(step, rng):
        b = base(step, rng)
        seen.append(float(b["x0"].sum()))
        return b

    cfg = TrainConfig(steps=4, batch_size=2, lr_size=4, lr=1e-2, log_every=1, checkpoint_every=100, device="cpu",
                      ema_decay=0.5)
    tr = Trainer(model, cfg, batch_fn=batch_fn, out_dir=os.path.join(out, f"ck{rank}"), rank=rank,
                 world_size=world_size, device=info.device)
    synced_init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    kinds = [e.kind for e in tr.iter_train()]
    torch.save({"params": tr.model.state_dict(), "ema": tr.ema.state_dict(), "own_init": own_init,
                "synced_init": synced_init, "kinds": kinds, "seen": seen},
               os.path.join(out, f"rank{rank}.pt"))
    ddp.cleanup_distributed()


def _launch(nprocs, args, timeout=180):
    """torch.multiprocessing.spawn's machinery; 'fork' where available (as DataLoader workers on Linux) so the
    children do not re-import torch (seconds each on a busy 2-core machine); never hangs the test run."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        import torch._dynamo  # noqa: F401  (torch.optim imports it lazily; once here, not in every child)
    ctx = mp.start_processes(_worker, args=args, nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {timeout} s")


def test_two_process_gloo_replicas_stay_identical(tmp_path):
    port = ddp.free_port()
    _launch(2, (2, port, str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # different seeds → different initial weights, but DDP broadcast rank 0's before training
    assert not torch.equal(r0["own_init"]["out.weight"], r1["own_init"]["out.weight"])
    for k in r0["synced_init"]:
        assert torch.equal(r0["synced_init"][k], r1["synced_init"][k])
        assert torch.equal(r0["synced_init"][k], r0["own_init"][k])
    # each rank drew different data, yet the replicas (and their EMAs) are identical after training
    assert r0["seen"] != r1["seen"] and len(r0["seen"]) == 4
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert not torch.equal(r0["params"]["out.weight"], r0["synced_init"]["out.weight"])
    # rank 0 only: events and checkpoints
    assert r0["kinds"][-1] == "done" and r0["kinds"].count("step") == 4 and r1["kinds"] == []
    assert (tmp_path / "ck0" / "model.pt").is_file() and not (tmp_path / "ck1").exists()
    model, _, meta = load_checkpoint(tmp_path / "ck0", builder=StandIn)
    assert meta["step"] == 4 and meta["extra"]["world_size"] == 2
    assert all(torch.equal(v, r0["params"][k]) for k, v in model.state_dict().items())


def test_entry_point_single_process(tmp_path, capsys):
    cfg = TrainConfig(steps=3, batch_size=2, lr_size=4, log_every=1, checkpoint_every=100, device="cpu",
                      model_factory=f"{__name__}:StandIn", model={"hidden": 4},
                      data={"source": "synthetic", "genes": 2, "scale": 2, "he_per_hr": 2})
    p = tmp_path / "cfg.json"
    cfg.to_json(p)
    for k in ("RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    assert ddp.main(["--config", str(p), "--out", str(tmp_path / "run")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["kind"] for x in lines] == ["step", "step", "step", "checkpoint", "done"]
    model, _, meta = load_checkpoint(tmp_path / "run")  # rebuilt via the saved model_factory
    assert isinstance(model, StandIn) and model.config["hidden"] == 4 and meta["step"] == 3
    # resume to more steps
    assert ddp.main(["--config", str(p), "--resume", str(tmp_path / "run"), "--steps", "5"]) == 0
    assert load_checkpoint(tmp_path / "run")[2]["step"] == 5


def test_entry_point_reports_missing_data_source(tmp_path, capsys):
    p = tmp_path / "cfg.json"
    TrainConfig(steps=2, device="cpu", model_factory=f"{__name__}:StandIn").to_json(p)
    assert ddp.main(["--config", str(p)]) == 1
    assert "no data source" in capsys.readouterr().err
