"""Dataset preparation from the command line: the dataset module named first gives its options and
splits, :func:`voxsparse.data.prepared.prepare` runs each split (``tools/prepare_data.py`` is this
module's ``main``).

The first argument names the dataset module: a module of ``voxsparse.data`` by its name (nuscenes,
waymo), else any importable module by its (dotted) name. The module gives its own options
(``add_prepare_arguments``) and the splits to prepare (``preparation_splits``; see
:class:`voxsparse.data.prepared.PreparationSplit`).

``--executor local`` (the default) runs the units of work in ``--workers`` processes of this
machine; ``--executor ray`` runs the same tasks on a Ray cluster (``--ray-address``, default a local
instance of ``--workers`` CPUs), each reserving ``--ray-task-memory`` GiB, and writes the same files.
"""


from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from types import ModuleType

from voxsparse.data.executors import Executor, GiB, LocalExecutor, RayExecutor
from voxsparse.data.prepared import PreparedIndex, prepare

_HOOKS = ("add_prepare_arguments", "preparation_splits")


def _summary(index: PreparedIndex, seconds: float, workers: int, stats: dict) -> str:
    n = len(index.frames)
    rate = n / seconds if seconds > 0 else float("inf")
    return (
        f"{index.split}: {n} frames in {seconds:.1f} s ({rate:.2f} frames/s, {rate / workers:.2f} frames/s per "
        f"worker with {workers} worker(s)); {stats['done']} task(s) done, {stats['skipped']} already done; "
        f"peak RSS per worker {stats['peak_rss'] / 2**20:.0f} MiB{'; GT database built' if index.gt_database else ''}"
    )


def build_executor(args: argparse.Namespace) -> Executor:
    """The executor ``--executor`` names (a Ray connection is made here)."""
    if args.executor == "local":
        return LocalExecutor(args.workers)
    return RayExecutor(args.ray_address, task_memory=int(args.ray_task_memory * GiB), num_cpus=args.workers)


def _gt_splits(splits: Sequence[str], chosen: Sequence[str] | None) -> set[str]:
    """Splits that get a GT database: ``chosen``, else those whose name ends in 'train'."""
    if chosen is None:
        return {s for s in splits if s.endswith("train")}
    unknown = set(chosen) - set(splits)
    if unknown:
        raise SystemExit(f"--gt-database: {sorted(unknown)} are not among the prepared splits {list(splits)}")
    return set(chosen)


def dataset_module(name: str) -> ModuleType:
    """The module that prepares ``name``: ``voxsparse.data.<name>`` if there is one, else the module
    ``name`` itself (any importable, dotted or not)."""
    candidates = [name] if "." in name else [f"voxsparse.data.{name}", name]
    module = None
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):  # found, but it needs a missing one
                raise SystemExit(
                    f"dataset {name!r}: {module_name} needs {exc.name!r}, which is not installed ({exc})"
                ) from None
    if module is None:
        raise SystemExit(f"dataset {name!r}: no module {' or '.join(candidates)}")
    missing = [hook for hook in _HOOKS if not callable(getattr(module, hook, None))]
    if missing:
        raise SystemExit(f"dataset {name!r}: {module.__name__} cannot prepare data (it has no {', '.join(missing)})")
    return module


def build_parser(module: ModuleType | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The options: the dataset's own (``module.add_prepare_arguments``) after the common ones."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset module: nuscenes, waymo (voxsparse.data.<name>) or a dotted name")
    parser.add_argument("--root", help="raw dataset folder (default: the dataset's)")
    parser.add_argument("--out", help="prepared dataset folder (default: the dataset's)")
    parser.add_argument(
        "--workers", type=int, default=4, help="processes (default 4); with --executor ray, a local instance's CPUs"
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool on this machine (default); ray: tasks on a Ray cluster (the ray extra)",
    )
    parser.add_argument(
        "--ray-address",
        help="Ray cluster to join (ray.init address: auto, host:6379, ray://host:10001); default a local instance",
    )
    parser.add_argument(
        "--ray-task-memory",
        type=float,
        default=1.0,
        metavar="GIB",
        help="memory each Ray task reserves, GiB (default 1; a run prints its measured peak per worker)",
    )
    parser.add_argument("--splits", nargs="+", help="splits to prepare (default: all of the dataset)")
    parser.add_argument(
        "--gt-database",
        nargs="*",
        metavar="SPLIT",
        help="splits that get a GT database (default: those whose name ends in 'train'; none if empty)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if module is not None:
        module.add_prepare_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, description: str | None = None) -> list[PreparedIndex]:
    """Prepare the splits that ``argv`` (the command line without the program name) asks for; their
    indices. ``description`` heads ``--help``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("dataset", nargs="?")
    known, _ = first.parse_known_args(argv)
    module = None if known.dataset is None or known.dataset.startswith("-") else dataset_module(known.dataset)
    args = build_parser(module, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.workers < 1:
        raise SystemExit(f"--workers: expected >= 1, got {args.workers}")
    if args.root is None or args.out is None:
        raise SystemExit(f"dataset {args.dataset!r}: give --root and --out (the dataset module sets no default)")
    if args.ray_task_memory <= 0:
        raise SystemExit(f"--ray-task-memory: expected > 0 GiB, got {args.ray_task_memory}")
    plans = module.preparation_splits(args)
    gt_splits = _gt_splits([p.split for p in plans], args.gt_database)
    indices = []
    try:
        executor = build_executor(args)
    except ImportError as exc:
        raise SystemExit(f"--executor ray: {exc}") from None
    try:
        for plan in plans:
            start, stats = time.perf_counter(), {}
            index = prepare(
                plan.factory,
                plan.tasks(),
                args.out,
                plan.split,
                class_names=plan.class_names,
                config=plan.config,
                gt_database=plan.split in gt_splits,
                progress=not args.quiet,
                half_features=plan.half_features,
                keep_features=plan.keep_features,
                quantize=plan.quantize,
                executor=executor,
                stats=stats,
            )
            print(_summary(index, time.perf_counter() - start, executor.parallelism, stats))
            indices.append(index)
    finally:
        executor.close()
    return indices


