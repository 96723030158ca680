"""Multi-object trackers over per-frame detections."""

from voxsparse.models.trackers.voxelnext_tracker import Track, TrackerConfig, VoxelNeXtTracker, greedy_match

__all__ = ["Track", "TrackerConfig", "VoxelNeXtTracker", "greedy_match"]
