from voxsparse.evaluation.keypoints import (  # noqa: F401
    FrameKeypointGroundTruth,
    FrameKeypointPredictions,
    KeypointMetrics,
    evaluate_keypoints,
    match_humans,
)
