"""Every model config builds parts that keep the contracts of voxsparse.models.contracts."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from tool_runs import ROOT, compose_config

from voxsparse.benchmark.stages import dataset_for
from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.models.contracts import Backbone, Head, Neck, VoxelEncoder, check_losses
from voxsparse.models.heads.centerpoint_head import CenterPointHead
from voxsparse.structures import DenseBEV, Detections3D, PointBatch

CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))
#: Small enough to run forward and backward on the CPU in a test.
RUNNABLE = {"voxelnext_small", "centerpoint_small", "dsvt_pillar_small", "dsvt_voxel_small", "voxelkp_small",
            "lion_small", "scatterformer_small", "voxelnext_focals_small"}


def test_every_model_config_is_listed():
    assert RUNNABLE <= set(CONFIGS) and len(CONFIGS) >= 10


@pytest.mark.parametrize("name", CONFIGS)
def test_parts_keep_their_contracts(name):
    model = instantiate(compose_config("train", [f"model={name}", f"dataset={dataset_for(name)}"]).model)
    assert isinstance(model.voxel_encoder, VoxelEncoder)
    assert isinstance(model.backbone, Backbone) and model.backbone.stride >= 1
    assert model.neck is None or isinstance(model.neck, Neck)
    assert isinstance(model.head, Head)
    assert len(model.point_convention.features) == model.voxel_encoder.in_channels


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    frames = SyntheticDataset("train", 2, seed=4, cache_dir=tmp_path_factory.mktemp("cache"))
    data = DetectionDataset(frames, (-40.0, -40.0, -3.0, 40.0, 40.0, 2.0))
    return collate([data[0], data[1]])


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_parts_return_what_their_contracts_say(name, batch):
    torch.manual_seed(0)
    model = instantiate(compose_config("train", [f"model={name}"]).model).train()
    voxels = model.voxel_encoder(batch.points)
    assert voxels.features.shape[1] == model.voxel_encoder.out_channels and voxels.batch_size == 2
    bev = model.backbone(voxels)
    assert bev.features.shape[1] == model.backbone.out_channels and bev.stride == model.backbone.stride
    if model.neck is not None:
        bev = model.neck(bev)
        assert isinstance(bev, DenseBEV) and bev.features.shape[1] == model.neck.out_channels
    pred = model.head(bev)
    losses = model.head.loss(pred, batch.annotations)
    check_losses(losses)
    losses.total.backward()
    detections = model.eval().predict(batch.points)
    assert len(detections) == 2 and all(isinstance(d, Detections3D) for d in detections)
    for d in detections:
        assert torch.all(d.scores[:-1] >= d.scores[1:])

    empty = PointBatch(torch.zeros(0, model.voxel_encoder.in_channels), torch.zeros(0, dtype=torch.long), 2)
    with torch.no_grad():
        bev = model.backbone(model.voxel_encoder(empty))
        assert bev.features.shape == (0, model.backbone.out_channels) and bev.stride == model.backbone.stride
        decoded = model.head.decode(model.head(bev if model.neck is None else model.neck(bev)))
    assert len(decoded) == 2
    if not isinstance(model.head, CenterPointHead):  # a dense head scores every cell, occupied or not
        assert [len(d) for d in decoded] == [0, 0]
