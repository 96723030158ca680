"""DDP on the CPU (gloo, two processes): a step of two ranks with one frame each equals a step of one
process with both frames, and distributed evaluation returns every frame once, in order."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.data.synthetic.lidar import LidarConfig
from voxsparse.data.transforms import GlobalAugment
from voxsparse.engine.distributed import (
    CpuSyncBatchNorm,
    DistInfo,
    _SyncBatchNormFunction,
    convert_sync_batchnorm,
)
from voxsparse.engine.inference import predict_dataset
from voxsparse.engine.trainer import Trainer, TrainerConfig
from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.structures import VoxelGrid

ROOT = Path(__file__).resolve().parents[2]
RANGE = (-16.0, -16.0, -3.0, 16.0, 16.0, 2.0)
WORLD = 2


@pytest.fixture(scope="module")
def frames():
    source = SyntheticDataset("train", 5, seed=3, lidar=LidarConfig(beams=32, azimuth_resolution=0.4))
    return [source[i] for i in range(len(source))]


def _model() -> SparseDetector:
    torch.manual_seed(0)
    return SparseDetector(
        MeanVFE(VoxelGrid((0.25, 0.25, 0.25), RANGE)),
        functools.partial(
            VoxelNeXtBackbone, channels=(8, 8, 8), blocks=(0, 1, 1), bev_stage=2, out_channels=8
        ),
        functools.partial(
            VoxelNeXtHead, head_channels=8, with_iou=True, regression_positives=4, max_detections=5,
            score_threshold=0.0,
        ),
        ("Vehicle", "Pedestrian", "Cyclist"),
    )


def _one_step(info: DistInfo, frames: list, sync_bn: bool, output_dir: Path) -> dict[str, dict]:
    """Gradients and state after one AdamW step over ``frames`` split across ``info.world_size`` ranks."""
    data = DetectionDataset(frames, RANGE, [GlobalAugment()], seed=0)
    cfg = TrainerConfig(
        epochs=1, batch_size=len(frames) // info.world_size, num_workers=0, grad_clip=0.0, sync_bn=sync_bn,
        tensorboard=False,
    )
    trainer = Trainer(_model(), data, cfg, output_dir, info, config_dict={})
    assert len(trainer.loader) == 1
    trainer.fit()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return {"grads": grads, "state": trainer.model.state_dict()}


def _worker(rank: int, store: Path, frames: list, out: Path) -> None:
    """Rank ``rank`` of a two-process gloo job: one training step over the first two frames with and
    without synchronised BatchNorm, then prediction over all frames with the initial weights."""
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    info = DistInfo(rank=rank, world_size=WORLD)
    steps = {sync: _one_step(info, frames[:2], sync, out.parent / f"run{rank}") for sync in (True, False)}
    predictions = predict_dataset(_model().eval(), DetectionDataset(frames, RANGE), info, batch_size=2)
    if rank == 0:
        torch.save({"steps": steps, "predictions": predictions}, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_step(frames, tmp_path_factory):
    """The reference: one process, both frames in one batch (plain BatchNorm sees them all)."""
    return _one_step(DistInfo(), frames[:2], sync_bn=False, output_dir=tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def two_ranks(frames, single_step, tmp_path_factory):
    """What rank 0 of the two-process job returned. The ranks are forked after ``single_step`` has
    imported everything a step needs (spawned ones spend ~10 s importing torch and its optimizers)."""
    tmp = tmp_path_factory.mktemp("ddp")
    args = (tmp / "store", frames, tmp / "rank0.pt")
    mp.start_processes(_worker, args=args, nprocs=WORLD, start_method="fork")
    return torch.load(tmp / "rank0.pt", weights_only=False)


def test_two_ranks_step_like_one_process_with_the_global_batch(single_step, two_ranks):
    single = single_step
    synced = two_ranks["steps"][True]
    for kind in ("grads", "state"):  # state: weights after the AdamW step, and BatchNorm statistics
        for name, expected in single[kind].items():
            # Summation order differs between one process and two: errors are relative to the
            # tensor's scale (the control below differs by > 1e-2 of it).
            scale = expected.abs().max().item() if expected.is_floating_point() and expected.numel() else 0.0
            torch.testing.assert_close(
                synced[kind][name], expected, rtol=1e-4, atol=max(1e-6, 1e-4 * scale),
                msg=lambda m, key=f"{kind} {name}": f"{key}: {m}",
            )
    # Control: with each rank's own BatchNorm statistics the step differs, so the check above can fail.
    plain = two_ranks["steps"][False]
    worst = max(
        ((plain["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
        for n, g in single["grads"].items()
    )
    assert worst > 1e-2


def test_distributed_prediction_returns_every_frame_once_in_order(frames, two_ranks):
    gathered = two_ranks["predictions"]
    single = predict_dataset(_model().eval(), DetectionDataset(frames, RANGE), DistInfo(), batch_size=2)
    assert gathered.frame_ids == [f.frame_id for f in frames] == single.frame_ids
    for frame_id, a, b, ga, gb in zip(
        single.frame_ids, gathered.detections, single.detections, gathered.annotations, single.annotations
    ):
        assert len(a) == len(b) == 5, frame_id
        torch.testing.assert_close(a.boxes.tensor, b.boxes.tensor, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ga.boxes.tensor, gb.boxes.tensor)


def test_torchrun_smoke_two_processes_train_and_evaluate(tmp_path):
    """``torchrun --nproc_per_node=2 tools/train.py`` end to end (~17 s): rank 0 alone logs, saves and
    scores, and the evaluation covers each of the 3 validation frames once."""
    small_lidar = "{beams: 32, azimuth_resolution: 0.4}"
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "tools/train.py",
        "model.voxel_encoder.grid.point_cloud_range=[-16,-16,-3,16,16,2]", "model.backbone.channels=[8,8,8,8,8]",
        "model.backbone.out_channels=8", "model.head.head_channels=8", "trainer.batch_size=1", "trainer.epochs=1",
        "trainer.tensorboard=false", "dataset.train.num_frames=2", "dataset.val.num_frames=3",
        f"+dataset.train.lidar={small_lidar}", f"+dataset.val.lidar={small_lidar}",
        f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.cache_workers=1", f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "last.pth").is_file() and "LEVEL_2" in json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "train.log").read_text().count("epoch 1/1 step 1/1 (1/1): loss") == 1
    predictions = torch.load(run_dir / "predictions.pt", weights_only=True)
    assert len(predictions["frame_ids"]) == len(set(predictions["frame_ids"])) == 3


def test_cpu_sync_batchnorm_conversion_keeps_parameters_and_checkpoint_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6, eps=1e-3, momentum=0.2))
    bn = model[1]
    keys = set(model.state_dict())
    assert convert_sync_batchnorm(model, torch.device("cpu")) is model
    sync = model[1]
    assert isinstance(sync, CpuSyncBatchNorm) and (sync.eps, sync.momentum) == (1e-3, 0.2)
    assert sync.weight is bn.weight and sync.running_var is bn.running_var and set(model.state_dict()) == keys


def test_sync_batchnorm_function_matches_batchnorm_on_one_rank(tmp_path):
    """The autograd function on (B, C, H, W) matches ``F.batch_norm``: output, gradients and running
    statistics (a one-rank group; the two-rank test covers sums over ranks, on (N, C) features)."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 4) * 3 + 2).requires_grad_()
    weight, bias = torch.rand(3).requires_grad_(), torch.randn(3).requires_grad_()
    upstream = torch.randn(2, 3, 5, 4)
    stats = [torch.zeros(3), torch.ones(3)]
    ref_stats = [t.clone() for t in stats]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = _SyncBatchNormFunction.apply(x, weight, bias, *stats, 0.1, 1e-3)
        grads = torch.autograd.grad(out, (x, weight, bias), upstream)
    finally:
        dist.destroy_process_group()
    ref = torch.nn.functional.batch_norm(x, *ref_stats, weight, bias, training=True, momentum=0.1, eps=1e-3)
    ref_grads = torch.autograd.grad(ref, (x, weight, bias), upstream)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    for s, r in zip(stats, ref_stats):
        torch.testing.assert_close(s, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_uses_fused_adamw_equal_to_the_default(frames, tmp_path):
    """On CUDA the trainer's AdamW is the fused kernel; its step equals the per-tensor AdamW's."""
    info = DistInfo(device=torch.device("cuda"))
    data = DetectionDataset(frames[:2], RANGE, [GlobalAugment()], seed=0)
    cfg = TrainerConfig(epochs=1, batch_size=2, num_workers=0, grad_clip=0.0, sync_bn=False, tensorboard=False,
                        amp=False)
    trainer = Trainer(_model().cuda(), data, cfg, tmp_path, info, config_dict={})
    assert trainer.optimizer.defaults["fused"]
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    group = trainer.optimizer.param_groups[0]  # the first step's rate and betas (one-cycle's start)
    reference = torch.optim.AdamW(list(start.values()), lr=group["lr"], betas=group["betas"],
                                  weight_decay=group["weight_decay"], foreach=True)
    trainer.fit()
    for value, (_, p) in zip(start.values(), trainer.model.named_parameters()):
        value.grad = p.grad.detach().clone()
    reference.step()
    for (name, p), expected in zip(trainer.model.named_parameters(), start.values()):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)
