"""tools/visualize.py and tools/track.py check their options' types: a value of the wrong type on the
command line is one line naming its key (exit status 2), before any data is read or model run."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tool_runs import compose_config, error_line, run_tool

from voxsparse.engine.tracking import TrackOptions
from voxsparse.viz.app import VisualizeOptions


def _error_line(tool: str, tmp_path: Path, *args: str) -> str:
    return error_line(run_tool(tool, *args, f"hydra.run.dir={tmp_path / 'run'}", timeout=300))


# --- the schemas cover the configs ------------------------------------------------------------------


def test_visualize_options_cover_every_key_of_its_config():
    cfg = compose_config("visualize")
    keys = set(cfg) - {"dataset"}
    assert keys == {f.name for f in dataclasses.fields(VisualizeOptions)}
    # The dataclass defaults are the config's: a run without overrides sees the same values.
    assert dataclasses.asdict(VisualizeOptions()) == {k: cfg[k] for k in keys}


def test_track_options_cover_its_config():
    cfg = compose_config("track")
    opts = TrackOptions()
    assert {k: getattr(opts, k) for k in ("checkpoint", "device", "batch_size", "class_range")} == {
        k: cfg[k] for k in ("checkpoint", "device", "batch_size", "class_range")
    }
    # The sequences are the dataset's (its tracking section), with the tracking source's defaults.
    from voxsparse.data.synthetic import SyntheticTracking

    section = OmegaConf.to_container(cfg.dataset.tracking)
    defaults = {k: p.default for k, p in inspect.signature(SyntheticTracking).parameters.items() if k != "frames"}
    assert {k: section[k] for k in defaults} == defaults


# --- a wrong type is one line naming the key --------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("frame=abc", "error: frame: expected an integer, got 'abc'"),
        ("score_threshold=high", "error: score_threshold: expected a number, got 'high'"),
        ("width=1.5", "error: width: expected an integer, got 1.5"),
    ],
)
def test_visualize_names_the_key_of_a_wrong_type(tmp_path, override, expected):
    cache = f"dataset.cache_dir={tmp_path / 'cache'}"
    args = [override, "mode=render", "backend=matplotlib", cache]
    assert _error_line("visualize", tmp_path, *args) == expected


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["dataset.tracking.num_sequences=two"],
         "error: dataset.tracking.num_sequences: expected an integer, got 'two'"),
        (["batch_size=abc", "dataset.tracking.num_sequences=1"],
         "error: batch_size: expected an integer, got 'abc'"),
    ],
)
def test_track_names_the_key_of_a_wrong_type(tmp_path, tiny_checkpoint, overrides, expected):
    args = [f"checkpoint={tiny_checkpoint}", *overrides, "dataset.tracking.sequence_length=2", "device=cpu",
            f"dataset.cache_dir={tmp_path / 'cache'}"]
    assert _error_line("track", tmp_path, *args) == expected
