"""CenterPoint's dense head (Yin et al., CVPR 2021), the baseline the sparse head is compared with.

The sparse BEV is scattered to a dense map, convolved densely, and every cell predicts; the
targets, losses and decoding are the same as the sparse head's (:mod:`center_head`).
"""

from __future__ import annotations

import torch
from torch import nn

from voxsparse.models.heads.center_head import CenterHeadBase, CenterPredictions, init_heatmap_bias
from voxsparse.models.layers import batch_norm_2d
from voxsparse.structures import SparseBEV


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        batch_norm_2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CenterPointHead(CenterHeadBase):
    """Dense head: shared 3x3 conv, then per output ``num_convs`` 3x3 convs and a 1x1 output conv
    (keyword arguments such as ``with_iou`` go to :class:`CenterHeadBase`).

    Input: ``SparseBEV`` with spatial shape (H, W). Output: :class:`CenterPredictions` at all
    B * H * W cells.
    """

    def __init__(
        self, in_channels: int, num_classes: int, head_channels: int = 64, num_convs: int = 1, **kwargs
    ) -> None:
        super().__init__(num_classes, **kwargs)
        self.shared = _conv_bn_relu(in_channels, head_channels)
        self.branches = nn.ModuleDict(
            {
                name: nn.Sequential(
                    *[_conv_bn_relu(head_channels, head_channels) for _ in range(num_convs)],
                    nn.Conv2d(head_channels, c, 1),
                )
                for name, c in self.output_channels().items()
            }
        )
        init_heatmap_bias(self.branches["heatmap"][-1])

    def forward(self, bev: SparseBEV) -> CenterPredictions:
        h, w = bev.spatial_shape
        b = bev.batch_size
        dense = bev.features.new_zeros(b, h, w, bev.features.shape[1])
        coords = bev.coords.long()
        dense[coords[:, 0], coords[:, 1], coords[:, 2]] = bev.features
        x = self.shared(dense.permute(0, 3, 1, 2).contiguous())
        # (B, C, H, W) -> (B*H*W, C), rows in (batch, y, x) order to match the cell coordinates.
        out = {name: branch(x).permute(0, 2, 3, 1).reshape(b * h * w, -1) for name, branch in self.branches.items()}
        grid = torch.stack(
            torch.meshgrid(
                torch.arange(b, device=dense.device),
                torch.arange(h, device=dense.device),
                torch.arange(w, device=dense.device),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 3)
        return CenterPredictions(
            coords=grid.int(),
            cell_xy=bev.cell_centers(grid),
            velocity=out.pop("velocity", None),
            iou=out.pop("iou", None),
            spatial_shape=bev.spatial_shape,
            cell_size=bev.cell_size,
            batch_size=b,
            **out,
        )
