"""OpenPCDet's VoxelNeXt and DSVT loaded from a checkout by path, to time beside ours on the same input.

Only the needed source files of the checkout are executed, by path, under stub packages: pcdet's
package ``__init__`` files import its compiled ops, which these models do not need. OpenPCDet's
``DSVT`` (``pcdet/models/backbones_3d/dsvt.py``) is pure PyTorch except for one compiled CUDA op,
``ingroup_inds``; :func:`ingroup_indices` replaces it with sort + cumsum, so the reference runs on
the CPU and on any CUDA build. It is configured from the checkout's
``tools/cfgs/waymo_models/dsvt_voxel.yaml``, which ``configs/model/dsvt_voxel_waymo.yaml`` mirrors.
:class:`OpenPCDetVoxelNeXt` is their whole VoxelNeXt detector with the checkout's nuScenes config.
Nothing of OpenPCDet is imported until one of these functions is called.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

DSVT_SOURCES = {
    "pcdet.models.model_utils.dsvt_utils": "pcdet/models/model_utils/dsvt_utils.py",
    "pcdet.models.backbones_3d.dsvt": "pcdet/models/backbones_3d/dsvt.py",
}
VOXELNEXT_SOURCES = {
    "pcdet.utils.spconv_utils": "pcdet/utils/spconv_utils.py",
    "pcdet.models.backbones_3d.spconv_backbone_voxelnext": "pcdet/models/backbones_3d/spconv_backbone_voxelnext.py",
}
# Executed after VOXELNEXT_SOURCES, in this order (each imports the ones before it).
VOXELNEXT_DETECTOR_SOURCES = {
    "pcdet.models.backbones_3d.vfe.vfe_template": "pcdet/models/backbones_3d/vfe/vfe_template.py",
    "pcdet.models.backbones_3d.vfe.mean_vfe": "pcdet/models/backbones_3d/vfe/mean_vfe.py",
    "pcdet.models.model_utils.centernet_utils": "pcdet/models/model_utils/centernet_utils.py",
    "pcdet.models.model_utils.model_nms_utils": "pcdet/models/model_utils/model_nms_utils.py",
    "pcdet.models.dense_heads.voxelnext_head": "pcdet/models/dense_heads/voxelnext_head.py",
}
DSVT_CONFIG = "tools/cfgs/waymo_models/dsvt_voxel.yaml"
VOXELNEXT_CONFIG = "tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml"


def ingroup_indices(group_ids: torch.Tensor) -> torch.Tensor:
    """Index of each element among the elements with the same group id, in input order.

    Stands in for OpenPCDet's CUDA op ``ingroup_inds`` (one thread per element taking the next
    value of its group's counter with ``atomicAdd``). The kernel's values form a permutation of
    0..n-1 within each group of n, but which element gets which value follows thread scheduling,
    so it is not guaranteed to be input order; input order is one of its possible outputs, and the
    deterministic one. DSVT needs only the permutation property: ``get_set_single_shift`` sorts by
    (window, in-group index) and deals the ranks 0..n-1 out again in x- or y-major in-window order,
    so its sets do not depend on the order within a group. Unlike the kernel (which needs
    non-negative ids and fails on empty input), any integer ids and empty input are accepted.

    Args:
        group_ids: (N,) integer tensor of group ids, any device.

    Returns:
        (N,) int64 on the same device; no host synchronisation.
    """
    if group_ids.ndim != 1 or group_ids.dtype.is_floating_point or group_ids.dtype.is_complex \
            or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be a 1-D integer tensor, got {group_ids.dtype} {tuple(group_ids.shape)}")
    # A stable sort keeps input order within each group; rank = position - start of the group's run.
    order = torch.sort(group_ids, stable=True).indices
    ids = group_ids[order]
    position = torch.arange(len(ids), device=ids.device)
    run_start = torch.ones_like(ids, dtype=torch.bool)
    run_start[1:] = ids[1:] != ids[:-1]
    first = torch.where(run_start, position, 0).cummax(0).values
    ranks = torch.empty_like(position)
    ranks[order] = position - first
    return ranks


def _missing(root: Path, relative: list[str]) -> None:
    missing = [str(root / r) for r in relative if not (root / r).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not an OpenPCDet checkout: missing {missing}")


def _stub_parents(root: Path, name: str) -> None:
    """Empty packages for the parents of module ``name``, so pcdet's own ``__init__`` files never run."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        stub = types.ModuleType(package)
        stub.__path__ = [str(root / package.replace(".", "/"))]
        sys.modules.setdefault(package, stub)


