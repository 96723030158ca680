"""Resuming `tools/train.py` as a user does: kill a real training process, resume it, extend a run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tool_runs import ROOT, TINY_MODEL

from voxsparse.engine.checkpoint import load_checkpoint

TINY = [
    *TINY_MODEL,
    "trainer.batch_size=1",
    "trainer.log_every=1",
    "trainer.tensorboard=false",
    "evaluate=false",
    "dataset.train.num_frames=8",
]
EPOCHS = 3
STEPS_PER_EPOCH = 8


def _args(cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "tools/train.py", *TINY, f"dataset.cache_dir={cache}", "dataset.cache_workers=1", *extra,
    ]


def _train(cache: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_args(cache, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    return done


def _assert_same_state(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert (x.epoch, x.step) == (y.epoch, y.step)
    for name in x.model:
        assert torch.equal(x.model[name], y.model[name]), f"model {name}"
    for group_x, group_y in zip(x.optimizer["param_groups"], y.optimizer["param_groups"]):
        assert group_x == group_y
    assert x.optimizer["state"].keys() == y.optimizer["state"].keys()
    for key, state in x.optimizer["state"].items():
        for field, value in state.items():
            other = y.optimizer["state"][key][field]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, f"optimizer {key}.{field}"
    assert x.scheduler == y.scheduler


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run, its console output piped to a file as in a batch job."""
    base = tmp_path_factory.mktemp("resume")
    run = base / "straight"
    done = _train(base / "cache", f"trainer.epochs={EPOCHS}", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    return base, run, done.stdout + done.stderr


def test_piped_run_logs_lines_not_bar_frames(straight_run):
    _, run, console = straight_run
    assert "\r" not in console, "a progress bar drew frames into a pipe"
    log = (run / "train.log").read_text()
    steps = re.findall(r"epoch \d/3 step (\d+)/24 \(\d/8\): loss [\d.]+ \(heatmap [\d.]+, .*\) \| lr [\d.e+-]+ "
                       r"\| [\d.]+ steps/s \| ETA \d\d:\d\d:\d\d", log)
    assert [int(s) for s in steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert "is_fx_tracing" not in console


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(straight_run):
    base, straight, _ = straight_run
    run = base / "killed"
    log = run / "train.log"
    with open(base / "killed.console", "w") as console:
        proc = subprocess.Popen(
            _args(base / "cache", f"trainer.epochs={EPOCHS}", f"hydra.run.dir={run}"),
            cwd=ROOT, stdout=console, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        # Kill as soon as the second epoch has taken a step: mid-epoch, after one checkpoint.
        while not (log.is_file() and re.search(r"epoch 2/3 step \d+/24 \(1/8\)", log.read_text())):
            assert proc.poll() is None, (base / "killed.console").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert load_checkpoint(run / "last.pth").epoch == 1, "killed before the second epoch ended"
    stale = run / ".last.pth.interrupted.tmp"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"partial")

    resumed = _train(base / "cache", f"trainer.epochs={EPOCHS}", f"resume={run / 'last.pth'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not stale.exists(), "the interrupted write's temporary file was not cleaned up"
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["cache", "killed", "straight"], (
        "a resume must continue in the run's own folder"
    )
    assert "resumed from" in (run / "train.log").read_text()
    _assert_same_state(straight / "last.pth", run / "last.pth")


def test_extending_a_finished_run_rebuilds_the_schedule(straight_run):
    base, straight, _ = straight_run
    run = base / "extended"
    run.mkdir()
    (run / "last.pth").write_bytes((straight / "last.pth").read_bytes())
    extended = _train(base / "cache", "trainer.epochs=5", f"resume={run / 'last.pth'}")
    assert extended.returncode == 0, extended.stderr[-3000:]
    ckpt = load_checkpoint(run / "last.pth")
    assert (ckpt.epoch, ckpt.step) == (5, 5 * STEPS_PER_EPOCH)
    assert ckpt.scheduler["total_steps"] == 5 * STEPS_PER_EPOCH
    # The learning rate follows a one-cycle schedule over the new total, from the resumed step on.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.004)
    cfg = dict(max_lr=0.004, total_steps=5 * STEPS_PER_EPOCH, pct_start=0.3, div_factor=10.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(opt, **cfg)
    for _ in range(5 * STEPS_PER_EPOCH):  # one scheduler step per training step, as the trainer does
        opt.step()
        reference.step()
    assert ckpt.scheduler["_last_lr"] == pytest.approx(reference.get_last_lr(), rel=1e-12)
    log = (run / "train.log").read_text()
    assert "schedule rebuilt for 40 steps (the checkpoint's run had 24)" in log
    assert re.search(r"epoch 4/5 step 25/40 \(1/8\)", log)


def test_resume_refuses_another_model(straight_run):
    base, straight, _ = straight_run
    changed = _train(
        base / "cache", f"trainer.epochs={EPOCHS + 1}", f"resume={straight / 'last.pth'}",
        "model.head.head_channels=16", f"hydra.run.dir={base / 'refused'}",
    )
    assert changed.returncode == 2
    assert "its model config differs from this run's in 1 key(s) (model.head.head_channels: 8 in the checkpoint, " \
           "16 now)" in changed.stderr
    forced = _train(
        base / "cache", f"trainer.epochs={EPOCHS + 1}", f"resume={straight / 'last.pth'}",
        "model.head.head_channels=16", "resume_allow_model_change=true", f"hydra.run.dir={base / 'forced'}",
    )
    assert forced.returncode == 2
    message = forced.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: checkpoint {re.escape(str(straight / 'last.pth'))}: its weights do not fit the model \(\d+ tensors\): "
        r"\d+ of another shape \(.*\) in the file, .* in the model.*",
        message,
    ), message
    assert len(forced.stderr.strip().splitlines()) == 1 or "size mismatch" not in forced.stderr
