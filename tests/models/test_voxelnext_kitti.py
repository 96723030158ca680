"""configs/model/voxelnext_kitti.yaml against the VoxelNeXt authors' KITTI config
(``tools/cfgs/kitti_models/voxelnext.yaml`` of github.com/dvlab-research/VoxelNeXt) run by OpenPCDet's
modules: settings read from the yaml, and the detector stage by stage with converted weights.

Needs two checkouts: ``VOXSPARSE_OPENPCDET`` (OpenPCDet, its modules and the KITTI dataset yaml) and
``VOXSPARSE_VOXELNEXT`` (the authors' repository, for the model yaml); skipped without them. The range
is cut to 25.6 m (spconv's CPU voxelizer allocates a table of every cell); the rest is the reference's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from voxsparse.benchmark.openpcdet import build_reference, load_reference_config
from voxsparse.benchmark.parity import compare, parity_input, randomize_batchnorm
from voxsparse.convert.openpcdet import model_config, model_from_config, openpcdet_to_ours

YAML = "tools/cfgs/kitti_models/voxelnext.yaml"
RANGE = [0.0, -12.8, -3.0, 25.6, 12.8, 1.0]


@pytest.fixture(scope="module")
def checkouts():
    roots = [os.environ.get(name) for name in ("VOXSPARSE_OPENPCDET", "VOXSPARSE_VOXELNEXT")]
    if not all(roots):
        pytest.skip("set VOXSPARSE_OPENPCDET and VOXSPARSE_VOXELNEXT to compare with the authors' KITTI VoxelNeXt")
    return Path(roots[0]), Path(roots[1]) / YAML


def test_settings_follow_the_authors_config(checkouts):
    root, yaml_path = checkouts
    cfg = load_reference_config(root, str(yaml_path))
    ours = model_config("voxelnext_kitti", None, ())
    data, head = cfg["DATA_CONFIG"], cfg["MODEL"]["DENSE_HEAD"]
    voxels = next(p for p in data["DATA_PROCESSOR"] if p["NAME"] == "transform_points_to_voxels")
    encoder = ours["voxel_encoder"]
    assert encoder["grid"]["voxel_size"] == voxels["VOXEL_SIZE"]
    assert encoder["grid"]["point_cloud_range"] == data["POINT_CLOUD_RANGE"]
    assert encoder["max_points_per_voxel"] == voxels["MAX_POINTS_PER_VOXEL"]
    assert [encoder["max_voxels_train"], encoder["max_voxels"]] == [
        voxels["MAX_NUMBER_OF_VOXELS"]["train"], voxels["MAX_NUMBER_OF_VOXELS"]["test"]]  # fmt: skip
    assert ours["class_names"] == cfg["CLASS_NAMES"]
    assert ours["head"]["class_groups"] == head["CLASS_NAMES_EACH_HEAD"]
    weights, post = head["LOSS_CONFIG"]["LOSS_WEIGHTS"], head["POST_PROCESSING"]
    assert ours["head"]["loc_weight"] == weights["loc_weight"]
    assert ours["head"]["code_weights"] == weights["code_weights"]
    assert ours["head"]["score_threshold"] == post["SCORE_THRESH"]
    assert ours["head"]["nms_threshold"] == post["NMS_CONFIG"]["NMS_THRESH"]
    assert ours["head"]["nms_post_maxsize"] == post["NMS_CONFIG"]["NMS_POST_MAXSIZE"]
    assert ours["head"]["post_center_limit_range"] == post["POST_CENTER_LIMIT_RANGE"]


def test_detector_matches_the_reference(checkouts):
    root, yaml_path = checkouts
    text = ",".join(map(str, RANGE))
    overrides = {"DATA_CONFIG.POINT_CLOUD_RANGE": RANGE, "MODEL.DENSE_HEAD.POST_PROCESSING.POST_CENTER_LIMIT_RANGE": RANGE}
    ours = [f"model.voxel_encoder.grid.point_cloud_range=[{text}]", f"model.head.post_center_limit_range=[{text}]"]
    # Narrower layers (full width compared the same, 1.9e-6 m on boxes): the architecture and every
    # rule stay the reference's.
    overrides.update({"MODEL.BACKBONE_3D.CHANNELS": [8, 8, 16, 16, 16], "MODEL.BACKBONE_3D.OUT_CHANNEL": 16,
                      "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16})  # fmt: skip
    ours += ["model.backbone.channels=[8,8,16,16,16,16]", "model.backbone.out_channels=16"]
    torch.manual_seed(0)
    reference = build_reference(root, str(yaml_path), overrides)
    randomize_batchnorm(reference, 0)
    model = model_from_config(model_config("voxelnext_kitti", None, tuple(ours)))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    state, report = openpcdet_to_ours(model, reference.state_dict(), where=str(yaml_path))
    assert not report.unmapped and not report.missing
    model.load_state_dict(state)
    result = compare(reference.eval(), model.eval(), parity_input(model, reference, seed=0))
    assert all(row.matched for row in result.rows), result
