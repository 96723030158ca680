import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from voxsparse.ops.sparse_backend import BACKEND_NAME, SparseConvTensor, large_kernel_options, spnn


def _random_sparse(seed: int, size: int, count: int, channels: int):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(size**3, generator=gen)[:count]
    z, y, x = flat // (size * size), (flat // size) % size, flat % size
    coords = torch.stack([torch.zeros_like(z), z, y, x], dim=1).int()
    feats = torch.randn(count, channels, generator=gen)
    return coords, feats


def _dense(coords, feats, size):
    dense = torch.zeros(1, feats.shape[1], size, size, size, dtype=torch.float64)
    dense[0, :, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()] = feats.double().T
    return dense


def _weight_oidhw(conv) -> torch.Tensor:
    # spconv 2 stores (out, kz, ky, kx, in); conv3d wants (out, in, kz, ky, kx).
    return conv.weight.detach().double().permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subm_conv_matches_dense_reference_with_two_threads(seed):
    # 6,000 voxels in 32^3, 16 -> 32 channels: with two threads unpatched spconv errs by ~0.5 here.
    assert torch.get_num_threads() == 2
    size = 32
    coords, feats = _random_sparse(seed, size, 6000, 16)
    feats.requires_grad_(True)
    conv = spnn.SubMConv3d(16, 32, 3, padding=1, bias=False)
    out = conv(SparseConvTensor(feats, coords, [size] * 3, 1))
    grad_out = torch.randn_like(out.features)
    (out.features * grad_out).sum().backward()

    dense_in = _dense(coords, feats.detach(), size).requires_grad_(True)
    weight = _weight_oidhw(conv).requires_grad_(True)
    z, y, x = (coords[:, i].long() for i in (1, 2, 3))
    ref_at_sites = F.conv3d(dense_in, weight, padding=1)[0, :, z, y, x].T
    (ref_at_sites * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.features.double(), ref_at_sites, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats.grad.double(), dense_in.grad[0, :, z, y, x].T, atol=1e-4, rtol=1e-4)
    weight_grad = conv.weight.grad.double().permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(weight_grad, weight.grad, atol=1e-3, rtol=1e-4)
    assert torch.get_num_threads() == 2, "the backend must restore the thread count"


@pytest.mark.parametrize("subm,act", [(True, "none"), (False, "none"), (True, "relu")])
def test_eval_mode_bias_and_activation_on_cpu(subm, act):
    """spconv's CPU kernel refuses a fused bias / activation (eval mode); the backend adds them after."""
    import cumm.tensorview as tv

    size = 12
    coords, feats = _random_sparse(3, size, 300, 4)
    cls = spnn.SubMConv3d if subm else spnn.SparseConv3d
    conv = cls(4, 6, 3, padding=1, bias=True).eval()
    torch.nn.init.normal_(conv.bias)
    if act == "relu":
        conv.act_type = tv.gemm.Activation.ReLU
    out = conv(SparseConvTensor(feats, coords, [size] * 3, 1))
    dense = F.conv3d(_dense(coords, feats, size), _weight_oidhw(conv), conv.bias.detach().double(), padding=1)
    if act == "relu":
        dense = dense.relu()
    z, y, x = (out.indices[:, i].long() for i in (1, 2, 3))
    torch.testing.assert_close(out.features.double(), dense[0, :, z, y, x].T, atol=1e-5, rtol=1e-5)


