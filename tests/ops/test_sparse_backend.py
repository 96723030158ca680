import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from voxsparse.ops.sparse_backend import BACKEND_NAME, SparseConvTensor, spnn


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
