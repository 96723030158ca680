"""``SyntheticDataset``: frames of the synthetic world, generated on the fly from (split, seed, index).

Frame ``i`` is frame ``i % sequence_length`` of sequence ``i // sequence_length``. Sequence ``s`` of a
split uses the seed ``SPLIT_CODES[split] << 60 | seed << 32 | s`` (``seed < 2**28``, ``s < 2**32``):
the split code occupies bits the other fields never reach, so no two (split, seed, sequence) triples
share a seed and the train, val and test worlds never overlap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from voxsparse.data.synthetic.actors import CLASS_NAMES
from voxsparse.data.synthetic.frame import LidarFrame, make_scene, render_frame
from voxsparse.data.synthetic.lidar import Lidar, LidarConfig
from voxsparse.data.synthetic.scene import Scene, SceneConfig
from voxsparse.utils.io import atomic_write

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}

#: Bump when generation changes, so stale cache files are not reused.
GENERATOR_VERSION = 1


def sequence_seed(split: str, seed: int, sequence: int) -> int:
    """The seed of sequence ``sequence`` of ``split`` (see the module docstring)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split: expected one of {sorted(SPLIT_CODES)}, got {split!r}")
    if not 0 <= seed < 1 << 28:
        raise ValueError(f"seed: expected 0 <= seed < 2**28, got {seed}")
    if not 0 <= sequence < 1 << 32:
        raise ValueError(f"sequence: expected 0 <= sequence < 2**32, got {sequence}")
    return SPLIT_CODES[split] << 60 | seed << 32 | sequence


def _as_config(cls, value):
    """A config dataclass from None, an instance, or a mapping such as a Hydra ``DictConfig``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        plain = {k: v if isinstance(v, (str, int, float, bool)) else tuple(v) for k, v in value.items()}
        return cls(**plain)
    raise TypeError(f"expected {cls.__name__}, a mapping or None, got {type(value).__name__}")


class SyntheticDataset(Dataset):
    """Deterministic frames of procedural street scenes, as :class:`LidarFrame` s.

    Args:
        split: "train", "val" or "test"; their scenes never share a seed.
        num_frames: dataset length.
        seed: base seed (0 <= seed < 2**28); another seed gives another dataset of the same split.
        lidar: sensor model (a ``LidarConfig`` or a mapping of its fields).
        scene: scene generator settings (a ``SceneConfig`` or a mapping of its fields).
        sequence_length: consecutive frames per scene (``scene.frame_rate`` apart); 1 = every frame
            is its own scene.
        cache_dir: if set, frames are saved there (``.npz``, written atomically) and read back on
            later calls; the file name carries a hash of the configs and the generator version.
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        split: str = "train",
        num_frames: int = 1000,
        seed: int = 0,
        lidar: LidarConfig | Mapping | None = None,
        scene: SceneConfig | Mapping | None = None,
        sequence_length: int = 1,
        cache_dir: str | os.PathLike | None = None,
    ):
        if sequence_length < 1:
            raise ValueError(f"sequence_length: expected >= 1, got {sequence_length}")
        sequence_seed(split, seed, 0)  # validates split and seed
        self.split, self.num_frames, self.seed = split, int(num_frames), int(seed)
        self.lidar_config = _as_config(LidarConfig, lidar)
        self.scene_config = _as_config(SceneConfig, scene)
        self.sequence_length = int(sequence_length)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.lidar = Lidar(self.lidar_config)
        self._scene: tuple[int, Scene] | None = None  # last built scene: sequences reuse it
        scene_key = asdict(self.scene_config)
        if not scene_key["varied_pedestrians"]:  # off: the key (and cached files) from before the option
            del scene_key["varied_pedestrians"]
        key = json.dumps(
            [GENERATOR_VERSION, asdict(self.lidar_config), scene_key, self.sequence_length],
            sort_keys=True,
            default=list,
        )
        self._config_hash = hashlib.sha1(key.encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return self.num_frames

    def frame_id(self, index: int) -> str:
        sequence, frame = divmod(index, self.sequence_length)
        return f"synthetic-{self.split}-{self.seed}-{sequence:06d}-{frame:03d}"

    @property
    def frame_ids(self) -> list[str]:
        """Every frame's id, in order, without generating a frame."""
        return [self.frame_id(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> LidarFrame:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self.frame_id(index)}-{self._config_hash}.npz"
            if path.exists():
                return _load(path)
        frame = self._generate(index)
        if path is not None:
            atomic_write(
                path, lambda f: np.savez(f, **{k.name: getattr(frame, k.name) for k in fields(frame)})
            )
        return frame

    def _generate(self, index: int) -> LidarFrame:
        sequence, frame = divmod(index, self.sequence_length)
        seed = sequence_seed(self.split, self.seed, sequence)
        if self._scene is None or self._scene[0] != sequence:
            self._scene = (
                sequence,
                make_scene(seed, self.sequence_length, self.lidar_config, self.scene_config),
            )
        return render_frame(self._scene[1], seed, frame, self.lidar, self.frame_id(index))


def _load(path: Path) -> LidarFrame:
    with np.load(path, allow_pickle=False) as data:
        values = {k: data[k] for k in data.files}
    values["frame_id"] = str(values["frame_id"])
    values["timestamp"] = float(values["timestamp"])
    return LidarFrame(**values)