def test_strided_conv_forward_and_backward_on_cpu():
    # Backward of a strided conv used to raise "Torch not compiled with CUDA enabled" on CPU torch.
    size = 16
    coords, feats = _random_sparse(3, size, 800, 4)
    feats = feats.double().requires_grad_(True)
    conv = spnn.SparseConv3d(4, 8, 3, stride=2, padding=1, bias=False).double()
    out = conv(SparseConvTensor(feats, coords, [size] * 3, 1))
    grad_out = torch.randn_like(out.features)
    (out.features * grad_out).sum().backward()

    dense_in = _dense(coords, feats.detach(), size).requires_grad_(True)
    ref = F.conv3d(dense_in, _weight_oidhw(conv), stride=2, padding=1)
    idx = out.indices.long()
    ref_at_sites = ref[0, :, idx[:, 1], idx[:, 2], idx[:, 3]].T
    torch.testing.assert_close(out.features, ref_at_sites)
    (ref_at_sites * grad_out).sum().backward()
    ref_grad = dense_in.grad[0, :, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()].T
    torch.testing.assert_close(feats.grad, ref_grad)


@pytest.mark.skipif(BACKEND_NAME != "spconv", reason="spconv's algorithm choice")
def test_modules_built_for_implicit_gemm_run_on_cpu():
    # spconv's CUDA builds give these modules an implicit-GEMM algorithm, whose index generation
    # refuses CPU tensors; on the CPU they must compute what the native algorithm computes.
    from spconv.core import ConvAlgo

    size = 12
    coords, feats = _random_sparse(5, size, 300, 4)
    torch.manual_seed(0)
    subm, down, pool, inverse = net = torch.nn.ModuleList([
        spnn.SubMConv3d(4, 8, 3, padding=1, bias=False, indice_key="subm"),
        spnn.SparseConv3d(8, 8, 3, stride=2, padding=1, bias=False, indice_key="down"),
        spnn.SparseMaxPool3d(2, stride=2),
        spnn.SparseInverseConv3d(8, 8, 3, bias=False, indice_key="down"),
    ])
    layers = list(net)
    results = []
    for algo in (ConvAlgo.Native, ConvAlgo.MaskImplicitGemm):
        for layer in layers:
            layer.algo = algo
        net.zero_grad()
        x = feats.clone().requires_grad_(True)
        strided = down(subm(SparseConvTensor(x, coords, [size] * 3, 1)))
        out, up = pool(strided), inverse(strided)
        (out.features.sum() + up.features.square().sum()).backward()
        results.append((out.indices, out.features, up.features, x.grad, [p.grad.clone() for p in net.parameters()]))
        assert all(layer.algo == algo for layer in layers)  # restored after each call
    (i0, o0, u0, g0, p0), (i1, o1, u1, g1, p1) = results
    assert torch.equal(i0, i1)
    assert torch.equal(o0, o1) and torch.equal(u0, u1) and torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


@pytest.mark.skipif(BACKEND_NAME != "spconv", reason="spconv's algorithm choice")
def test_large_kernels_take_implicit_gemm_where_spconv_offers_it():
    from spconv.core import ConvAlgo

    assert large_kernel_options(5) == {"large_kernel_fast_algo": True}  # 125 offsets
    assert large_kernel_options((5, 5, 3)) == {"large_kernel_fast_algo": True}
    assert large_kernel_options(3) == large_kernel_options(5, dims=2) == large_kernel_options(7) == {}
    conv = spnn.SubMConv3d(4, 8, 5, padding=2, bias=False, **large_kernel_options(5))
    gpu_build = torch.cuda.is_available() or conv.algo != ConvAlgo.Native
    assert conv.algo == (ConvAlgo.MaskImplicitGemm if gpu_build else ConvAlgo.Native)


def test_large_kernel_conv_matches_dense_reference_on_cpu():
    size = 12
    coords, feats = _random_sparse(7, size, 500, 4)
    feats = feats.double().requires_grad_(True)
    conv = spnn.SubMConv3d(4, 6, 5, padding=2, bias=False, **large_kernel_options(5)).double()
    out = conv(SparseConvTensor(feats, coords, [size] * 3, 1))
    ref = F.conv3d(_dense(coords, feats.detach(), size), _weight_oidhw(conv), padding=2)
    torch.testing.assert_close(out.features, ref[0, :, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()].T)


