"""VoxelNeXt's fully sparse detection head: boxes predicted directly at occupied BEV voxels."""

from __future__ import annotations

from torch import nn

from voxsparse.models.heads.center_head import CenterHeadBase, CenterPredictions, init_heatmap_bias
from voxsparse.models.layers import sparse_conv_block
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.structures import SparseBEV


class _SparseBranch(nn.Module):
    """Submanifold 2D conv layers then a per-voxel linear output."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, kernel_size: int, key: str) -> None:
        super().__init__()
        self.convs = spnn.SparseSequential(
            *[sparse_conv_block(in_channels, in_channels, kernel_size, indice_key=key, dims=2) for _ in range(num_convs)]
        )
        self.out = nn.Linear(in_channels, out_channels)

    def forward(self, x: SparseConvTensor | None, empty_features=None):
        if x is None:  # no occupied cells: spconv cannot run, the linear layer gives (0, C) outputs
            return self.out(empty_features)
        return self.out(self.convs(x).features)


class VoxelNeXtHead(CenterHeadBase):
    """Sparse head: a shared submanifold conv, then one branch per output at every occupied cell.

    Args:
        in_channels: channels of the backbone's sparse BEV.
        num_classes: heatmap channels.
        head_channels: width of the shared conv and branches.
        num_convs: submanifold convs per branch before its linear output.
        kernel_size: of every submanifold conv.
        **kwargs: :class:`CenterHeadBase` options (velocity, IoU branch, loss weights, decoding).

    Input: ``SparseBEV`` (M cells). Output: :class:`CenterPredictions` at those M cells.
    """

    def __init__(
        self, in_channels: int, num_classes: int, head_channels: int = 64, num_convs: int = 1,
        kernel_size: int = 3, **kwargs,
    ) -> None:
        super().__init__(num_classes, **kwargs)
        key = "head_subm"
        self.shared = sparse_conv_block(in_channels, head_channels, kernel_size, indice_key=key, dims=2)
        self.branches = nn.ModuleDict(
            {name: _SparseBranch(head_channels, c, num_convs, kernel_size, key) for name, c in self.output_channels().items()}
        )
        init_heatmap_bias(self.branches["heatmap"].out)

    def forward(self, bev: SparseBEV) -> CenterPredictions:
        if len(bev) == 0:
            empty = bev.features.new_zeros(0, self.branches["heatmap"].out.in_features)
            out = {name: branch(None, empty) for name, branch in self.branches.items()}
        else:
            x = SparseConvTensor(bev.features, bev.coords.int(), list(bev.spatial_shape), bev.batch_size)
            x = self.shared(x)
            out = {name: branch(x) for name, branch in self.branches.items()}
        return CenterPredictions(
            coords=bev.coords,
            cell_xy=bev.cell_centers(),
            velocity=out.pop("velocity", None),
            iou=out.pop("iou", None),
            spatial_shape=bev.spatial_shape,
            cell_size=bev.cell_size,
            batch_size=bev.batch_size,
            **out,
        )
