"""Write tests/parity/fixtures/scatterformer_backbone.pt from the official ScatterFormer code.

    VOXSPARSE_SCATTERFORMER=/path/to/ScatterFormer python tests/parity/make_scatterformer_fixtures.py

The official backbone (``pcdet/models/backbones_3d/scatterformer.py`` of skyhehe123/ScatterFormer)
is loaded from the checkout by file path. Its compiled pieces are replaced here by plain torch, for
this harness only:

- the Triton kernels ``scatter_matmul_kv`` / ``scatter_matmul_qc``: per-window ``K^T V`` and
  ``Q KV`` loops over (offsets, counts);
- the CUDA depthwise convolution ``dw_spconv``: a loop over kernel offsets of its pair table;
- spconv's implicit-GEMM pair generation (CUDA only) used by its depthwise module: a brute-force
  neighbour search giving the same (K, N) tables (input row of output n at offset k, -1 where
  empty; the backward table its inverse);
- ``torch_scatter.scatter_add`` and ``einops.rearrange`` (the two patterns the module uses);
- the pillar pooling's query comes from spconv's max pool, whose CPU build lists output cells in
  first-seen order, while the module pairs query i with the i-th column in sorted order (the order
  spconv's CUDA build gives): the harness sorts the pooled cells, as on the GPU.

Reduced size (32 channels, 4 heads, windows of 8 cells, a 48 x 40 x 15 grid), random weights and
BatchNorm statistics; two frames of clustered voxels. The fixture (plain tensors, < 1 MB) holds the
reference's state dict, the input voxels, its eval-mode output, its train-mode output and the
gradient of a weighted sum of that output with respect to the input features, each output as
(coords, features) sorted by coordinates; and the neck of the configs, ``CascadeDEDBackbone``
(2 blocks of 16 channels, random weights and statistics), with its eval-mode output on the dense
map of the backbone's eval output. tests/models/test_scatterformer_parity.py checks voxsparse
against it, and against the checkout when ``VOXSPARSE_SCATTERFORMER`` names one.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxsparse.benchmark.openpcdet import _attr_dict, _exec_sources, _stub_module, _stub_parents
from voxsparse.benchmark.parity import randomize_batchnorm
from voxsparse.ops.sparse_utils import linear_keys, neighbor_indices

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "scatterformer_backbone.pt"
SOURCES = {
    "pcdet.utils.spconv_utils": "pcdet/utils/spconv_utils.py",
    "pcdet.models.backbones_3d.spconv_backbone": "pcdet/models/backbones_3d/spconv_backbone.py",
    "pcdet.models.model_utils.scatterformer_utils": "pcdet/models/model_utils/scatterformer_utils.py",
    "pcdet.models.backbones_3d.scatterformer": "pcdet/models/backbones_3d/scatterformer.py",
}
NECK_SOURCES = {
    "pcdet.models.backbones_2d.base_bev_backbone": "pcdet/models/backbones_2d/base_bev_backbone.py",
    "pcdet.models.backbones_2d.bev_backbone_ded": "pcdet/models/backbones_2d/bev_backbone_ded.py",
}
#: The reduced neck: CascadeDEDBackbone's settings but 2 blocks of 16 channels.
NECK = {"NUM_LAYERS": 2, "NUM_SBB": [2, 1, 1], "DOWN_STRIDES": [1, 2, 2], "FEATURE_DIM": 16}
#: The reduced setting: grid (x, y, z) voxels, channels, window, voxel feature channels.
GRID = (48, 40, 15)
CHANNELS = 32
WINDOW = 8
IN_CHANNELS = 8
PILLAR_SIZE = (GRID[2] + 1) // 4


# --- torch stand-ins for the compiled pieces ------------------------------------------------------


def _rearrange(x: torch.Tensor, pattern: str, h: int) -> torch.Tensor:
    if pattern == "n (h c) -> n h c":
        return x.reshape(x.shape[0], h, -1)
    if pattern == "n h c -> n (h c)":
        return x.reshape(x.shape[0], -1)
    raise NotImplementedError(pattern)


def _scatter_add(src: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    assert dim == 0
    return src.new_zeros(int(index.max()) + 1, *src.shape[1:]).index_add_(0, index, src)


def _matmul_kv(k, v, offsets, counts):
    """(W, H, D, D): per window sum of k_n^T v_n."""
    out = k.new_zeros(len(offsets), k.shape[1], k.shape[2], v.shape[2])
    for w, (start, n) in enumerate(zip(offsets.tolist(), counts.tolist())):
        out[w] = torch.einsum("nhd,nhe->hde", k[start:start + n], v[start:start + n])
    return out


def _matmul_qc(q, c, offsets, counts):
    """(N, H, D): q_n @ c[window of n]."""
    parts = [torch.einsum("nhd,hde->nhe", q[start:start + n], c[w])
             for w, (start, n) in enumerate(zip(offsets.tolist(), counts.tolist()))]
    return torch.cat(parts)


def _dwconv(features, weights, table):
    """out[n] = sum_k features[table[k, n]] * weights[k] (table -1: nothing)."""
    w = weights.reshape(table.shape[0], -1)
    out = features.new_zeros(table.shape[1], features.shape[1])
    for k in range(table.shape[0]):
        rows = table[k].long()
        valid = rows >= 0
        out[valid] += features[rows[valid]] * w[k]
    return out


class _DwConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weights, pair_fwd, pair_bwd):
        ctx.save_for_backward(features, weights, pair_fwd)
        return _dwconv(features, weights, pair_fwd)

    @staticmethod
    def backward(ctx, grad):
        features, weights, table = ctx.saved_tensors
        with torch.enable_grad():
            f = features.detach().requires_grad_(True)
            w = weights.detach().requires_grad_(True)
            df, dw = torch.autograd.grad(_dwconv(f, w, table), (f, w), grad)
        return df, dw, None, None


def _pairs_implicit_gemm(indices, batch_size, spatial_shape, algo, ksize, stride, padding, dilation, out_padding,
                         subm, is_train, alloc=None, timer=None, **_):
    """spconv's subm implicit-GEMM pair tables by brute force: (K, N) forward, its inverse backward."""
    assert subm and list(stride) == [1, 1, 1] and list(dilation) == [1, 1, 1]
    axes = [torch.arange(k) - k // 2 for k in ksize]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    offsets = torch.cat([torch.zeros(len(offsets), 1, dtype=torch.long), offsets], 1)
    table = neighbor_indices(indices.long(), (batch_size, *spatial_shape), offsets).T.contiguous()  # (K, N)
    inverse = torch.full_like(table, -1)
    k_idx, n_idx = torch.nonzero(table >= 0, as_tuple=True)
    inverse[k_idx, table[k_idx, n_idx]] = n_idx
    counts = (table >= 0).sum(1).int()
    bwd = inverse.int() if is_train else torch.Tensor()
    return indices, counts, table.int(), bwd, [], [], [], [], []


def load_reference(root: str | Path) -> types.ModuleType:
    """The official ``scatterformer`` module with the stand-ins above."""
    root = Path(root)
    triton = types.ModuleType("triton")
    triton.jit = lambda fn: fn
    triton.language = types.ModuleType("triton.language")
    triton.language.constexpr = int  # only annotates the kernels' arguments
    sys.modules["triton"], sys.modules["triton.language"] = triton, triton.language
    _stub_module("einops", rearrange=_rearrange)
    _stub_module("torch_scatter", scatter_add=_scatter_add)
    _stub_parents(root, "pcdet.ops.dw_spconv.dw_spconv")
    _stub_module("pcdet.ops.dw_spconv.dw_spconv")
    sys.modules["pcdet.ops.dw_spconv"].dw_spconv = sys.modules["pcdet.ops.dw_spconv.dw_spconv"]
    try:
        module = _exec_sources(root, SOURCES)
    finally:
        for name in ("triton", "triton.language"):
            sys.modules.pop(name, None)  # voxsparse asks whether Triton is importable
    utils = sys.modules["pcdet.models.model_utils.scatterformer_utils"]
    utils.sparse_dwconv = _DwConv.apply
    utils.ops = types.SimpleNamespace(get_indice_pairs_implicit_gemm=_pairs_implicit_gemm)
    module.scatter_matmul_kv, module.scatter_matmul_qc = _matmul_kv, _matmul_qc
    pool = module.AttnPillarPool.forward

    def sorted_query_forward(self, x):
        query_func = self.query_func

        def sorted_pool(t):
            out = query_func(t)
            order = torch.argsort(linear_keys(out.indices[:, [0, 2, 3]].long(), (t.batch_size, *t.spatial_shape[1:])))
            out = out.replace_feature(out.features[order])
            out.indices = out.indices[order]
            return out

        self.__dict__["query_func"] = sorted_pool  # shadows the submodule for this call only
        try:
            return pool(self, x)
        finally:
            del self.__dict__["query_func"]

    module.AttnPillarPool.forward = sorted_query_forward
    return module


def build_reference(root: str | Path, seed: int = 0) -> nn.Module:
    """The official backbone at the reduced size, random weights (seeded) and BatchNorm statistics."""
    module = load_reference(root)
    torch.manual_seed(seed)
    cfg = _attr_dict({"FEATURE_DIM": CHANNELS, "WIN_SIZE": WINDOW})
    net = module.ScatterFormer(cfg, IN_CHANNELS, np.array(GRID))
    randomize_batchnorm(net, seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("conv_k.weight", "conv_h.weight", "conv_w.weight")):
                p.mul_(0.3)  # N(0, 1) taps summed over up to 27 neighbours: keep activations moderate
    return net


def build_reference_neck(root: str | Path, seed: int = 0) -> nn.Module:
    """The official ``CascadeDEDBackbone`` at :data:`NECK` size on the backbone's channels."""
    module = _exec_sources(Path(root), NECK_SOURCES)
    torch.manual_seed(seed)
    net = module.CascadeDEDBackbone(_attr_dict(NECK), CHANNELS)
    randomize_batchnorm(net, seed)
    return net.eval()


def bev_map(cells: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(2, C, H, W) dense map of the backbone's output cells (OpenPCDet's HeightCompression of one z cell)."""
    h, w = (GRID[1] - 1) // 2 + 1, (GRID[0] - 1) // 2 + 1
    dense = features.new_zeros(2, h, w, features.shape[1])
    cells = cells.long()
    dense[cells[:, 0], cells[:, 1], cells[:, 2]] = features
    return dense.permute(0, 3, 1, 2).contiguous()


def parity_input(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frames of voxels in clusters (so convolutions and windows have neighbours): (M, 4) int32
    (b, z, y, x) sorted, (M, IN_CHANNELS) features."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = GRID
    centres = torch.stack([torch.randint(0, 2, (24,), generator=g), torch.randint(0, z, (24,), generator=g),
                           torch.randint(0, y, (24,), generator=g), torch.randint(0, x, (24,), generator=g)], 1)
    spread = torch.randint(-3, 4, (24, 60, 4), generator=g) * torch.tensor([0, 1, 1, 1])
    coords = (centres[:, None] + spread).reshape(-1, 4)
    coords = torch.maximum(coords, torch.zeros(4, dtype=torch.long))
    coords = torch.minimum(coords, torch.tensor([1, z - 1, y - 1, x - 1]))
    coords = torch.unique(coords, dim=0).int()
    features = torch.randn(len(coords), IN_CHANNELS, generator=g)
    return coords, features


def _sorted(indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cells = indices[:, [0, 2, 3]].long()
    order = torch.argsort(linear_keys(cells, (2, 1 << 12, 1 << 12)))
    return cells[order].int(), features[order]


def run_reference(net: nn.Module, coords: torch.Tensor, features: torch.Tensor, train: bool):
    """The reference's output (sorted (P, 3) cells, (P, C) features) and, in training mode, the
    gradient of ``(output * weights).sum()`` (fixed weights) w.r.t. the input features."""
    net.train(train)
    feats = features.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = net({"voxel_features": feats, "voxel_coords": coords, "batch_size": 2})["encoded_spconv_tensor"]
        cells, result = _sorted(out.indices, out.features)
        grad = None
        if train:
            (result * loss_weights(result.shape)).sum().backward()
            grad = feats.grad
    return cells, result.detach(), grad


def loss_weights(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def main() -> None:
    root = os.environ.get("VOXSPARSE_SCATTERFORMER")
    if not root:
        raise SystemExit("set VOXSPARSE_SCATTERFORMER to a ScatterFormer checkout")
    torch.set_num_threads(1)
    net = build_reference(root)
    coords, features = parity_input()
    record = {"state_dict": {k: v.clone() for k, v in net.state_dict().items()},
              "coords": coords, "features": features,
              "grid": list(GRID), "channels": CHANNELS, "window_size": WINDOW, "pillar_size": PILLAR_SIZE}
    record["eval_cells"], record["eval_features"], _ = run_reference(net, coords, features, train=False)
    record["train_cells"], record["train_features"], record["train_input_grad"] = run_reference(
        net, coords, features, train=True)
    neck = build_reference_neck(root)
    record["neck_state_dict"] = {k: v.clone() for k, v in neck.state_dict().items()}
    with torch.no_grad():
        bev = bev_map(record["eval_cells"], record["eval_features"])
        record["neck_features"] = neck({"spatial_features": bev})["spatial_features_2d"]
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, FIXTURE)
    print(f"{FIXTURE}: {FIXTURE.stat().st_size / 1e6:.2f} MB, {len(coords)} voxels -> {len(record['eval_cells'])} cells")


if __name__ == "__main__":
    main()
