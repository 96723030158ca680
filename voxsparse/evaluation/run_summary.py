"""Mean and spread of metrics over training runs that differ only in their seed.

A run folder is what ``tools/train.py`` writes: ``metrics.json`` (the evaluation after training) and
``.hydra/config.yaml`` (its composed config, whose ``name`` and ``trainer.seed`` group and label it).
Nested metric names are joined with dots: ``keypoints.MPJPE``, ``LEVEL_1.AP_L1/Vehicle``.
"""

from __future__ import annotations

import difflib
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class RunMetrics:
    """One finished run: its ``name``, ``seed`` and flattened metrics (None where nothing was measured)."""

    folder: Path
    name: str
    seed: int
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class MetricSpread:
    """A metric over the runs of one name that measured it: mean, sample standard deviation (0 for one
    run), range, and how many runs."""

    mean: float
    std: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> MetricSpread:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{path}."))
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            out[path] = None if value is None else float(value)
    return out


def read_run(folder: str | Path) -> RunMetrics:
    """The metrics, name and seed of a ``tools/train.py`` run folder.

    Raises:
        ValueError: naming the file, when ``metrics.json`` or ``.hydra/config.yaml`` is missing or
            does not hold what a training run writes.
    """
    folder = Path(folder)
    metrics = _read_mapping(folder / "metrics.json", json.loads, json.JSONDecodeError)
    config_path = folder / ".hydra" / "config.yaml"
    config = _read_mapping(config_path, yaml.safe_load, yaml.YAMLError)
    name, trainer = config.get("name"), config.get("trainer")
    seed = trainer.get("seed") if isinstance(trainer, dict) else None
    if not isinstance(name, str) or not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{config_path}: expected a string 'name' and an integer 'trainer.seed', got "
                         f"{name!r} and {seed!r}")
    return RunMetrics(folder, name, seed, _flatten(metrics))


def _read_mapping(path: Path, parse: Any, error: type[Exception]) -> dict:
    """The mapping a JSON or YAML file holds; ValueError naming the file otherwise."""
    if not path.is_file():
        raise ValueError(f"{path}: not found; expected a finished tools/train.py run folder (evaluate=true)")
    try:
        content = parse(path.read_text(encoding="utf-8"))
    except (error, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping at the top, got {type(content).__name__}")
    return content


def summarize(runs: Sequence[RunMetrics], metrics: Sequence[str]) -> dict[str, dict[str, MetricSpread | None]]:
    """Per run name (in first-seen order) and metric, the spread over its runs; None where no run
    of that name measured the metric.

    Raises:
        ValueError: a metric that none of a run's metrics is named, with the closest names; or two
            runs of one name with the same seed (a repeated run would weigh twice).
    """
    groups: dict[str, list[RunMetrics]] = {}
    for run in runs:
        group = groups.setdefault(run.name, [])
        twin = next((r for r in group if r.seed == run.seed), None)
        if twin is not None:
            raise ValueError(f"{run.folder} and {twin.folder}: both are run {run.name!r} with seed {run.seed}")
        group.append(run)
    for run in runs:
        for metric in metrics:
            if metric not in run.metrics:
                close = difflib.get_close_matches(metric, list(run.metrics), n=5, cutoff=0.4)
                raise ValueError(f"{run.folder / 'metrics.json'}: no metric {metric!r}; closest: {close}")
    table: dict[str, dict[str, MetricSpread | None]] = {}
    for name, group in groups.items():
        row: dict[str, MetricSpread | None] = {}
        for metric in metrics:
            values = [r.metrics[metric] for r in group]
            measured = [v for v in values if v is not None and not math.isnan(v)]
            row[metric] = MetricSpread.of(measured) if measured else None
        table[name] = row
    return table


def markdown(table: Mapping[str, Mapping[str, MetricSpread | None]], runs: Sequence[RunMetrics],
             digits: int = 3) -> str:
    """The summary as a Markdown table: one row per run name with its seeds, one column per metric
    as ``mean ± std (low–high)``."""
    metrics = list(next(iter(table.values()), {}))
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, row in table.items():
        of_name = sorted((r for r in runs if r.name == name), key=lambda r: r.seed)
        seeds = ", ".join(str(r.seed) for r in of_name)
        cells = [_cell(s, digits, len(of_name)) for s in row.values()]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(spread: MetricSpread | None, digits: int, runs: int) -> str:
    """``mean ± std (low–high)``, with ``n=`` when fewer than all ``runs`` measured the metric."""
    if spread is None:
        return "—"
    text = f"{spread.mean:.{digits}f} ± {spread.std:.{digits}f} ({spread.low:.{digits}f}–{spread.high:.{digits}f})"
    return text if spread.count == runs else f"{text}, n={spread.count}"
