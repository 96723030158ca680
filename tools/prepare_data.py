"""Convert a raw dataset into the prepared layout (``voxsparse.data.prepared``) and build the GT
database of its training split. Parallel over ``--workers`` processes, resumable: rerun the same
command after an interruption and finished work is skipped.

    python tools/prepare_data.py nuscenes --root data/nuscenes --version v1.0-mini \\
        --out data/prepared/nuscenes --sweeps 10 --workers 4
    python tools/prepare_data.py waymo --root data/waymo/raw --out data/prepared/waymo --workers 4

nuScenes splits are the devkit's (``train``/``val`` for v1.0-trainval, ``mini_train``/``mini_val``
for v1.0-mini, ``test`` for v1.0-test; ``--splits`` also takes custom splits of
``<root>/<version>/splits.json``). Waymo splits are the folders ``training``, ``validation`` and
``testing`` under ``--root``, prepared as ``train``, ``val`` and ``test``. See data/README.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from voxsparse.data.prepared import PreparedIndex, prepare
from voxsparse.data.waymo.classes import CLASS_NAMES as WAYMO_CLASS_NAMES

log = logging.getLogger("voxsparse.prepare_data")

#: Waymo v1 folders -> prepared split names.
WAYMO_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


def _summary(index: PreparedIndex, seconds: float, workers: int) -> str:
    n = len(index.frames)
    rate = n / seconds if seconds > 0 else float("inf")
    return (
        f"{index.split}: {n} frames in {seconds:.1f} s ({rate:.2f} frames/s, {rate / workers:.2f} frames/s per "
        f"worker with {workers} worker(s)){'; GT database built' if index.gt_database else ''}"
    )


def _gt_splits(splits: Sequence[str], chosen: Sequence[str] | None) -> set[str]:
    """Splits that get a GT database: ``chosen``, else those whose name ends in 'train'."""
    if chosen is None:
        return {s for s in splits if s.endswith("train")}
    unknown = set(chosen) - set(splits)
    if unknown:
        raise SystemExit(f"--gt-database: {sorted(unknown)} are not among the prepared splits {list(splits)}")
    return set(chosen)


def prepare_nuscenes(args: argparse.Namespace) -> list[PreparedIndex]:
    from voxsparse.data.nuscenes import (
        NUSCENES_DETECTION_NAMES,
        VERSION_SPLITS,
        load_nuscenes,
        plan_samples,
        sample_frames,
    )

    splits = args.splits or VERSION_SPLITS.get(args.version)
    if not splits:
        raise SystemExit(f"--version {args.version}: no predefined splits known; name them with --splits")
    nusc = load_nuscenes(args.root, args.version)
    gt_splits = _gt_splits(splits, args.gt_database)
    indices = []
    for split in splits:
        start = time.perf_counter()
        samples = plan_samples(nusc, split, args.sweeps)
        index = prepare(
            sample_frames,
            {s.token: s for s in samples},
            args.out,
            split,
            args.workers,
            class_names=NUSCENES_DETECTION_NAMES,
            config={"dataset": "nuscenes", "version": args.version, "max_sweeps": args.sweeps},
            gt_database=split in gt_splits,
            progress=not args.quiet,
        )
        print(_summary(index, time.perf_counter() - start, args.workers))
        indices.append(index)
    return indices


def waymo_frames(path: str) -> Iterator:
    """The frames of one Waymo TFRecord (a ``prepare`` factory: module level, so workers can pickle it).

    Without the official protobuf definitions, reading raises an ImportError that says how to
    install them (``voxsparse.data.waymo.INSTALL_HINT``).
    """
    try:
        from voxsparse.data.waymo import read_frames
    except ImportError as exc:  # the TFRecord reader's CRC library
        raise ImportError(f'Waymo preparation needs the waymo extra: pip install -e ".[waymo]" ({exc})') from exc
    return read_frames(path)


def _task_key(path: Path) -> str:
    stem = path.name.removesuffix(".tfrecord")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def prepare_waymo(args: argparse.Namespace) -> list[PreparedIndex]:
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
    gt_splits = _gt_splits(splits, args.gt_database)
    indices = []
    for split in splits:
        files = sorted(found[split].glob("*.tfrecord"))
        if not files:
            raise SystemExit(f"{found[split]}: no .tfrecord files")
        start = time.perf_counter()
        index = prepare(
            waymo_frames,
            {_task_key(f): str(f) for f in files},
            args.out,
            split,
            args.workers,
            class_names=WAYMO_CLASS_NAMES,
            config={"dataset": "waymo", "format": "v1-tfrecord"},
            gt_database=split in gt_splits,
            progress=not args.quiet,
        )
        print(_summary(index, time.perf_counter() - start, args.workers))
        indices.append(index)
    return indices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="dataset", required=True)

    def common(p: argparse.ArgumentParser, root: str, out: str) -> None:
        p.add_argument("--root", default=root, help=f"raw dataset folder (default {root})")
        p.add_argument("--out", default=out, help=f"prepared dataset folder (default {out})")
        p.add_argument("--workers", type=int, default=4, help="processes (default 4)")
        p.add_argument("--splits", nargs="+", help="splits to prepare (default: all of the dataset)")
        p.add_argument(
            "--gt-database",
            nargs="*",
            metavar="SPLIT",
            help="splits that get a GT database (default: those whose name ends in 'train'; none if empty)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    nus = sub.add_parser("nuscenes", help="nuScenes through nuscenes-devkit")
    common(nus, "data/nuscenes", "data/prepared/nuscenes")
    nus.add_argument("--version", default="v1.0-trainval", help="v1.0-trainval | v1.0-mini | v1.0-test")
    nus.add_argument(
        "--sweeps", type=int, default=10, help="LiDAR scans per frame, the keyframe included (default 10)"
    )
    way = sub.add_parser("waymo", help="Waymo Open Dataset v1 TFRecords (needs the waymo extra)")
    common(way, "data/waymo/raw", "data/prepared/waymo")
    return parser


def main(argv: Sequence[str] | None = None) -> list[PreparedIndex]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workers < 1:
        raise SystemExit(f"--workers: expected >= 1, got {args.workers}")
    return prepare_nuscenes(args) if args.dataset == "nuscenes" else prepare_waymo(args)


if __name__ == "__main__":
    main(sys.argv[1:])
