"""VoxelKP (Shi & Wonka, "VoxelKP: A Voxel-based Network Architecture for Human Keypoint Estimation in
LiDAR Data", 2023): its four backbone modules, the backbone that assembles them, and the typed output.

The keypoint head is :mod:`voxsparse.models.heads.keypoint_head`, the detector
:mod:`voxsparse.models.detectors.keypoint_detector`. The authors' network as their code computes it,
whose checkpoints load: :mod:`.reference` (backbone) and :mod:`.reference_head` (keypoint head),
``configs/model/voxelkp_waymo_reference.yaml``.
"""
