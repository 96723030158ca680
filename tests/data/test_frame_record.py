"""One frame record, one validator: LidarFrame, WaymoFrame and PreparedFrame share FrameRecord's checks."""

from __future__ import annotations

import numpy as np
import pytest

from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.prepared import PreparedFrame
from voxsparse.data.synthetic import LidarFrame


def _common(k: int = 2, columns: int = 4, box_width: int = 9) -> dict:
    return {
        "frame_id": "f0", "points": np.zeros((5, columns), np.float32), "boxes": np.ones((k, box_width), np.float32),
        "labels": np.zeros(k, np.int64), "num_points": np.ones(k, np.int64), "difficulty": np.ones(k, np.int64),
        "track_ids": np.arange(k, dtype=np.int64),
    }


def _keypoints(k: int = 2) -> dict:
    return {"keypoints": np.zeros((k, 14, 3), np.float32), "keypoint_visibility": np.zeros((k, 14), bool)}


def _waymo(**changes):
    pytest.importorskip("google_crc32c")
    from voxsparse.data.waymo import POINT_FEATURES, WaymoFrame

    values = dict(
        **_common(columns=len(POINT_FEATURES)), **_keypoints(), point_features=POINT_FEATURES,
        laser_id=np.ones(5, np.uint8), return_index=np.zeros(5, np.uint8), no_label_zone=np.zeros(5, bool),
        timestamp=1.0, ego_pose=np.eye(4), context_name="segment",
    )
    return WaymoFrame(**{**values, **changes})


def test_every_source_is_a_frame_record_checked_by_one_validator():
    lidar = LidarFrame(**_common(), **_keypoints(), timestamp=0.0, ego_pose=np.eye(4))
    prepared = PreparedFrame(**_common(box_width=7), point_features=("x", "y", "z", "intensity"))
    assert isinstance(lidar, FrameRecord) and isinstance(prepared, FrameRecord) and isinstance(_waymo(), FrameRecord)
    assert len(lidar) == 2 and prepared.keypoints is None

    with pytest.raises(TypeError, match="LidarFrame 'f0': labels must be a int64 array, got a int32 array"):
        LidarFrame(**{**_common(), "labels": np.zeros(2, np.int32)}, **_keypoints(), timestamp=0.0, ego_pose=np.eye(4))
    with pytest.raises(ValueError, match=r"LidarFrame 'f0': boxes need 9 columns, got 7"):
        LidarFrame(**_common(box_width=7), **_keypoints(), timestamp=0.0, ego_pose=np.eye(4))
    with pytest.raises(TypeError, match="LidarFrame 'f0': keypoints must be a float32 array, got NoneType"):
        LidarFrame(**_common(), timestamp=0.0, ego_pose=np.eye(4))
    with pytest.raises(ValueError, match=r"frame 'f0': points has shape \(5, 4\), expected \(-1, 3\)"):
        PreparedFrame(**_common())
    with pytest.raises(ValueError, match=r"WaymoFrame 'f0': laser_id has shape \(4,\)"):
        _waymo(laser_id=np.ones(4, np.uint8))
    with pytest.raises(ValueError, match=r"WaymoFrame 'f0': track_ids has shape \(3,\), expected \(2,\)"):
        _waymo(track_ids=np.arange(3, dtype=np.int64))
