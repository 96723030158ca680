"""Tracking on the synthetic world: held-out sequences, scored as nuScenes car / pedestrian / bicycle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from voxsparse.data.synthetic.dataset import SyntheticDataset
from voxsparse.data.tracking import TrackingSequences

#: Synthetic class -> (nuScenes category, nuScenes tracking name).
NUSCENES_CLASSES: Mapping[str, tuple[str, str]] = {
    "Vehicle": ("vehicle.car", "car"),
    "Pedestrian": ("human.pedestrian.adult", "pedestrian"),
    "Cyclist": ("vehicle.bicycle", "bicycle"),
}


class SyntheticTracking:
    """``num_sequences`` sequences of ``sequence_length`` frames of ``split`` (``configs/dataset/synthetic.yaml``,
    ``tracking``), generated with the LiDAR, scene and cache of ``frames`` (the val split's dataset).

    The ground truth is written as a tiny nuScenes dataset with the exact per-frame poses; the detector
    sees a square range, so scoring is limited to its inscribed circle (``range_limited``).
    """

    def __init__(
        self,
        frames: SyntheticDataset,
        split: str = "test",
        seed: int = 0,
        num_sequences: int = 10,
        sequence_length: int = 20,
    ):
        if num_sequences < 1 or sequence_length < 1:
            raise ValueError(
                f"tracking: num_sequences and sequence_length must be >= 1, got {num_sequences}, {sequence_length}"
            )
        self.template = frames
        self.split, self.seed = split, int(seed)
        self.num_sequences, self.sequence_length = int(num_sequences), int(sequence_length)

    def frames(self) -> SyntheticDataset:
        t = self.template
        return SyntheticDataset(
            self.split, self.num_sequences * self.sequence_length, self.seed, t.lidar_config, t.scene_config,
            self.sequence_length, t.cache_dir,
        )

    def sequences(self, frames: SyntheticDataset, frame_ids: Sequence[str]) -> TrackingSequences:
        length = self.sequence_length
        raw = [frames[i] for i in range(len(frames))]  # ego poses and times (the frame cache makes this cheap)
        return TrackingSequences(
            indices=[list(range(q * length, (q + 1) * length)) for q in range(self.num_sequences)],
            timestamps=[f.timestamp for f in raw],
            tracking_names={k: v[1] for k, v in NUSCENES_CLASSES.items()},
            ego_poses=[f.ego_pose for f in raw],
            categories={k: v[0] for k, v in NUSCENES_CLASSES.items()},
            range_limited=True,
        )
