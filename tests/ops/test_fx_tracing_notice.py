"""Constructing spconv's SparseConvTensor (a torch.fx ``ProxyableClassMeta`` class) must not print
torch's ``is_fx_tracing will return true ...`` notice into the tools' first progress bar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A fresh process: torch logs the notice once per process, so an earlier test could hide it.
_FORWARD = """
import functools
import torch
from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.structures import PointBatch, VoxelGrid

RANGE = (-16.0, -16.0, -3.0, 16.0, 16.0, 2.0)
torch.manual_seed(0)
model = SparseDetector(
    MeanVFE(VoxelGrid((0.4, 0.4, 0.25), RANGE), in_channels=4),
    functools.partial(VoxelNeXtBackbone, channels=(8, 16, 16, 16), blocks=(1, 1, 1, 1), bev_stage=2,
                      out_channels=16),
    functools.partial(VoxelNeXtHead, head_channels=16),
    ("Vehicle", "Pedestrian", "Cyclist"),
).eval()
xyz = torch.rand(3000, 3) * torch.tensor([30.0, 30.0, 4.0]) - torch.tensor([15.0, 15.0, 2.5])
points = torch.cat([xyz, torch.rand(3000, 1)], 1)
with torch.no_grad():
    detections = model.predict(PointBatch.from_frames([points]))
print("FORWARD_OK", len(detections))
"""


def test_sparse_forward_prints_no_fx_tracing_notice():
    done = subprocess.run(
        [sys.executable, "-c", _FORWARD], capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FORWARD_OK 1" in done.stdout
    output = done.stdout + done.stderr
    assert "is_fx_tracing" not in output, output[-3000:]