def _exec_sources(root: Path, sources: dict[str, str]) -> types.ModuleType:
    """Execute ``sources`` (module name -> path in the checkout) in order; the last module."""
    _missing(root, list(sources.values()))
    module = None
    for name, relative in sources.items():
        _stub_parents(root, name)
        spec = importlib.util.spec_from_file_location(name, root / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def load_openpcdet_voxelnext(root: Path) -> type[nn.Module]:
    """OpenPCDet's ``VoxelResBackBone8xVoxelNeXt`` class from a checkout at ``root``.

    voxsparse's sparse backend has imported spconv already, so pcdet's ``SPCONV_USE_DIRECT_TABLE =
    False`` does not take effect and both backbones run spconv with the same settings (its default,
    direct tables on).
    """
    return _exec_sources(Path(root), VOXELNEXT_SOURCES).VoxelResBackBone8xVoxelNeXt


def load_openpcdet_dsvt(root: Path) -> type[nn.Module]:
    """OpenPCDet's ``DSVT`` class from a checkout at ``root``.

    The compiled ``pcdet.ops.ingroup_inds.ingroup_inds_op`` is a stub module whose ``ingroup_inds``
    is :func:`ingroup_indices`. One repair, behaviour-preserving: the attention pooling passes an
    all-zero int32 ``key_padding_mask``, which torch >= 2.0 rejects (only bool or float masks;
    Haiyang-W/DSVT#54, still in OpenPCDet), so it is cast to bool, which also masks nothing.
    """
    root = Path(root)
    _missing(root, list(DSVT_SOURCES.values()))
    op = types.ModuleType("pcdet.ops.ingroup_inds.ingroup_inds_op")
    _stub_parents(root, op.__name__)
    op.ingroup_inds = ingroup_indices
    sys.modules[op.__name__] = op
    module = _exec_sources(root, DSVT_SOURCES)

    class BoolMaskReduction(module.Stage_ReductionAtt_Block):
        def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
            return super().forward(x, key_padding_mask.bool())

    # DSVT.__init__ looks the pooling class up in its module's globals.
    module.Stage_ReductionAtt_Block = BoolMaskReduction
    return module.DSVT


def _keep_all_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, pre_maxsize=None, **kwargs):
    """Stand-in for OpenPCDet's compiled ``iou3d_nms_utils.nms_gpu``: its score sort and cap, no suppression.

    Returns what ``nms_gpu`` returns, ``(kept indices in descending score, None)``, keeping every box.
    """
    order = scores.sort(0, descending=True)[1]
    return (order if pre_maxsize is None else order[:pre_maxsize]), None


