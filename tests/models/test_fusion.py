"""The optimised inference paths equal the plain eval-mode model: fused (BatchNorm folded into sparse
convs, ReLU in spconv's epilogue) and index-first (each stage's index pairs, then its feature kernels)."""

import functools

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from voxsparse.data.synthetic import LidarConfig, generate_frame
from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.fusion import fuse_for_inference
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.ops.sparse_utils import linear_keys
from voxsparse.structures import PointBatch, VoxelGrid

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
RANGE = (-24.0, -24.0, -3.0, 24.0, 24.0, 2.0)


def _model() -> SparseDetector:
    torch.manual_seed(0)
    model = SparseDetector(
        MeanVFE(VoxelGrid((0.2, 0.2, 0.25), RANGE), in_channels=4),
        functools.partial(VoxelNeXtBackbone, channels=(16, 32, 32, 32), blocks=(1, 2, 1, 1), bev_stage=2,
                          out_channels=32),
        functools.partial(VoxelNeXtHead, head_channels=32, num_convs=1),
        ("Vehicle", "Pedestrian", "Cyclist"),
    )
    # Non-trivial BatchNorm statistics and affine parameters, as after training.
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def _points() -> PointBatch:
    cloud = torch.from_numpy(generate_frame(3, lidar=LidarConfig(beams=32)).points)
    return PointBatch.from_frames([cloud, cloud[::2].clone()])


def test_fused_model_has_no_batch_norm_left_and_original_is_untouched():
    model = _model()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, _BatchNorm) for m in fused.backbone.modules())
    assert not any(isinstance(m, _BatchNorm) for m in fused.head.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.backbone.modules())
    assert not fused.training


@pytest.mark.skipif(torch.cuda.is_available(), reason="spconv's CUDA wheel runs these convs on CUDA only")
def test_fused_predictions_equal_unfused():
    model = _model()
    fused = fuse_for_inference(model)
    points = _points()
    with torch.no_grad():
        ref, out = model(points), fused(points)
        bev_ref = model.backbone(model.voxel_encoder(points))
        bev_out = fused.backbone(fused.voxel_encoder(points))
    assert torch.equal(bev_ref.coords, bev_out.coords)
    scale = bev_ref.features.abs().max()
    torch.testing.assert_close(bev_out.features, bev_ref.features, atol=1e-4 * scale, rtol=1e-4)
    for name in ref.__dataclass_fields__:
        a, b = getattr(ref, name), getattr(out, name)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3, msg=name)


def _sorted(bev):
    # spconv's CUDA index generation lists output voxels in a run-dependent order.
    order = torch.argsort(linear_keys(bev.coords, (bev.batch_size, *bev.spatial_shape)))
    return bev.coords[order], bev.features[order]


@requires_cuda
def test_fused_epilogue_equals_unfused_on_cuda():
    model = _model().cuda()
    fused = fuse_for_inference(model)
    points = _points().to("cuda")
    assert any(m.bias is not None for m in fused.backbone.modules() if hasattr(m, "act_type"))
    with torch.no_grad():
        coords_ref, feats_ref = _sorted(model.backbone(model.voxel_encoder(points)))
        coords_out, feats_out = _sorted(fused.backbone(fused.voxel_encoder(points)))
    assert torch.equal(coords_ref, coords_out)
    scale = feats_ref.abs().max()
    torch.testing.assert_close(feats_out, feats_ref, atol=1e-4 * scale, rtol=1e-4)


def _layer_by_layer(backbone, voxels):
    with backbone.layer_by_layer():
        return backbone(voxels)


def _check_index_first(device: str) -> None:
    model = _model().to(device)
    points = _points().to(device)
    with torch.no_grad():
        voxels = model.voxel_encoder(points)
        coords_ref, feats_ref = _sorted(_layer_by_layer(model.backbone, voxels))
        for net in (model, fuse_for_inference(model)):
            coords, feats = _sorted(net.backbone(voxels))
            assert torch.equal(coords, coords_ref)
            scale = feats_ref.abs().max()
            torch.testing.assert_close(feats, feats_ref, atol=1e-5 * scale, rtol=1e-5)
        # The unfused model runs the very same kernels in both orders: bit-identical.
        if device == "cpu":
            assert torch.equal(_sorted(model.backbone(voxels))[1], feats_ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="spconv's CUDA wheel runs these convs on CUDA only")
def test_index_first_equals_layer_by_layer_on_cpu():
    _check_index_first("cpu")


@requires_cuda
def test_index_first_equals_layer_by_layer_on_cuda():
    _check_index_first("cuda")


def _check_index_first_training(device: str) -> None:
    """Same gradients (BatchNorm in training mode, batch statistics)."""
    model = _model().to(device).train()
    voxels = model.voxel_encoder(_points().to(device))
    grads = []
    for index_first in (False, True):
        model.backbone.index_first = index_first
        model.zero_grad()
        bev = model.backbone(voxels)
        (bev.features * torch.linspace(-1, 1, bev.features.shape[1], device=device)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5 * g.abs().max(), rtol=1e-5, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="spconv's CUDA wheel runs these convs on CUDA only")
def test_index_first_training_equals_layer_by_layer_on_cpu():
    _check_index_first_training("cpu")


@requires_cuda
def test_index_first_training_equals_layer_by_layer_on_cuda():
    _check_index_first_training("cuda")
