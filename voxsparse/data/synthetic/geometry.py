"""Solid primitives of the synthetic world and their exact ray intersections (numpy, float64, metres).

Three primitive kinds build every object, each held as a structure of arrays:

* :class:`BoxSet`: oriented boxes with any rotation (car bodies, walls, limbs),
* :class:`CylinderSet`: vertical capped cylinders (poles, trunks, bins),
* :class:`SpheroidSet`: ellipsoids with a vertical axis and equal horizontal radii (heads, canopies).

Intersections work on *pairs*: ``intersect(origin, direction, index)`` tests ray ``p`` against
primitive ``index[p]``, so the caller decides which pairs are worth testing (the LiDAR culls them by
angle). They return the distance ``t > 0`` along a unit direction to the first surface crossing, or
``inf`` for a miss; a ray starting inside a solid returns its exit.

Every primitive carries a ``reflectivity`` in [0, 1] (diffuse reflectance, drives LiDAR intensity)
and an ``owner``: the index of the actor it belongs to, or -1 for static structures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np

from voxsparse.geometry import wrap_angle


def yaw_matrix(yaw: np.ndarray | float) -> np.ndarray:
    """(..., 3, 3) rotations about +z by ``yaw`` radians (counter-clockwise seen from above)."""
    yaw = np.asarray(yaw, dtype=np.float64)
    c, s = np.cos(yaw), np.sin(yaw)
    m = np.zeros(yaw.shape + (3, 3))
    m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1], m[..., 2, 2] = c, -s, s, c, 1.0
    return m


def _first_crossing(t_near: np.ndarray, t_far: np.ndarray) -> np.ndarray:
    """Distance to the first surface of the solid occupying [t_near, t_far] along the ray."""
    hit = (t_near <= t_far) & (t_far > 0)
    return np.where(hit, np.where(t_near > 0, t_near, t_far), np.inf)


def _round_bounds(center_xy, radius, z_lo, z_hi, origin):
    """Angular bounds of shapes with a circular footprint (see :meth:`BoxSet.sensor_bounds`)."""
    rel = center_xy - origin[:2]
    dist = np.hypot(rel[:, 0], rel[:, 1])
    az = np.arctan2(rel[:, 1], rel[:, 0])
    half = np.where(dist > radius, np.arcsin(np.clip(radius / np.maximum(dist, 1e-12), 0.0, 1.0)), np.pi)
    return (
        az - half,
        az + half,
        np.maximum(dist - radius, 0.0),
        dist + radius,
        z_lo - origin[2],
        z_hi - origin[2],
    )


@dataclass
class _PrimitiveSet:
    reflectivity: np.ndarray  # (M,) diffuse reflectance in [0, 1]
    owner: np.ndarray  # (M,) int64 actor index, -1 = static structure

    def __len__(self) -> int:
        return len(self.owner)

    @classmethod
    def concat(cls, sets: Sequence[_PrimitiveSet]):
        return cls(**{f.name: np.concatenate([getattr(s, f.name) for s in sets]) for f in fields(cls)})


@dataclass
class BoxSet(_PrimitiveSet):
    """M oriented boxes: ``center`` (M, 3), ``half_size`` (M, 3), ``rotation`` (M, 3, 3) world-from-local
    (its columns are the box axes)."""

    center: np.ndarray
    half_size: np.ndarray
    rotation: np.ndarray

    def moved(self, yaw: np.ndarray, translation: np.ndarray) -> BoxSet:
        """Rotate each box about the world z axis by ``yaw`` (M,), then translate it by ``translation``
        (M, 3)."""
        r = yaw_matrix(yaw)
        return replace(
            self, center=np.einsum("mij,mj->mi", r, self.center) + translation, rotation=r @ self.rotation
        )

    def corners(self) -> np.ndarray:
        """(M, 8, 3) corner points."""
        signs = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=np.float64) * 2 - 1
        local = signs[None] * self.half_size[:, None, :]
        return self.center[:, None, :] + np.einsum("mij,mkj->mki", self.rotation, local)

    def local_bounds(self) -> np.ndarray:
        """(M, 2, 3) axis-aligned min/max of each box in the current frame."""
        c = self.corners()
        return np.stack([c.min(1), c.max(1)], axis=1)

    def sensor_bounds(self, origin: np.ndarray):
        """Conservative angular window of each box seen from ``origin`` (3,).

        Returns ``(az_lo, az_hi, r_min, r_max, z_lo, z_hi)``, each (M,): the world azimuth interval
        (``az_hi - az_lo = 2 pi`` when the footprint covers the sensor), bounds of the horizontal
        distance to the footprint, and the height range relative to ``origin``.
        """
        corners = self.corners() - origin
        rel = self.center - origin
        az_c = np.arctan2(rel[:, 1], rel[:, 0])
        d_az = wrap_angle(np.arctan2(corners[..., 1], corners[..., 0]) - az_c[:, None])
        # A convex footprint not covering the sensor spans < pi, so its extreme azimuths are corners.
        # The distance lower bound uses the footprint's bounding rectangle in the box's own yaw frame
        # (exact for upright boxes).
        yaw = np.arctan2(self.rotation[:, 1, 0], self.rotation[:, 0, 0])
        c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
        u = corners[..., 0] * c + corners[..., 1] * s
        v = corners[..., 1] * c - corners[..., 0] * s
        du = np.maximum(u.min(1), 0.0) + np.maximum(-u.max(1), 0.0)
        dv = np.maximum(v.min(1), 0.0) + np.maximum(-v.max(1), 0.0)
        r_min = np.hypot(du, dv)
        r_max = np.hypot(corners[..., 0], corners[..., 1]).max(1)
        covers = r_min <= 0.0
        lo = np.where(covers, -np.pi, az_c + d_az.min(1))
        hi = np.where(covers, np.pi, az_c + d_az.max(1))
        return lo, hi, r_min, r_max, corners[..., 2].min(1), corners[..., 2].max(1)

    def intersect(self, origin: np.ndarray, direction: np.ndarray, index: np.ndarray) -> np.ndarray:
        """(P,) distance from ``origin`` (3,) along unit ``direction`` (P, 3) into box ``index`` (P,)."""
        rot = self.rotation[index]
        o = np.einsum("pji,pj->pi", rot, origin - self.center[index])
        d = np.einsum("pji,pj->pi", rot, direction)
        h = self.half_size[index]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t1 = (-h - o) * inv
            t2 = (h - o) * inv
        # fmin/fmax skip the NaN of a ray lying exactly in a slab plane.
        t_near = np.fmax.reduce(np.fmin(t1, t2), axis=1)
        t_far = np.fmin.reduce(np.fmax(t1, t2), axis=1)
        return _first_crossing(t_near, t_far)

    def normal(self, points: np.ndarray, index: np.ndarray) -> np.ndarray:
        """(P, 3) outward unit normal of the face of box ``index`` that ``points`` (P, 3) lie on."""
        rot = self.rotation[index]
        local = np.einsum("pji,pj->pi", rot, points - self.center[index])
        axis = np.argmax(np.abs(local) / self.half_size[index], axis=1)
        rows = np.arange(len(index))
        return rot[rows, :, axis] * np.sign(local[rows, axis])[:, None]


@dataclass
class CylinderSet(_PrimitiveSet):
    """M vertical capped cylinders: axis at ``center_xy`` (M, 2), ``z_range`` (M, 2) bottom/top,
    ``radius`` (M,)."""

    center_xy: np.ndarray
    z_range: np.ndarray
    radius: np.ndarray

    def moved(self, yaw: np.ndarray, translation: np.ndarray) -> CylinderSet:
        xy = np.einsum("mij,mj->mi", yaw_matrix(yaw)[:, :2, :2], self.center_xy) + translation[:, :2]
        return replace(self, center_xy=xy, z_range=self.z_range + translation[:, 2:3])

    def local_bounds(self) -> np.ndarray:
        r = self.radius[:, None]
        lo = np.concatenate([self.center_xy - r, self.z_range[:, :1]], axis=1)
        hi = np.concatenate([self.center_xy + r, self.z_range[:, 1:]], axis=1)
        return np.stack([lo, hi], axis=1)

    def sensor_bounds(self, origin: np.ndarray):
        return _round_bounds(self.center_xy, self.radius, self.z_range[:, 0], self.z_range[:, 1], origin)

    def intersect(self, origin: np.ndarray, direction: np.ndarray, index: np.ndarray) -> np.ndarray:
        o = origin[:2] - self.center_xy[index]
        d = direction[:, :2]
        a = np.einsum("pi,pi->p", d, d)
        b = np.einsum("pi,pi->p", o, d)
        c = np.einsum("pi,pi->p", o, o) - self.radius[index] ** 2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            # A vertical ray (a = 0) is inside the infinite cylinder for all t iff c <= 0.
            vertical = a <= 1e-18
            t_c1 = np.where(vertical, np.where(c <= 0, -np.inf, np.inf), (-b - root) / a)
            t_c2 = np.where(vertical, np.where(c <= 0, np.inf, -np.inf), (-b + root) / a)
            t_c1 = np.where(disc < 0, np.inf, t_c1)
            z = self.z_range[index]
            inv = 1.0 / direction[:, 2]
            tz1 = (z[:, 0] - origin[2]) * inv
            tz2 = (z[:, 1] - origin[2]) * inv
        t_near = np.fmax(t_c1, np.fmin(tz1, tz2))
        t_far = np.fmin(t_c2, np.fmax(tz1, tz2))
        return _first_crossing(t_near, t_far)

    def normal(self, points: np.ndarray, index: np.ndarray) -> np.ndarray:
        rel_xy = points[:, :2] - self.center_xy[index]
        z = self.z_range[index]
        half_h = 0.5 * (z[:, 1] - z[:, 0])
        dz = points[:, 2] - 0.5 * (z[:, 0] + z[:, 1])
        radius = self.radius[index]
        # The face whose normalised coordinate is largest: a cap if |dz|/half_h wins, else the side.
        on_cap = np.abs(dz) / half_h > np.hypot(rel_xy[:, 0], rel_xy[:, 1]) / radius
        n = np.zeros_like(points)
        n[:, :2] = rel_xy / np.maximum(np.hypot(rel_xy[:, 0], rel_xy[:, 1]), 1e-12)[:, None]
        n[on_cap] = 0.0
        n[on_cap, 2] = np.sign(dz[on_cap])
        return n


@dataclass
class SpheroidSet(_PrimitiveSet):
    """M ellipsoids with a vertical axis: ``center`` (M, 3), horizontal ``radius`` (M,),
    ``vertical_radius`` (M,)."""

    center: np.ndarray
    radius: np.ndarray
    vertical_radius: np.ndarray

    def moved(self, yaw: np.ndarray, translation: np.ndarray) -> SpheroidSet:
        return replace(self, center=np.einsum("mij,mj->mi", yaw_matrix(yaw), self.center) + translation)

    def _scale(self, index: np.ndarray) -> np.ndarray:
        r = self.radius[index]
        return np.stack([r, r, self.vertical_radius[index]], axis=1)

    def local_bounds(self) -> np.ndarray:
        s = self._scale(np.arange(len(self)))
        return np.stack([self.center - s, self.center + s], axis=1)

    def sensor_bounds(self, origin: np.ndarray):
        z = self.center[:, 2]
        return _round_bounds(
            self.center[:, :2], self.radius, z - self.vertical_radius, z + self.vertical_radius, origin
        )

    def intersect(self, origin: np.ndarray, direction: np.ndarray, index: np.ndarray) -> np.ndarray:
        # Scale space so the spheroid is the unit sphere; t keeps its meaning along the original ray.
        s = self._scale(index)
        o = (origin - self.center[index]) / s
        d = direction / s
        a = np.einsum("pi,pi->p", d, d)
        b = np.einsum("pi,pi->p", o, d)
        c = np.einsum("pi,pi->p", o, o) - 1.0
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t_near = np.where(disc < 0, np.inf, (-b - root) / a)
        return _first_crossing(t_near, (-b + root) / a)

    def normal(self, points: np.ndarray, index: np.ndarray) -> np.ndarray:
        g = (points - self.center[index]) / self._scale(index) ** 2
        return g / np.linalg.norm(g, axis=1, keepdims=True)


@dataclass
class Primitives:
    """Everything solid in a scene (or in one actor's local frame), by kind."""

    boxes: BoxSet
    cylinders: CylinderSet
    spheroids: SpheroidSet

    def sets(self) -> Iterator[_PrimitiveSet]:
        yield self.boxes
        yield self.cylinders
        yield self.spheroids

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets())

    @classmethod
    def concat(cls, parts: Sequence[Primitives], owners: Sequence[int] | None = None) -> Primitives:
        """Concatenate ``parts``; with ``owners``, the primitives of ``parts[i]`` get owner ``owners[i]``."""

        def join(sets: list[_PrimitiveSet]) -> _PrimitiveSet:
            joined = type(sets[0]).concat(sets)
            if owners is None:
                return joined
            return replace(
                joined, owner=np.repeat(np.asarray(owners, dtype=np.int64), [len(s) for s in sets])
            )

        return cls(
            join([p.boxes for p in parts]),
            join([p.cylinders for p in parts]),
            join([p.spheroids for p in parts]),
        )

    def shifted(self, offset: np.ndarray) -> Primitives:
        """Every primitive translated by ``offset`` (3,)."""
        return Primitives(
            *(s.moved(np.zeros(len(s)), np.broadcast_to(offset, (len(s), 3))) for s in self.sets())
        )

    def moved_by_owner(self, yaw: np.ndarray, translation: np.ndarray) -> Primitives:
        """Move every primitive rigidly with its owner: ``yaw`` (A,) and ``translation`` (A, 3) per owner."""
        return Primitives(*(s.moved(yaw[s.owner], translation[s.owner]) for s in self.sets()))

    def local_bounds(self) -> np.ndarray:
        """(M, 2, 3) axis-aligned min/max of every primitive, boxes then cylinders then spheroids."""
        return np.concatenate([s.local_bounds() for s in self.sets()])

    def owners(self) -> np.ndarray:
        return np.concatenate([s.owner for s in self.sets()])


