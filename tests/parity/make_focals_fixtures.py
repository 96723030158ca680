"""Write the Focals Conv parity fixtures of tests/parity/fixtures/ from an OpenPCDet checkout (8caccce).

    python -m tests.parity.make_focals_fixtures --openpcdet /path/to/OpenPCDet

``focals_layer.pt``: OpenPCDet's ``FocalSparseConv`` (``backbones_3d/focal_sparse_conv/``) in three
settings (the backbone's: top half, 3x3x3; above a threshold with ``MASK_MULTI`` and an enlarged
importance branch; top 55 %, 5x5x5, ``SKIP_MASK_KERNEL``), random weights and BatchNorm statistics,
on a random two-frame sparse tensor with boxes: per setting its state dict, the eval-mode output
(features and indices), and in training mode the output, the importance loss and the gradients of
``loss + sum(output * probe)`` for the input features and every parameter (``probe`` normal, drawn
from ``probe_seed`` in the shape of the output with its rows ordered by (b, z, y, x)).

``focals_centerpoint_nuscenes.pt``: OpenPCDet's CenterPoint (``cbgs_voxel0075_res3d_centerpoint.yaml``)
with ``BACKBONE_3D.NAME: VoxelBackBone8xFocal``, reduced as ``centerpoint_nuscenes``'s fixture
(``voxsparse.benchmark.parity.REFERENCE_CONFIGS``), in the layout of tests/parity/make_fixtures.py;
its training loss is the head's plus the backbone's importance loss (``forward_ret_dict
["loss_box_of_pts"]``), the sum the Focals Conv authors train CenterPoint with.

The reference runs as ``voxsparse.benchmark.openpcdet.build_reference`` loads it, plus two stand-ins
made here: ``torchvision`` (absent here; imported by the camera branch, which ``USE_IMG: False``
never builds) as an empty module, and roiaware's compiled ``points_in_boxes_gpu`` as
:func:`points_in_boxes_gpu` (torch, the kernel's rule). Inputs keep every voxel away from index 0 in
y and x (see ``voxsparse.models.backbones.focal``: the reference's duplicate merge is exact there).
The whole model is also run through voxsparse before writing and must match. The reference layer
fails (spconv refuses its float indices) on a frame whose dilated voxels hold no duplicate at all;
the layer cases dilate enough to have some.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tests.parity.make_fixtures import MAX_BYTES, POINTS, fixture_entry, pack, quantize_large_weights
from voxsparse.benchmark.openpcdet import _reference_patches, build_reference
from voxsparse.benchmark.parity import (
    REFERENCE_CONFIGS,
    ParityInput,
    compare_to_record,
    parity_input,
    randomize_batchnorm,
    reference_record,
    shrink_rows,
)
from voxsparse.convert.openpcdet import model_config, model_from_config, openpcdet_to_ours
from voxsparse.ops.sparse_backend import SparseConvTensor

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FOCAL_MODULE = "pcdet.models.backbones_3d.focal_sparse_conv.focal_sparse_conv"
CONFIG = "centerpoint_focals_nuscenes"
YAML = REFERENCE_CONFIGS["centerpoint_nuscenes"].yaml
REDUCED = {**REFERENCE_CONFIGS["centerpoint_nuscenes"].reduced, "MODEL.BACKBONE_3D.NAME": "VoxelBackBone8xFocal"}
OURS_REDUCED = REFERENCE_CONFIGS["centerpoint_nuscenes"].ours_reduced
#: Points closer than this to the range's low x or y edge are dropped (16 voxels of 0.075 m): no
#: voxel of any stage gets index 0 there.
EDGE_MARGIN = 1.2
#: The layer cases: name -> FocalSparseConv keyword arguments (OpenPCDet's names).
LAYER_CASES = {
    "backbone_default": dict(topk=True, threshold=0.5, kernel_size=3, padding=1),
    "threshold_mask_multi_enlarge": dict(topk=False, threshold=0.5, kernel_size=3, padding=1, mask_multi=True,
                                         enlarge_voxel_channels=8),
    "top55_kernel5_skip_mask": dict(topk=True, threshold=0.55, kernel_size=5, padding=2, skip_mask_kernel=True),
}
#: The layer input: two frames on a (z, y, x) grid at voxel stride 2, 8 channels in, 16 out.
LAYER_SHAPE = (10, 36, 36)
LAYER_VOXELS = 250
LAYER_STRIDE = 2
LAYER_CHANNELS = (8, 8)


def points_in_boxes_gpu(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Stand-in for roiaware's compiled ``points_in_boxes_gpu``: (B, M, 3) points and (B, T, >=7)
    boxes to (B, M) int32, the first box holding each point or -1.

    The kernel's test, in float32: the offset from the centre rotated by ``-heading``; inside when
    ``|dz| <= dz / 2.0`` and ``|local x| < dx / 2.0 + 1e-5``, ``|local y| < dy / 2.0 + 1e-5`` (the
    right-hand sides in double, as C promotes them). Its wrapper asserts 7 box columns; FocalSparseConv
    hands it every column but the label, so nuScenes boxes (with velocity) would stop it there: the
    first 7 are used.
    """
    points, boxes = points.float(), boxes[..., :7].float()
    margin = torch.tensor(1e-5, dtype=torch.float32).double()
    out = torch.full(points.shape[:2], -1, dtype=torch.int32, device=points.device)
    for b in range(points.shape[0]):
        for k in reversed(range(boxes.shape[1])):  # the lowest index holding a point wins
            box = boxes[b, k]
            shift = points[b] - box[:3]
            cosa, sina = torch.cos(-box[6]), torch.sin(-box[6])
            local_x = shift[:, 0] * cosa + shift[:, 1] * -sina
            local_y = shift[:, 0] * sina + shift[:, 1] * cosa
            inside = (shift[:, 2].abs().double() <= box[5].double() / 2.0) \
                & (local_x.abs().double() < box[3].double() / 2.0 + margin) \
                & (local_y.abs().double() < box[4].double() / 2.0 + margin)
            out[b, inside] = k
    return out


