"""The synthetic world: procedural street scenes scanned by a simulated spinning LiDAR.

The default dataset of voxsparse: labelled frames (boxes, velocities, pedestrian keypoints, tracks)
generated deterministically from a seed, with no download. Modules, by concern:

* ``geometry``: solid primitives (oriented boxes, vertical cylinders, spheroids) and exact ray casts,
* ``actors``: vehicle, pedestrian (articulated, walking) and cyclist shapes,
* ``scene``: terrain, road layout, static structures, collision-free moving actors,
* ``lidar``: the sensor (beams, occlusion, noise, dropout, intensity),
* ``frame``: ``LidarFrame`` and frame / sequence generation,
* ``dataset``: ``SyntheticDataset`` with disjoint split seeds and an optional disk cache,
* ``tracking``: ``SyntheticTracking``, held-out sequences for the tracking evaluation.
"""

from voxsparse.data.synthetic.actors import CLASS_NAMES
from voxsparse.data.synthetic.dataset import SPLIT_CODES, SyntheticDataset, sequence_seed
from voxsparse.data.synthetic.frame import (
    LidarFrame,
    generate_frame,
    generate_sequence,
    make_scene,
    render_frame,
)
from voxsparse.data.synthetic.lidar import Lidar, LidarConfig, Scan
from voxsparse.data.synthetic.scene import Scene, SceneConfig, build_scene
from voxsparse.data.synthetic.tracking import NUSCENES_CLASSES, SyntheticTracking

__all__ = [
    "CLASS_NAMES",
    "NUSCENES_CLASSES",
    "SPLIT_CODES",
    "Lidar",
    "LidarConfig",
    "LidarFrame",
    "Scan",
    "Scene",
    "SceneConfig",
    "SyntheticDataset",
    "SyntheticTracking",
    "build_scene",
    "generate_frame",
    "generate_sequence",
    "make_scene",
    "render_frame",
    "sequence_seed",
]