def _stub_module(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


class _InferenceOnly(nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("OpenPCDet's losses are not loaded: voxsparse.benchmark.openpcdet times inference only")


class OpenPCDetVoxelNeXt(nn.Module):
    """OpenPCDet's VoxelNeXt detector with the checkout's nuScenes config, one frame of points to boxes.

    Its stages as OpenPCDet runs them at test time: ``transform_points_to_voxels`` (spconv's
    ``PointToVoxel``, at most 10 points per voxel and 160,000 voxels, run here on the model's device,
    not in the data loader), ``MeanVFE``, ``VoxelResBackBone8xVoxelNeXt``, ``VoxelNeXtHead`` with its
    decoding (top 500 per task head, score > 0.1, centre range). One part cannot run without
    compiling OpenPCDet: the rotated-box NMS kernel, replaced by :func:`_keep_all_nms` (sort and cap
    at 1,000 then 83 boxes per task head, nothing suppressed). The times are therefore a lower bound
    on OpenPCDet's. Other stubs, not used at test time: numba's ``jit`` (only their circle NMS, when
    numba is absent), the loss classes, and ``easydict`` (when absent). CUDA only: the head places its
    constants with ``.cuda()``.

    Args:
        root: an OpenPCDet checkout.
        voxel_size, point_cloud_range: the grid, metres (x, y, z) and (x0, y0, z0, x1, y1, z1);
            ``grid_size`` (x, y, z) cells.
        num_point_features: columns per point (5 on nuScenes: x, y, z, intensity, time lag).

    ``forward``: points (N, num_point_features) float32 on CUDA → OpenPCDet's ``final_box_dicts``
    (one dict per frame: ``pred_boxes`` (K, 9), ``pred_scores`` (K,), ``pred_labels`` (K,) from 1).
    """

    def __init__(self, root: Path, voxel_size, point_cloud_range, grid_size, num_point_features: int) -> None:
        super().__init__()
        from spconv.pytorch.utils import PointToVoxel

        root = Path(root)
        _missing(root, [*VOXELNEXT_SOURCES.values(), *VOXELNEXT_DETECTOR_SOURCES.values(), VOXELNEXT_CONFIG])
        cfg = yaml.safe_load((root / VOXELNEXT_CONFIG).read_text())
        processor = {p["NAME"]: p for p in cfg["DATA_CONFIG"]["DATA_PROCESSOR"]}["transform_points_to_voxels"]
        if list(processor["VOXEL_SIZE"]) != list(voxel_size):
            raise ValueError(f"{VOXELNEXT_CONFIG}: VOXEL_SIZE {processor['VOXEL_SIZE']}, our grid {list(voxel_size)}")
        backbone_cls = load_openpcdet_voxelnext(root)
        for name, attributes in (("numba", {"jit": lambda *a, **k: (lambda f: f)}), ("easydict", {"EasyDict": _AttrDict})):
            try:
                importlib.import_module(name)
            except ImportError:
                _stub_module(name, **attributes)
        _stub_module("pcdet.ops.iou3d_nms.iou3d_nms_utils", nms_gpu=_keep_all_nms)
        _stub_module("pcdet.utils.loss_utils", **{n: _InferenceOnly for n in (
            "FocalLossSparse", "RegLossSparse", "IouLossSparse", "IouRegLossSparse")})
        _stub_parents(root, "pcdet.ops.iou3d_nms.iou3d_nms_utils")
        _exec_sources(root, VOXELNEXT_DETECTOR_SOURCES)
        vfe_module = sys.modules["pcdet.models.backbones_3d.vfe.mean_vfe"]
        head_module = sys.modules["pcdet.models.dense_heads.voxelnext_head"]

        device = torch.device("cuda")
        self.voxelizer = PointToVoxel(
            vsize_xyz=list(voxel_size), coors_range_xyz=list(point_cloud_range), num_point_features=num_point_features,
            max_num_voxels=processor["MAX_NUMBER_OF_VOXELS"]["test"],
            max_num_points_per_voxel=processor["MAX_POINTS_PER_VOXEL"], device=device,
        )
        self.vfe = vfe_module.MeanVFE(model_cfg={}, num_point_features=num_point_features)
        self.backbone = backbone_cls({}, num_point_features, np.array(grid_size))
        head_cfg = _attr_dict(cfg["MODEL"]["DENSE_HEAD"])
        self.head = head_module.VoxelNeXtHead(
            model_cfg=head_cfg, input_channels=self.backbone.num_point_features, num_class=len(cfg["CLASS_NAMES"]),
            class_names=cfg["CLASS_NAMES"], grid_size=np.array(grid_size), point_cloud_range=list(point_cloud_range),
            voxel_size=list(voxel_size),
        )

    def forward(self, points: torch.Tensor) -> list[dict]:
        voxels, coords, num_points = self.voxelizer(points)
        batch = {
            "voxels": voxels,
            "voxel_num_points": num_points,
            "voxel_coords": torch.nn.functional.pad(coords, (1, 0)),  # batch index 0, as their collate adds
            "batch_size": 1,
        }
        return self.head(self.backbone(self.vfe(batch)))["final_box_dicts"]


class _AttrDict(dict):
    """The part of EasyDict that DSVT's constructor uses: ``cfg.KEY`` besides ``cfg.get(KEY)``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


def _attr_dict(value):
    return _AttrDict({k: _attr_dict(v) for k, v in value.items()}) if isinstance(value, dict) else value


def build_openpcdet_dsvt(root: Path) -> nn.Module:
    """OpenPCDet's DSVT with ``MODEL.BACKBONE_3D`` of the checkout's ``dsvt_voxel.yaml``.

    Input ``batch_dict``: ``voxel_features`` (M, 192) float, ``voxel_coords`` (M, 4) int (b, z, y, x)
    on the 468 x 468 x 32 grid. Output: the same dict with ``pillar_features`` (P, 192) (also
    written to ``voxel_features``) and ``voxel_coords`` (P, 4) int64 (b, 0, y, x) of the last stage.
    """
    root = Path(root)
    _missing(root, [*DSVT_SOURCES.values(), DSVT_CONFIG])
    cfg = yaml.safe_load((root / DSVT_CONFIG).read_text())["MODEL"]["BACKBONE_3D"]
    return load_openpcdet_dsvt(root)(model_cfg=_attr_dict(cfg))
