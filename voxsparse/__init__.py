"""voxsparse: fully sparse 3D LiDAR perception."""

__version__ = "0.1.0"
