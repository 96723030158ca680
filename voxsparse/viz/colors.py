"""Colours: point colour ramps and the class palettes of ground truth and predictions.

Everything here is plain numpy, RGB floats in [0, 1]. The palettes are chosen so that the six
box colours (3 classes x {ground truth, prediction}) are distinct from each other and from the
intensity ramp of the points: ground truth is drawn in cool colours, predictions in warm ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "BACKGROUND",
    "GT_CLASS_COLORS",
    "HEIGHT_RAMP",
    "INTENSITY_RAMP",
    "KEY_COLORS",
    "PRED_CLASS_COLORS",
    "SEMANTIC_COLORS",
    "class_color",
    "ramp",
    "track_color",
]

#: Ground-truth box colour of class label i (Vehicle, Pedestrian, Cyclist): cool colours.
GT_CLASS_COLORS = np.array(
    [
        [0.15, 0.90, 0.25],  # Vehicle: green
        [0.10, 0.75, 1.00],  # Pedestrian: sky blue
        [0.95, 0.95, 0.15],  # Cyclist: yellow
    ],
    dtype=np.float32,
)

#: Predicted box colour of class label i: warm colours.
PRED_CLASS_COLORS = np.array(
    [
        [1.00, 0.20, 0.15],  # Vehicle: red
        [1.00, 0.35, 0.95],  # Pedestrian: magenta
        [1.00, 0.60, 0.05],  # Cyclist: orange
    ],
    dtype=np.float32,
)

#: Point colour per semantic label, label -1 (no object) first: muted versions of the GT palette.
SEMANTIC_COLORS = np.array(
    [
        [0.45, 0.45, 0.50],  # background
        [0.30, 0.75, 0.35],
        [0.30, 0.60, 0.85],
        [0.80, 0.80, 0.30],
    ],
    dtype=np.float32,
)

#: Render background: near-black blue, so light points and saturated lines both stand out.
BACKGROUND = np.array([0.04, 0.05, 0.07], dtype=np.float32)

#: Intensity ramp, dark slate to white: neutral, so coloured boxes stay readable on top.
INTENSITY_RAMP = np.array(
    [[0.22, 0.25, 0.33], [0.45, 0.50, 0.60], [0.72, 0.76, 0.84], [1.00, 1.00, 1.00]], dtype=np.float32
)

#: Height ramp, deep blue through teal and pale green to white-yellow.
HEIGHT_RAMP = np.array(
    [[0.15, 0.10, 0.45], [0.10, 0.35, 0.75], [0.10, 0.65, 0.70], [0.55, 0.85, 0.55], [1.00, 0.97, 0.75]],
    dtype=np.float32,
)

#: Colours a palette image must keep exactly: both box palettes, the background, white.
KEY_COLORS = np.concatenate(
    [GT_CLASS_COLORS, PRED_CLASS_COLORS, BACKGROUND[None], np.ones((1, 3), np.float32)]
)

_EXTRA = np.array(  # for labels past the palettes (datasets with more classes)
    [[0.60, 0.40, 1.00], [0.40, 1.00, 0.80], [1.00, 0.80, 0.60], [0.70, 0.70, 0.70]], dtype=np.float32
)


def class_color(labels: np.ndarray | Sequence[int], predicted: bool = False) -> np.ndarray:
    """(K, 3) box colours for (K,) integer class labels; ``predicted`` picks the warm palette."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    palette = np.concatenate([PRED_CLASS_COLORS if predicted else GT_CLASS_COLORS, _EXTRA])
    return palette[np.mod(labels, len(palette))]


def track_color(track_ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """(K, 3) a stable, bright colour per track id (golden-ratio hue walk)."""
    ids = np.asarray(track_ids, dtype=np.int64).reshape(-1)
    hue = np.mod(ids.astype(np.float64) * 0.618033988749895 + 0.1, 1.0)
    return _hsv_to_rgb(hue, 0.65, 1.0).astype(np.float32)


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([np.full_like(h, v), t, np.full_like(h, p)], -1),
            np.stack([q, np.full_like(h, v), np.full_like(h, p)], -1),
            np.stack([np.full_like(h, p), np.full_like(h, v), t], -1),
            np.stack([np.full_like(h, p), q, np.full_like(h, v)], -1),
            np.stack([t, np.full_like(h, p), np.full_like(h, v)], -1),
            np.stack([np.full_like(h, v), np.full_like(h, p), q], -1),
        ],
        axis=0,
    )
    return table[i, np.arange(len(h))]


def ramp(
    values: np.ndarray, stops: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Map (N,) values to (N, 3) colours by piecewise-linear interpolation between ``stops``.

    ``vmin`` / ``vmax`` default to the 1st and 99th percentiles, so a few outliers do not wash
    the ramp out.
    """
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(values) == 0:
        return np.zeros((0, 3), dtype=np.float32)
    if vmin is None or vmax is None:
        lo, hi = np.percentile(values, [1.0, 99.0]) if len(values) > 100 else (values.min(), values.max())
        vmin = float(lo) if vmin is None else vmin
        vmax = float(hi) if vmax is None else vmax
    t = np.clip((values - vmin) / max(vmax - vmin, 1e-6), 0.0, 1.0) * (len(stops) - 1)
    i = np.minimum(t.astype(np.int64), len(stops) - 2)
    f = (t - i)[:, None]
    return (stops[i] * (1.0 - f) + stops[i + 1] * f).astype(np.float32)
