"""LION's reference backbone (the authors' OpenPCDet fork) loaded by path from a checkout, on the CPU.

Only the files the backbone needs are executed from the checkout, under a private package name so they
never meet OpenPCDet's own modules: ``pcdet/models/backbones_3d/lion_backbone_one_stride.py``, the
Mamba block (``pcdet/ops/mamba/mamba_ssm/modules/mamba_simple.py``), the official pure-PyTorch
``selective_scan_ref`` (``.../mamba_ssm/ops/selective_scan_interface.py``), the RetNet block
(``pcdet/models/model_utils/retnet_attn.py``) and the RWKV block (``pcdet/models/model_utils/rwkv_cls.py``).
Their compiled or absent dependencies are replaced, for the duration of the load only, by torch code here:

- ``mamba_inner_fn`` (LION's fused CUDA function, returning the gated scan without the output
  projection): causal depthwise conv + SiLU, ``x_proj``, the step projection, then the official
  ``selective_scan_ref``;
- ``chunk_retention`` (LION's Triton kernels): the same chunk recurrence in torch, 64-step chunks whose
  steps weigh each other by ``gamma^|i - j|``, earlier chunks reaching later ones through the state;
- ``wkv6_cuda`` (RWKV-6's CUDA kernel, absent from the checkout): the recurrence step by step, as the
  kernel runs it, forward only. The RWKV file asserts a head size of 32 (its ``HEAD_SIZE``);
  :func:`build_lion_backbone` sets it to the config's channels per head;
- ``torch_scatter.scatter_add`` by ``index_add``; spconv by voxsparse's sparse backend; ``timm``'s
  ``DropPath`` (identity: fixtures use no stochastic depth); ``einops`` where it is not installed (the
  few patterns these files use); the xLSTM and TTT blocks (not loaded).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.benchmark.openpcdet import _attr_dict
from voxsparse.ops.linear_rnn import wkv6_sequential

#: Private package the checkout's files are executed under.
PACKAGE = "lion_reference"
SOURCES = {
    "backbone": "pcdet/models/backbones_3d/lion_backbone_one_stride.py",
    "mamba": "pcdet/ops/mamba/mamba_ssm/modules/mamba_simple.py",
    "scan": "pcdet/ops/mamba/mamba_ssm/ops/selective_scan_interface.py",
    "retnet": "pcdet/models/model_utils/retnet_attn.py",
    "rwkv": "pcdet/models/model_utils/rwkv_cls.py",
}
CONFIGS = {
    "lion_mamba_waymo": "tools/cfgs/lion_models/lion_mamba_waymo_8x_1f_1x_one_stride_128dim.yaml",
    "lion_retnet_waymo": "tools/cfgs/lion_models/lion_retnet_waymo_8x_1f_1x_one_stride_64dim.yaml",
    "lion_rwkv_waymo": "tools/cfgs/lion_models/lion_rwkv_waymo_8x_1f_1x_one_stride_64dim.yaml",
    "lion_mamba_nuscenes": "tools/cfgs/lion_models/lion_mamba_nusc_8x_1f_1x_one_stride_128dim.yaml",
}


def _axes(side: str) -> list:
    out: list = []
    group = None
    for token in re.findall(r"\(|\)|\.\.\.|\w+", side):
        if token == "(":
            group = []
        elif token == ")":
            out.append(group)
            group = None
        elif group is not None:
            group.append(token)
        else:
            out.append(token)
    return out


def _flat(tokens: list, ellipsis: list[str]) -> list[str]:
    names: list[str] = []
    for token in tokens:
        if token == "...":
            names += ellipsis
        elif isinstance(token, list):
            names += token
        elif token != "1":
            names.append(token)
    return names


def rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """einops' ``rearrange`` / ``repeat`` for patterns of names, groups, ``...`` and ``1``."""
    left, right = (_axes(s) for s in pattern.split("->"))
    dims = dict(sizes)
    rest = x.ndim - (len(left) - ("..." in left))
    ellipsis = [f"_e{j}" for j in range(rest)]
    i = 0
    for token in left:
        if token == "...":
            dims.update(zip(ellipsis, x.shape[i:i + rest]))
            i += rest
            continue
        if isinstance(token, list):
            unknown = [n for n in token if n not in dims]
            if unknown:
                dims[unknown[0]] = x.shape[i] // math.prod(dims[n] for n in token if n in dims)
        elif token != "1":
            dims[token] = x.shape[i]
        i += 1
    have = _flat(left, ellipsis)
    x = x.reshape([dims[n] for n in have])
    want = _flat(right, ellipsis)
    x = x.permute([have.index(n) for n in want if n in have])
    for position, name in enumerate(want):  # repeat: new axes broadcast
        if name not in have:
            x = x.unsqueeze(position)
            x = x.expand(*x.shape[:position], dims[name], *x.shape[position + 1:])
    final = []
    for token in right:
        if token == "...":
            final += [dims[n] for n in ellipsis]
        elif isinstance(token, list):
            final.append(math.prod(dims[n] for n in token))
        else:
            final.append(1 if token == "1" else dims[token])
    return x.reshape(final)


