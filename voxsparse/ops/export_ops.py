"""spconv's native sparse-convolution kernels as ``torch.library`` custom ops, for whole-model export.

``torch.export`` traces a model with fake tensors, which spconv's kernels cannot take (they hand raw
pointers to C++). Registered as custom ops with fake implementations, the kernels become single
nodes of the exported graph, and the data-dependent output size of a strided convolution's index
generation becomes an unbacked size (``torch.library.get_ctx().new_dynamic_size()``).

The ops (namespace ``voxsparse``):

- ``subm_pairs(indices, batch_size, spatial_shape, kernel_size, dilation) -> (pairs, pair_num)``:
  a submanifold convolution's gather/scatter pairs; its output voxels are its input voxels.
- ``conv_pairs(indices, batch_size, spatial_shape, kernel_size, stride, padding, dilation,
  output_padding, transposed) -> (out_indices, pairs, pair_num)``: a regular (strided) or transposed
  convolution's output voxels (their count data-dependent) and pairs.
- ``indice_conv(features, weight, pairs, pair_num, num_out, inverse, subm) -> out``: the
  gather-GEMM-scatter convolution over those pairs, without bias.

Shapes: ``indices`` (M, 1 + D) int32 (batch, spatial...); ``pairs`` (2, K, M) int32 (input row,
output row per kernel offset, -1 where unused); ``pair_num`` (K,) int32; ``weight`` spconv's
(C_out, *kernel, C_in); ``features`` (M, C_in); ``out`` (num_out, C_out).

They run spconv's *native* algorithm (the only one of its CPU build, and one of its CUDA ones), on
the CPU single-threaded through :mod:`voxsparse.ops.sparse_backend`. Importing this module
registers them, and (through :mod:`voxsparse.ops.boxes`) the NMS op of heads that decode with NMS:
a process that runs an exported program (``torch.export.load``,
``torch._inductor.aoti_load_package``) imports it first and needs nothing else of voxsparse
(it imports spconv and the sparse backend; no model code).

:func:`routed_through_custom_ops` routes spconv's functional calls (those of its modules and of
:mod:`voxsparse.ops.sparse_plan`) through the ops for the duration of an export; eager execution
outside it is untouched.

:func:`routed_through_torch` routes the same calls through plain torch instead (for ONNX, which has
no sparse convolution): a dense table of the active voxels' rows over the grid (one int64 per grid
cell and frame, so for grids of up to some ten million cells), the neighbour of every output voxel
at every kernel offset looked up in it, and one matrix product over the gathered rows. Outputs equal
spconv's per voxel (up to float summation order); a strided convolution lists its output voxels
sorted by (batch, spatial...), spconv in the order of its hash table.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from voxsparse.ops import boxes  # noqa: F401  registers voxsparse::greedy_survivors, the NMS of exported heads
from voxsparse.ops.sparse_backend import BACKEND_NAME

if BACKEND_NAME != "spconv":
    raise ImportError(f"voxsparse.ops.export_ops needs spconv's kernels; the sparse backend is {BACKEND_NAME}")

_ops = importlib.import_module("spconv.pytorch.ops")
_functional = importlib.import_module("spconv.pytorch.functional")
_ConvAlgo = importlib.import_module("spconv.core").ConvAlgo
_Activation = importlib.import_module("cumm.tensorview").gemm.Activation

# The functions the ops call: spconv's own, as the sparse backend repaired them (captured before any
# routing replaces the module attributes).
_get_indice_pairs = _ops.get_indice_pairs
_indice_conv = _ops.indice_conv


@torch.library.custom_op("voxsparse::subm_pairs", mutates_args=())
def subm_pairs(
    indices: torch.Tensor, batch_size: int, spatial_shape: list[int], kernel_size: list[int], dilation: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    dims = len(spatial_shape)
    _, pairs, pair_num = _get_indice_pairs(
        indices, batch_size, list(spatial_shape), _ConvAlgo.Native, list(kernel_size), [1] * dims,
        [k // 2 for k in kernel_size], list(dilation), [0] * dims, True, False,
    )
    return pairs, pair_num


@subm_pairs.register_fake
def _(indices, batch_size, spatial_shape, kernel_size, dilation):
    volume = _volume(kernel_size)
    return indices.new_empty(2, volume, indices.shape[0]), indices.new_empty(volume)


@torch.library.custom_op("voxsparse::conv_pairs", mutates_args=())
def conv_pairs(
    indices: torch.Tensor, batch_size: int, spatial_shape: list[int], kernel_size: list[int], stride: list[int],
    padding: list[int], dilation: list[int], output_padding: list[int], transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, pairs, pair_num = _get_indice_pairs(
        indices, batch_size, list(spatial_shape), _ConvAlgo.Native, list(kernel_size), list(stride),
        list(padding), list(dilation), list(output_padding), False, transposed,
    )
    return out.clone(), pairs, pair_num  # ``out`` is a view of a larger allocation


@conv_pairs.register_fake
def _(indices, batch_size, spatial_shape, kernel_size, stride, padding, dilation, output_padding, transposed):
    volume = _volume(kernel_size)
    # A non-empty input has output voxels (kernel-wide padding as in every model here); at least
    # one also lets the kernels after it (BatchNorm's) drop their empty-input branches.
    num_out = torch.library.get_ctx().new_dynamic_size(min=1)
    return (indices.new_empty(num_out, indices.shape[1]), indices.new_empty(2, volume, indices.shape[0]),
            indices.new_empty(volume))


@torch.library.custom_op("voxsparse::indice_conv", mutates_args=())
def indice_conv(
    features: torch.Tensor, weight: torch.Tensor, pairs: torch.Tensor, pair_num: torch.Tensor, num_out: int,
    inverse: bool, subm: bool,
) -> torch.Tensor:
    if num_out == 0:  # spconv's kernels refuse empty outputs
        return features.new_zeros(0, weight.shape[0])
    return _indice_conv(features.contiguous(), weight, pairs, pair_num, num_out, inverse, subm)


@indice_conv.register_fake
def _(features, weight, pairs, pair_num, num_out, inverse, subm):
    return features.new_empty(num_out, weight.shape[0])


def load_package(path: str) -> Any:
    """An AOTInductor ``.pt2`` package, ready to call, with the ops above registered (torch's
    ``aoti_load_package``; the package's custom-op calls find the ops in this process)."""
    import torch._inductor

    return torch._inductor.aoti_load_package(str(path))


def _volume(kernel_size: Sequence[int]) -> int:
    volume = 1
    for k in kernel_size:
        volume *= int(k)
    return volume


# --- routing spconv's calls through the ops ---------------------------------------------------------


def _routed_get_indice_pairs(indices, batch_size, spatial_shape, algo, ksize, stride, padding, dilation,
                             out_padding, subm=False, transpose=False, num_out_act_bound=-1):
    if algo != _ConvAlgo.Native:
        raise NotImplementedError(f"export: sparse convolutions run spconv's native algorithm, got {algo}")
    if num_out_act_bound > 0:
        raise NotImplementedError("export: an output voxel bound (num_out_act_bound) is not supported")
    indices = indices.int()
    if subm:
        pairs, pair_num = subm_pairs(indices, int(batch_size), _ints(spatial_shape), _ints(ksize), _ints(dilation))
        return indices, pairs, pair_num
    return conv_pairs(indices, int(batch_size), _ints(spatial_shape), _ints(ksize), _ints(stride), _ints(padding),
                      _ints(dilation), _ints(out_padding), bool(transpose))


def _epilogue(out: torch.Tensor, bias: torch.Tensor | None, act_type: Any, act_alpha: float) -> torch.Tensor:
    """The bias and activation spconv fuses into its kernel, applied after the op."""
    if bias is not None:
        out = out + bias
    # By identity: the tracer cannot compare the pybind enum's members, and spconv passes the class's own.
    if act_type is _Activation.ReLU:
        return torch.relu(out)
    if act_type is _Activation.LeakyReLU:
        return nn.functional.leaky_relu(out, act_alpha)
    if act_type is not _Activation.None_:
        raise NotImplementedError(f"export: spconv activation {act_type}")
    return out


def _routed_indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse=False,
                        subm=False, algo=None, timer=None, bias=None, act_alpha=0.0, act_beta=0.0,
                        act_type=_Activation.None_):
    out = indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, bool(inverse), bool(subm))
    return _epilogue(out, bias, act_type, act_alpha)


