"""VoxelKP (Shi & Wonka, "VoxelKP: A Voxel-based Network Architecture for Human Keypoint Estimation in
LiDAR Data", 2023): its four backbone modules, the backbone that assembles them, and the typed output.

The keypoint head is :mod:`voxsparse.models.heads.keypoint_head`, the detector
:mod:`voxsparse.models.detectors.keypoint_detector`.
"""
