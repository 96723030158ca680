"""``tools/prepare_data.py waymo``: TFRecord segments of the ``training``, ``validation`` and
``testing`` folders under ``--root``, prepared as the splits ``train``, ``val`` and ``test``."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from voxsparse.data.prepared import PreparationSplit
from voxsparse.data.waymo.classes import CLASS_NAMES

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


def _task_key(path: Path) -> str:
    stem = path.name.removesuffix(".tfrecord")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own; ``--root`` holds the ``training`` / ``validation`` / ``testing`` folders."""
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
    if not splits:
        raise SystemExit(f"--root {root}: no {'/'.join(WAYMO_SPLITS)} folder of .tfrecord files found")
    missing = [s for s in splits if s not in found]
    if missing:
        raise SystemExit(f"--splits {missing}: no matching folder under {root} (expected {WAYMO_SPLITS})")

    def tasks(folder: Path) -> dict[str, str]:
        files = sorted(folder.glob("*.tfrecord"))
        if not files:
            raise SystemExit(f"{folder}: no .tfrecord files")
        return {_task_key(f): str(f) for f in files}

    config = {"dataset": "waymo", "format": "v1-tfrecord"}
    return [
        PreparationSplit(split, waymo_frames, lambda folder=found[split]: tasks(folder), CLASS_NAMES, config)
        for split in splits
    ]
