"""Typed structures that cross module boundaries."""

from voxsparse.structures.boxes import Boxes3D
from voxsparse.structures.detections import Annotations3D, Detections3D
from voxsparse.structures.points import PointBatch
from voxsparse.structures.voxels import SparseBEV, SparseVoxels, VoxelGrid

__all__ = ["Annotations3D", "Boxes3D", "Detections3D", "PointBatch", "SparseBEV", "SparseVoxels", "VoxelGrid"]
