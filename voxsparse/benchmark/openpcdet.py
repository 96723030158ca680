"""OpenPCDet's VoxelNeXt and DSVT loaded from a checkout by path, to time beside ours on the same input.

Only the needed source files of the checkout are executed, by path, under stub packages: pcdet's
package ``__init__`` files import its compiled ops, which these models do not need. OpenPCDet's
``DSVT`` (``pcdet/models/backbones_3d/dsvt.py``) is pure PyTorch except for one compiled CUDA op,
``ingroup_inds``; :func:`ingroup_indices` replaces it with sort + cumsum, so the reference runs on
the CPU and on any CUDA build. It is configured from the checkout's
``tools/cfgs/waymo_models/dsvt_voxel.yaml``, which ``configs/model/dsvt_voxel_waymo.yaml`` mirrors.
:class:`OpenPCDetVoxelNeXt` is their whole VoxelNeXt detector with the checkout's nuScenes config.

:func:`build_reference` builds any detector of a pcdet checkout (OpenPCDet, or the DSVT repository
of the same layout) from its model yaml, with overrides, and runs it from raw points on the CPU or
CUDA, keeping every stage's output, the decoded boxes and, in training, the losses
(:class:`ReferenceDetector`, :class:`ReferenceOutput`): the reference side of parity checks and
of the converter's tests. Nothing of OpenPCDet is imported until one of these functions is called.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
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
    _repair_dsvt_pooling_mask(module)
    return module.DSVT


def _repair_dsvt_pooling_mask(module: types.ModuleType) -> None:
    """DSVT's attention pooling gets an all-zero int32 ``key_padding_mask``, which torch >= 2.0
    rejects (bool or float only; Haiyang-W/DSVT#54): cast it to bool, which masks nothing either.
    ``DSVT.__init__`` looks the pooling class up in its module's globals, so the subclass goes there."""
    base = getattr(module, "Stage_ReductionAtt_Block", None)
    if base is None or getattr(base, "casts_mask_to_bool", False):
        return

    class BoolMaskReduction(base):
        casts_mask_to_bool = True

        def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
            return super().forward(x, key_padding_mask.bool())

    module.Stage_ReductionAtt_Block = BoolMaskReduction


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
    """The part of EasyDict that OpenPCDet's modules use: ``cfg.KEY`` besides ``cfg.get(KEY)``, and
    ``cfg.KEY = value`` (nested dicts become ``_AttrDict`` s)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def __setattr__(self, name: str, value) -> None:
        self[name] = _attr_dict(value)


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


# ---------------------------------------------------------------------------------------------
# A whole reference detector from a model yaml of an OpenPCDet (or DSVT repository) checkout.

#: The detector's parts in OpenPCDet's order: yaml section, attribute (its state-dict prefix) and
#: the package whose ``__init__`` names the classes in an ``__all__`` dict.
REFERENCE_PARTS = (
    ("VFE", "vfe", "pcdet/models/backbones_3d/vfe"),
    ("BACKBONE_3D", "backbone_3d", "pcdet/models/backbones_3d"),
    ("MAP_TO_BEV", "map_to_bev_module", "pcdet/models/backbones_2d/map_to_bev"),
    ("BACKBONE_2D", "backbone_2d", "pcdet/models/backbones_2d"),
    ("DENSE_HEAD", "dense_head", "pcdet/models/dense_heads"),
)


def load_reference_config(root: Path, config_relpath: str, overrides: dict | None = None) -> dict:
    """A model yaml of a pcdet checkout as OpenPCDet reads it, with ``overrides`` applied.

    ``DATA_CONFIG._BASE_CONFIG_`` (a path relative to the checkout's ``tools/``, where OpenPCDet
    runs) is read first and the model yaml's ``DATA_CONFIG`` merged over it key by key, nested
    dicts recursively, as pcdet's ``merge_new_config`` does.

    Args:
        root: the checkout.
        config_relpath: the yaml, relative to ``root`` (``tools/cfgs/...``).
        overrides: dotted keys to values (``{"MODEL.BACKBONE_3D.CHANNELS": [8, 8, 16, 16, 16]}``);
            every key but the last must exist; lists are indexed by number (``"A.B.0"``).

    Returns:
        plain nested dicts and lists.
    """
    root = Path(root)
    _missing(root, [config_relpath])
    cfg = yaml.safe_load((root / config_relpath).read_text())
    data = cfg.get("DATA_CONFIG", {})
    if "_BASE_CONFIG_" in data:
        base_path = root / "tools" / data["_BASE_CONFIG_"]
        if not base_path.is_file():
            raise FileNotFoundError(f"{config_relpath}: _BASE_CONFIG_ {base_path} does not exist")
        cfg["DATA_CONFIG"] = _merged(yaml.safe_load(base_path.read_text()), data)
    for dotted, value in (overrides or {}).items():
        *parents, last = dotted.split(".")
        node = cfg
        for part in parents:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError) as error:
                raise KeyError(f"override {dotted!r}: {config_relpath} has no {part!r} there") from error
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return cfg


def _merged(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _registry(root: Path, package_dir: str) -> dict[str, str]:
    """Registry name -> ``module:Class`` from a pcdet package ``__init__`` (its imports and its
    ``__all__`` dict), read with ``ast`` so the package (which imports compiled ops) never runs."""
    path = root / package_dir / "__init__.py"
    _missing(root, [f"{package_dir}/__init__.py"])
    package = package_dir.replace("/", ".")
    tree = ast.parse(path.read_text())
    origin: dict[str, str] = {}
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                origin[alias.asname or alias.name] = f"{package}.{node.module}:{alias.name}"
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Name):
                    names[key.value] = value.id
    return {name: origin[cls] for name, cls in names.items() if cls in origin}


def _stub_all_packages(root: Path) -> None:
    """Every package of the checkout's ``pcdet`` as an empty module with its path: submodules then
    import from their files by the ordinary machinery and no package ``__init__`` runs."""
    for init in sorted((root / "pcdet").rglob("__init__.py")):
        package = ".".join(init.parent.relative_to(root).parts)
        stub = types.ModuleType(package)
        stub.__path__ = [str(init.parent)]
        sys.modules[package] = stub


def _forget_pcdet() -> None:
    """Drop every loaded pcdet module, so the next checkout (OpenPCDet or the DSVT repository, both
    ``pcdet``) is loaded from its own files with fresh stubs. Classes built before keep working."""
    for name in [n for n in sys.modules if n == "pcdet" or n.startswith("pcdet.")]:
        del sys.modules[name]


def _overlap_from_iou(iou: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BEV intersection areas from IoU: inter = iou * (area_a + area_b) / (1 + iou)."""
    area_a, area_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    return iou * (area_a[:, None] + area_b[None, :]) / (1 + iou)


def nms_bev_greedy(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, pre_maxsize: int | None = None,
                   axis_aligned: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """Torch stand-in for OpenPCDet's compiled ``iou3d_nms_utils.nms_gpu`` (and ``nms_normal_gpu``).

    Its wrapper's steps: sort by score descending, keep the first ``pre_maxsize``, then greedily keep
    each box not yet suppressed and suppress every later box whose BEV IoU with it exceeds
    ``thresh``. Equal scores keep their input order (a stable sort): OpenPCDet's unstable CUDA sort
    leaves their order open, and untrained weights give many equal scores. IoU is :func:`voxsparse.ops.boxes.bev_iou` (exact, float64
    internally); the CUDA kernel clips polygons in float32 and counts corners up to 1 cm outside a box
    as inside, so pairs within rounding of ``thresh`` may be decided differently.

    Args:
        boxes: (N, >=7) boxes (x, y, z, dx, dy, dz, heading).
        scores: (N,) scores.
        thresh: IoU above which a lower-scored box is suppressed.
        axis_aligned: ``nms_normal_gpu``'s rule (headings ignored).

    Returns:
        (kept indices into ``boxes`` (K,) int64 in descending score, None), as ``nms_gpu`` returns.
    """
    from voxsparse.ops.boxes import bev_iou

    order = scores.sort(dim=0, descending=True, stable=True)[1]
    if pre_maxsize is not None:
        order = order[:pre_maxsize]
    candidates = boxes[order, :7].float()
    if axis_aligned:
        candidates = torch.cat([candidates[:, :6], torch.zeros_like(candidates[:, 6:7])], dim=1)
    over = (bev_iou(candidates, candidates) > thresh).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed[i + 1:] |= over[i, i + 1:]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)], None