def _functional_conv(inverse: bool, subm: bool):
    """A stand-in for spconv's autograd function ``indice_(subm_|inverse_)conv`` (inference only)."""

    def conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, algo=None, timer=None,
             bias=None, act_alpha=0.0, act_beta=0.0, act_type=_Activation.None_):
        out = indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse, subm)
        # spconv's module passes (bias, act_type, act_beta, act_type) positionally to its regular conv:
        # only a real activation enum selects one.
        act = act_type if isinstance(act_type, _Activation) else _Activation.None_
        return _epilogue(out, bias, act, act_alpha if isinstance(act_alpha, float) else 0.0)

    return conv


def _ints(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values]


def _is_sparse_conv(module: nn.Module) -> bool:
    return hasattr(module, "indice_key") and hasattr(module, "subm") and hasattr(module, "algo")


@contextlib.contextmanager
def _routed(model: nn.Module | None, replaced: list[tuple[Any, str, Any]]) -> Iterator[None]:
    convs = [m for m in model.modules() if _is_sparse_conv(m)] if model is not None else []
    algos = [m.algo for m in convs]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replaced]
    try:
        for conv in convs:
            conv.algo = _ConvAlgo.Native
        for owner, name, fn in replaced:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        for conv, algo in zip(convs, algos):
            conv.algo = algo


