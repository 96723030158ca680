"""Run a detector over a dataset, sharded across DDP ranks, and gather every frame exactly once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.engine.distributed import DistInfo, gather_objects
from voxsparse.evaluation.predictions_io import PredictionsFile
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.fusion import fuse_for_inference
from voxsparse.structures import Annotations3D, Detections3D, VoxelGrid
from voxsparse.utils.progress import progress


@dataclass
class DatasetPredictions:
    """Predictions and ground truth of a whole dataset, in dataset order (on the CPU)."""

    frame_ids: list[str]
    detections: list[Detections3D]
    annotations: list[Annotations3D]

    def to_file(self, class_names: Sequence[str], grid: VoxelGrid) -> PredictionsFile:
        """The predictions as a :class:`PredictionsFile` (ground truth was cropped to ``grid``)."""
        return PredictionsFile(self.frame_ids, self.detections, list(class_names), grid.point_cloud_range)


@torch.no_grad()
def predict_dataset(
    model: SparseDetector, dataset: DetectionDataset, info: DistInfo, batch_size: int = 4, num_workers: int = 0,
    use_amp: bool = False, fuse: bool = True,
) -> DatasetPredictions:
    """Rank r predicts frames r, r + W, r + 2W, ...; all ranks receive the merged result.

    With ``fuse``, a copy of the model with BatchNorm folded into its sparse convolutions predicts
    (:func:`~voxsparse.models.fusion.fuse_for_inference`: one kernel per conv-BN-ReLU on CUDA, the
    same outputs up to float rounding); ``model`` itself is left as it was.
    """
    model = fuse_for_inference(model) if fuse else model.eval()
    indices = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    device = info.device
    local: list[tuple[int, str, Detections3D, Annotations3D]] = []
    position = 0
    for batch in progress(loader, "predict", enabled=info.is_main, leave=False):
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp and device.type == "cuda"):
            detections = model.predict(batch.points.to(device))
        for det, ann, frame_id in zip(detections, batch.annotations, batch.frame_ids):
            local.append((indices[position], frame_id, det.to("cpu"), ann))
            position += 1
    merged = sorted((item for part in gather_objects(local, info) for item in part), key=lambda item: item[0])
    return DatasetPredictions(
        frame_ids=[m[1] for m in merged], detections=[m[2] for m in merged], annotations=[m[3] for m in merged]
    )
