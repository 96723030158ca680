"""Waymo Open Dataset v1 (TFRecord segments of ``Frame`` protos) and v2 (parquet components) without TensorFlow.

* ``tfrecord``: the TFRecord container, read and written with checksums verified,
* ``range_image``: the official range-image-to-points conversion in numpy,
* ``frame``: ``Frame`` protos to :class:`WaymoFrame` and :func:`read_frames`,
* ``v2``: v2 parquet components to the same :class:`WaymoFrame` (:func:`read_segment`, pyarrow only),
* ``prepare``: what ``tools/prepare_data.py waymo`` prepares (``add_prepare_arguments``, ``preparation_splits``),
* ``writer``: Waymo-format frames built from vehicle-frame points and labels (tests, examples).

Install: ``pip install --no-deps waymo-open-dataset-tf-2-12-0==1.6.7`` for the protos (``INSTALL_HINT``);
v2 needs pyarrow instead (``pip install -e ".[waymo-v2]"``).
"""

from voxsparse.data.waymo.classes import CLASS_NAMES
from voxsparse.data.waymo.frame import (
    INSTALL_HINT,
    POINT_FEATURES,
    WaymoFrame,
    decode_frame,
    read_frames,
    track_id,
)
from voxsparse.data.waymo.prepare import add_prepare_arguments, preparation_splits
from voxsparse.data.waymo.tfrecord import TFRecordError, iter_records, write_records
from voxsparse.data.waymo.v2 import read_segment, segment_names

__all__ = [
    "CLASS_NAMES",
    "INSTALL_HINT",
    "POINT_FEATURES",
    "TFRecordError",
    "WaymoFrame",
    "add_prepare_arguments",
    "decode_frame",
    "iter_records",
    "preparation_splits",
    "read_frames",
    "read_segment",
    "segment_names",
    "track_id",
    "write_records",
]
