"""VoxelNeXt's sparse-convolution backbone (Chen et al., "VoxelNeXt: Fully Sparse VoxelNet for 3D
Object Detection and Tracking", CVPR 2023).

A SECOND-style sparse ResNet over 3D voxels with two *extra* down-sampling stages: their features,
at strides 16 and 32, are scattered back onto the stride-8 voxels (sparse addition), which gives
the large receptive field a fully sparse head needs without any dense BEV map. The 3D voxels are
then flattened to a sparse BEV tensor by summing over height (sparse height compression) and refined
by a sparse 2D convolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from voxsparse.models.fusion import fuse_conv_bn
from voxsparse.models.keys import KeyPair, TensorKind
from voxsparse.models.layers import BN_EPS, BN_MOMENTUM, batch_norm_1d, sparse_conv_block
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_plan import (
    ConvPairs,
    IndexStream,
    is_sparse_conv,
    plan_indices,
    run_conv,
    run_features,
)
from voxsparse.ops.sparse_plan import supported as index_first_supported
from voxsparse.ops.sparse_utils import sum_rows, unique_coords
from voxsparse.structures import Annotations3D, SparseBEV, SparseVoxels, VoxelGrid


class SparseBasicBlock(spnn.SparseModule):
    """Residual block of two submanifold 3x3(x3) convolutions that keep the active set.

    ``bias``: the convolutions carry a bias before their BatchNorm (OpenPCDet's block does).
    """

    def __init__(self, channels: int, indice_key: str, dims: int = 3, bias: bool = False) -> None:
        super().__init__()
        conv_cls = spnn.SubMConv3d if dims == 3 else spnn.SubMConv2d
        self.conv1 = conv_cls(channels, channels, 3, padding=1, bias=bias, indice_key=indice_key)
        self.bn1 = batch_norm_1d(channels)
        self.conv2 = conv_cls(channels, channels, 3, padding=1, bias=bias, indice_key=indice_key)
        self.bn2 = batch_norm_1d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        mid = self.conv1(x)
        mid = mid.replace_feature(self.act1(self.bn1(mid.features)))
        out = self.conv2(mid)
        return out.replace_feature(self._add_identity(out.features, x.features))

    def forward_features(self, features: torch.Tensor, pairs: dict[str, ConvPairs]) -> torch.Tensor:
        """The block on (M, C) features with precomputed pairs (index-first execution)."""
        mid = self.act1(self.bn1(run_conv(self.conv1, features, pairs[self.conv1.indice_key])))
        return self._add_identity(run_conv(self.conv2, mid, pairs[self.conv2.indice_key]), features)

    def _add_identity(self, out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(out) + identity)

    def fuse_(self) -> None:
        """Fold both BatchNorms into their convolutions, and on CUDA the first ReLU into conv1's
        kernel (inference only; see :func:`voxsparse.models.fusion.fuse_for_inference`)."""
        self.bn1, self.act1 = fuse_conv_bn(self.conv1, self.bn1, self.act1)
        self.bn2, _ = fuse_conv_bn(self.conv2, self.bn2, None)


@dataclass
class SparseLevel:
    """One resolution of 3D voxel features to project.

    Attributes:
        coords: (M, 4) int (batch, z, y, x) at this level.
        features: (M, C).
        scale: this level's voxels are ``scale`` BEV cells wide (1 for the BEV resolution itself).
    """

    coords: torch.Tensor
    features: torch.Tensor
    scale: int


def bev_projection(
    level_coords: Sequence[tuple[torch.Tensor, int]], bev_shape: tuple[int, int], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BEV cells that the voxels of several levels land on (the index half of :func:`project_to_bev`).

    A level's (y, x) indices are multiplied by its scale to land on the BEV grid (clamped to it: an
    odd extent rounds up when halved) and z is dropped.

    Args:
        level_coords: per level, (M_l, 4) int (batch, z, y, x) coordinates and the level's scale.
        bev_shape: (H, W) of the BEV grid.
        batch_size: frames.

    Returns:
        (U, 3) int32 (batch, y, x) cells sorted lexicographically, and (sum M_l,) int64: the cell
        of each voxel, levels concatenated in order.
    """
    h, w = bev_shape
    coords = []
    for level, scale in level_coords:
        c = level[:, [0, 2, 3]].clone()
        c[:, 1:] *= scale
        coords.append(c)
    bev_coords = torch.cat(coords)
    bev_coords[:, 1].clamp_(max=h - 1)
    bev_coords[:, 2].clamp_(max=w - 1)
    return unique_coords(bev_coords, (batch_size, h, w))


def project_to_bev(
    levels: Sequence[SparseLevel], bev_shape: tuple[int, int], batch_size: int, bev_stride: int,
    grid: VoxelGrid, encoding: Callable[[torch.Tensor, int, VoxelGrid], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse height compression of several levels into one BEV grid, with the spatial encoding.

    Every voxel lands on a cell as in :func:`bev_projection`, and the features of every voxel that
    lands on a cell are summed. With ``encoding``, ``encoding(coords)`` is added to each voxel's
    features first.

    Args:
        levels: the levels (same channel count C).
        bev_shape: (H, W) of the BEV grid.
        batch_size: frames.
        bev_stride: BEV cell size in input voxels of ``grid`` (a level's voxel is ``bev_stride * scale``).
        grid: the input voxel grid.
        encoding: ``encoding(coords, stride, grid)`` -> (M, C) added to each level's features before
            the sum (VoxelKP's spatial encoding), or None for plain height compression (VoxelNeXt's).

    Returns:
        (U, 3) int32 (batch, y, x) cells sorted lexicographically and their (U, C) features.
    """
    bev_coords, inverse = bev_projection([(level.coords, level.scale) for level in levels], bev_shape, batch_size)
    feats = []
    for level in levels:
        f = level.features
        if encoding is not None:
            f = f + encoding(level.coords, bev_stride * level.scale, grid).to(f.dtype)
        feats.append(f)
    return bev_coords, sum_rows(torch.cat(feats), inverse, len(bev_coords))


class VoxelNeXtBackbone(nn.Module):
    """Sparse ResNet over 3D voxels with extra down-sampling and sparse height compression.

    Stage ``i`` (i >= 1) starts with a stride-2 sparse convolution; stage 0 keeps the input
    resolution. ``bev_stage`` is the stage whose resolution the BEV output has (stride
    ``2 ** bev_stage``); the stages after it are the extra down-sampling stages, added back to it.

    Args:
        in_channels: voxel feature channels from the voxel encoder.
        channels: output channels of each stage, e.g. (16, 32, 64, 128, 128, 128).
        blocks: residual blocks per stage, same length as ``channels``.
        bev_stage: index of the stage the extra stages are added to (3 ⇒ output stride 8).
        out_channels: channels of the sparse BEV output.
        down_kernel_sizes: kernel size of the stride-2 convolution that starts each stage after the
            first (padding ``k // 2``); None: 3 everywhere.
        z_padding: cells added to the top of the input grid's z extent (OpenPCDet's sparse shape is
            ``grid_size[::-1] + [1, 0, 0]``: 1). It changes which voxels the strided convolutions
            create along z, hence the output.
        block_bias: the residual blocks' convolutions carry biases (OpenPCDet's do).
        bn_momentum: momentum of the BatchNorms (except ``bev_subm``'s); see ``models/layers.py``.
        bev_subm_bias, bev_subm_eps, bev_subm_momentum: the last submanifold 2D conv's bias and its
            BatchNorm's settings (OpenPCDet's ``shared_conv``: a bias, PyTorch's defaults 1e-5, 0.1).
        focal: ``(in_channels, out_channels, voxel_stride, indice_key) ->`` a focal sparse conv
            (:class:`~voxsparse.models.backbones.focal.FocalSparseConv`, a Hydra partial) closing each
            stage of ``focal_stages``; its importance loss is :meth:`auxiliary_losses`.
        focal_stages: the stages (indices into ``channels``) a focal sparse conv closes; none by default.

    The defaults are voxsparse's design. OpenPCDet's ``VoxelResBackBone8xVoxelNeXt`` (whose
    parameters :meth:`openpcdet_keys` names) is ``channels = (*CHANNELS, CHANNELS[4])``, ``blocks``
    all 2, ``bev_stage=3``, ``out_channels=OUT_CHANNEL``, ``down_kernel_sizes = (*SPCONV_KERNEL_SIZES,
    SPCONV_KERNEL_SIZES[3])``, ``z_padding=1``, ``block_bias=True``, ``bn_momentum=0.01``,
    ``bev_subm_bias=True``, ``bev_subm_eps=1e-5``, ``bev_subm_momentum=0.1``
    (``configs/model/voxelnext_{nuscenes,waymo,argo2}.yaml``).

    Input: ``SparseVoxels`` (M voxels). Output: ``SparseBEV`` with ``out_channels`` features.

    The forward is index-first (:mod:`voxsparse.ops.sparse_plan`), in training and in inference:
    stage by stage, the stage's index pairs (on CUDA on a side stream, whose syncs do not wait for
    queued feature kernels), then its features, which never synchronise; the BEV projection's cells
    likewise. ``index_first = False`` runs spconv's modules layer by layer. Both give the same
    output and gradients.
    """

    index_first: bool = True

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 128, 128),
        blocks: Sequence[int] = (1, 2, 2, 2, 2, 2),
        bev_stage: int = 3,
        out_channels: int = 128,
        down_kernel_sizes: Sequence[int] | None = None,
        z_padding: int = 0,
        block_bias: bool = False,
        bn_momentum: float = BN_MOMENTUM,
        bev_subm_bias: bool = False,
        bev_subm_eps: float = BN_EPS,
        bev_subm_momentum: float = BN_MOMENTUM,
        focal: Callable[..., nn.Module] | None = None,
        focal_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if focal_stages and (focal is None or any(not 0 <= i < len(channels) for i in focal_stages)):
            raise ValueError(f"focal_stages {tuple(focal_stages)}: expected stages of {len(channels)} and a focal factory")
        down_kernel_sizes = (3,) * (len(channels) - 1) if down_kernel_sizes is None else tuple(down_kernel_sizes)
        if len(down_kernel_sizes) != len(channels) - 1 or any(k < 1 or k % 2 == 0 for k in down_kernel_sizes):
            raise ValueError(f"down_kernel_sizes {down_kernel_sizes}: expected {len(channels) - 1} odd sizes, "
                             "one per stage after the first")
        if z_padding < 0:
            raise ValueError(f"z_padding: expected >= 0, got {z_padding}")
        if len(channels) != len(blocks):
            raise ValueError(f"channels {tuple(channels)} and blocks {tuple(blocks)} must have equal length")
        if not 0 <= bev_stage < len(channels):
            raise ValueError(f"bev_stage={bev_stage} must index a stage of {len(channels)}")
        if any(c != channels[bev_stage] for c in channels[bev_stage:]):
            raise ValueError("the extra down-sampling stages must keep the BEV stage's channel count")
        self.bev_stage = bev_stage
        self.out_channels = out_channels
        self.z_padding = z_padding
        self.stem = sparse_conv_block(in_channels, channels[0], 3, indice_key="subm0")
        self.stages = nn.ModuleList()
        prev = channels[0]
        for i, (c, n) in enumerate(zip(channels, blocks)):
            layers: list[nn.Module] = []
            if i > 0:
                k = down_kernel_sizes[i - 1]
                layers.append(sparse_conv_block(prev, c, k, stride=2, indice_key=f"down{i}", subm=False))
            layers += [SparseBasicBlock(c, indice_key=f"subm{i}", bias=block_bias) for _ in range(n)]
            self.stages.append(spnn.SparseSequential(*layers))
            prev = c
        self.bev_conv = sparse_conv_block(prev, out_channels, 3, indice_key="bev_out", subm=False, dims=2)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = bn_momentum
        self.bev_subm = spnn.SparseSequential(
            spnn.SubMConv2d(out_channels, out_channels, 3, padding=1, bias=bev_subm_bias, indice_key="bev_subm"),
            nn.BatchNorm1d(out_channels, eps=bev_subm_eps, momentum=bev_subm_momentum),
            nn.ReLU(inplace=True),
        )
        # Focal sparse convs closing stages (by stage index), after the BatchNorm momentum above: they
        # take the factory's settings.
        self.focal = nn.ModuleDict({
            str(i): focal(in_channels=channels[i], out_channels=channels[i], voxel_stride=2**i, indice_key=f"focal{i}")
            for i in sorted(set(focal_stages))
        })
        # Added to the voxel features before height compression (VoxelKP's spatial encoding); none here.
        self.bev_encoding: nn.Module | None = None

    @property
    def stride(self) -> int:
        return 2**self.bev_stage

    def input_shape(self, grid: VoxelGrid) -> list[int]:
        """(z, y, x) spatial shape of the sparse input tensor: the grid's, with ``z_padding`` more z cells."""
        z, y, x = grid.spatial_shape
        return [z + self.z_padding, y, x]

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry under its name in OpenPCDet's ``VoxelResBackBone8xVoxelNeXt``
        (relative to ``backbone_3d.``); only for the six-stage, stride-8 layout it has."""
        if len(self.stages) != 6 or self.bev_stage != 3 or len(self.focal) or any(
            sum(isinstance(m, SparseBasicBlock) for m in stage) != 2 for stage in self.stages
        ):
            raise ValueError("openpcdet_keys: this backbone is not laid out as OpenPCDet's VoxelNeXt backbone "
                             "(six stages of two residual blocks, BEV at stage 3)")
        prefixes = {"stem.": "conv_input.", "bev_conv.": "conv_out.", "bev_subm.": "shared_conv."}
        prefixes.update({f"stages.{i}.": f"conv{i + 1}." for i in range(6)})
        convs = {name for name, m in self.named_modules() if is_sparse_conv(m)}
        pairs = []
        for key in self.state_dict():
            ours_prefix = next(p for p in prefixes if key.startswith(p))
            module, _, leaf = key.rpartition(".")
            kind = TensorKind.SPARSE_CONV if module in convs and leaf == "weight" else TensorKind.TENSOR
            pairs.append(KeyPair(key, prefixes[ours_prefix] + key[len(ours_prefix):], kind))
        return pairs

    def auxiliary_losses(self, annotations: Sequence[Annotations3D]) -> dict[str, torch.Tensor]:
        """``{"importance": ...}``, the focal sparse convs' importance loss of the last forward
        (summed over layers), or ``{}`` without focal sparse convs."""
        from voxsparse.models.backbones.focal import importance_losses  # focal builds on this module

        return importance_losses(self.focal, annotations)

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        for layer in self.focal.values():  # no stale importance from an earlier batch
            layer.last_importance = None
        if len(voxels) == 0:  # spconv cannot convolve an empty tensor; there is nothing to compute
            return self._empty_output(voxels)
        if self.index_first and self._plain() and index_first_supported():
            return self._forward_index_first(voxels)
        return self._forward_layer_by_layer(voxels)

    def _forward_layer_by_layer(self, voxels: SparseVoxels) -> SparseBEV:
        x = SparseConvTensor(voxels.features, voxels.coords.int(), self.input_shape(voxels.grid), voxels.batch_size)
        outputs = self._run_stages(self.stem(x), voxels)
        base = outputs[self.bev_stage]
        # The extra stages are added back onto the BEV stage's grid (sparse addition).
        levels = [SparseLevel(base.indices, base.features, 1)]
        levels += [
            SparseLevel(extra.indices, extra.features, 2**level)
            for level, extra in enumerate(outputs[self.bev_stage + 1 :], start=1)
        ]
        _, h, w = base.spatial_shape
        bev_coords, bev_feats = project_to_bev(
            levels, (h, w), voxels.batch_size, self.stride, voxels.grid, self.bev_encoding
        )
        bev = SparseConvTensor(bev_feats, bev_coords, [h, w], voxels.batch_size)
        bev = self.bev_subm(self.bev_conv(bev))
        return SparseBEV(bev.indices, bev.features, (h, w), self.stride, voxels.grid, voxels.batch_size)

    @contextmanager
    def layer_by_layer(self) -> Iterator[VoxelNeXtBackbone]:
        """Within the block, ``forward`` runs spconv's modules layer by layer (the reference path)."""
        previous, self.index_first = self.index_first, False
        try:
            yield self
        finally:
            self.index_first = previous

    def _plain(self) -> bool:
        """True when nothing beyond VoxelNeXt's layers runs (subclasses such as VoxelKP's add per-stage
        blocks and a BEV encoding, which the index-first path does not know)."""
        return type(self)._run_stages is VoxelNeXtBackbone._run_stages and self.bev_encoding is None \
            and not len(self.focal)

    def _forward_index_first(self, voxels: SparseVoxels) -> SparseBEV:
        """Stage by stage: the stage's index pairs (on the side stream), then its feature kernels."""
        batch_size = voxels.batch_size
        pairs: dict[str, ConvPairs] = {}
        stream = IndexStream(voxels.features.device)
        indices, shape = voxels.coords.int(), self.input_shape(voxels.grid)
        features = voxels.features
        levels, level_features = [], []
        for number, part in enumerate([self.stem, *self.stages]):
            with stream.indices():
                indices, shape = plan_indices(part, indices, shape, batch_size, pairs)
            features = run_features(part, features, pairs)
            if number > self.bev_stage:  # stages from the BEV stage on (the stem is part 0)
                if not levels:
                    _, h, w = shape
                levels.append(indices)
                level_features.append(features)
        with stream.indices():
            bev_coords, inverse = bev_projection(
                [(coords, 2**level) for level, coords in enumerate(levels)], (h, w), batch_size
            )
            bev_indices, _ = plan_indices(self.bev_conv, bev_coords, [h, w], batch_size, pairs)
            plan_indices(self.bev_subm, bev_indices, [h, w], batch_size, pairs)
        bev = sum_rows(torch.cat(level_features), inverse, len(bev_coords))
        bev = run_features(self.bev_subm, run_features(self.bev_conv, bev, pairs), pairs)
        return SparseBEV(bev_indices, bev, (h, w), self.stride, voxels.grid, batch_size)

    def _run_stages(self, x: SparseConvTensor, voxels: SparseVoxels) -> list[SparseConvTensor]:
        """Every stage's output, in order (subclasses add per-stage blocks here)."""
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if str(i) in self.focal:
                x = self.focal[str(i)](x, voxels.grid)
            outputs.append(x)
        return outputs

    def _empty_output(self, voxels: SparseVoxels) -> SparseBEV:
        _, h, w = self.input_shape(voxels.grid)
        for _ in range(self.bev_stage):  # each stride-2 conv with padding 1 rounds up
            h, w = (h + 1) // 2, (w + 1) // 2
        coords = voxels.coords.new_zeros(0, 3)
        feats = voxels.features.new_zeros(0, self.out_channels)
        return SparseBEV(coords, feats, (h, w), self.stride, voxels.grid, voxels.batch_size)