@contextmanager
def without_torchvision():
    """An empty ``torchvision`` while the reference loads, where none is installed."""
    stub = importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules
    if stub:
        sys.modules["torchvision"] = types.ModuleType("torchvision")
    try:
        yield
    finally:
        if stub:
            del sys.modules["torchvision"]


def build_focal_reference(root: Path, overrides: dict, seed: int):
    """The reduced reference detector with the focal backbone, random weights (seeded), and its
    ``focal_sparse_conv`` module with :func:`points_in_boxes_gpu` in place of the compiled op."""
    torch.manual_seed(seed)
    with without_torchvision():
        reference = build_reference(root, YAML, overrides)
    module = sys.modules[FOCAL_MODULE]
    module.points_in_boxes_gpu = points_in_boxes_gpu
    return reference, module


# --- one layer --------------------------------------------------------------------------------


def layer_input(seed: int) -> dict:
    """Two frames of unique voxels (y, x >= 1), features, and boxes around them (KITTI's placement,
    which the reference layer uses: x = 0.05 * 2 * ix, y = -40 + 0.1 * iy, z = -3 + 0.2 * iz)."""
    gen = torch.Generator().manual_seed(seed)
    z, y, x = LAYER_SHAPE
    frames = []
    for b in range(2):
        cells = torch.stack([torch.randint(0, z, (LAYER_VOXELS,), generator=gen),
                             torch.randint(1, y, (LAYER_VOXELS,), generator=gen),
                             torch.randint(1, x, (LAYER_VOXELS,), generator=gen)], 1)
        cells = torch.unique(cells, dim=0)
        frames.append(torch.cat([torch.full((len(cells), 1), b), cells], 1))
    indices = torch.cat(frames).int()
    features = torch.randn(len(indices), LAYER_CHANNELS[0], generator=gen)
    size = torch.tensor([0.05, 0.05, 0.1]) * LAYER_STRIDE
    low, high = torch.tensor([0.0, -40.0, -3.0]), torch.tensor([0.0, -40.0, -3.0]) + size * torch.tensor([x, y, z])
    boxes = torch.zeros(2, 4, 8)
    for b, count in ((0, 4), (1, 3)):  # frame 1 has a zero-padded row, as OpenPCDet's collate leaves it
        centre = low + (high - low) * torch.rand(count, 3, generator=gen)
        dims = torch.tensor([1.2, 0.9, 0.8]) + torch.rand(count, 3, generator=gen)
        heading = (torch.rand(count, 1, generator=gen) * 2 - 1) * torch.pi
        boxes[b, :count] = torch.cat([centre, dims, heading, torch.ones(count, 1)], 1)
    return {"indices": indices, "features": features, "gt_boxes": boxes, "spatial_shape": list(LAYER_SHAPE)}