def routed_through_custom_ops(model: nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
    """Within the block, spconv's index generation and native convolutions run through the custom ops,
    and every sparse convolution of ``model`` uses the native algorithm (restored afterwards).

    For tracing (``torch.export``) in inference: the routed convolutions have no backward.
    """
    return _routed(model, [
        (_ops, "get_indice_pairs", _routed_get_indice_pairs),
        (_ops, "indice_conv", _routed_indice_conv),
        (_functional, "indice_conv", _functional_conv(False, False)),
        (_functional, "indice_subm_conv", _functional_conv(False, True)),
        (_functional, "indice_inverse_conv", _functional_conv(True, False)),
    ])


def routed_through_torch(model: nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
    """As :func:`routed_through_custom_ops`, with the plain-torch convolutions of :func:`torch_conv_pairs`
    and :func:`torch_indice_conv` instead of the custom ops (inference only; no transposed or
    inverse convolutions), and the neighbour lookups of sparse local maxima (the heads' decoding)
    through :func:`table_neighbor_indices`."""
    # Imported here: a process that only runs exported programs does not need it.
    from voxsparse.ops import sparse_utils

    return _routed(model, [
        (sparse_utils, "neighbor_indices", table_neighbor_indices),
        (_ops, "get_indice_pairs", _torch_get_indice_pairs),
        (_ops, "indice_conv", _torch_indice_conv),
        (_functional, "indice_conv", _torch_functional_conv(False)),
        (_functional, "indice_subm_conv", _torch_functional_conv(False)),
        (_functional, "indice_inverse_conv", _torch_functional_conv(True)),
    ])


# --- the same convolutions in plain torch (for ONNX) -----------------------------------------------


def _cell_keys(coords: torch.Tensor, extent: Sequence[int]) -> torch.Tensor:
    """(..., 1 + D) int64 (batch, spatial...) -> (...,) row-major keys over (batch, *extent)."""
    return _row_major(coords, [0, *extent])


def _kernel_offsets(kernel_size: Sequence[int], dilation: Sequence[int], device: torch.device) -> torch.Tensor:
    """(K, D) int64 offsets ``k * dilation`` in the row-major order of spconv's weight (C_out, *kernel, C_in)."""
    axes = [torch.arange(int(k), device=device) * int(d) for k, d in zip(kernel_size, dilation)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))


def torch_conv_pairs(
    indices: torch.Tensor, batch_size: int, spatial_shape: Sequence[int], kernel_size: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], subm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse convolution's output voxels and, per output voxel and kernel offset, its input row.

    Output voxel ``o`` reads input ``o * stride - padding + k * dilation`` at offset ``k`` (a
    submanifold convolution: stride 1, padding ``(kernel // 2) * dilation``, outputs = inputs).

    Args:
        indices: (M, 1 + D) int (batch, spatial...) unique active voxels.
        batch_size, spatial_shape: the input grid (frames, (D,) extent).

    Returns:
        (M_out, 1 + D) int32 output voxels (the inputs for ``subm``, else sorted by key) and (M_out, K)
        int64 input rows, M where the cell is empty.
    """
    device = indices.device
    dims = len(spatial_shape)
    shape = [int(v) for v in spatial_shape]
    offsets = _kernel_offsets(kernel_size, dilation, device)  # (K, D)
    coords = indices.long()
    if subm:
        stride, padding = [1] * dims, [(int(k) // 2) * int(d) for k, d in zip(kernel_size, dilation)]
        out_shape, out = shape, indices.int()
    else:
        out_shape = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                     for s, k, st, p, d in zip(shape, kernel_size, stride, padding, dilation)]
        # Candidate outputs of every (input, offset): (i + padding - k * dilation) / stride where whole.
        step = torch.tensor([int(v) for v in stride], device=device)
        shifted = coords[:, None, 1:] + torch.tensor([int(v) for v in padding], device=device) - offsets  # (M, K, D)
        cell = torch.div(shifted, step, rounding_mode="floor")
        extent = torch.tensor(out_shape, device=device)
        ok = ((shifted - cell * step) == 0).all(-1) & ((cell >= 0) & (cell < extent)).all(-1)
        batch = coords[:, None, :1].expand(-1, offsets.shape[0], 1)
        sentinel = batch_size * math.prod(out_shape)
        keys = torch.where(ok, _cell_keys(torch.cat([batch, cell], -1), out_shape), sentinel)
        occupied = torch.zeros(sentinel + 1, dtype=torch.bool, device=device)
        occupied[keys.reshape(-1)] = True
        out_keys = torch.nonzero(occupied[:sentinel]).reshape(-1)
        parts = []
        for size in reversed(out_shape):
            parts.append(out_keys % size)
            out_keys = torch.div(out_keys, size, rounding_mode="floor")
        out = torch.stack([out_keys, *reversed(parts)], dim=1).int()
    # Rows of the active inputs over the dense input grid; M (a zero row of the features) elsewhere.
    m = indices.shape[0]
    cells = batch_size * math.prod(shape)
    table = torch.full((cells + 1,), m, dtype=torch.int64, device=device)
    table[_cell_keys(coords, shape)] = torch.arange(m, device=device)
    source = (out.long()[:, None, 1:] * torch.tensor([int(v) for v in stride], device=device)
              - torch.tensor([int(v) for v in padding], device=device) + offsets)  # (M_out, K, D)
    inside = ((source >= 0) & (source < torch.tensor(shape, device=device))).all(-1)
    batch = out.long()[:, None, :1].expand(-1, offsets.shape[0], 1)
    keys = torch.where(inside, _cell_keys(torch.cat([batch, source], -1), shape), cells)
    return out, table[keys]


def torch_indice_conv(features: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(M, C_in) ``features`` through spconv ``weight`` (C_out, *kernel, C_in) at the (M_out, K) input
    ``rows`` of :func:`torch_conv_pairs` -> (M_out, C_out)."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    padded = torch.cat([features, features.new_zeros(1, c_in)])
    gathered = padded[rows].reshape(rows.shape[0], -1)  # (M_out, K * C_in)
    return gathered @ weight.reshape(c_out, -1, c_in).permute(1, 2, 0).reshape(-1, c_out)


def table_neighbor_indices(coords: torch.Tensor, shape: Sequence[int], offsets: torch.Tensor) -> torch.Tensor:
    """:func:`voxsparse.ops.sparse_utils.neighbor_indices` through a dense table of rows over the grid
    ``shape`` instead of a sorted search (ONNX has no ``searchsorted``); the same (M, K) int64 rows,
    -1 where a cell is empty or outside."""
    device = coords.device
    extent = [int(v) for v in shape]
    c = coords.long()
    cells = math.prod(extent)
    table = torch.full((cells + 1,), -1, dtype=torch.int64, device=device)
    table[_row_major(c, extent)] = torch.arange(c.shape[0], device=device)
    neighbours = c[:, None, :] + offsets.to(device).long()[None]  # (M, K, D)
    inside = ((neighbours >= 0) & (neighbours < torch.tensor(extent, device=device))).all(-1)
    return table[torch.where(inside, _row_major(neighbours, extent), cells)]


def _row_major(coords: torch.Tensor, extent: Sequence[int]) -> torch.Tensor:
    """(..., D) int64 -> (...,) row-major keys over ``extent`` (D,)."""
    keys = coords[..., 0]
    for d in range(1, len(extent)):
        keys = keys * int(extent[d]) + coords[..., d]
    return keys


def _torch_get_indice_pairs(indices, batch_size, spatial_shape, algo, ksize, stride, padding, dilation,
                            out_padding, subm=False, transpose=False, num_out_act_bound=-1):
    if transpose or num_out_act_bound > 0:
        raise NotImplementedError("export to plain torch: transposed convolutions and output bounds are not supported")
    out, rows = torch_conv_pairs(indices, int(batch_size), _ints(spatial_shape), _ints(ksize), _ints(stride),
                                 _ints(padding), _ints(dilation), bool(subm))
    return out, rows, rows.new_empty(0)  # the rows stand in for spconv's pairs; no per-offset counts


def _torch_indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse=False,
                       subm=False, algo=None, timer=None, bias=None, act_alpha=0.0, act_beta=0.0,
                       act_type=_Activation.None_):
    if inverse:
        raise NotImplementedError("export to plain torch: inverse convolutions are not supported")
    return _epilogue(torch_indice_conv(features, filters, indice_pairs), bias, act_type, act_alpha)


def _torch_functional_conv(inverse: bool):
    def conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, algo=None, timer=None,
             bias=None, act_alpha=0.0, act_beta=0.0, act_type=_Activation.None_):
        if inverse:
            raise NotImplementedError("export to plain torch: inverse convolutions are not supported")
        act = act_type if isinstance(act_type, _Activation) else _Activation.None_
        return _epilogue(torch_indice_conv(features, filters, indice_pairs), bias, act,
                         act_alpha if isinstance(act_alpha, float) else 0.0)

    return conv
