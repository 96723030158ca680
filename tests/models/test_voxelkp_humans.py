"""The keypoint dataset's varied people (``SceneConfig.varied_pedestrians``) and the detection world
they must not move: a default frame is byte for byte the one generated before the option existed."""

import hashlib
from dataclasses import fields

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.data.synthetic.actors import PEDESTRIAN, sample_pedestrian
from voxsparse.engine.cli import CONFIG_DIR

# sha256 over every array field (name, then bytes) of frame 2 of SyntheticDataset("train", seed=0),
# recorded with the generator before varied people were added; and that dataset's cache key.
DEFAULT_FRAME_2 = "9ac197dca6fca3acbdd19467bbd53dc697f4b373de38d5c74e05ce06851b72ec"
DEFAULT_CACHE_KEY = "c5d1b577e7b5"
ANKLES = [KEYPOINT_NAMES.index("left_ankle"), KEYPOINT_NAMES.index("right_ankle")]


def frame_digest(frame) -> str:
    h = hashlib.sha256()
    for field in fields(frame):
        value = getattr(frame, field.name)
        if isinstance(value, np.ndarray):
            h.update(field.name.encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def test_the_detection_world_is_unchanged():
    dataset = SyntheticDataset("train", num_frames=3, seed=0)
    assert dataset._config_hash == DEFAULT_CACHE_KEY  # cached frames stay valid
    assert frame_digest(dataset[2]) == DEFAULT_FRAME_2


def test_default_draws_are_the_original_ones():
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        original = sample_pedestrian(a, 0.0 if seed % 3 == 0 else 1.2)
        assert sample_pedestrian(b, original.speed, varied=False) == original
        assert not original.sitting and not original.carried and original.arm_swing == 0.8
        assert a.random() == b.random()  # the same number of draws


def varied_people(count: int = 300):
    rng = np.random.default_rng(0)
    people = [sample_pedestrian(rng, 0.0 if rng.random() < 0.4 else rng.uniform(0.5, 1.8), varied=True)
              for _ in range(count)]
    return people, [p.shape(0.37) for p in people]


def test_varied_people_span_sizes_poses_and_carry():
    people, shapes = varied_people()
    heights = np.array([p.body.height for p in people])
    assert heights.min() < 1.25 and heights.max() > 1.9
    sitting = np.array([p.sitting for p in people])
    assert 0.05 < sitting.mean() < 0.3 and all(p.speed == 0 for p, s in zip(people, sitting) if s)
    assert 0.1 < np.mean([p.carried for p in people]) < 0.4
    swings = np.array([p.arm_swing for p in people if p.speed > 0])
    assert swings.min() < 0.5 and swings.max() > 1.1
    tops = np.array([s.keypoints[:, 2].max() for s in shapes])
    # Seated people are lower than upright ones of the same height.
    ratio = tops / heights
    assert ratio[sitting].max() < ratio[~sitting].min()
    for person, shape in zip(people, shapes):
        # Every keypoint lies in the box, the feet stand on the ground.
        assert np.all(np.abs(shape.keypoints - shape.box[:3]) <= shape.box[3:] / 2 + 1e-9)
        assert 0.04 * person.body.height < shape.keypoints[ANKLES, 2].min() < 0.05 * person.body.height + 0.05


def test_keypoint_dataset_config_turns_them_on():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=voxelkp_varied_humans"])
    assert cfg.model.keypoint_classes == ["Pedestrian"]
    train = instantiate(cfg.dataset.train, num_frames=1, cache_dir=None)
    val = instantiate(cfg.dataset.val, num_frames=1, cache_dir=None)
    assert train.scene_config.varied_pedestrians and val.scene_config.varied_pedestrians
    assert train._config_hash != DEFAULT_CACHE_KEY
    frame = train[0]
    humans = frame.labels == PEDESTRIAN
    assert humans.any() and frame.keypoint_visibility[humans].any()
