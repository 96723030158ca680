"""Project-wide conventions shared by data, models and evaluation.

Class names are not among them: each dataset module owns its own (``voxsparse.data.synthetic``,
``voxsparse.data.waymo``, ``voxsparse.data.nuscenes``), and a model records those it was trained on.
"""

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