def _iou3d_nms_utils_stub() -> dict:
    from voxsparse.ops import boxes as ops_boxes

    return {
        "nms_gpu": nms_bev_greedy,
        "nms_normal_gpu": lambda boxes, scores, thresh, **kw: nms_bev_greedy(boxes, scores, thresh, axis_aligned=True),
        "boxes_iou_bev": lambda a, b: ops_boxes.bev_iou(a, b),
        "boxes_iou3d_gpu": lambda a, b: ops_boxes.iou_3d(a, b),
        "boxes_aligned_iou3d_gpu": lambda a, b: ops_boxes.iou_3d_aligned(a, b).view(-1, 1),
        "paired_boxes_iou3d_gpu": lambda a, b: ops_boxes.iou_3d_aligned(a, b),
    }


def _boxes_overlap_bev_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """The compiled ``iou3d_nms_cuda.boxes_overlap_bev_gpu``: BEV intersection areas written into ``out``."""
    from voxsparse.ops.boxes import bev_iou

    out.copy_(_overlap_from_iou(bev_iou(a, b), a, b))


def _scatter_max(src: torch.Tensor, index: torch.Tensor, dim: int = 0):
    """``torch_scatter.scatter_max`` along dim 0 into ``index.max() + 1`` rows; no argmax (None)."""
    assert dim == 0
    rows = int(index.max()) + 1 if index.numel() else 0
    expanded = index.view(-1, *([1] * (src.ndim - 1))).expand_as(src)
    return src.new_zeros((rows, *src.shape[1:])).scatter_reduce(0, expanded, src, "amax", include_self=False), None