def chunk_retention(q, k, v, initial_state=None, output_final_state=False):
    """LION's ``chunk_retention`` in torch: (B, H, T, K) q, k and (B, H, T, V) v -> ((B, H, T, V), None)."""
    _, heads, length, dk = q.shape
    scale = dk ** -0.5
    log_gamma = torch.log2(1 - torch.pow(2.0, -5.0 - torch.arange(heads, dtype=torch.float32))).view(1, heads, 1, 1)
    state = q.new_zeros(q.shape[0], heads, dk, v.shape[-1])
    out = []
    for start in range(0, length, 64):
        qc, kc, vc = (t[:, :, start:start + 64] for t in (q, k, v))
        i = torch.arange(qc.shape[2], dtype=torch.float32)
        gap = (i[:, None] - i[None, :]).abs()
        inner = torch.exp2(gap * log_gamma)
        from_state = torch.exp2((i + 1).view(-1, 1) * log_gamma)
        out.append(((qc * from_state) @ state + ((qc @ kc.transpose(-1, -2)) * inner) @ vc) * scale)
        to_end = torch.exp2((qc.shape[2] - i - 1).view(-1, 1) * log_gamma)
        state = torch.exp2(qc.shape[2] * log_gamma) * state + kc.transpose(-1, -2) @ (vc * to_end)
    return torch.cat(out, 2), None