@pytest.mark.skipif(not torch.cuda.is_available() or BACKEND_NAME != "spconv", reason="needs CUDA and spconv")
def test_large_kernels_on_cuda_equal_the_native_algorithm():
    """5 x 5 x 5 kernels through spconv's implicit GEMM (modules, and the index-first VoxelNeXt path
    with 5 x 5 x 5 stride-2 convolutions, VoxelKP's selective kernels) against the native algorithm."""
    import copy

    from spconv.core import ConvAlgo

    from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
    from voxsparse.models.voxelkp.selective_kernel import SelectiveKernelBlock
    from voxsparse.structures import SparseVoxels, VoxelGrid

    size = 40
    coords, feats = _random_sparse(11, size, 12_000, 16)
    grid = VoxelGrid((0.1, 0.1, 0.1), (0.0, 0.0, 0.0, 4.0, 4.0, 4.0))
    torch.manual_seed(0)
    models = {
        "selective kernel": SelectiveKernelBlock(16, "sk", (3, 5)),
        "VoxelNeXt, 5x5x5 down-sampling": VoxelNeXtBackbone(16, (16, 16, 32, 32), (1, 1, 1, 1), bev_stage=3,
                                                           out_channels=32, down_kernel_sizes=(5, 5, 3)),
    }
    for name, fast in models.items():
        large = [m for m in fast.modules() if getattr(m, "algo", None) is not None and math.prod(m.kernel_size) > 32]
        assert large and all(m.algo == ConvAlgo.MaskImplicitGemm for m in large), name
        native = copy.deepcopy(fast)
        for m in native.modules():
            if getattr(m, "algo", None) is not None:
                m.algo = ConvAlgo.Native
        results = []
        for model in (native, fast):
            model.cuda().train()
            x = feats.cuda().requires_grad_(True)
            if name == "selective kernel":
                out = model(SparseConvTensor(x, coords.cuda(), [size] * 3, 1)).features
            else:
                out = model(SparseVoxels(coords.cuda(), x, grid, 1)).features
            out.square().mean().backward()
            results.append((out.detach().cpu(), x.grad.cpu(), [p.grad.cpu() for p in model.parameters()]))
        (o0, g0, p0), (o1, g1, p1) = results
        torch.testing.assert_close(o1, o0, rtol=1e-4, atol=1e-4 * o0.abs().max().item(), msg=name)
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-3 * g0.abs().max().item(), msg=name)
        for a, b in zip(p1, p0):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item(), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_mode_conv_takes_float16_features_under_autocast():
    """spconv's eval path skips autocast's cast: float16 features met float32 weights and no kernel fit."""
    size = 20
    coords, feats = _random_sparse(3, size, 2000, 16)
    torch.manual_seed(0)
    net = spnn.SparseSequential(spnn.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="a"),
                                spnn.SparseConv3d(16, 16, 3, stride=2, padding=1, bias=False)).cuda().eval()
    x = SparseConvTensor(feats.cuda(), coords.int().cuda(), [size] * 3, 1)
    with torch.no_grad():
        expected = net(x).features
        with torch.autocast("cuda", dtype=torch.float16):
            out = net(x.replace_feature(feats.cuda().half())).features
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def _import_with_backend(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VOXSPARSE_SPARSE_BACKEND=value)
    return subprocess.run(
        [sys.executable, "-c", "import voxsparse.ops.sparse_backend as b; print(b.BACKEND_NAME)"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_backend_is_chosen_by_environment():
    assert BACKEND_NAME in ("spconv", "spconv-triton")
    bad = _import_with_backend("tensorflow")
    assert bad.returncode != 0 and "VOXSPARSE_SPARSE_BACKEND='tensorflow'" in bad.stderr


def test_missing_backend_gives_install_hint():
    try:
        import spconv_triton  # noqa: F401
    except ImportError:
        result = _import_with_backend("spconv-triton")
        assert result.returncode != 0
        assert "pip install spconv-triton" in result.stderr
    else:
        pytest.skip("spconv-triton is installed here")
