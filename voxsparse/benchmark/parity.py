"""voxsparse's reference configs beside the OpenPCDet (or DSVT repository) detectors they reproduce.

:data:`REFERENCE_CONFIGS` names, for each reference config of ``configs/model/``, the checkout and
model yaml it follows and the overrides that build it at reduced width (narrower layers, and a
smaller range where a dense BEV map would be large: for fixtures and quick checks; the architecture
and every rule stay the reference's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Environment variables naming the two checkouts (tests skip without them).
CHECKOUT_ENV = {"OpenPCDet": "VOXSPARSE_OPENPCDET", "DSVT": "VOXSPARSE_DSVT"}


@dataclass(frozen=True)
class ReferenceConfig:
    """Where a voxsparse reference config comes from.

    Attributes:
        checkout: ``"OpenPCDet"`` (commit 8caccce) or ``"DSVT"`` (Haiyang-W/DSVT), a key of
            :data:`CHECKOUT_ENV`.
        yaml: the model yaml, relative to the checkout.
        reduced: dotted yaml keys -> values for a reduced-width reference
            (:func:`voxsparse.benchmark.openpcdet.load_reference_config`).
        ours_reduced: the Hydra overrides that build ``configs/model/<name>.yaml`` as ``reduced``.
    """

    checkout: str
    yaml: str
    reduced: dict = field(default_factory=dict)
    ours_reduced: tuple[str, ...] = ()


_VOXELNEXT_REDUCED = {
    "MODEL.BACKBONE_3D.CHANNELS": [8, 8, 16, 16, 16],
    "MODEL.BACKBONE_3D.OUT_CHANNEL": 16,
    "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16,
}
_DSVT_REDUCED = {
    "MODEL.VFE.NUM_FILTERS": [16, 16],
    "MODEL.BACKBONE_3D.conv_out_channel": 16,
    "MODEL.MAP_TO_BEV.NUM_BEV_FEATURES": 16,
    "MODEL.BACKBONE_2D.NUM_FILTERS": [16, 16, 16],
    "MODEL.BACKBONE_2D.NUM_UPSAMPLE_FILTERS": [16, 16, 16],
}


def _voxelnext_ours(point_cloud_range: list[float]) -> tuple[str, ...]:
    return ("model.backbone.channels=[8,8,16,16,16,16]", "model.backbone.out_channels=16",
            f"model.voxel_encoder.grid.point_cloud_range={point_cloud_range}")


def _per_stage(stages: int) -> dict:
    return {
        "MODEL.BACKBONE_3D.INPUT_LAYER.d_model": [16] * stages,
        "MODEL.BACKBONE_3D.d_model": [16] * stages,
        "MODEL.BACKBONE_3D.nhead": [2] * stages,
        "MODEL.BACKBONE_3D.dim_feedforward": [32] * stages,
    }


# Reduced ranges keep 512 x 512 cells a side: spconv's CPU voxelizer allocates a table of every
# cell of the grid.
REFERENCE_CONFIGS: dict[str, ReferenceConfig] = {
    "voxelnext_nuscenes": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml", {
            **_VOXELNEXT_REDUCED, "DATA_CONFIG.POINT_CLOUD_RANGE": [-19.2, -19.2, -5.0, 19.2, 19.2, 3.0]},
        _voxelnext_ours([-19.2, -19.2, -5.0, 19.2, 19.2, 3.0])),
    "voxelnext_waymo": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/waymo_models/voxelnext_ioubranch_large.yaml", {
            **_VOXELNEXT_REDUCED, "DATA_CONFIG.POINT_CLOUD_RANGE": [-25.6, -25.6, -2.0, 25.6, 25.6, 4.0]},
        _voxelnext_ours([-25.6, -25.6, -2.0, 25.6, 25.6, 4.0])),
    "voxelnext_argo2": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/argo2_models/cbgs_voxel01_voxelnext.yaml", {
            **_VOXELNEXT_REDUCED, "DATA_CONFIG.POINT_CLOUD_RANGE": [-25.6, -25.6, -4.0, 25.6, 25.6, 4.0]},
        _voxelnext_ours([-25.6, -25.6, -4.0, 25.6, 25.6, 4.0])),
    # VoxelResBackBone8x has fixed widths (16-32-64-128): the dense parts are narrowed and the range
    # cut to 36 m (a 60 x 60 BEV map).
    "centerpoint_nuscenes": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/nuscenes_models/cbgs_voxel0075_res3d_centerpoint.yaml", {
            "DATA_CONFIG.POINT_CLOUD_RANGE": [-18.0, -18.0, -5.0, 18.0, 18.0, 3.0],
            "MODEL.BACKBONE_2D.NUM_FILTERS": [16, 16],
            "MODEL.BACKBONE_2D.NUM_UPSAMPLE_FILTERS": [16, 16],
            "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16,
        }),
    # 38.4 m: 120 x 120 cells of 0.32 m, ten 12-cell windows a side.
    "dsvt_voxel_waymo": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/waymo_models/dsvt_voxel.yaml", {
            **_DSVT_REDUCED, **_per_stage(4),
            "DATA_CONFIG.POINT_CLOUD_RANGE": [-19.2, -19.2, -2.0, 19.2, 19.2, 4.0],
            "MODEL.BACKBONE_3D.INPUT_LAYER.sparse_shape": [120, 120, 32],
            "MODEL.BACKBONE_3D.output_shape": [120, 120],
            "MODEL.MAP_TO_BEV.INPUT_SHAPE": [120, 120, 1],
            "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16}),
    # 36 m: 120 x 120 pillars of 0.3 m, four 30-cell windows a side. The DSVT repository's TransFusion
    # head reshapes its queries to 128 channels in code, so HIDDEN_CHANNEL keeps 128.
    "dsvt_pillar_nuscenes": ReferenceConfig(
        "DSVT", "tools/cfgs/dsvt_models/dsvt_plain_1f_onestage_nusences.yaml", {
            **_DSVT_REDUCED, **_per_stage(1),
            "DATA_CONFIG.POINT_CLOUD_RANGE": [-18.0, -18.0, -5.0, 18.0, 18.0, 3.0],
            "MODEL.BACKBONE_3D.INPUT_LAYER.sparse_shape": [120, 120, 1],
            "MODEL.BACKBONE_3D.output_shape": [120, 120],
            "MODEL.MAP_TO_BEV.INPUT_SHAPE": [120, 120, 1],
            "MODEL.DENSE_HEAD.FFN_CHANNEL": 32, "MODEL.DENSE_HEAD.NUM_PROPOSALS": 50}),
}
