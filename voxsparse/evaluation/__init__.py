from voxsparse.evaluation.keypoints import (  # noqa: F401
    FrameKeypointGroundTruth,
    FrameKeypointPredictions,
    KeypointMetrics,
    evaluate_keypoints,
    match_humans,
)
from voxsparse.evaluation.nuscenes import (  # noqa: F401
    NuScenesMetrics,
    evaluate_nuscenes,
    export_submission,
)
