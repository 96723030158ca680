"""Bird's-eye-view rendering with matplotlib: the fallback where Open3D cannot render.

Draws the scene from above in metric axes: points as tiny square markers (rasterized), every
line layer projected onto the ground plane (boxes, heading marks, skeletons, trails), and the
legend. Needs only matplotlib (Agg back-end, no display).

The picture is the same as the ``bev`` camera preset's: forward (+x) up, the vehicle's left (+y)
on the image's left.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from voxsparse.viz.scene import LineLayer, PointLayer, Scene

__all__ = ["bev_to_pixel", "render_bev"]


def bev_to_pixel(xy: np.ndarray, extent: Sequence[float], width: int, height: int) -> np.ndarray:
    """(N, 2) pixel (column, row) of ground-plane points in an image from :func:`render_bev`.

    Valid for ``axes_off=True`` images, whose axes fill the whole image.
    """
    x0, y0, x1, y1 = _fitted_extent(extent, width, height)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    col = (y1 - xy[:, 1]) / (y1 - y0) * width  # +y is left
    row = (x1 - xy[:, 0]) / (x1 - x0) * height  # +x is up
    return np.stack([col, row], 1)


def _fitted_extent(extent: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Grow ``(x_min, y_min, x_max, y_max)`` so that metres per pixel match on both image axes."""
    x0, y0, x1, y1 = (float(v) for v in extent)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    metres_per_px = max((x1 - x0) / height, (y1 - y0) / width)
    hx, hy = 0.5 * metres_per_px * height, 0.5 * metres_per_px * width
    return cx - hx, cy - hy, cx + hx, cy + hy


def render_bev(
    scene: Scene,
    extent: Sequence[float] | None = None,
    width: int = 1280,
    height: int = 960,
    legend: bool = True,
    axes_off: bool = True,
) -> np.ndarray:
    """(H, W, 3) uint8 bird's-eye view of ``scene``.

    Args:
        extent: ``(x_min, y_min, x_max, y_max)`` metres shown (fitted to the image aspect);
            default: the scene's bounds.
        axes_off: fill the image with the plot (pixel geometry given by :func:`bev_to_pixel`);
            False adds metric axes and ticks around it.
    """
    # Figure + the Agg canvas directly: no pyplot, no global back-end switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if extent is None:
        lo, hi = scene.bounds()
        extent = (lo[0], lo[1], hi[0], hi[1])
    x0, y0, x1, y1 = _fitted_extent(extent, width, height)
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=scene.background)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1]) if axes_off else fig.add_axes([0.07, 0.06, 0.9, 0.9])
    ax.set_facecolor(scene.background)
    # Plot coordinates (u, v) = (-y, x): forward up, left on the left.
    for name, layer in scene.layers.items():
        if isinstance(layer, PointLayer):
            size_pt = (layer.size * 72.0 / dpi) ** 2  # marker area in points^2 for a size-px square
            ax.scatter(
                -layer.xyz[:, 1],
                layer.xyz[:, 0],
                s=size_pt,
                c=layer.colors,
                marker="s",
                linewidths=0,
                rasterized=True,
                zorder=1,
            )
        elif isinstance(layer, LineLayer):
            ends = layer.endpoints  # (S, 2, 3)
            segments = np.stack([-ends[..., 1], ends[..., 0]], -1)
            ax.add_collection(
                LineCollection(
                    segments,
                    colors=layer.colors,
                    linewidths=layer.width * 72.0 / dpi,
                    zorder=3 if name != "trails" else 2,
                    capstyle="round",
                )
            )
    ax.set_xlim(-y1, -y0)
    ax.set_ylim(x0, x1)
    ax.set_aspect("equal", adjustable="box")
    if axes_off:
        ax.set_axis_off()
    else:
        ax.tick_params(colors="0.8")
        ax.set_xlabel("y (m, + is left)", color="0.8")
        ax.set_ylabel("x (m, forward)", color="0.8")
        ax.set_xticks(ax.get_xticks())
        ax.set_xticklabels([f"{0.0 - t:g}" for t in ax.get_xticks()])
        ax.set_xlim(-y1, -y0)
    if legend and scene.legend:
        handles = [Patch(color=c, label=t) for t, c in scene.legend]
        leg = ax.legend(
            handles=handles,
            loc="upper left",
            fontsize=10 * max(1.0, height / 960),
            framealpha=0.6,
            facecolor="black",
            labelcolor="0.9",
            edgecolor="0.4",
        )
        leg.set_zorder(5)
    if scene.title:
        ax.text(
            0.01,
            0.01,
            scene.title,
            transform=ax.transAxes,
            color="0.9",
            fontsize=10 * max(1.0, height / 960),
            va="bottom",
            ha="left",
            zorder=5,
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"},
        )
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return image