class _WKV6:
    """``wkv6_cuda``'s forward in torch: the recurrence step by step (:func:`wkv6_sequential`) on the
    kernel's (B, T, C) tensors, ``ew`` being the log decay, written into its output ``y``."""

    @staticmethod
    def forward(b, t, c, h, r, k, v, ew, u, y):
        heads = [x.view(b, t, h, c // h).transpose(1, 2) for x in (r, k, v, ew)]
        y.copy_(wkv6_sequential(*heads, u.view(h, c // h)).transpose(1, 2).reshape(b, t, c))

    @staticmethod
    def backward(*args):
        raise NotImplementedError("lion_reference: the RWKV stand-in has no backward")


def _mamba_inner(selective_scan_ref):
    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None,
                       D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
        batch, _, length = xz.shape
        rank, state = delta_proj_weight.shape[1], A.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(x, conv1d_weight, conv1d_bias, padding=conv1d_weight.shape[-1] - 1, groups=x.shape[1])[..., :length])
        x_dbl = F.linear(x.transpose(1, 2).reshape(batch * length, -1), x_proj_weight)
        delta = (delta_proj_weight @ x_dbl[:, :rank].t()).view(-1, batch, length).transpose(0, 1)
        b = x_dbl[:, rank:rank + state].view(batch, length, state).transpose(1, 2).contiguous()
        c = x_dbl[:, -state:].view(batch, length, state).transpose(1, 2).contiguous()
        return selective_scan_ref(x, delta, A, b, c, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)

    return mamba_inner_fn


def _module(name: str, package: bool = False, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    if package:
        module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _exec(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _NotLoaded(nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("lion_reference: only the Mamba, RetNet and RWKV operators are loaded")


@contextlib.contextmanager
def _stubs() -> Iterator[None]:
    """Stub modules registered while the checkout's files execute, removed afterwards."""
    before = dict(sys.modules)
    try:
        for name in ("einops",):
            try:
                importlib.import_module(name)
            except ImportError:
                _module(name, rearrange=rearrange, repeat=rearrange)
        _module("timm", package=True)
        _module("timm.models", package=True)
        _module("timm.models.layers", DropPath=lambda p: nn.Identity())
        _module("torch_scatter", scatter_add=lambda src, index, dim=0: src.new_zeros(
            int(index.max()) + 1 if len(index) else 0, *src.shape[1:]).index_add_(0, index, src))
        _module("causal_conv1d", causal_conv1d_fn=None, causal_conv1d_update=None)
        _module("causal_conv1d_cuda")
        _module("selective_scan_cuda")
        _module("pcdet", package=True)
        _module("pcdet.ops", package=True)
        _module("pcdet.ops.wkv6", wkv6_cuda=_WKV6)
        yield
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


def load_lion_module(root: Path) -> types.ModuleType:
    """The checkout's ``lion_backbone_one_stride`` module, with its operators' compiled code replaced."""
    from voxsparse.ops.sparse_backend import spnn

    root = Path(root)
    missing = [p for p in SOURCES.values() if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: not a LION checkout (missing {missing})")
    with _stubs():
        scan = _exec(f"{PACKAGE}_scan", root / SOURCES["scan"])
        _module("mamba_ssm", package=True)
        _module("mamba_ssm.ops", package=True)
        _module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=scan.selective_scan_ref,
                mamba_inner_fn=_mamba_inner(scan.selective_scan_ref))
        mamba = _exec(f"{PACKAGE}_mamba_simple", root / SOURCES["mamba"])
        sys.modules["mamba_ssm"].Block = mamba.Block
        for package in (PACKAGE, f"{PACKAGE}.models", f"{PACKAGE}.models.backbones_3d",
                        f"{PACKAGE}.models.model_utils", f"{PACKAGE}.utils"):
            _module(package, package=True)
        _module(f"{PACKAGE}.models.model_utils.retention", chunk_retention=chunk_retention,
                fused_chunk_retention=None, fused_recurrent_retention=None, parallel_retention=None)
        _exec(f"{PACKAGE}.models.model_utils.retnet_attn", root / SOURCES["retnet"])
        rwkv = _exec(f"{PACKAGE}.models.model_utils.rwkv_cls", root / SOURCES["rwkv"])
        _module(f"{PACKAGE}.models.model_utils.vision_lstm2", xLSTM_Block=_NotLoaded)
        _module(f"{PACKAGE}.models.model_utils.ttt", TTTBlock=_NotLoaded)
        _module(f"{PACKAGE}.utils.spconv_utils", spconv=spnn, replace_feature=lambda x, f: x.replace_feature(f))
        backbone = _exec(f"{PACKAGE}.models.backbones_3d.lion_backbone_one_stride", root / SOURCES["backbone"])
        backbone.rwkv_module = rwkv
        return backbone


def build_lion_backbone(root: Path, backbone_cfg: dict, input_channels: int, grid_size) -> nn.Module:
    """The reference ``LION3DBackboneOneStride`` built from a ``BACKBONE_3D`` config dict.

    ``grid_size`` is (x, y, z) voxels, as OpenPCDet passes it.
    """
    module = load_lion_module(root)
    operator = backbone_cfg["OPERATOR"]
    if operator["NAME"] == "RWKV":
        module.rwkv_module.HEAD_SIZE = backbone_cfg["FEATURE_DIM"] // operator["CFG"]["n_head"]
    with contextlib.redirect_stdout(None):  # it prints a line per layer
        return module.LION3DBackboneOneStride(_attr_dict(backbone_cfg), input_channels, np.array(grid_size))


def run_lion_backbone(model: nn.Module, coords: torch.Tensor, features: torch.Tensor, batch_size: int):
    """The reference's ``encoded_spconv_tensor`` for voxels ((M, 4) int (b, z, y, x), (M, C))."""
    out = model({"voxel_features": features, "voxel_coords": coords.int(), "batch_size": batch_size})
    return out["encoded_spconv_tensor"]