def sorted_rows(indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ordered by (b, z, y, x)."""
    idx = indices.long()
    order = ((idx[:, 0] * 1024 + idx[:, 1]) * 1024 + idx[:, 2]) * 1024 + idx[:, 3]
    order = order.argsort()
    return indices[order].int(), features[order]


def layer_case(module: types.ModuleType, options: dict, inputs: dict, seed: int) -> dict:
    """One reference layer: its state, eval output, training output, loss and gradients."""
    torch.manual_seed(seed)
    norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
    with _reference_patches(torch.device("cpu")):
        layer = module.FocalSparseConv(*LAYER_CHANNELS, voxel_stride=LAYER_STRIDE, norm_fn=norm_fn,
                                       indice_key="focal", **options)
    randomize_batchnorm(layer, seed)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    batch_dict = {"batch_size": 2, "gt_boxes": inputs["gt_boxes"]}

    def run(features):
        x = SparseConvTensor(features, inputs["indices"], inputs["spatial_shape"], 2)
        with _reference_patches(torch.device("cpu")):
            return layer(x, batch_dict)

    layer.eval()
    with torch.no_grad():
        out, _, _ = run(inputs["features"].clone())
    eval_indices, eval_features = sorted_rows(out.indices, out.features)

    layer.train()
    features = inputs["features"].clone().requires_grad_(True)
    out, _, loss = run(features)
    train_indices, order_features = sorted_rows(out.indices, out.features)
    probe = torch.randn(order_features.shape, generator=torch.Generator().manual_seed(seed))
    (loss + (order_features * probe).sum()).backward()
    print(f"{options}: {len(inputs['indices'])} -> {len(eval_indices)} voxels (eval), {len(train_indices)} (training)")
    return {
        "options": options,
        "state": state,
        "eval": {"indices": eval_indices, "features": eval_features.detach()},
        "train": {"indices": train_indices, "features": order_features.detach(), "loss": float(loss.detach()),
                  "probe_seed": seed, "input_grad": features.grad.clone(),
                  "grads": {n: p.grad.clone() for n, p in layer.named_parameters()}},
    }


def make_layer_fixture(module: types.ModuleType, seed: int = 0) -> dict:
    inputs = layer_input(seed)
    cases = {name: layer_case(module, options, inputs, seed + i) for i, (name, options) in enumerate(LAYER_CASES.items())}
    return {"reference": f"OpenPCDet {FOCAL_MODULE.replace('.', '/')}.py", "voxel_stride": LAYER_STRIDE,
            "channels": list(LAYER_CHANNELS), "input": inputs, "cases": cases}


# --- the whole detector -------------------------------------------------------------------------


def away_from_low_edges(inputs: ParityInput, point_cloud_range) -> ParityInput:
    """``inputs`` without the points within :data:`EDGE_MARGIN` of the range's low x and y edges."""
    keep = (inputs.points[:, 0] >= point_cloud_range[0] + EDGE_MARGIN) \
        & (inputs.points[:, 1] >= point_cloud_range[1] + EDGE_MARGIN)
    return ParityInput(inputs.points[keep], inputs.reference_points[keep], inputs.gt_boxes, inputs.annotations)


def make_model_fixture(root: Path, seed: int = 0) -> dict:
    reference, _ = build_focal_reference(root, REDUCED, seed)
    randomize_batchnorm(reference, seed)
    quantize_large_weights(reference, seed)
    reference.eval()
    model = model_from_config(model_config(CONFIG, None, OURS_REDUCED))
    state, report = openpcdet_to_ours(model, reference.state_dict())
    assert not report.unmapped and not report.missing, report.summary()
    model.load_state_dict(state)
    inputs = parity_input(model, reference, seed=seed, max_points=POINTS)
    inputs = away_from_low_edges(inputs, [float(v) for v in reference.point_cloud_range])
    reference_state = pack(reference.state_dict())  # before training mode moves its BatchNorm statistics
    record = reference_record(reference, inputs)
    importance = float(reference.backbone_3d.forward_ret_dict["loss_box_of_pts"])  # of the training forward
    record["loss"] += importance
    record["loss_terms"]["loss_box_of_pts"] = importance
    result = compare_to_record(model, inputs, record)
    print(result.table())
    if not result.ok(1e-4):
        raise SystemExit("voxsparse does not match the reference on this input: no fixture written")
    record["stages"] = {k: shrink_rows(v, samples=192, seed=seed) for k, v in record["stages"].items()}
    return fixture_entry(CONFIG, OURS_REDUCED, f"OpenPCDet {YAML} with BACKBONE_3D VoxelBackBone8xFocal", REDUCED,
                         reference_state, inputs, record)


def _save(fixture: dict, name: str) -> None:
    path = FIXTURES / name
    torch.save(fixture, path)
    size = path.stat().st_size
    print(f"{path}: {size / 1e6:.2f} MB")
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is larger than {MAX_BYTES} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--openpcdet", type=Path, required=True, help="OpenPCDet checkout (8caccce)")
    parser.add_argument("--only", choices=("layer", "model"), help="write one of the two fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    FIXTURES.mkdir(exist_ok=True)
    if args.only in (None, "layer"):
        _, module = build_focal_reference(args.openpcdet, REDUCED, 0)
        _save(make_layer_fixture(module), "focals_layer.pt")
    if args.only in (None, "model"):
        _save(make_model_fixture(args.openpcdet), "focals_centerpoint_nuscenes.pt")


if __name__ == "__main__":
    main()
