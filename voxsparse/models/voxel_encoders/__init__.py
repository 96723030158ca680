"""Voxel feature encoders: ``PointBatch`` → ``SparseVoxels`` (dynamic voxelization + per-voxel encoding)."""

from voxsparse.models.voxel_encoders.dynamic_pillar import DynamicPillarVFE, DynamicVoxelVFE
from voxsparse.models.voxel_encoders.mean_vfe import MeanVFE
from voxsparse.models.voxel_encoders.voxelnet_vfe import VoxelNetVFE

__all__ = ["DynamicPillarVFE", "DynamicVoxelVFE", "MeanVFE", "VoxelNetVFE"]