class ShapeBuilder:
    """Collects primitives one at a time (object models are small), then packs them into arrays.

    Plain-float arithmetic here: numpy's per-call overhead dominates on 3-vectors.
    """

    def __init__(self) -> None:
        self._boxes: list[tuple] = []
        self._cylinders: list[tuple] = []
        self._spheroids: list[tuple] = []

    def box(self, center, size, reflectivity: float, yaw: float = 0.0, rotation=None) -> None:
        """Box of full ``size`` (dx, dy, dz) at ``center``, turned by ``yaw`` or by a ``rotation`` (3, 3)."""
        if rotation is None:
            c, s = math.cos(yaw), math.sin(yaw)
            rotation = ((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0))
        self._boxes.append((center, (0.5 * size[0], 0.5 * size[1], 0.5 * size[2]), rotation, reflectivity))

    def segment(self, a, b, radius: float, reflectivity: float, side=(0.0, 1.0, 0.0)) -> None:
        """Limb from joint ``a`` to joint ``b``: a box of square section 2 ``radius``, extended by
        ``radius`` / 2 past each joint so consecutive limbs overlap; ``side`` orients its section."""
        (ax, ay, az), (bx, by, bz) = a, b
        zx, zy, zz = bx - ax, by - ay, bz - az
        length = math.sqrt(zx * zx + zy * zy + zz * zz)
        zx, zy, zz = zx / length, zy / length, zz / length
        sx, sy, sz = side
        dot = sx * zx + sy * zy + sz * zz
        yx, yy, yz = sx - dot * zx, sy - dot * zy, sz - dot * zz
        norm = math.sqrt(yx * yx + yy * yy + yz * yz)
        if norm < 1e-6:  # side along the limb: any perpendicular will do
            yx, yy, yz = 1.0 - zx * zx, -zx * zy, -zx * zz
            norm = math.sqrt(yx * yx + yy * yy + yz * yz)
        yx, yy, yz = yx / norm, yy / norm, yz / norm
        xx, xy, xz = yy * zz - yz * zy, yz * zx - yx * zz, yx * zy - yy * zx
        rotation = ((xx, yx, zx), (xy, yy, zy), (xz, yz, zz))
        center = (0.5 * (ax + bx), 0.5 * (ay + by), 0.5 * (az + bz))
        self.box(center, (2 * radius, 2 * radius, length + radius), reflectivity, rotation=rotation)

    def cylinder(self, x: float, y: float, z0: float, z1: float, radius: float, reflectivity: float) -> None:
        self._cylinders.append(((x, y), (z0, z1), radius, reflectivity))

    def spheroid(self, center, radius: float, vertical_radius: float, reflectivity: float) -> None:
        self._spheroids.append((center, radius, vertical_radius, reflectivity))

    def build(self, owner: int = -1) -> Primitives:
        """Pack the collected primitives, all owned by ``owner``."""

        def columns(rows: list[tuple], shapes: list[tuple]) -> list[np.ndarray]:
            return [
                np.array([r[i] for r in rows], dtype=np.float64).reshape((len(rows),) + shape)
                for i, shape in enumerate(shapes)
            ]

        def owners(rows: list[tuple]) -> np.ndarray:
            return np.full(len(rows), owner, dtype=np.int64)

        center, half, rot, refl = columns(self._boxes, [(3,), (3,), (3, 3), ()])
        boxes = BoxSet(
            reflectivity=refl, owner=owners(self._boxes), center=center, half_size=half, rotation=rot
        )
        xy, z, radius, refl = columns(self._cylinders, [(2,), (2,), (), ()])
        cylinders = CylinderSet(
            reflectivity=refl, owner=owners(self._cylinders), center_xy=xy, z_range=z, radius=radius
        )
        center, radius, vradius, refl = columns(self._spheroids, [(3,), (), (), ()])
        spheroids = SpheroidSet(
            reflectivity=refl,
            owner=owners(self._spheroids),
            center=center,
            radius=radius,
            vertical_radius=vradius,
        )
        return Primitives(boxes, cylinders, spheroids)


