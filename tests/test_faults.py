"""Faults and reruns lose nothing (issue 19).

A folder holding a checkpoint is refused unless ``--resume`` (same settings, checked) or ``--overwrite`` (the
old checkpoint moved to a dated sibling); a SIGKILLed run resumes bit for bit; a checkpoint write killed by
SIGKILL or failing with a full disk leaves the previous checkpoint intact; a killed OME-Zarr write leaves the
target absent or as it was; ``sample --out`` never replaces an existing output unless asked. The kill / disk-full
cases run in a subprocess. (CUDA out-of-memory: tests/test_trainer.py::test_cuda_oom_becomes_actionable_error.)
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import single_thread_env
import torch

import napari_diffst
from napari_diffst import cli
from napari_diffst.errors import DataFormatError, DiffSTError
from napari_diffst.io.safety import (DiskFullError, OutputExistsError, dated_sibling, move_aside, recover_temps,
                                     refuse_existing, write_errors)
from napari_diffst.train.checkpoint import (CheckpointExistsError, config_differences, existing_checkpoint,
                                            prepare_run_dir, read_checkpoint, save_checkpoint)

SRC = str(Path(napari_diffst.__file__).resolve().parents[1])
# a tiny CLI run: ~0.3 s per step on one CPU thread
TRAIN = ["train", "--data", "synthetic", "--scale", "4", "--n-genes", "3", "--budget", "tiny", "--batch-size", "2",
         "--lr-size", "4", "--seed", "3"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """The subprocesses run one torch thread; bit-for-bit comparisons need the same here."""


def _env():
    return single_thread_env(SRC)


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "napari_diffst.cli", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _script(code: str, *args):
    """Run ``code`` in a fresh interpreter (stdout line-buffered, readable while it runs)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(proc, marker: str, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if marker in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"subprocess ended (rc={proc.returncode}) before {marker!r}: {proc.stderr.read()}")
    raise AssertionError(f"no {marker!r} within {timeout} s")


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ run folders (in-process)
def test_prepare_run_dir_refuses_resumes_and_moves_aside(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run) is None and prepare_run_dir(run, resume=True) is None  # nothing there yet
    save_checkpoint(run, model=torch.nn.Linear(2, 2), step=7, train_config={"steps": 20})
    (run / "resolved_config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    before = (run / "model.pt").read_bytes()
    assert existing_checkpoint(run)["step"] == 7
    with pytest.raises(CheckpointExistsError, match=r"already holds a checkpoint \(step 7 of 20.*--resume.*"
                                                    r"--overwrite"):
        prepare_run_dir(run)
    with pytest.raises(CheckpointExistsError, match="contradict"):
        prepare_run_dir(run, resume=True, overwrite=True)
    log = []
    assert prepare_run_dir(run, resume=True, log=log.append) == run and "resuming" in log[-1]
    assert prepare_run_dir(run, resume=str(run)) == run
    # resuming another checkpoint into a folder that holds one is a new run there: refused too
    with pytest.raises(CheckpointExistsError):
        prepare_run_dir(run, resume=str(tmp_path / "elsewhere"))
    # --overwrite: the checkpoint files move to a dated sibling, a loadable checkpoint folder; nothing deleted
    assert prepare_run_dir(run, overwrite=True, log=log.append) is None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and str(moved[0]) in log[-1]
    assert sorted(os.listdir(moved[0])) == ["config.json", "model.pt", "resolved_config.json"]
    assert (moved[0] / "model.pt").read_bytes() == before and read_checkpoint(moved[0])["step"] == 7
    assert sorted(os.listdir(run)) == ["notes.txt"]
    # a second overwrite in the same second gets its own sibling
    save_checkpoint(run, model=torch.nn.Linear(2, 2), step=1)
    d2 = move_aside(run, ["model.pt", "config.json"])
    assert d2 != moved[0] and d2.parent == tmp_path and (d2 / "model.pt").is_file()
    assert dated_sibling(run).name.startswith("run.old-")


@pytest.mark.slow
def test_config_differences_and_resume_check_through_make_trainer(tmp_path):
    from napari_diffst import pipeline as P
    from toy_fields import make_toy_field

    assert config_differences({"a": 1, "steps": 5, "model": {"x": [1, 2]}},
                              {"a": 1, "steps": 9, "model": {"x": [1, 3]}}) == ["model.x: checkpoint [1, 2], now [1, 3]"]
    f = make_toy_field(seed=0, h=6, w=6, s=2, k=2)
    kw = dict(budget="tiny", batch_size=2, lr_size=4, device="cpu", model_overrides={"use_cigc": False})
    tr = P.make_trainer([f], steps=2, out_dir=tmp_path, **kw)
    list(tr.iter_train())
    with pytest.raises(DataFormatError, match=r"cannot resume.*batch_size: checkpoint 2, now 3"):
        P.make_trainer([f], steps=4, out_dir=tmp_path, resume=tmp_path, resume_check=True,
                       **{**kw, "batch_size": 3})
    with pytest.raises(DataFormatError, match=r"model\.base_channels"):
        P.make_trainer([f], steps=4, out_dir=tmp_path, resume=tmp_path, resume_check=True,
                       **{**kw, "model_overrides": {"use_cigc": False, "base_channels": 16}})
    g = make_toy_field(seed=1, h=6, w=6, s=2, k=2)
    g.gene_scale = np.asarray(g.gene_scale) * 2
    with pytest.raises(DataFormatError, match="gene_scale"):
        P.make_trainer([g], steps=4, out_dir=tmp_path, resume=tmp_path, resume_check=True, **kw)
    r = P.make_trainer([f], steps=4, out_dir=tmp_path, resume=tmp_path, resume_check=True, **kw)
    assert r.step == 2 and r.config.steps == 4  # only steps (and device) may change


def test_sample_out_is_not_replaced_unless_asked(tmp_path, capsys):
    out = tmp_path / "maps.zarr"
    out.mkdir()
    (out / "keep").write_text("old maps")
    args = ["sample", "--checkpoint", str(tmp_path / "no_ckpt"), "--data", "synthetic", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "maps.zarr: the output already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "keep").read_text() == "old maps"
    # asked to: the existing output no longer stops it (here the missing checkpoint does, and out is untouched)
    assert cli.main(args + ["--overwrite"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err and (out / "keep").is_file()
    assert refuse_existing(tmp_path / "new.zarr") == tmp_path / "new.zarr"
    with pytest.raises(OutputExistsError):
        refuse_existing(out)


def test_recover_temps_after_a_killed_folder_replacement(tmp_path):
    target = tmp_path / "maps.zarr"
    # killed between "move the old version aside" and "move the new one in": the old one comes back
    old = tmp_path / ".old-0123abcd-maps.zarr"
    old.mkdir()
    (old / "a").write_text("previous")
    tmp = tmp_path / ".tmp-89abcdef-maps.zarr"
    tmp.mkdir()
    (tmp / "a").write_text("half-written")
    other = tmp_path / ".tmp-89abcdef-other.zarr"  # another target's temporary: not touched
    other.mkdir()
    # names that only look like a temporary (not 8 lowercase hex digits, another tag, a suffix): a user's
    not_ours = [".tmp-0123ABCD-maps.zarr", ".tmp-0123abcx-maps.zarr", ".bak-0123abcd-maps.zarr",
                ".tmp-0123abcd-maps.zarr.txt", ".tmp-0123abcde-maps.zarr"]
    for n in not_ours:
        (tmp_path / n).write_text("user")
    said = []
    removed = recover_temps(target, log=said.append)
    assert removed == [tmp] and (target / "a").read_text() == "previous" and other.is_dir()
    assert _hidden(tmp_path) == sorted([".tmp-89abcdef-other.zarr", *not_ours])
    assert said == [f"{target}: removed 1 partial output left by a killed write (.tmp-89abcdef-maps.zarr); put back "
                    f"the previous maps.zarr that the killed write had moved aside"]
    assert recover_temps(target, log=said.append) == [] and len(said) == 1  # nothing to do: nothing said


def test_disk_full_error_names_the_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")
    with pytest.raises(DiskFullError, match=r"x\.bin: cannot write the file: the disk is full.*previous x\.bin "
                                            r"is intact"):
        with write_errors(p):
            raise OSError(errno.ENOSPC, "No space left on device", str(p))
    with pytest.raises(OSError, match="permission"):  # other errors pass through unchanged
        with write_errors(p):
            raise PermissionError(errno.EACCES, "permission denied")
    assert isinstance(DiskFullError(errno.ENOSPC, "m"), DiffSTError)


# ------------------------------------------------------------------------------------ subprocess faults
def _cli_threads(args, threads: int):
    env = dict(_env(), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "napari_diffst.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout: float = 180) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


@pytest.mark.slow
def test_sigkilled_cli_run_is_refused_then_resumed_bit_for_bit(tmp_path):
    """The real Diff-ST network through the CLI, every process on one CPU thread: a run SIGKILLed after a
    checkpoint and rerun is refused without a flag (nothing touched); ``--resume`` in a fresh process ends with
    the uninterrupted run's model and EMA weights bit for bit. Resumed in a process with two threads it is bit for
    bit too: the checkpoint records its run's CPU thread count and ``train --resume`` uses it (float sums split
    over another number of threads round differently — checked here: a fresh two-thread run differs)."""
    import shutil

    steps, every = 10, 3
    args = [*TRAIN, "--steps", str(steps), "--set", f"checkpoint_every={every}"]
    whole = _cli([*args, "--out", str(tmp_path / "whole")])  # the uninterrupted run, meanwhile
    run = tmp_path / "b"
    killed = _cli([*args, "--out", str(run)])
    t0 = time.time()
    while (existing_checkpoint(run) or {}).get("step") is None:  # poll for the first checkpoint
        assert killed.poll() is None, killed.stderr.read()
        assert time.time() - t0 < 120
        time.sleep(0.02)
    assert killed.poll() is None  # still training
    _kill(killed)
    at = read_checkpoint(run)["step"]
    assert at % every == 0 and 0 < at < steps  # a checkpoint no older than `every` steps, mid-run
    assert read_checkpoint(run)["extra"]["cpu_threads"] == 1
    assert sorted(p for p in os.listdir(run) if not p.startswith(".")) == ["config.json", "model.pt",
                                                                            "resolved_config.json"]
    _finish(whole)
    # the same command again: refused, nothing touched
    before, have = (run / "model.pt").read_bytes(), existing_checkpoint(run)
    again = _cli([*TRAIN, "--steps", str(steps), "--out", str(run)])
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "already holds a checkpoint" in err and "--resume" in err
    assert "--overwrite" in err and (run / "model.pt").read_bytes() == before
    two = tmp_path / "two"
    shutil.copytree(run, two)
    res = _cli([*args, "--out", str(run), "--resume"])
    res2 = _cli_threads([*args, "--out", str(two), "--resume"], 2)
    fresh2 = _cli_threads([*args, "--out", str(tmp_path / "fresh2")], 2)
    err = _finish(res)
    assert f"resuming the checkpoint in {run} (step {have['step']} of {steps}" in err and "thread" not in err
    err2 = _finish(res2)
    assert "using 1 CPU thread as the run that wrote the checkpoint did (this process had 2)" in err2
    _finish(fresh2)
    a = read_checkpoint(tmp_path / "whole")
    for folder in (run, two):
        b = read_checkpoint(folder)
        assert b["step"] == a["step"] == steps
        assert _same_state(a["model"], b["model"]) and _same_state(a["ema"], b["ema"])
        assert not _hidden(folder)
    assert not _same_state(a["model"], read_checkpoint(tmp_path / "fresh2")["model"])


KILL_TRAINER = """
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_trainer import StandIn, cfg, make_model
    from napari_diffst.train import Trainer, synthetic_batch_fn
    c = cfg(steps=400, lr_schedule="cosine", warmup_steps=3, checkpoint_every=4)
    tr = Trainer(make_model(dropout=0.2), c, batch_fn=synthetic_batch_fn(3, 2, 4), out_dir=sys.argv[1])
    for ev in tr.iter_train():
        if ev.kind == "checkpoint" and ev.step >= 8:
            print("SAVED", ev.step, flush=True)
"""


def test_sigkilled_trainer_resumes_bit_for_bit(tmp_path):
    """Engine level (tiny stand-in network, CPU): a run SIGKILLed in a subprocess after a checkpoint, resumed
    here, ends with the uninterrupted run's weights, EMA and optimizer state bit for bit."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import StandIn, cfg, make_model

    from napari_diffst.train import Trainer, synthetic_batch_fn

    run = tmp_path / "run"
    p = _script(KILL_TRAINER, run, Path(__file__).parent)
    _wait_line(p, "SAVED")
    _kill(p)
    at = read_checkpoint(run)["step"]
    assert at >= 8 and at % 4 == 0
    fn = synthetic_batch_fn(3, 2, 4)
    c = cfg(steps=400, lr_schedule="cosine", warmup_steps=3, checkpoint_every=4)
    end = at + 6
    a = Trainer(make_model(dropout=0.2), c, batch_fn=fn)
    list(a.iter_train(stop_at=end))
    torch.manual_seed(999)  # the resuming process's RNG state must not matter
    r = Trainer.from_checkpoint(run, batch_fn=fn, builder=StandIn)
    list(r.iter_train(stop_at=end))
    assert r.step == a.step == end
    assert _same_state(a.model.state_dict(), r.model.state_dict())
    assert _same_state(a.ema.state_dict(), r.ema.state_dict())
    sa, sr = a.optimizer.state_dict()["state"], r.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sr[i]["exp_avg_sq"]) for i in sa)


KILL_DURING_SAVE = """
    import sys, time
    import torch
    from napari_diffst.train import checkpoint as ck
    d = sys.argv[1]
    ck.save_checkpoint(d, model=torch.nn.Linear(64, 64), step=1)
    real = torch.save
    def slow_save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half of the new file is on disk when the kill comes
            fh.truncate(fh.seek(0, 2) // 2)
        print("WRITING", flush=True)
        time.sleep(120)
    torch.save = slow_save
    ck.save_checkpoint(d, model=torch.nn.Linear(64, 64), step=2)
"""


def test_sigkill_during_checkpoint_write_keeps_the_previous(tmp_path):
    d = tmp_path / "run"
    p = _script(KILL_DURING_SAVE, d)
    _wait_line(p, "WRITING")
    before = (d / "model.pt").read_bytes()
    _kill(p)
    assert (d / "model.pt").read_bytes() == before and read_checkpoint(d)["step"] == 1
    assert len(_hidden(d)) == 1 and _hidden(d)[0].endswith("-model.pt")  # the half-written temporary
    # the next save (or run) clears the debris
    save_checkpoint(d, model=torch.nn.Linear(64, 64), step=3)
    assert read_checkpoint(d)["step"] == 3 and not _hidden(d)


DISK_FULL = """
    import errno, sys
    import torch
    from napari_diffst import cli
    real, n = torch.save, [0]
    def full_disk(obj, f, *a, **k):
        n[0] += 1
        if n[0] < 2:
            return real(obj, f, *a, **k)
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    torch.save = full_disk
    sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_disk_full_during_checkpoint_write_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    p = _script(DISK_FULL, *TRAIN, "--steps", "6", "--set", "checkpoint_every=2", "--out", run)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 2, err
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(line) == 1 and "Traceback" not in err
    assert "model.pt: cannot write the checkpoint: the disk is full" in line[0]
    assert "the previous checkpoint (step 2 of 6" in line[0] and "is intact" in line[0]
    assert read_checkpoint(run)["step"] == 2 and not _hidden(run)


#: patched into a writer subprocess: after each OME-Zarr tile it says WRITING and waits to be killed
SLOW_TILES = """
    import time
    from napari_diffst.io import writers as W
    real = W.OmeZarrWriter.write_tile
    def slow(self, *a, **k):
        real(self, *a, **k)
        print("WRITING", flush=True)
        time.sleep(120)
    W.OmeZarrWriter.write_tile = slow
"""

KILL_ZARR = SLOW_TILES + """
    import sys
    import numpy as np
    target, value = sys.argv[1], float(sys.argv[2])
    W.write_ome_zarr(target, np.full((2, 40, 30), value, np.float32), ["A", "B"], 2.0)
"""


def test_killed_ome_zarr_write_leaves_target_absent_or_intact(tmp_path):
    from napari_diffst.io.writers import read_maps, write_ome_zarr

    fresh = tmp_path / "fresh.ome.zarr"
    p = _script(KILL_ZARR, fresh, 5.0)
    _wait_line(p, "WRITING")
    _kill(p)
    assert not fresh.exists()
    old = tmp_path / "old.ome.zarr"
    write_ome_zarr(old, np.full((2, 40, 30), 1.0, np.float32), ["A", "B"], 2.0)
    p = _script(KILL_ZARR, old, 7.0)
    _wait_line(p, "WRITING")
    _kill(p)
    mf = read_maps(old)
    assert list(mf.genes) == ["A", "B"] and np.all(np.asarray(mf.maps) == 1.0)
    assert recover_temps(old) and recover_temps(fresh) and not _hidden(tmp_path)



KILL_SAMPLE = SLOW_TILES + """
    import sys
    from napari_diffst import cli
    sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkilled_sample_out_leaves_a_temporary_that_the_rerun_removes(tmp_path):
    """``sample --out X.ome.zarr`` SIGKILLed mid-write leaves only a hidden partial output beside X (X absent);
    the next ``sample`` to X removes it, says so in one line and writes X. A user's own dot-file is not touched."""
    from napari_diffst.io.writers import read_maps

    run = tmp_path / "run"
    tr = _cli([*TRAIN, "--steps", "2", "--out", str(run)])
    _, err = tr.communicate(timeout=180)
    assert tr.returncode == 0, err
    out = tmp_path / "maps.ome.zarr"
    mine = tmp_path / ".tmp-notes-maps.ome.zarr"  # a user's file: not of the writers' form (8 hex digits)
    mine.write_text("mine")
    args = ["sample", "--checkpoint", str(run), "--data", "synthetic", "--steps", "2", "--n-samples", "1",
            "--out", str(out)]
    p = _script(KILL_SAMPLE, *args)
    _wait_line(p, "WRITING", timeout=120)
    _kill(p)
    left = [n for n in _hidden(tmp_path) if n != mine.name]
    assert not out.exists() and len(left) == 1 and left[0].startswith(".tmp-") and left[0].endswith("-maps.ome.zarr")
    again = _cli(args)
    _, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    said = [ln for ln in err.splitlines() if "killed write" in ln]
    assert len(said) == 1 and f"removed 1 partial output left by a killed write ({left[0]})" in said[0]
    assert _hidden(tmp_path) == [mine.name] and mine.read_text() == "mine"
    assert list(read_maps(out).genes) == read_checkpoint(run)["genes"]



def test_diffst_run_stopped_after_a_checkpoint_resumes_bit_for_bit(tmp_path):
    """The real Diff-ST network (tiny budget, CPU), in one process: a run stopped right after a checkpoint and
    resumed from it ends with the uninterrupted run's weights bit for bit (the network's initial weights are
    seeded by make_trainer). Across processes: test_sigkilled_cli_run_is_refused_then_resumed_bit_for_bit."""
    from napari_diffst import pipeline as P

    s = P.load_data("synthetic", seed=3)
    genes = P.choose_genes([s], n_genes=3)
    fields, _ = P.make_fields([s], genes, 4)
    kw = dict(budget="tiny", steps=8, batch_size=2, lr_size=4, seed=3, device="cpu", train_samples=[s],
              checkpoint_every=3)
    a = P.make_trainer(fields, **kw)
    list(a.iter_train())
    run = tmp_path / "run"
    list(P.make_trainer(fields, out_dir=str(run), **kw).iter_train(stop_at=3))
    assert read_checkpoint(run)["step"] == 3
    torch.manual_seed(999)  # the resuming RNG state must not matter
    r = P.make_trainer(fields, resume=str(run), resume_check=True, **kw)
    list(r.iter_train())
    assert r.step == a.step == 8
    assert _same_state(a.model.state_dict(), r.model.state_dict())
