"""The VoxelKP backbone: VoxelNeXt's sparse ResNet with the four VoxelKP modules, each switchable.

With every module off this *is* :class:`~voxsparse.models.backbones.voxelnext.VoxelNeXtBackbone`
(same layers, parameter names and initialisation), so an ablation that turns one module off measures
that module against the plain VoxelNeXt design and nothing else. Turned on:

- ``selective_kernel``: the residual blocks of ``sk_stages`` become selective-kernel blocks
  (:mod:`.selective_kernel`), branches of ``sk_kernel_sizes``;
- ``hybrid``: the residual blocks of ``hybrid_stages`` get a per-voxel MLP beside them (:mod:`.hybrid`);
- ``box_attention``: after the blocks of each of ``box_attention_stages``, ``box_attention_blocks``
  attention blocks within human-sized boxes of ``box_size`` metres, alternating plain and half-box
  shifted tilings (:mod:`.box_attention`);
- ``spatial_encoding``: absolute voxel coordinates are encoded into the features before the sparse
  height compression to BEV (:mod:`.spatial_encoding`).

Stage ``i`` has stride ``2**i`` input voxels. The authors' Waymo network places selective kernels and
the MLP path from stride 4 on and attention at the deepest stages; the configs follow that placement.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.voxelkp.box_attention import BoxAttentionBlock, group_layouts, window_groups
from voxsparse.models.voxelkp.hybrid import HybridBlock
from voxsparse.models.voxelkp.selective_kernel import SelectiveKernelBlock
from voxsparse.models.voxelkp.spatial_encoding import SpatialEncoding
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.structures import SparseVoxels


def _check_stages(name: str, stages: Sequence[int], num_stages: int) -> tuple[int, ...]:
    stages = tuple(int(s) for s in stages)
    bad = [s for s in stages if not 0 <= s < num_stages]
    if bad:
        raise ValueError(f"{name}: stages {bad} do not exist (the backbone has stages 0..{num_stages - 1})")
    return stages


class VoxelKPBackbone(VoxelNeXtBackbone):
    """Sparse ResNet + VoxelKP modules, sparse BEV output.

    Args:
        in_channels, channels, blocks, bev_stage, out_channels: as :class:`VoxelNeXtBackbone`.
        selective_kernel: use selective-kernel residual blocks in ``sk_stages``.
        sk_stages: stages whose residual blocks select kernels.
        sk_kernel_sizes: kernel size of each branch.
        sk_reduction: squeeze reduction of the kernel selection.
        hybrid: add the per-voxel MLP path in ``hybrid_stages``.
        hybrid_stages: stages whose residual blocks get the MLP path.
        hybrid_layers: layers of that MLP.
        box_attention: add box-attention blocks in ``box_attention_stages``.
        box_attention_stages: stages followed by attention blocks.
        box_attention_blocks: attention blocks per such stage (odd ones use the shifted tiling).
        box_size: (x, y, z) box size in metres; at stage ``i`` it is rounded to whole voxels of
            ``2**i`` input voxels (at least one).
        num_heads: attention heads.
        spatial_encoding: encode absolute coordinates in the 3D-to-BEV projection.

    Input: ``SparseVoxels`` (M voxels). Output: ``SparseBEV`` with ``out_channels`` features.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 128, 128),
        blocks: Sequence[int] = (1, 2, 2, 2, 2, 2),
        bev_stage: int = 3,
        out_channels: int = 128,
        selective_kernel: bool = True,
        sk_stages: Sequence[int] = (2, 3, 4, 5),
        sk_kernel_sizes: Sequence[int] = (3, 5),
        sk_reduction: int = 4,
        hybrid: bool = True,
        hybrid_stages: Sequence[int] = (2, 3, 4, 5),
        hybrid_layers: int = 2,
        box_attention: bool = True,
        box_attention_stages: Sequence[int] = (4, 5),
        box_attention_blocks: int = 2,
        box_size: Sequence[float] = (2.0, 2.0, 2.0),
        num_heads: int = 4,
        spatial_encoding: bool = True,
    ) -> None:
        super().__init__(in_channels, channels, blocks, bev_stage, out_channels)
        n = len(channels)
        sk = _check_stages("sk_stages", sk_stages, n) if selective_kernel else ()
        mlp = _check_stages("hybrid_stages", hybrid_stages, n) if hybrid else ()
        attention = _check_stages("box_attention_stages", box_attention_stages, n) if box_attention else ()
        if len(box_size) != 3 or min(box_size) <= 0:
            raise ValueError(f"box_size: expected 3 positive sizes (x, y, z), metres; got {tuple(box_size)}")
        self.box_size = tuple(float(s) for s in box_size)
        for i in sorted(set(sk) | set(mlp)):
            self.stages[i] = self._make_stage(
                i, channels[i], i in sk, i in mlp, sk_kernel_sizes, sk_reduction, hybrid_layers
            )
        self.box_attention = nn.ModuleList(
            nn.ModuleList(BoxAttentionBlock(channels[i], num_heads) for _ in range(box_attention_blocks))
            if i in attention else nn.ModuleList()
            for i in range(n)
        )
        if spatial_encoding:
            self.bev_encoding = SpatialEncoding(channels[bev_stage])

    def _make_stage(
        self, i: int, channels: int, sk: bool, hybrid: bool, kernel_sizes: Sequence[int], reduction: int,
        hybrid_layers: int,
    ) -> nn.Module:
        """Stage ``i`` rebuilt around its down-sampling conv (kept from VoxelNeXt's stage)."""
        layers = list(self.stages[i].children())
        down, residual = (layers[:1], layers[1:]) if i > 0 else ([], layers)
        if sk:
            residual = [SelectiveKernelBlock(channels, f"subm{i}", kernel_sizes, reduction) for _ in residual]
        body: list[nn.Module] = residual
        if hybrid:
            body = [HybridBlock(spnn.SparseSequential(*residual), channels, hybrid_layers)]
        return spnn.SparseSequential(*down, *body)

    def _box_voxels(self, voxels: SparseVoxels, stage: int) -> tuple[int, int, int]:
        """``box_size`` in whole voxels of ``stage``, (x, y, z)."""
        size = [v * 2**stage for v in voxels.grid.voxel_size]
        return tuple(max(1, round(b / s)) for b, s in zip(self.box_size, size))  # type: ignore[return-value]

    def _run_stages(self, x: SparseConvTensor, voxels: SparseVoxels) -> list[SparseConvTensor]:
        """VoxelNeXt's stages, each followed by its box-attention blocks (the plain and the shifted
        tiling and their layouts built once per stage, with one host read)."""
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            blocks = self.box_attention[i]
            if len(blocks):
                box = self._box_voxels(voxels, i)
                tilings = [window_groups(x.indices, x.spatial_shape, box, shifted) for shifted in (False, True)]
                layouts = group_layouts([groups.index for groups in tilings[: len(blocks)]])
                for j, block in enumerate(blocks):
                    x = x.replace_feature(block(x.features, tilings[j % 2], layouts[j % 2]))
            outputs.append(x)
        return outputs
