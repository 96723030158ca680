"""A spinning multi-beam LiDAR: first-return ray casting with range noise, dropout and intensity.

The sensor fires ``beams`` x ``columns`` rays from one origin (a rolling-shutter-free sweep: the world
is frozen at the frame's timestamp). Testing every ray against every primitive would be ~10^8 pairs,
so each primitive is first bounded by an azimuth interval and an elevation interval seen from the
sensor; only the rays of the (beam, column) grid inside both are tested, in chunks that bound memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from voxsparse.data.synthetic.geometry import Primitives
from voxsparse.geometry import wrap_angle

#: ``Scan.owner`` value of ground returns (static structures are -1, actors >= 0).
GROUND = -2


@dataclass
class LidarConfig:
    """Sensor model. Angles in degrees, distances in metres.

    Attributes:
        beams: number of lasers (rows of the range image).
        fov_down: elevation of the lowest beam (negative = below the horizon).
        fov_up: elevation of the highest beam.
        beam_spacing: "uniform", or "waymo": spacing shrinking towards the top, about 4x denser at
            the horizon than at the bottom, like long-range automotive sensors.
        azimuth_resolution: horizontal angle between columns; 0.2 gives 1800 columns.
        max_range: returns beyond it are lost.
        min_range: returns closer than it are discarded (the sensor's blind zone).
        range_noise: standard deviation of the Gaussian range error.
        dropout: probability that a return is lost at random.
        intensity_noise: standard deviation of the additive Gaussian intensity noise.
        mount_height: sensor height above the ground under the ego vehicle.
        max_pairs: ray-primitive pairs tested per chunk (memory: ~200 bytes per pair); the ground is
            cast in chunks of ``max_pairs / 8`` rays.
    """

    beams: int = 64
    fov_down: float = -25.0
    fov_up: float = 3.0
    beam_spacing: str = "uniform"
    azimuth_resolution: float = 0.2
    max_range: float = 75.0
    min_range: float = 1.0
    range_noise: float = 0.02
    dropout: float = 0.03
    intensity_noise: float = 0.02
    mount_height: float = 1.8
    max_pairs: int = 1 << 19


class Ground(Protocol):
    """What the sensor needs from the terrain (world frame, metres)."""

    def intersect(self, origin: np.ndarray, direction: np.ndarray, t_max: float) -> np.ndarray:
        """(R,) distance along unit ``direction`` (R, 3) from ``origin`` (3,) to the ground, inf if none."""

    def normal(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, 3) unit surface normals at ground points."""

    def reflectivity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) diffuse reflectance in [0, 1] at ground points."""


@dataclass
class Scan:
    """The returns of one sweep.

    Attributes:
        points: (N, 4) float32 x, y, z in the LiDAR frame (metres) and intensity in [0, 1].
        ray: (N,) int64 ray index ``beam * columns + column`` (beams ascending in elevation).
        range: (N,) float64 noise-free range of the return, metres.
        owner: (N,) int64 what was hit: actor index >= 0, -1 static structure, ``GROUND`` (-2).
    """

    points: np.ndarray
    ray: np.ndarray
    range: np.ndarray
    owner: np.ndarray


class Lidar:
    """The sensor of ``config``; :meth:`scan` renders a world seen from a pose."""

    def __init__(self, config: LidarConfig | None = None):
        self.config = cfg = config or LidarConfig()
        if cfg.beam_spacing not in ("uniform", "waymo"):
            raise ValueError(
                f"LidarConfig.beam_spacing: expected 'uniform' or 'waymo', got {cfg.beam_spacing!r}"
            )
        u = np.linspace(0.0, 1.0, cfg.beams)
        if cfg.beam_spacing == "waymo":
            u = u + 0.6 * u * (1.0 - u)
        #: (B,) beam elevations, radians, ascending.
        self.elevations = np.deg2rad(cfg.fov_down + (cfg.fov_up - cfg.fov_down) * u)
        self.columns = round(360.0 / cfg.azimuth_resolution)
        #: (C,) column azimuths in the LiDAR frame, radians, from -pi.
        self.azimuths = -np.pi + 2 * np.pi * np.arange(self.columns) / self.columns
        el, az = np.meshgrid(self.elevations, self.azimuths, indexing="ij")
        #: (B * C, 3) unit ray directions in the LiDAR frame, row-major over (beam, column).
        self.directions = np.stack(
            [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1
        ).reshape(-1, 3)

    @property
    def num_rays(self) -> int:
        return len(self.directions)

    def scan(self, world: Primitives, ground: Ground, pose: np.ndarray, rng: np.random.Generator) -> Scan:
        """Cast every ray from ``pose`` (4, 4) world-from-LiDAR (level: rotation about z only) into
        ``world`` and ``ground``; keep the first hit, then add noise, dropout and intensity.

        The random draws have a fixed count per sweep, so they do not depend on the geometry.
        """
        cfg = self.config
        origin, rot = pose[:3, 3], pose[:3, :3]
        directions = self.directions @ rot.T
        rows = max(cfg.max_pairs // 8, 1)  # the ground is sampled up to ~65 times per ray
        t_best = np.concatenate(
            [
                ground.intersect(origin, directions[i : i + rows], cfg.max_range)
                for i in range(0, self.num_rays, rows)
            ]
        )
        kind = np.full(self.num_rays, -1, dtype=np.int8)  # -1 ground, else index into world.sets()
        index = np.zeros(self.num_rays, dtype=np.int64)
        yaw = np.arctan2(rot[1, 0], rot[0, 0])
        for k, prims in enumerate(world.sets()):
            for r, p in self._grid_pairs(prims.sensor_bounds(origin), yaw):
                t = prims.intersect(origin, directions[r], p)
                hit = t < t_best[r]
                r, p, t = r[hit], p[hit], t[hit]
                np.minimum.at(t_best, r, t)
                won = t == t_best[r]
                kind[r[won]], index[r[won]] = k, p[won]

        dropped = rng.random(self.num_rays) < cfg.dropout
        range_noise = rng.normal(0.0, cfg.range_noise, self.num_rays)
        intensity_noise = rng.normal(0.0, cfg.intensity_noise, self.num_rays)
        rays = np.flatnonzero((t_best <= cfg.max_range) & (t_best >= cfg.min_range) & ~dropped)
        t, kind, index = t_best[rays], kind[rays], index[rays]
        d = directions[rays]
        hits = origin + t[:, None] * d

        normal = np.empty_like(hits)
        reflectivity = np.empty(len(rays))
        owner = np.full(len(rays), GROUND, dtype=np.int64)
        on_ground = kind < 0
        normal[on_ground] = ground.normal(hits[on_ground, 0], hits[on_ground, 1])
        reflectivity[on_ground] = ground.reflectivity(hits[on_ground, 0], hits[on_ground, 1])
        for k, prims in enumerate(world.sets()):
            m = kind == k
            normal[m] = prims.normal(hits[m], index[m])
            reflectivity[m] = prims.reflectivity[index[m]]
            owner[m] = prims.owner[index[m]]

        # Diffuse return: brighter for surfaces facing the beam, never zero at grazing incidence.
        cos_incidence = np.abs(np.einsum("ij,ij->i", normal, d))
        intensity = np.clip(reflectivity * (0.3 + 0.7 * cos_incidence) + intensity_noise[rays], 0.0, 1.0)
        measured = t + range_noise[rays]
        points = np.concatenate([self.directions[rays] * measured[:, None], intensity[:, None]], axis=1)
        return Scan(points.astype(np.float32), rays, t, owner)

    def _grid_pairs(self, bounds, sensor_yaw: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Candidate (ray, primitive) pairs: the grid rays inside each primitive's angular window.

        ``bounds`` is a primitive set's ``sensor_bounds``. Yields ray and primitive indices, (P,) each,
        in chunks of whole primitives holding at most ``max_pairs`` pairs (or a single primitive).
        """
        az_lo, az_hi, r_min, _, z_lo, z_hi = bounds
        el_lo, el_hi = _elevation_window(bounds)
        eps = 1e-9
        beam0 = np.searchsorted(self.elevations, el_lo - eps, side="left")
        beams = np.searchsorted(self.elevations, el_hi + eps, side="right") - beam0

        step = 2 * np.pi / self.columns
        full = (az_hi - az_lo) >= 2 * np.pi - eps
        start = wrap_angle(az_lo - sensor_yaw)
        col0 = np.ceil((start + np.pi) / step - eps).astype(np.int64)
        cols = np.floor((start + (az_hi - az_lo) + np.pi) / step + eps).astype(np.int64) - col0 + 1
        cols = np.where(full, self.columns, np.clip(cols, 0, self.columns))
        col0 = np.where(full, 0, col0)
        # Nearest possible point of the primitive: beyond the range, it cannot be seen.
        dz = np.where(z_lo * z_hi > 0, np.minimum(np.abs(z_lo), np.abs(z_hi)), 0.0)
        counts = np.where(np.hypot(r_min, dz) <= self.config.max_range, cols * beams, 0)

        ends = np.cumsum(counts)
        first = 0
        while first < len(counts):
            budget = ends[first] - counts[first] + self.config.max_pairs
            last = max(int(np.searchsorted(ends, budget, side="right")), first + 1)
            n = counts[first:last]
            prim = np.repeat(np.arange(first, last), n)
            k = np.arange(len(prim)) - np.repeat(np.cumsum(n) - n, n)  # index within each window
            nb = beams[prim]
            column = (col0[prim] + k // nb) % self.columns
            yield (beam0[prim] + k % nb) * self.columns + column, prim
            first = last

    def visible(
        self, targets: np.ndarray, world: Primitives, ground: Ground, pose: np.ndarray, tolerance: float
    ) -> np.ndarray:
        """(Q,) whether the sensor at ``pose`` sees ``targets`` (Q, 3), given in the LiDAR frame.

        A target is visible when it lies within the vertical field of view (extended by half a beam
        spacing) and the range limits, and the first surface on the ray towards it is no more than
        ``tolerance`` metres in front of it. Ray angles are exact, not snapped to the beam grid; no
        noise or dropout.
        """
        cfg = self.config
        dist = np.linalg.norm(targets, axis=1)
        elevation = np.arcsin(np.clip(targets[:, 2] / np.maximum(dist, 1e-9), -1.0, 1.0))
        half_gap = 0.5 * (self.elevations[-1] - self.elevations[0]) / max(cfg.beams - 1, 1)
        in_view = (
            (elevation >= self.elevations[0] - half_gap)
            & (elevation <= self.elevations[-1] + half_gap)
            & (dist >= cfg.min_range)
            & (dist <= cfg.max_range)
        )
        origin, rot = pose[:3, 3], pose[:3, :3]
        directions = (targets / np.maximum(dist, 1e-9)[:, None]) @ rot.T
        t_first = ground.intersect(origin, directions, cfg.max_range)
        yaw = np.arctan2(rot[1, 0], rot[0, 0])
        azimuth = np.arctan2(targets[:, 1], targets[:, 0])
        for prims in world.sets():
            bounds = prims.sensor_bounds(origin)
            az_lo, az_hi = bounds[:2]
            el_lo, el_hi = _elevation_window(bounds)
            width = az_hi - az_lo
            offset = (azimuth[:, None] - (az_lo - yaw)[None, :]) % (2 * np.pi)
            inside = (
                (offset <= width[None, :] + 1e-9)
                | (offset >= 2 * np.pi - 1e-9)
                | (width >= 2 * np.pi)[None, :]
            )
            inside &= elevation[:, None] >= el_lo[None, :] - 1e-9
            inside &= elevation[:, None] <= el_hi[None, :] + 1e-9
            q, p = np.nonzero(inside)
            t = prims.intersect(origin, directions[q], p)
            np.minimum.at(t_first, q, t)
        return in_view & (t_first >= dist - tolerance)


def _elevation_window(bounds) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) elevation (rad) bounds of primitives from their ``sensor_bounds``: a top above the
    sensor is steepest seen from the nearest distance, a top below it from the farthest."""
    _, _, r_min, r_max, z_lo, z_hi = bounds
    el_lo = np.arctan2(z_lo, np.where(z_lo > 0, r_max, r_min))
    el_hi = np.arctan2(z_hi, np.where(z_hi > 0, r_min, r_max))
    return el_lo, el_hi
