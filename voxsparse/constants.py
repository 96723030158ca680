"""Project-wide conventions shared by data, models and evaluation."""

#: Detection classes, in label order (label ``i`` is ``CLASS_NAMES[i]``).
CLASS_NAMES: tuple[str, ...] = ("Vehicle", "Pedestrian", "Cyclist")

#: Waymo 3D keypoint challenge order (14 keypoints).
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "head_center",
)