def _scatter_mean(src: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch_scatter.scatter_mean`` along dim 0 into ``index.max() + 1`` rows."""
    assert dim == 0
    rows = int(index.max()) + 1 if index.numel() else 0
    expanded = index.view(-1, *([1] * (src.ndim - 1))).expand_as(src)
    return src.new_zeros((rows, *src.shape[1:])).scatter_reduce(0, expanded, src, "mean", include_self=False)


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{what} is a compiled op that the reference harness does not provide")
    return fail


def _install_stubs() -> None:
    """Torch stand-ins for pcdet's compiled ops, and for third-party packages that are absent here
    and not on the detectors' paths (``SharedArray``) or replaceable (``numba.jit`` as identity,
    ``easydict``, ``torch_scatter``). Must follow :func:`_stub_all_packages`."""
    for name, attributes in (
        ("numba", {"jit": lambda *a, **k: (lambda f: f)}),
        ("easydict", {"EasyDict": lambda value=None, **kwargs: _attr_dict({**(value or {}), **kwargs})}),
        ("SharedArray", {}),
        ("torch_scatter", {"scatter_max": _scatter_max, "scatter_mean": _scatter_mean}),
    ):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            _stub_module(name, **attributes)
    _stub_module("pcdet.ops.iou3d_nms.iou3d_nms_utils", **_iou3d_nms_utils_stub())
    _stub_module("pcdet.ops.iou3d_nms.iou3d_nms_cuda", boxes_overlap_bev_gpu=_boxes_overlap_bev_into)
    _stub_module("pcdet.ops.ingroup_inds.ingroup_inds_op", ingroup_inds=ingroup_indices)
    _stub_module("pcdet.ops.roiaware_pool3d.roiaware_pool3d_utils",
                 points_in_boxes_cpu=_unavailable("roiaware_pool3d"), points_in_boxes_gpu=_unavailable("roiaware_pool3d"))
    _stub_module("pcdet.models.model_utils.tensorrt_utils.trtwrapper", TRTWrapper=_unavailable("TensorRT"))
    _stub_module("pcdet.ops.ioubev_nms.ioubev_nms_utils", nms_gpu_bev=_unavailable("ioubev_nms"))


#: NumPy aliases removed in NumPy 1.24 that the DSVT repository still uses (``np.int``).
_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool}


@contextmanager
def _reference_patches(device: torch.device):
    """What the reference needs while it builds or runs, undone afterwards.

    ``Tensor.cuda()`` moves to ``device``: its modules place constants with ``.cuda()`` (heads,
    dynamic VFEs, losses), which fails on a CPU-only torch. NumPy's removed aliases ``np.int``,
    ``np.float``, ``np.bool`` are the builtins they stood for.
    """
    original = torch.Tensor.cuda
    added = [name for name in _NUMPY_ALIASES if name not in np.__dict__]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)
    for name in added:
        setattr(np, name, _NUMPY_ALIASES[name])
    try:
        yield
    finally:
        torch.Tensor.cuda = original
        for name in added:
            delattr(np, name)


def _plain(value):
    """A stage output as plain data: spconv tensors become their features, indices and shape;
    tensors are detached copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if hasattr(value, "features") and hasattr(value, "indices") and hasattr(value, "spatial_shape"):
        return {"features": value.features.detach().clone(), "indices": value.indices.detach().clone(),
                "spatial_shape": list(value.spatial_shape)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class ReferenceOutput:
    """What one batch did in the reference detector.

    Attributes:
        stages: per part (``vfe``, ``backbone_3d``, ``map_to_bev_module``, ``backbone_2d``,
            ``dense_head``, those present) the batch-dict entries it added or replaced, as plain data
            (spconv tensors as ``{"features", "indices", "spatial_shape"}``); ``dense_head`` also
            holds its ``forward_ret_dict`` (per-group predictions, targets in training) under
            ``"forward_ret_dict"``. ``"input"`` holds the batch dict the first part received.
        final_box_dicts: eval mode: one dict per frame, ``pred_boxes`` (K, 7|9), ``pred_scores``
            (K,), ``pred_labels`` (K,) 1-based in the config's class order; None in training.
        loss: training with boxes: the dense head's total loss (scalar tensor, with its graph).
        tb_dict: the head's named loss terms (floats or tensors) beside it.
    """

    stages: dict[str, dict]
    final_box_dicts: list[dict] | None = None
    loss: torch.Tensor | None = None
    tb_dict: dict | None = None


class ReferenceDetector(nn.Module):
    """A detector of a pcdet checkout (OpenPCDet, or the DSVT repository of the same layout) built
    from its model yaml, run from raw points as OpenPCDet's dataset, collate and model would.

    Built by :func:`build_reference`. Its children carry OpenPCDet's names (``vfe``,
    ``backbone_3d``, ``map_to_bev_module``, ``backbone_2d``, ``dense_head``) and it has OpenPCDet's
    ``global_step`` buffer, so ``state_dict()`` has the keys of an OpenPCDet checkpoint's
    ``model_state``.

    The input path, per frame: points outside the range dropped as the config's
    ``mask_points_and_boxes_outside_range`` does (x and y only, both ends inclusive, unless
    ``MASK_Z``), boxes outside dropped in training (their centres, unless configured otherwise); no
    shuffling (the points are taken in the order given; shuffle them beforehand to reproduce
    OpenPCDet's data loader); then ``transform_points_to_voxels`` with spconv's ``PointToVoxel``
    (float32, ``MAX_POINTS_PER_VOXEL`` first points of each voxel, ``MAX_NUMBER_OF_VOXELS`` of the
    mode) or, for ``transform_points_to_voxels_placeholder``, the points alone for a dynamic VFE.
    Frames are collated as OpenPCDet's ``collate_batch`` does (batch index prepended to points and
    voxel coordinates, boxes zero-padded to the largest count) and every array becomes float32 on
    the device, as its ``load_data_to_gpu`` does.

    Patched to run without OpenPCDet's build: see :func:`build_reference`.
    """

    def __init__(self, root: Path, cfg: dict, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        self.class_names = list(cfg["CLASS_NAMES"])
        data = cfg["DATA_CONFIG"]
        self.point_cloud_range = np.array(data["POINT_CLOUD_RANGE"], dtype=np.float32)
        self.num_point_features = len(data["POINT_FEATURE_ENCODING"]["used_feature_list"])
        self.processors = {p["NAME"]: p for p in data["DATA_PROCESSOR"]}
        voxel_step = self.processors.get("transform_points_to_voxels") \
            or self.processors.get("transform_points_to_voxels_placeholder")
        if voxel_step is None:
            raise ValueError("the config's DATA_PROCESSOR has no transform_points_to_voxels(_placeholder)")
        self.voxel_size = list(voxel_step["VOXEL_SIZE"])
        self.grid_size = np.round((self.point_cloud_range[3:6] - self.point_cloud_range[0:3])
                                  / np.array(self.voxel_size)).astype(np.int64)
        self.register_buffer("global_step", torch.zeros(1, dtype=torch.int64))
        self._voxelizers: dict = {}

        model = _attr_dict(cfg["MODEL"])
        info = {"num_point_features": self.num_point_features}
        self.part_names: list[str] = []
        for section, attribute, package_dir in REFERENCE_PARTS:
            if model.get(section) is None:
                setattr(self, attribute, None)
                continue
            registry = _registry(root, package_dir)
            name = model[section]["NAME"]
            if name not in registry:
                raise KeyError(f"{section}.NAME {name!r} is not in {package_dir}/__init__.py's __all__")
            module_name, class_name = registry[name].split(":")
            module = importlib.import_module(module_name)
            _repair_dsvt_pooling_mask(module)
            cls = getattr(module, class_name)
            setattr(self, attribute, self._build_part(section, cls, model[section], info))
            self.part_names.append(attribute)
        self.module_list = [getattr(self, name) for name in self.part_names]
        self.to(self.device)

    def _build_part(self, section: str, cls: type, part_cfg, info: dict) -> nn.Module:
        """One part with the arguments OpenPCDet's ``Detector3DTemplate.build_*`` passes it."""
        common = {"grid_size": self.grid_size, "voxel_size": self.voxel_size,
                  "point_cloud_range": self.point_cloud_range}
        if section == "VFE":
            module = cls(model_cfg=part_cfg, num_point_features=self.num_point_features,
                         depth_downsample_factor=None, **common)
            info["num_point_features"] = module.get_output_feature_dim()
        elif section == "BACKBONE_3D":
            module = cls(model_cfg=part_cfg, input_channels=info["num_point_features"], **common)
            info["num_point_features"] = module.num_point_features
        elif section == "MAP_TO_BEV":
            module = cls(model_cfg=part_cfg, grid_size=self.grid_size)
            info["num_bev_features"] = module.num_bev_features
        elif section == "BACKBONE_2D":
            module = cls(model_cfg=part_cfg, input_channels=info.get("num_bev_features"))
            info["num_bev_features"] = module.num_bev_features
        else:
            module = cls(model_cfg=part_cfg, input_channels=info.get("num_bev_features", part_cfg.get("INPUT_FEATURES")),
                         num_class=1 if part_cfg.get("CLASS_AGNOSTIC") else len(self.class_names),
                         class_names=self.class_names, predict_boxes_when_training=False, **common)
        return module

    def batch(self, points, gt_boxes=None) -> dict:
        """OpenPCDet's batch dict for frames of points (and boxes in training).

        Args:
            points: one frame (N, C) or a list of frames; C = the config's ``used_feature_list``
                (x, y, z first); tensors or arrays.
            gt_boxes: None, or per frame (K, 8 | 10) boxes (x, y, z, dx, dy, dz, heading[, vx, vy],
                label) with labels 1-based in ``class_names`` order.
        """
        frames = [points] if isinstance(points, (torch.Tensor, np.ndarray)) else list(points)
        boxes = [gt_boxes] if isinstance(gt_boxes, (torch.Tensor, np.ndarray)) else gt_boxes
        if boxes is not None and len(boxes) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(boxes)} box arrays")
        mode = "train" if self.training else "test"
        pc_range = self.point_cloud_range
        mask_cfg = self.processors.get("mask_points_and_boxes_outside_range")
        common_utils = importlib.import_module("pcdet.utils.common_utils")
        box_utils = importlib.import_module("pcdet.utils.box_utils")
        voxel_cfg = self.processors.get("transform_points_to_voxels")
        collated = {"points": [], "voxels": [], "voxel_num_points": [], "voxel_coords": [], "gt_boxes": []}
        for index, frame in enumerate(frames):
            frame = np.asarray(torch.as_tensor(frame).cpu(), dtype=np.float32)
            if frame.ndim != 2 or frame.shape[1] != self.num_point_features:
                raise ValueError(f"frame {index}: points must be (N, {self.num_point_features}), got {frame.shape}")
            frame_boxes = None if boxes is None else np.asarray(torch.as_tensor(boxes[index]).cpu(), dtype=np.float32)
            if mask_cfg is not None:
                by_range = common_utils.mask_points_by_range_v2 if mask_cfg.get("MASK_Z") \
                    else common_utils.mask_points_by_range
                frame = frame[by_range(frame, pc_range)]
                if frame_boxes is not None and mask_cfg.get("REMOVE_OUTSIDE_BOXES") and self.training:
                    frame_boxes = frame_boxes[box_utils.mask_boxes_outside_range_numpy(
                        frame_boxes, pc_range, min_num_corners=mask_cfg.get("min_num_corners", 1),
                        use_center_to_filter=mask_cfg.get("USE_CENTER_TO_FILTER", True))]
            collated["points"].append(np.pad(frame, ((0, 0), (1, 0)), constant_values=index))
            if voxel_cfg is not None:
                voxels, coords, counts = self._voxelize(frame, voxel_cfg, mode)
                collated["voxels"].append(voxels)
                collated["voxel_num_points"].append(counts)
                collated["voxel_coords"].append(np.pad(coords, ((0, 0), (1, 0)), constant_values=index))
            if frame_boxes is not None:
                collated["gt_boxes"].append(frame_boxes)
        batch = {"batch_size": len(frames)}
        for key, arrays in collated.items():
            if not arrays:
                continue
            if key == "gt_boxes":
                stacked = np.zeros((len(arrays), max(1, max(len(a) for a in arrays)), arrays[0].shape[1]), np.float32)
                for i, a in enumerate(arrays):
                    stacked[i, :len(a)] = a
            else:
                stacked = np.concatenate(arrays, axis=0)
            batch[key] = torch.from_numpy(stacked).float().to(self.device)
        return batch

    def _voxelize(self, points: np.ndarray, voxel_cfg: dict, mode: str):
        from spconv.pytorch.utils import PointToVoxel

        # One voxelizer per mode, made on first use: on the CPU it allocates a table of every cell.
        if mode not in self._voxelizers:
            self._voxelizers[mode] = PointToVoxel(
                vsize_xyz=self.voxel_size, coors_range_xyz=self.point_cloud_range.tolist(),
                num_point_features=self.num_point_features, max_num_voxels=voxel_cfg["MAX_NUMBER_OF_VOXELS"][mode],
                max_num_points_per_voxel=voxel_cfg["MAX_POINTS_PER_VOXEL"], device=torch.device("cpu"),
            )
        # On the CPU, as OpenPCDet's data loader runs it: there a voxel keeps its first points in
        # order; spconv's CUDA version keeps whichever its atomics let in first.
        voxels, coords, counts = self._voxelizers[mode](torch.from_numpy(points))
        return voxels.cpu().numpy(), coords.cpu().numpy(), counts.cpu().numpy()

    def forward(self, points, gt_boxes=None) -> ReferenceOutput:
        """Run the parts in order on frames of points (see :meth:`batch`), keeping every stage.

        In training mode ``gt_boxes`` are required and the dense head's ``get_loss()`` (or the loss
        it leaves in the batch dict, TransFusion's way) is returned; in eval mode the decoded boxes.
        """
        if self.training and gt_boxes is None:
            raise ValueError("training mode needs gt_boxes (the losses are computed from them)")
        batch = self.batch(points, gt_boxes)
        stages = {"input": _plain(batch)}
        with _reference_patches(self.device):
            for name, module in zip(self.part_names, self.module_list):
                before = dict(batch)
                batch = module(batch)
                stages[name] = {k: _plain(v) for k, v in batch.items()
                                if k not in before or v is not before[k]}
                if name == "dense_head" and hasattr(module, "forward_ret_dict"):
                    stages[name]["forward_ret_dict"] = _plain(module.forward_ret_dict)
            output = ReferenceOutput(stages, final_box_dicts=batch.get("final_box_dicts"))
            if self.training:
                if "loss" in batch:
                    output.loss, output.tb_dict = batch["loss"], batch.get("tb_dict")
                else:
                    output.loss, output.tb_dict = self.dense_head.get_loss()
        return output


def build_reference(root: Path, config_relpath: str, overrides: dict | None = None,
                    device: torch.device | str = "cpu") -> ReferenceDetector:
    """A reference detector from ``root/config_relpath`` (:class:`ReferenceDetector`).

    Only the source files its parts need are executed, by path: each part's class is looked up in
    its package's ``__init__`` (read with ``ast``), its module imported under stub packages (no
    pcdet ``__init__`` runs) and its own imports follow from the checkout's files. What is replaced,
    and only here:

    - compiled ``iou3d_nms``: NMS by :func:`nms_bev_greedy`, IoUs by :mod:`voxsparse.ops.boxes`;
    - compiled ``ingroup_inds``: :func:`ingroup_indices`; ``roiaware_pool3d`` and TensorRT: absent
      (raise if called; not on these detectors' paths), as is the DSVT repository's ``ioubev_nms``;
    - DSVT's pooling mask cast to bool (:func:`_repair_dsvt_pooling_mask`, behaviour-preserving);
    - absent third-party packages: ``numba.jit`` (identity: pure Python), ``easydict`` (a dict with
      attribute access), ``torch_scatter`` (``scatter_max`` / ``scatter_mean`` by ``scatter_reduce``),
      ``SharedArray`` (empty);

    Every pcdet module loaded before is forgotten first, so OpenPCDet and the DSVT repository (both
    ``pcdet``) can be built one after the other in one process.

    Args:
        root: the checkout.
        config_relpath: its model yaml, relative to ``root``.
        overrides: dotted yaml keys -> values (see :func:`load_reference_config`).
        device: where the model and its inputs live.

    Returns:
        the detector in training mode (as ``nn.Module`` s start), random weights.
    """
    root = Path(root)
    cfg = load_reference_config(root, config_relpath, overrides)
    _forget_pcdet()
    _stub_all_packages(root)
    _install_stubs()
    device = torch.device(device)
    with _reference_patches(device):
        return ReferenceDetector(root, cfg, device)
