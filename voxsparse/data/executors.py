"""Where :func:`voxsparse.data.prepared.prepare` runs its units of work: a local process pool (the
default) or a Ray cluster (``pip install -e ".[ray]"``), with the same tasks and the same files.

An executor maps a picklable function over picklable items and yields the results as they finish
(any order). Each task runs in a process of its own that exits afterwards (``maxtasksperchild=1``
locally, ``max_calls=1`` on Ray): a worker's peak memory is one task's, never the sum of leaks over
many, and the peak resident set reported by the task is that task's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

__all__ = ["RAY_INSTALL_HINT", "Executor", "GiB", "LocalExecutor", "RayExecutor", "peak_rss_bytes"]

RAY_INSTALL_HINT = 'the Ray executor needs Ray: pip install -e ".[ray]" (ray>=2.9) on every machine of the cluster'

GiB = 1 << 30


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux and macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


class Executor(Protocol):
    """Runs ``fn(item)`` for every item and yields the results as they finish.

    Closing the generator :meth:`map_unordered` returns stops its unfinished tasks; :meth:`close`
    releases the executor (e.g. a Ray instance it started).
    """

    #: Tasks that may run at once (for messages and throughput figures).
    parallelism: int

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]: ...

    def close(self) -> None: ...


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


class LocalExecutor:
    """``workers`` processes of this machine (``multiprocessing.Pool``, one task per process); with
    one worker or one item, this process itself.

    Args:
        workers: processes at once (>= 1).
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        self.parallelism = workers

    def map_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        items = list(items)
        if self.parallelism == 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        pool = multiprocessing.Pool(min(self.parallelism, len(items)), maxtasksperchild=1)
        try:
            yield from pool.imap_unordered(fn, items, chunksize=1)
        finally:
            pool.terminate()
            pool.join()

    def close(self) -> None:
        """Nothing outlives :meth:`map_unordered`."""


class RayExecutor:
    """Tasks as Ray remote functions on a Ray cluster: ``ray.init(address)`` unless this process is
    already connected (then that connection is used and left open).

    Args:
        address: the cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts a
            local Ray instance of ``num_cpus`` CPUs that :meth:`close` stops.
        task_memory: bytes each task asks Ray to reserve (its ``memory`` resource): Ray starts no more
            tasks on a node than its memory holds. Set it to the peak a task needs (the summary of a
            run reports the measured peak per worker).
        task_cpus: CPUs each task reserves.
        num_cpus: CPUs of a local instance (None: all of this machine).
        max_in_flight: tasks submitted at once (None: twice the cluster's CPUs), so a driver with
            thousands of tasks holds few result references at a time.
    """

    def __init__(
        self,
        address: str | None = None,
        task_memory: int = GiB,
        task_cpus: float = 1,
        num_cpus: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError(f"{RAY_INSTALL_HINT} ({exc})") from exc
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
            if address is None:
                # A local instance's workers import what this process imports, from the same paths
                # ("" is this process's working directory, which a worker does not share).
                path = os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)
                kwargs.update(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
            ray.init(**kwargs)
            self._owns = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.parallelism = max(1, int(cpus // task_cpus))
        self.max_in_flight = max_in_flight or 2 * self.parallelism
        # A task whose worker process dies is run again (its files are written atomically, so a
        # rerun only replaces complete files with identical ones).
        self._remote = ray.remote(memory=int(task_memory), num_cpus=task_cpus, max_calls=1, max_retries=3)(_call)

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        ray = self._ray
        todo, pending = iter(items), []
        fn_ref = ray.put(fn)
        try:
            while True:
                for item in todo:
                    pending.append(self._remote.remote(fn_ref, item))
                    if len(pending) >= self.max_in_flight:
                        break
                if not pending:
                    return
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    # The task's own exception, as a local run raises it (not Ray's wrapper and its
                    # remote traceback).
                    if isinstance(exc.cause, Exception):
                        raise exc.cause from None
                    raise
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()
            self._owns = False
