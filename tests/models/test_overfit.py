"""A broken loss, target assignment or decoder cannot overfit two frames: this test fails then."""

import functools

import torch

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.evaluation.detection import evaluate_detection
from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.structures import VoxelGrid

RANGE = (-24.0, -24.0, -3.0, 24.0, 24.0, 2.0)


def test_small_voxelnext_overfits_two_synthetic_frames():
    torch.manual_seed(0)
    frames = DetectionDataset(SyntheticDataset("train", num_frames=2, seed=7), RANGE)
    batch = collate([frames[0], frames[1]])
    assert sum(len(a) for a in batch.annotations) >= 5
    model = SparseDetector(
        MeanVFE(VoxelGrid((0.2, 0.2, 0.25), RANGE), in_channels=4),
        functools.partial(VoxelNeXtBackbone, channels=(16, 32, 32, 32), blocks=(1, 1, 1, 1), bev_stage=2,
                          out_channels=32),
        functools.partial(VoxelNeXtHead, head_channels=32, regression_positives=9, with_iou=True),
        ("Vehicle", "Pedestrian", "Cyclist"),
    )
    steps = 100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    for _ in range(steps):
        loss = model.loss(batch.points, batch.annotations).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        detections = model.predict(batch.points)
    metrics = evaluate_detection(detections, batch.annotations, model.class_names)  # Waymo thresholds: 0.7 / 0.5 / 0.5
    present = [c for c in metrics.ap if metrics.num_gt[c] > 0]
    assert all(metrics.ap[c] > 0.9 for c in present), metrics.table()
