"""Dynamic pillar / voxel feature encoders of DSVT, computed as OpenPCDet computes them.

:class:`DynamicPillarVFE` is OpenPCDet's ``DynamicPillarVFE`` (``DynPillarVFE`` in configs; DSVT-Pillar,
e.g. the DSVT repository's nuScenes config); :class:`DynamicVoxelVFE` is OpenPCDet's
``DynamicVoxelVFE`` (the DSVT repository's ``DynamicPillarVFE_3d`` / ``DynPillarVFE3D``; DSVT-Voxel,
``waymo_models/dsvt_voxel.yaml``). Both keep every point of a cell (no cap) and encode each cell by
stacked PFN layers over its points.

Per point the input is, in this order: its columns (x, y, z and features; without
``use_absolute_xyz`` the features only), its offset (x, y, z) to the mean of its cell's points,
its offset to the cell centre (the pillar encoder: x, y to the centre, z to the middle of the z
range), and with ``with_distance`` its distance to the origin.

What makes these exact rather than close (each checked against the reference):

- Cell indices are ``floor((p - range_min) / voxel_size)`` in float32 (the reference's float32
  range and size tensors), not voxsparse's float64 rule: a point on a cell border can fall on the
  other side. A point is kept iff every index lies in ``[0, grid_size)`` (x, y only for pillars).
  The reference pillar encoder keeps every z; its data pipeline drops z outside the range when
  configured (the DSVT repository's ``MASK_Z``, both bounds inclusive), which ``mask_z`` does here.
- Centre offsets are formed with the reference's operations and constants: the float32-rounded
  range minimum, the offset ``voxel_size / 2 + range_min`` in float64 (numpy 1.x promotion of the
  reference's float32 range), applied to float32 coordinates one operation at a time.
- PFN layers: Linear (no bias when ``use_norm``), BatchNorm1d (eps 1e-3, momentum 0.01), ReLU,
  per-cell max; every layer but the last outputs half its width and concatenates the cell max to
  each point.

The per-cell max and mean are torch ``scatter_reduce`` / ``index_add`` (torch_scatter's
``scatter_max`` / ``scatter_mean`` values). Gradients of a max tied between points are shared
here and go to one point in torch_scatter; after the ReLU such ties are zeros, whose gradient the
ReLU stops either way.

Cells come out sorted by (batch, z, y, x) (the reference orders them by (batch, x, y, z)); DSVT
and the BEV scatter do not depend on the order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from voxsparse.models.fusion import batch_norm_affine
from voxsparse.models.keys import KeyPair
from voxsparse.models.voxel_encoders.mean_vfe import _check_columns
from voxsparse.ops.scatter import scatter_max, scatter_mean, segment_max
from voxsparse.ops.sparse_utils import linear_keys
from voxsparse.ops.voxelize import decode_keys
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid

#: Per device type: sort the points by cell and take cell maxima as segment reductions. CUDA only,
#: where atomics on crowded cells are slow; the CPU keeps the input order, so its sums are unchanged.
_SORT_ROWS_BY_CELL = {"cuda": True, "cpu": False}

# OpenPCDet's PFN BatchNorm (both the reference configs train with it).
PFN_BN_EPS = 1e-3
PFN_BN_MOMENTUM = 0.01


class PFNLayer(nn.Module):
    """One PFN layer over the points of each cell (OpenPCDet's ``PFNLayerV2``).

    Args:
        in_channels: per-point input width.
        out_channels: layer width; a layer that is not the last computes ``out_channels // 2`` per
            point and returns them concatenated with the cell max (``out_channels`` in all).
        use_norm: BatchNorm after a bias-free Linear (else a Linear with bias).
        last_layer: return the (M, out_channels) cell max only.

    ``forward(x (N, in_channels), cell (N,) int64 in [0, M), pool)`` → (N, out_channels) per point, or
    (M, out_channels) per cell for the last layer; ``pool`` maps (N, C) rows to their (M, C) cell maxima.
    """

    def __init__(self, in_channels: int, out_channels: int, use_norm: bool = True, last_layer: bool = False) -> None:
        super().__init__()
        self.last_layer = last_layer
        self.use_norm = use_norm
        width = out_channels if last_layer else out_channels // 2
        self.linear = nn.Linear(in_channels, width, bias=not use_norm)
        self.norm = nn.BatchNorm1d(width, eps=PFN_BN_EPS, momentum=PFN_BN_MOMENTUM) if use_norm else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, cell: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = self.linear(x)
        if self.norm is not None:
            x = self.norm(x)
        x = self.relu(x)
        pooled = pool(x)
        if self.last_layer:
            return pooled
        return torch.cat([x, pooled[cell]], dim=1)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(width, in_channels) weight and (width,) bias of the eval-mode Linear (+ BatchNorm)."""
        bias = self.linear.bias if self.linear.bias is not None else torch.zeros_like(self.linear.weight[:, 0])
        if self.norm is None:
            return self.linear.weight, bias
        scale, shift = batch_norm_affine(self.norm)
        return self.linear.weight * scale[:, None], bias * scale + shift

    def openpcdet_keys(self) -> list[KeyPair]:
        return [KeyPair(name, name) for name in self.state_dict()]


def _inference_layers(
    layers: Sequence[PFNLayer], x: torch.Tensor, cell: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The PFN layers in eval mode without grad, computing what ``layer(x, cell, pool)`` in turn does
    with less memory traffic: BatchNorm folded into the Linear; the next layer's Linear over
    ``[x, pooled[cell]]`` split into ``x @ Wa`` per point plus ``pooled @ Wb`` per cell (no (N, 2C)
    concatenation); and the last layer's max taken before adding its per-cell term and the ReLU,
    since ``max_i relu(a_i + c) = relu(max_i a_i + c)`` (float addition and ReLU are monotonic),
    so its (N, C) output is never formed. Equal to the layers up to float summation order.
    """
    pooled = None  # the previous layer's (M, C) maxima, which its points carry as their second half
    for layer in layers:
        weight, bias = layer.affine()
        if pooled is None:
            pre, cell_term = torch.addmm(bias, x, weight.T), None
        else:
            half = x.shape[1]
            pre, cell_term = x @ weight[:, :half].T, torch.addmm(bias, pooled, weight[:, half:].T)
        if layer.last_layer:
            best = pool(pre)
            return layer.relu(best if cell_term is None else best.add_(cell_term))
        if cell_term is not None:
            pre.add_(cell_term.index_select(0, cell))
        x = pre.clamp_(min=0)
        pooled = pool(x)
    raise AssertionError("the last PFN layer returns")


class _DynamicPFNEncoder(nn.Module):
    """What the pillar and voxel encoders share; ``_pillar`` picks the cell shape."""

    _pillar: bool

    def __init__(
        self,
        grid: VoxelGrid,
        in_channels: int = 5,
        layer_channels: Sequence[int] = (128, 128),
        use_norm: bool = True,
        with_distance: bool = False,
        use_absolute_xyz: bool = True,
        tanh_columns: Sequence[int] = (),
        mask_z: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 3 or not layer_channels:
            raise ValueError(
                f"{type(self).__name__}: need in_channels >= 3 and at least one layer, got "
                f"in_channels={in_channels}, layer_channels={list(layer_channels)}"
            )
        self.grid = grid
        self.in_channels = in_channels
        self.use_norm = use_norm
        self.with_distance = with_distance
        self.use_absolute_xyz = use_absolute_xyz
        self.tanh_columns = tuple(int(c) for c in tanh_columns)
        self.mask_z = mask_z
        if any(not 3 <= c < in_channels for c in self.tanh_columns):
            raise ValueError(f"{type(self).__name__}.tanh_columns: feature columns in [3, {in_channels}), "
                             f"got {list(self.tanh_columns)}")
        self.out_channels = int(layer_channels[-1])
        widths = [in_channels + (6 if use_absolute_xyz else 3) + int(with_distance)] + [int(c) for c in layer_channels]
        self.pfn_layers = nn.ModuleList(
            PFNLayer(widths[i], widths[i + 1], use_norm, last_layer=i == len(layer_channels) - 1)
            for i in range(len(layer_channels))
        )
        # The reference's constants: its range is a float32 array; sizes are the config's floats.
        self._range_min = [float(v) for v in np.asarray(grid.point_cloud_range[:3], dtype=np.float32)]
        self._offset = [float(s) / 2 + m for s, m in zip(grid.voxel_size, self._range_min)]

    def forward(self, points: PointBatch) -> SparseVoxels:
        _check_columns(self, points)
        axes = 2 if self._pillar else 3
        p = points.points
        if self.tanh_columns:
            p = p.clone()
            p[:, self.tanh_columns] = torch.tanh(p[:, self.tanh_columns])
        low = torch.tensor(self._range_min[:axes], dtype=torch.float32, device=p.device)
        size = torch.tensor(self.grid.voxel_size[:axes], dtype=torch.float32, device=p.device)
        extent = torch.tensor(self.grid.grid_size[:axes], device=p.device)
        index = torch.floor((p[:, :axes] - low) / size).int()
        kept = ((index >= 0) & (index < extent)).all(dim=1)
        if self._pillar and self.mask_z:
            z_low, z_high = (float(v) for v in np.asarray(self.grid.point_cloud_range[2::3], dtype=np.float32))
            kept &= (p[:, 2] >= z_low) & (p[:, 2] <= z_high)
        kept = kept.nonzero().squeeze(1)
        p, index, batch = p.index_select(0, kept), index.index_select(0, kept), points.batch_index.index_select(0, kept)
        zeros = torch.zeros_like(batch)
        z = zeros if self._pillar else index[:, 2].long()
        coords = torch.stack([batch, z, index[:, 1].long(), index[:, 0].long()], dim=1)
        depth = 1 if self._pillar else self.grid.grid_size[2]
        shape = (points.batch_size, depth, self.grid.grid_size[1], self.grid.grid_size[0])
        keys, cell, counts = torch.unique(linear_keys(coords, shape), return_inverse=True, return_counts=True)
        num_cells = keys.shape[0]
        if _SORT_ROWS_BY_CELL.get(p.device.type, False):
            # Rows sorted by cell make every cell maximum a sequential segment reduction: scattered
            # atomics serialise on crowded cells (a real scan puts hundreds of points in some).
            order = torch.argsort(cell, stable=True)
            p, index, cell = p.index_select(0, order), index.index_select(0, order), cell.index_select(0, order)
            pool = functools.partial(segment_max, lengths=counts)
        else:
            pool = functools.partial(scatter_max, index=cell, num_groups=num_cells)

        xyz = p[:, :3]
        cluster = xyz - scatter_mean(xyz, cell, num_cells)[cell]
        center = torch.zeros_like(xyz)
        vx, vy, vz = self.grid.voxel_size
        center[:, 0] = xyz[:, 0] - (index[:, 0].to(xyz.dtype) * vx + self._offset[0])
        center[:, 1] = xyz[:, 1] - (index[:, 1].to(xyz.dtype) * vy + self._offset[1])
        if self._pillar:
            center[:, 2] = xyz[:, 2] - self._offset[2]
        else:
            center[:, 2] = xyz[:, 2] - (index[:, 2].to(xyz.dtype) * vz + self._offset[2])
        parts = [p if self.use_absolute_xyz else p[:, 3:], cluster, center]
        if self.with_distance:
            parts.append(torch.norm(xyz, 2, dim=1, keepdim=True))
        x = torch.cat(parts, dim=-1)
        if not self.training and not torch.is_grad_enabled():
            x = _inference_layers(self.pfn_layers, x, cell, pool)
        else:
            for layer in self.pfn_layers:
                x = layer(x, cell, pool)
        return SparseVoxels(decode_keys(keys, shape), x, self.grid, points.batch_size)

    def openpcdet_keys(self) -> list[KeyPair]:
        """State-dict names relative to this module, as in OpenPCDet's ``vfe.`` (identical)."""
        return [KeyPair(name, name) for name in self.state_dict()]

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, tanh_columns={self.tanh_columns}, mask_z={self.mask_z}, "
                f"use_absolute_xyz={self.use_absolute_xyz}, "
                f"with_distance={self.with_distance}, grid={self.grid}")


class DynamicPillarVFE(_DynamicPFNEncoder):
    """OpenPCDet's ``DynamicPillarVFE``: one cell per (x, y) pillar of ``grid`` (its z extent is ignored).

    Args:
        grid: the grid; its x, y cells are the pillars, ``voxel_size[2]`` and the z range only set
            the z centre offset (``z - (z_min + voxel_size_z / 2)``).
        in_channels: point columns, x, y, z first (5 on nuScenes: x, y, z, intensity, time lag).
        layer_channels: the PFN layers' widths (the reference's ``NUM_FILTERS``; nuScenes DSVT: 128, 128).
        use_norm: BatchNorm in the PFN layers (``USE_NORM``).
        with_distance: append each point's distance to the origin (``WITH_DISTANCE``).
        use_absolute_xyz: keep x, y, z among the point inputs (``USE_ABSLOTE_XYZ``).
        tanh_columns: point columns replaced by their tanh first: the reference's Waymo loader does
            this to intensity and elongation (``POINTS_TANH_DIM: [3, 4]``), so a model given raw Waymo
            values computes what the reference computes from its loader's (numpy's tanh there,
            torch's here: equal to about one float32 ulp).
        mask_z: also drop points with z outside ``[z_min, z_max]`` (bounds included), as the DSVT
            repository's data pipeline does with ``MASK_Z`` (its nuScenes config); False keeps every z,
            as OpenPCDet's encoder (the voxel encoder ignores this: its cells bound z).

    ``forward``: ``PointBatch`` (N, in_channels) → ``SparseVoxels`` (M, layer_channels[-1]) with
    coords (b, 0, y, x), points outside the x / y range (and with ``mask_z`` the z range) dropped.
    """

    _pillar = True


class DynamicVoxelVFE(_DynamicPFNEncoder):
    """OpenPCDet's ``DynamicVoxelVFE`` (the DSVT repository's ``DynamicPillarVFE_3d``): cells are the
    3D voxels of ``grid``, the centre offset is 3D.

    Args: as :class:`DynamicPillarVFE` (Waymo DSVT-Voxel: 5 columns, layers 192, 192).

    ``forward``: ``PointBatch`` (N, in_channels) → ``SparseVoxels`` (M, layer_channels[-1]) with
    coords (b, z, y, x), points outside the x / y / z range dropped.
    """

    _pillar = False