class RayClearance(Protocol):
    """Heights of R rays above a surface, as a function of the distance travelled along them."""

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """Clearance (m, negative below the surface) at distances ``t``, (R,) or (R, S)."""

    def take(self, rows: np.ndarray) -> RayClearance:
        """The same for the rays ``rows`` only."""


def band_interval(oz: float, dz: np.ndarray, z_bounds: tuple[float, float], t_max: float):
    """(t_enter, t_exit), each (R,): where rays from height ``oz`` with vertical direction components
    ``dz`` (R,) run inside the band ``z_bounds`` = (lo, hi), clipped to [0, ``t_max``]; empty when
    ``t_enter >= t_exit``. The band is widened by 1 mm so that a flat surface (lo = hi) is bracketed."""
    z_lo, z_hi = z_bounds[0] - 1e-3, z_bounds[1] + 1e-3
    with np.errstate(divide="ignore", invalid="ignore"):
        t_enter = np.where(dz < 0, np.maximum((z_hi - oz) / dz, 0.0), 0.0)
        t_exit = np.where(dz < 0, (z_lo - oz) / dz, np.where(dz > 0, (z_hi - oz) / dz, np.inf))
    return t_enter, np.minimum(t_exit, t_max)


def first_crossing(
    clearance: RayClearance,
    t_enter: np.ndarray,
    t_exit: np.ndarray,
    coarse_steps: int = 16,
    secant_steps: int = 6,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """(R,) first distance in [``t_enter``, ``t_exit``] where each ray meets the surface, inf if none.

    The interval is sampled at ``coarse_steps`` points to bracket the first crossing (a bump thinner
    than one step can be missed; with one step the interval must hold a single crossing). Secant
    steps from the bracket ends then converge fast on smooth surfaces; rays they leave more than
    ``tolerance`` metres from the surface (e.g. at a step of the surface) are bisected instead.
    """
    t_hit = np.full(len(t_enter), np.inf)
    rays = np.flatnonzero(t_enter < t_exit)
    if len(rays) < len(t_enter):
        clearance = clearance.take(rays)
    steps = t_enter[rays, None] + (t_exit - t_enter)[rays, None] * np.linspace(0.0, 1.0, coarse_steps + 1)
    gaps = clearance(steps)
    below = gaps[:, 1:] <= 0
    found = np.flatnonzero(below.any(axis=1))
    first = np.argmax(below[found], axis=1)
    if len(found) < len(rays):
        rays, clearance = rays[found], clearance.take(found)
    lo, hi = steps[found, first], steps[found, first + 1]

    # Secant iterations (no bracket upkeep, so no per-element selects in the loop).
    t0, f0, t1, f1 = lo, gaps[found, first], hi, gaps[found, first + 1]
    for _ in range(secant_steps):
        slope = f1 - f0
        # A converged ray (f1 == f0) stays where it is.
        step = np.divide(f1 * (t1 - t0), slope, out=np.zeros_like(t1), where=slope != 0)
        t2 = np.clip(t1 - step, lo, hi)
        t0, f0, t1, f1 = t1, f1, t2, clearance(t2)
    failed = np.flatnonzero(~(np.abs(f1) <= tolerance))
    lo, hi, clearance = lo[failed], hi[failed], clearance.take(failed)
    for _ in range(48):  # down to float64 resolution of the bracket
        mid = 0.5 * (lo + hi)
        down = clearance(mid) <= 0
        lo, hi = np.where(down, lo, mid), np.where(down, mid, hi)
    t1[failed] = hi
    t_hit[rays] = t1
    return t_hit


def bev_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., N, M) whether BEV rectangles ``a`` (..., N, 5) and ``b`` (..., M, 5) overlap (touching counts).

    A rectangle is (x, y, length, width, yaw); separating-axis test on the four edge normals.
    """
    ca, sa = np.cos(a[..., 4])[..., :, None], np.sin(a[..., 4])[..., :, None]
    cb, sb = np.cos(b[..., 4])[..., None, :], np.sin(b[..., 4])[..., None, :]
    la, wa = 0.5 * a[..., 2][..., :, None], 0.5 * a[..., 3][..., :, None]
    lb, wb = 0.5 * b[..., 2][..., None, :], 0.5 * b[..., 3][..., None, :]
    dx = b[..., 0][..., None, :] - a[..., 0][..., :, None]
    dy = b[..., 1][..., None, :] - a[..., 1][..., :, None]
    cos = np.abs(ca * cb + sa * sb)  # |cos| and |sin| of the angle between the two rectangles
    sin = np.abs(sa * cb - ca * sb)
    return (
        (np.abs(dx * ca + dy * sa) <= la + lb * cos + wb * sin)
        & (np.abs(dy * ca - dx * sa) <= wa + lb * sin + wb * cos)
        & (np.abs(dx * cb + dy * sb) <= lb + la * cos + wa * sin)
        & (np.abs(dy * cb - dx * sb) <= wb + la * sin + wa * cos)
    )
