"""The Waymo Open Dataset's detection classes and keypoint types (no dependency: read by preparation,
configs and the readers of every format)."""

#: Label order of prepared Waymo frames (label ``i`` is ``CLASS_NAMES[i]``): the ``TYPE_VEHICLE``,
#: ``TYPE_PEDESTRIAN`` and ``TYPE_CYCLIST`` objects (signs are not detected).
CLASS_NAMES: tuple[str, ...] = ("Vehicle", "Pedestrian", "Cyclist")

#: ``KeypointType`` value (``keypoint.proto``; the v2 ``lidar_hkp`` component stores the same integers) of
#: each name of ``voxsparse.constants.KEYPOINT_NAMES``.
KEYPOINT_TYPES: dict[str, int] = {
    "nose": 1, "left_shoulder": 5, "left_elbow": 6, "left_wrist": 7, "left_hip": 8, "left_knee": 9,
    "left_ankle": 10, "right_shoulder": 13, "right_elbow": 14, "right_wrist": 15, "right_hip": 16,
    "right_knee": 17, "right_ankle": 18, "head_center": 20,
}  # fmt: skip
