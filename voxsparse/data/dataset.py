"""Wraps a frame source (synthetic world, Waymo, nuScenes) into model-ready samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from voxsparse.data.sample import Sample
from voxsparse.data.transforms import RangeFilter
from voxsparse.utils.progress import progress

Transform = Callable[[Sample, torch.Generator], Sample]


class DetectionDataset(Dataset):
    """Frames of ``source`` as :class:`Sample` s: augmented (training), then cropped to the grid.

    Augmentation randomness is seeded by (``seed``, epoch, index), so a resumed run sees the same
    samples as an uninterrupted one. Call :meth:`set_epoch` at the start of every epoch.

    Args:
        source: a dataset whose items provide the ``FrameLike`` fields.
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) metres, usually the model
            grid's; points and boxes outside it are dropped.
        augmentations: transforms applied in order before cropping.
        seed: base seed of the augmentations.
    """

    def __init__(
        self, source: Dataset, point_cloud_range: Sequence[float], augmentations: Sequence[Transform] = (), seed: int = 0
    ):
        self.source = source
        self.augmentations = list(augmentations)
        self.crop = RangeFilter(tuple(point_cloud_range))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's augmentations, and tell epoch-aware ones (GT sampling's fade) the epoch."""
        self.epoch = epoch
        for transform in self.augmentations:
            if hasattr(transform, "set_epoch"):
                transform.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Sample:
        sample = Sample.from_frame(self.source[index])
        if self.augmentations:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
            for transform in self.augmentations:
                sample = transform(sample, generator)
        return self.crop(sample)


class _Generate(Dataset):
    """Reads every item of ``source`` (which caches what it generates) and returns only the index."""

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> int:
        self.source[index]
        return index


def fill_cache(source: Dataset, num_workers: int, desc: str = "generate") -> None:
    """Materialise every frame of a caching ``source`` in ``num_workers`` processes, with a progress bar.

    Generating frames before training, rather than in loader workers during it, keeps a small
    machine's cores free for the model: a busy worker beside two OpenMP threads on two cores makes
    every parallel region wait for a descheduled thread.
    """
    loader = DataLoader(_Generate(source), batch_size=None, num_workers=num_workers)
    for _ in progress(loader, desc, total=len(source)):
        pass
