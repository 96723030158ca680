"""Typed structures that cross module boundaries."""

from voxsparse.structures.bev import DenseBEV
from voxsparse.structures.boxes import Boxes3D
from voxsparse.structures.detections import Annotations3D, Detections3D
from voxsparse.structures.points import INTENSITY_SCALES, PointBatch, PointConvention
from voxsparse.structures.voxels import SparseBEV, SparseVoxels, VoxelGrid

__all__ = [
    "INTENSITY_SCALES",
    "Annotations3D",
    "Boxes3D",
    "DenseBEV",
    "Detections3D",
    "PointBatch",
    "PointConvention",
    "SparseBEV",
    "SparseVoxels",
    "VoxelGrid",
]
