"""``tools/prepare_data.py waymo``: the segments of the ``training``, ``validation`` and ``testing``
folders under ``--root``, prepared as the splits ``train``, ``val`` and ``test``.

``--format v1`` (the default): TFRecord files ``<folder>/*.tfrecord``. ``--format v2``: parquet
components ``<folder>/<component>/<context name>.parquet`` (:mod:`voxsparse.data.waymo.v2`), one
segment (all its components) per unit of work, streamed frame by frame.

Stored point columns: ``--features`` (default :data:`DEFAULT_FEATURES`, what the Waymo model configs
read; add ``range`` to keep it). By default x, y, z are quantized to ``--xyz-step`` (:data:`XYZ_STEP`,
2**-9 m: at most 0.98 mm from the reader's float32 values) and intensity and elongation stored as float16
(``--half-features``, :data:`HALF_FEATURES`: the sensor's intensity has at most 8 significant bits,
kept exactly, and its elongation 256 levels 5.9e-3 apart, moved by at most 2.5e-4); ``--xyz-step 0``
and ``--half-features`` without names store them losslessly as float32.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from voxsparse.data.prepared import PreparationSplit
from voxsparse.data.waymo.classes import CLASS_NAMES
from voxsparse.data.waymo.frame import POINT_FEATURES

#: The point columns prepared by default: what the Waymo model configs read (range is left out).
DEFAULT_FEATURES = ("x", "y", "z", "intensity", "elongation")

#: Default quantization step of x, y, z (m): a power of two, so every stored value is exact in float32.
XYZ_STEP = 2.0**-9

#: Point columns stored as float16 by default.
HALF_FEATURES = ("intensity", "elongation")

#: Waymo v1 folders -> prepared split names.
WAYMO_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


def waymo_frames(path: str) -> Iterator:
    """The frames of one Waymo TFRecord (a ``prepare`` factory: module level, so workers can pickle it).

    Without the official protobuf definitions, reading raises an ImportError that says how to
    install them (``voxsparse.data.waymo.INSTALL_HINT``).
    """
    try:
        from voxsparse.data.waymo.frame import read_frames
    except ImportError as exc:  # the TFRecord reader's CRC library
        raise ImportError(f'Waymo preparation needs the waymo extra: pip install -e ".[waymo]" ({exc})') from exc
    return read_frames(path)


def waymo_v2_frames(task: tuple[str, str]) -> Iterator:
    """The frames of one Waymo v2 segment, ``task = (split folder, context name)`` (a ``prepare`` factory)."""
    from voxsparse.data.waymo.v2 import read_segment

    return read_segment(*task)


def _task_key(path: Path) -> str:
    stem = path.name.removesuffix(".tfrecord")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format v1|v2``; ``--root`` holds the ``training`` / ``validation`` / ``testing`` folders."""
    parser.add_argument(
        "--format",
        choices=("v1", "v2"),
        default="v1",
        help="v1: TFRecord segments (default); v2: parquet components <folder>/<component>/<segment>.parquet",
    )
    parser.add_argument(
        "--features",
        nargs="+",
        default=list(DEFAULT_FEATURES),
        help=f"point columns to store, x y z first (default: {' '.join(DEFAULT_FEATURES)}; the reader also has range)",
    )
    parser.add_argument(
        "--half-features",
        nargs="*",
        default=list(HALF_FEATURES),
        metavar="NAME",
        help=f"point columns stored as float16 (~5e-4 relative precision; default: {' '.join(HALF_FEATURES)}; "
        "no names: none)",
    )
    parser.add_argument(
        "--xyz-step",
        type=float,
        default=XYZ_STEP,
        metavar="METRES",
        help=f"quantization step of x, y, z (error at most half of it; default {XYZ_STEP:g} = 2**-9); 0: lossless float32",
    )
    parser.set_defaults(root="data/waymo/raw", out="data/prepared/waymo")


def preparation_splits(args: argparse.Namespace) -> list[PreparationSplit]:
    """The splits ``tools/prepare_data.py waymo`` prepares: ``--splits``, else every folder found."""
    root = Path(args.root)
    found = (
        {WAYMO_SPLITS[d.name]: d for d in sorted(root.iterdir()) if d.name in WAYMO_SPLITS}
        if root.is_dir()
        else {}
    )
    splits = args.splits or list(found)
    v2 = getattr(args, "format", "v1") == "v2"
    if not splits:
        what = "v2 component folders" if v2 else ".tfrecord files"
        raise SystemExit(f"--root {root}: no {'/'.join(WAYMO_SPLITS)} folder of {what} found")
    missing = [s for s in splits if s not in found]
    if missing:
        raise SystemExit(f"--splits {missing}: no matching folder under {root} (expected {WAYMO_SPLITS})")

    def tasks(folder: Path) -> dict[str, str]:
        files = sorted(folder.glob("*.tfrecord"))
        if not files:
            raise SystemExit(f"{folder}: no .tfrecord files")
        return {_task_key(f): str(f) for f in files}

    def v2_tasks(folder: Path) -> dict[str, tuple[str, str]]:
        from voxsparse.data.waymo.v2 import segment_names

        names = segment_names(folder)
        if not names:
            raise SystemExit(f"{folder}: no lidar/*.parquet files (Waymo v2 components)")
        return {re.sub(r"[^A-Za-z0-9._-]", "_", name): (str(folder), name) for name in names}

    config = {"dataset": "waymo", "format": "v2-parquet" if v2 else "v1-tfrecord"}
    factory, make_tasks = (waymo_v2_frames, v2_tasks) if v2 else (waymo_frames, tasks)
    features = tuple(getattr(args, "features", DEFAULT_FEATURES))
    half = tuple(n for n in getattr(args, "half_features", HALF_FEATURES) if n in features)
    unknown = sorted(set(features + tuple(getattr(args, "half_features", ()))) - set(POINT_FEATURES))
    if unknown:
        raise SystemExit(f"--features / --half-features: {unknown} are not Waymo point columns {list(POINT_FEATURES)}")
    step = float(getattr(args, "xyz_step", XYZ_STEP))
    if not step >= 0:
        raise SystemExit(f"--xyz-step: expected >= 0 metres, got {step}")
    quantize = {name: step for name in ("x", "y", "z")} if step > 0 else None
    return [
        PreparationSplit(
            split, factory, lambda folder=found[split]: make_tasks(folder), CLASS_NAMES, config, half, features, quantize
        )
        for split in splits
    ]
