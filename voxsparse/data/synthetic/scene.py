"""Procedural street scenes: terrain, road layout, static structures and moving actors.

World frame (metres): the main road runs along x, centred on y = 0; an optional cross street runs
along y at ``x = cross_x``. Traffic keeps right, so lanes heading +x lie at y < 0. Outward from the
centre line each side has its travel lanes, an optional bike lane, an optional parking strip, then a
curb, a sidewalk and the building line. The ego vehicle starts at x = 0 in a main-road lane.

Everything moves at constant velocity (straight along its lane or sidewalk); all vehicles of a lane
share the lane's speed, so traffic never runs into itself. Actors are placed by rejection sampling:
a candidate is kept only if its footprint (with a margin) stays clear of the static structures, the
ego vehicle and every other actor at every frame time of the sequence. A scene therefore depends on
its number of frames.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from voxsparse.data.synthetic import actors as A
from voxsparse.data.synthetic.geometry import (
    Primitives,
    ShapeBuilder,
    band_interval,
    bev_overlap,
    first_crossing,
    yaw_matrix,
)
from voxsparse.geometry import wrap_angle

# Diffuse reflectances of static surfaces.
CONCRETE, GRASS, MARKING, VEGETATION, SIGN = 0.28, 0.14, 0.65, 0.16, 0.9


@dataclass
class SceneConfig:
    """Street-scene generator settings. ``(lo, hi)`` pairs are sampled uniformly (integers inclusive).

    Attributes:
        radius: actors are placed within this distance of the ego at t = 0, metres.
        extent: static structures are built along x within this distance of the ego's path, metres
            (keep it above the LiDAR range).
        num_vehicles, num_pedestrians, num_cyclists: target counts; a crowded layout may end with
            fewer, as placement gives up after 20 candidates per target.
        parked_fraction: share of vehicles parked (speed 0) in the parking strips, when there are some.
        crossing_fraction: share of vehicles on the cross street (heading +-90 degrees), if any.
        standing_fraction: share of pedestrians standing still.
        jaywalking_fraction: share of pedestrians crossing the main road.
        varied_pedestrians: draw pedestrians of wider sizes, poses and arm swing, some sitting or
            carrying a bag (``actors.sample_pedestrian``); off, the default world is unchanged.
        vehicle_speed, pedestrian_speed, cyclist_speed, ego_speed: m/s. A lane's vehicles share one
            speed; the ego's lane moves at the ego's speed.
        frame_rate: frames per second of a sequence, Hz.
        lanes_per_direction: travel lanes of the main road on each side.
        lane_width: metres.
        sidewalk_width: metres.
        bike_lane_probability, parking_probability: chance the main road has bike lanes / parking strips.
        intersection_probability: chance of a cross street.
        max_slope_deg: bound on the slope of the rolling terrain, degrees. Objects stand level on
            the ground height under their centre, so their ends may float or sink by up to
            half-length x tan(slope) (9 cm for a 5 m car on the steepest 2 degree slope).
        curb_height: sidewalks stand this much above the road, metres.
        building_height: metres.
        pole_spacing: distance between street lights and signs along each curb, metres.
        tree_probability: chance that one side of the street is lined with trees.
        clutter_per_100m: bins, benches, bushes, crates, hydrants per 100 m of street side.
    """

    radius: float = 60.0
    extent: float = 100.0
    num_vehicles: tuple[int, int] = (10, 30)
    num_pedestrians: tuple[int, int] = (5, 20)
    num_cyclists: tuple[int, int] = (2, 8)
    parked_fraction: float = 0.35
    crossing_fraction: float = 0.15
    standing_fraction: float = 0.3
    jaywalking_fraction: float = 0.15
    varied_pedestrians: bool = False
    vehicle_speed: tuple[float, float] = (0.0, 15.0)
    pedestrian_speed: tuple[float, float] = (0.5, 1.8)
    cyclist_speed: tuple[float, float] = (2.0, 7.0)
    ego_speed: tuple[float, float] = (0.0, 12.0)
    frame_rate: float = 10.0
    lanes_per_direction: tuple[int, int] = (1, 3)
    lane_width: float = 3.5
    sidewalk_width: tuple[float, float] = (2.5, 5.0)
    bike_lane_probability: float = 0.4
    parking_probability: float = 0.7
    intersection_probability: float = 0.6
    max_slope_deg: float = 2.0
    curb_height: float = 0.15
    building_height: tuple[float, float] = (4.0, 25.0)
    pole_spacing: tuple[float, float] = (12.0, 30.0)
    tree_probability: float = 0.5
    clutter_per_100m: float = 12.0


@dataclass
class Road:
    """Road layout in the world frame; widths in metres, per side of the centre line."""

    lanes: int
    lane_width: float
    bike_lane: float  # 0 = none
    parking: float  # 0 = none
    sidewalk: float
    cross_x: float | None  # x of the cross street's centre line, None = no intersection
    cross_lanes: int
    asphalt: float  # reflectance of the road surface

    @property
    def half_width(self) -> float:
        return self.lanes * self.lane_width + self.bike_lane + self.parking

    @property
    def cross_half_width(self) -> float:
        return self.cross_lanes * self.lane_width

    def _cross(self, x: np.ndarray) -> np.ndarray:
        """Distance from the cross street's centre line (inf without one)."""
        return np.abs(x - self.cross_x) if self.cross_x is not None else np.full(np.shape(x), np.inf)

    def on_road(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (np.abs(y) < self.half_width) | (self._cross(x) < self.cross_half_width)

    def first_entry(
        self, origin: np.ndarray, direction: np.ndarray, t_from: np.ndarray, t_to: np.ndarray
    ) -> np.ndarray:
        """(R,) first distance in (``t_from``, ``t_to``) at which rays from ``origin`` (3,) along
        ``direction`` (R, 3), over the road at ``t_from``, cross a road edge into a raised area; inf if
        none."""
        edges = [(1, self.half_width), (1, -self.half_width)]
        if self.cross_x is not None:
            edges += [(0, self.cross_x + self.cross_half_width), (0, self.cross_x - self.cross_half_width)]
        best = np.full(len(direction), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for axis, value in edges:
                t = (value - origin[axis]) / direction[:, axis]
                ok = (t > t_from) & (t < np.minimum(t_to, best))
                beyond = origin[:2] + (t[ok] + 1e-6)[:, None] * direction[ok, :2]
                ok[ok] = ~self.on_road(beyond[:, 0], beyond[:, 1])
                best[ok] = t[ok]
        return best

    def near_intersection(self, x: np.ndarray, margin: float) -> np.ndarray:
        """Whether x is within the cross street and its sidewalks, plus ``margin``."""
        return self._cross(x) < self.cross_half_width + self.sidewalk + margin

    def reflectivity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground reflectance: asphalt with painted lines and crossings, concrete sidewalks, grass."""
        ay, ax = np.abs(y), self._cross(x)
        main, cross = ay < self.half_width, ax < self.cross_half_width
        sidewalk = (ay < self.half_width + self.sidewalk) | (ax < self.cross_half_width + self.sidewalk)
        refl = np.where(main | cross, self.asphalt, np.where(sidewalk, CONCRETE, GRASS))

        def lines(across: np.ndarray, along: np.ndarray, lanes: int, edge: float) -> np.ndarray:
            paint = np.abs(across - 0.15) < 0.06  # double centre line
            for k in range(1, lanes):  # dashed lane dividers, 3 m dash every 9 m
                paint |= (np.abs(across - k * self.lane_width) < 0.075) & (along % 9.0 < 3.0)
            return (
                paint | (np.abs(across - lanes * self.lane_width) < 0.075) | (np.abs(across - edge) < 0.075)
            )

        paint = main & ~cross & lines(ay, x, self.lanes, self.half_width - self.parking)
        if self.cross_x is not None:
            paint |= cross & ~main & lines(ax, y, self.cross_lanes, self.cross_half_width)
            # Zebra crossings just outside the intersection on all four arms.
            zebra_main = main & (ax > self.cross_half_width + 1.0) & (ax < self.cross_half_width + 4.0)
            zebra_cross = cross & (ay > self.half_width + 1.0) & (ay < self.half_width + 4.0)
            paint |= zebra_main & (y % 1.2 < 0.6) | zebra_cross & (x % 1.2 < 0.6)
        return np.where(paint, MARKING, refl)


@dataclass
class Ground:
    """Rolling terrain with raised sidewalks: ``h(x, y) = W(x, y) + curb_height * [off the road]``,
    ``W(x, y) = sum_i a_i sin(k_i . (x, y) + phi_i)``. ``waves`` is (W, 4): amplitude (m), kx, ky
    (rad/m), phase (rad). Sines run in float32 (~16x faster here, ~1e-6 m error)."""

    road: Road
    waves: np.ndarray
    curb_height: float

    @property
    def amplitude(self) -> float:
        """Bound on |W|, metres."""
        return float(np.abs(self.waves[:, 0]).sum())

    @property
    def max_slope(self) -> float:
        """Bound on the gradient norm of W (tan of the steepest slope)."""
        return float(np.sum(np.abs(self.waves[:, 0]) * np.hypot(self.waves[:, 1], self.waves[:, 2])))

    def _phase(self, x: np.ndarray, y: np.ndarray, i: int) -> np.ndarray:
        _, kx, ky, phase = self.waves[i]
        return (kx * x + ky * y + phase).astype(np.float32)

    def smooth_height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """W(x, y): the terrain without curbs, metres."""
        h = np.zeros(np.shape(x))
        for i, a in enumerate(self.waves[:, 0]):
            h += a * np.sin(self._phase(x, y, i))
        return h

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.smooth_height(x, y) + np.where(self.road.on_road(x, y), 0.0, self.curb_height)

    def normal(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N, 3) terrain normals (curb faces get the terrain's normal too)."""
        n = np.zeros(np.shape(x) + (3,))
        n[:, 2] = 1.0
        for i, (a, kx, ky, _) in enumerate(self.waves):
            c = a * np.cos(self._phase(x, y, i))
            n[:, 0] -= c * kx
            n[:, 1] -= c * ky
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    def reflectivity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.road.reflectivity(x, y)

    def intersect(self, origin: np.ndarray, direction: np.ndarray, t_max: float) -> np.ndarray:
        """(R,) distance along unit ``direction`` (R, 3) from ``origin`` (3,) to the first ground hit.

        A ray descending faster than the steepest slope crosses each smooth level (road level W,
        sidewalk level W + curb) once, so it is solved exactly: it first meets the sidewalk level;
        if that point is off the road it is the hit, otherwise the ray runs between the two levels
        until it meets the road surface or enters a raised area through a curb face. Shallower rays
        can cross the terrain several times and are sampled along their length.
        """
        a, c = self.amplitude, self.curb_height
        t = np.full(len(direction), np.inf)
        steep = np.flatnonzero(direction[:, 2] < -self.max_slope * np.hypot(direction[:, 0], direction[:, 1]))
        d = direction[steep]
        top = first_crossing(
            _RayTerrain(self, origin, d, c), *band_interval(origin[2], d[:, 2], (c - a, c + a), t_max), 1
        )
        raised = np.isfinite(top)
        p = origin + top[raised, None] * d[raised]
        raised[raised] = ~self.road.on_road(p[:, 0], p[:, 1])
        t[steep[raised]] = top[raised]
        over = np.flatnonzero(np.isfinite(top) & ~raised)
        d = d[over]
        low = first_crossing(
            _RayTerrain(self, origin, d, 0.0), *band_interval(origin[2], d[:, 2], (-a, a), t_max), 1
        )
        t[steep[over]] = np.minimum(low, self.road.first_entry(origin, d, top[over], low))

        shallow = np.setdiff1d(np.arange(len(direction)), steep, assume_unique=True)
        d = direction[shallow]
        t[shallow] = first_crossing(
            _RayTerrain(self, origin, d, None),
            *band_interval(origin[2], d[:, 2], (-a, a + c), t_max),
            coarse_steps=64,
        )
        return t


class _RayTerrain:
    """Clearance of rays from ``origin`` (3,) along ``direction`` (R, 3) above the terrain (``level``
    None) or above the smooth level W + ``level``.

    Along a ray each wave's phase grows linearly with distance, so a sample costs one multiply-add
    and a float32 sine per wave instead of evaluating the waves at points."""

    def __init__(self, ground: Ground, origin: np.ndarray, direction: np.ndarray, level: float | None):
        w = ground.waves
        self.ground, self.origin, self.direction, self.level = ground, origin, direction, level
        # Each wave's phase at the origin, and its rate of change along each ray (W, R), rad/m.
        self._start = (w[:, 1] * origin[0] + w[:, 2] * origin[1] + w[:, 3]).astype(np.float32)
        self._rate = (w[:, 1:2] * direction[:, 0] + w[:, 2:3] * direction[:, 1]).astype(np.float32)
        self._amplitude = w[:, 0].astype(np.float32)

    def take(self, rows: np.ndarray) -> _RayTerrain:
        out = copy.copy(self)
        out.direction, out._rate = self.direction[rows], self._rate[:, rows]
        return out

    def __call__(self, t: np.ndarray) -> np.ndarray:
        extra = (slice(None),) + (None,) * (t.ndim - 1)  # broadcast per-ray values over samples
        t32 = t.astype(np.float32)
        h = np.zeros(t.shape, dtype=np.float32)
        for start, rate, amplitude in zip(self._start, self._rate, self._amplitude):
            phase = t32 * rate[extra]
            phase += start
            h += amplitude * np.sin(phase, out=phase)
        d = self.direction[extra]
        if self.level is None:
            x, y = self.origin[0] + t * d[..., 0], self.origin[1] + t * d[..., 1]
            h = h + np.where(self.ground.road.on_road(x, y), 0.0, self.ground.curb_height)
        else:
            h = h + self.level
        return self.origin[2] + t * d[..., 2] - h


@dataclass
class Actor:
    """A labelled object moving at constant velocity: world ``position`` (2,) at t = 0, ``heading``
    (rad, world), ``velocity`` (2,) m/s."""

    model: A.VehicleModel | A.PedestrianModel | A.CyclistModel
    track_id: int
    position: np.ndarray
    heading: float
    velocity: np.ndarray


@dataclass
class ActorStates:
    """All actors at one instant, world frame. ``boxes`` (A, 9) as the LiDAR-frame convention but in
    world coordinates; ``keypoints`` (A, 14, 3), zeros where ``has_keypoints`` (A,) is False;
    ``primitives`` owned by actor index."""

    primitives: Primitives
    boxes: np.ndarray
    labels: np.ndarray
    track_ids: np.ndarray
    keypoints: np.ndarray
    has_keypoints: np.ndarray


@dataclass
class Scene:
    """A generated street: terrain, static structures (world frame), actors and the ego's motion."""

    road: Road
    ground: Ground
    static: Primitives
    actors: list[Actor]
    ego_position: np.ndarray  # (2,) at t = 0
    ego_heading: float
    ego_velocity: np.ndarray  # (2,) m/s
    mount_height: float
    frame_rate: float
    num_frames: int
    footprints: np.ndarray = field(repr=False)  # (S, 5) static BEV rectangles used for placement

    def time(self, frame: int) -> float:
        return frame / self.frame_rate

    def ego_pose(self, t: float) -> np.ndarray:
        """(4, 4) world-from-LiDAR at time ``t``: level, on the ground, ``mount_height`` above it."""
        xy = self.ego_position + self.ego_velocity * t
        out = np.eye(4)
        out[:3, :3] = yaw_matrix(self.ego_heading)
        out[:2, 3] = xy
        out[2, 3] = float(self.ground.height(xy[:1], xy[1:])[0]) + self.mount_height
        return out

    def actors_at(self, t: float) -> ActorStates:
        n = len(self.actors)
        shapes = [a.model.shape(t) for a in self.actors]
        heading = np.array([a.heading for a in self.actors])
        velocity = np.array([a.velocity for a in self.actors]).reshape(n, 2)
        xy = np.array([a.position for a in self.actors]).reshape(n, 2) + velocity * t
        translation = np.concatenate([xy, self.ground.height(xy[:, 0], xy[:, 1])[:, None]], axis=1)
        rot = yaw_matrix(heading)
        local = np.array([s.box for s in shapes]).reshape(n, 6)
        boxes = np.concatenate(
            [
                np.einsum("aij,aj->ai", rot, local[:, :3]) + translation,
                local[:, 3:],
                wrap_angle(heading)[:, None],
                velocity,
            ],
            axis=1,
        )
        keypoints = np.zeros((n, 14, 3))
        has_keypoints = np.array([s.keypoints is not None for s in shapes], dtype=bool)
        for i in np.flatnonzero(has_keypoints):
            keypoints[i] = shapes[i].keypoints @ rot[i].T + translation[i]
        parts = [s.primitives for s in shapes] or [ShapeBuilder().build()]
        prims = Primitives.concat(parts, owners=range(len(parts))).moved_by_owner(heading, translation)
        return ActorStates(
            prims,
            boxes,
            np.array([a.model.label for a in self.actors], dtype=np.int64),
            np.array([a.track_id for a in self.actors], dtype=np.int64),
            keypoints,
            has_keypoints,
        )


def _count(rng: np.random.Generator, bounds) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _sample_road(rng: np.random.Generator, cfg: SceneConfig) -> Road:
    lw = cfg.lane_width
    cross = rng.random() < cfg.intersection_probability
    return Road(
        lanes=_count(rng, cfg.lanes_per_direction),
        lane_width=lw,
        bike_lane=1.6 if rng.random() < cfg.bike_lane_probability else 0.0,
        parking=2.3 if rng.random() < cfg.parking_probability else 0.0,
        sidewalk=rng.uniform(*cfg.sidewalk_width),
        cross_x=rng.uniform(-45.0, 45.0) if cross else None,
        cross_lanes=int(rng.integers(1, 3)),
        asphalt=rng.uniform(0.06, 0.14),
    )


def _sample_waves(rng: np.random.Generator, cfg: SceneConfig, count: int = 3) -> np.ndarray:
    """Terrain waves whose slopes add up to at most tan(max_slope)."""
    wavelength = rng.uniform(40.0, 160.0, count)
    direction = rng.uniform(0.0, 2 * np.pi, count)
    share = rng.uniform(0.2, 1.0, count)
    slope = np.tan(np.deg2rad(cfg.max_slope_deg)) * share / share.sum()
    k = 2 * np.pi / wavelength
    return np.stack(
        [slope / k, k * np.cos(direction), k * np.sin(direction), rng.uniform(0, 2 * np.pi, count)], 1
    )


class _StaticBuilder:
    """Places static structures without overlaps; records their footprints for actor placement."""

    def __init__(self, ground: Ground, rng: np.random.Generator):
        self.ground, self.rng = ground, rng
        self.shapes = ShapeBuilder()
        self.footprints: list[tuple[float, float, float, float, float]] = []

    def free(self, x: float, y: float, length: float, width: float, yaw: float = 0.0) -> bool:
        if not self.footprints:
            return True
        return not bev_overlap(np.array([[x, y, length, width, yaw]]), np.array(self.footprints)).any()

    def footing(
        self, x: float, y: float, length: float, width: float, yaw: float = 0.0
    ) -> tuple[float, float]:
        """(buried bottom, ground at centre): the bottom reaches 0.3 m below the lowest ground
        under the footprint, so sloping terrain never shows a gap under a structure."""
        c, s = np.cos(yaw), np.sin(yaw)
        u = np.array([-0.5, 0.5, 0.5, -0.5, 0.0]) * length
        v = np.array([-0.5, -0.5, 0.5, 0.5, 0.0]) * width
        h = self.ground.height(x + u * c - v * s, y + u * s + v * c)
        return float(h.min()) - 0.3, float(h[-1])

    def block(self, x, y, length, width, height, reflectivity, yaw=0.0, check=True) -> bool:
        """A box standing on the ground (``height`` above the ground at its centre)."""
        if check and not self.free(x, y, length, width, yaw):
            return False
        bottom, ground = self.footing(x, y, length, width, yaw)
        top = ground + height
        self.shapes.box((x, y, 0.5 * (bottom + top)), (length, width, top - bottom), reflectivity, yaw=yaw)
        self.footprints.append((x, y, length, width, yaw))
        return True

    def post(self, x, y, radius, height, reflectivity) -> bool:
        if not self.free(x, y, 2 * radius, 2 * radius):
            return False
        bottom, ground = self.footing(x, y, 2 * radius, 2 * radius)
        self.shapes.cylinder(x, y, bottom, ground + height, radius, reflectivity)
        self.footprints.append((x, y, 2 * radius, 2 * radius, 0.0))
        return True


def _buildings(st: _StaticBuilder, road: Road, cfg: SceneConfig, x0: float, x1: float) -> None:
    """Rows of buildings behind both sidewalks of both streets, with walls, fences and hedges."""
    rng = st.rng
    line = road.half_width + road.sidewalk
    cross_line = road.cross_half_width + road.sidewalk
    # Each row: (fixed axis is y?, side, start, end); rows along the cross street skip the main road.
    rows = [(True, side, x0, x1) for side in (1, -1)]
    if road.cross_x is not None:
        rows += [
            (False, side, lo, hi) for side in (1, -1) for lo, hi in ((-cfg.extent, -line), (line, cfg.extent))
        ]
    for along_x, side, lo, hi in rows:
        pos = lo + rng.uniform(0.0, 8.0)
        while pos < hi:
            width = rng.uniform(8.0, 30.0)
            gap = rng.uniform(0.0, 4.0) if rng.random() < 0.7 else rng.uniform(4.0, 10.0)
            mid = pos + 0.5 * width
            if along_x and road.cross_x is not None:
                # Keep the intersection and its sidewalks clear: restart the row beyond them.
                clear = road.cross_half_width + road.sidewalk + 0.5
                if pos < road.cross_x + clear and pos + width > road.cross_x - clear:
                    pos = road.cross_x + clear
                    continue
            setback, depth = rng.uniform(0.0, 4.0), rng.uniform(8.0, 20.0)
            front = (line if along_x else cross_line) + setback
            height = rng.uniform(*cfg.building_height)
            refl = rng.uniform(0.15, 0.5)
            offset = (road.cross_x if not along_x else 0.0) + side * (front + 0.5 * depth)
            x, y, length, breadth = (mid, offset, width, depth) if along_x else (offset, mid, depth, width)
            if st.block(x, y, length, breadth, height, refl) and rng.random() < 0.3:
                # A set-back upper storey.
                st.shapes.box(
                    (x, y, st.footing(x, y, length, breadth)[1] + height + 1.5),
                    (0.7 * length, 0.7 * breadth, 3.0),
                    refl,
                )
            if along_x and gap > 1.5 and rng.random() < 0.5:
                # A wall or a thin fence closing the gap between two buildings.
                thick = rng.choice([0.3, 0.05])
                st.block(
                    pos + width + 0.5 * gap,
                    side * (line + 0.3 + rng.uniform(0, setback)),
                    gap - 0.4,
                    thick,
                    rng.uniform(0.8, 2.2),
                    rng.uniform(0.2, 0.4),
                )
            if along_x and setback > 1.5 and rng.random() < 0.4:
                st.block(
                    mid,
                    side * (line + 0.5 * setback),
                    0.8 * width,
                    rng.uniform(0.6, 1.0),
                    rng.uniform(0.8, 1.6),
                    VEGETATION,
                )
            pos += width + gap


def _street_furniture(st: _StaticBuilder, road: Road, cfg: SceneConfig, x0: float, x1: float) -> None:
    """Street lights, signs and utility poles along the curbs; traffic lights; trees; clutter."""
    rng = st.rng
    hw, sw = road.half_width, road.sidewalk
    for side in (1, -1):
        x = x0 + rng.uniform(0.0, cfg.pole_spacing[1])
        while x < x1:
            y = side * (hw + 0.35 + rng.uniform(0.0, 0.2))
            if not road.near_intersection(np.array([x]), 1.0)[0]:
                kind = rng.choice(3, p=[0.45, 0.35, 0.2])
                if kind == 0 and st.post(x, y, rng.uniform(0.1, 0.14), h := rng.uniform(7.0, 9.0), 0.45):
                    arm = rng.uniform(1.5, 2.5)
                    top = st.footing(x, y, 0.2, 0.2)[1] + h
                    st.shapes.box((x, y - side * 0.5 * arm, top - 0.1), (0.12, arm, 0.12), 0.45)
                    st.shapes.box((x, y - side * (arm - 0.2), top - 0.25), (0.35, 0.6, 0.15), 0.6)
                elif kind == 1 and st.post(x, y, 0.035, h := rng.uniform(2.2, 2.8), 0.45):
                    # The plate hangs at head height: its footprint keeps pedestrians clear of it.
                    st.shapes.box((x, y, st.footing(x, y, 0.1, 0.1)[1] + h - 0.3), (0.03, 0.6, 0.6), SIGN)
                    st.footprints.append((x, y, 0.03, 0.6, 0.0))
                elif kind == 2 and st.post(x, y, rng.uniform(0.14, 0.18), h := rng.uniform(8.0, 11.0), 0.3):
                    st.shapes.box((x, y, st.footing(x, y, 0.3, 0.3)[1] + h - 0.6), (0.12, 1.8, 0.12), 0.3)
            x += rng.uniform(*cfg.pole_spacing)

    if road.cross_x is not None:
        # Traffic lights on the four corners; two of them carry an arm over the main road.
        for i, (sx, sy) in enumerate([(1, 1), (-1, 1), (1, -1), (-1, -1)]):
            x = road.cross_x + sx * (road.cross_half_width + 0.6)
            y = sy * (hw + 0.6)
            if st.post(x, y, 0.12, 6.0, 0.4):
                ground = st.footing(x, y, 0.24, 0.24)[1]
                if i in (0, 3):
                    arm = 0.6 * hw
                    st.shapes.box((x, y - sy * 0.5 * arm, ground + 5.6), (0.15, arm, 0.15), 0.4)
                    st.shapes.box((x, y - sy * (arm - 0.3), ground + 5.0), (0.35, 0.35, 0.9), 0.2)
                else:
                    st.shapes.box((x - sx * 0.25, y, ground + 3.0), (0.3, 0.3, 0.8), 0.2)

    for side in (1, -1):
        if rng.random() >= cfg.tree_probability:
            continue
        x = x0 + rng.uniform(0.0, 10.0)
        while x < x1:
            y = side * (hw + sw - rng.uniform(0.5, 0.9))
            trunk = rng.uniform(0.12, 0.25)
            r, rv, bottom = rng.uniform(1.5, 3.0), rng.uniform(1.5, 2.8), rng.uniform(3.2, 4.5)
            if not road.near_intersection(np.array([x]), r)[0] and st.post(x, y, trunk, bottom + rv, 0.2):
                st.shapes.spheroid((x, y, st.footing(x, y, 0.3, 0.3)[1] + bottom + rv), r, rv, VEGETATION)
            x += rng.uniform(7.0, 14.0)

    for _ in range(round(cfg.clutter_per_100m * 2 * (x1 - x0) / 100.0)):
        side = rng.choice([-1, 1])
        x = rng.uniform(x0, x1)
        if road.near_intersection(np.array([x]), 0.0)[0]:
            continue
        kind = rng.integers(7)
        outer = side * (hw + sw - rng.uniform(0.5, 1.3))  # the building side of the sidewalk
        curb = side * (hw + 0.6)
        if kind == 0:  # round bin
            st.post(x, outer, rng.uniform(0.25, 0.35), rng.uniform(0.9, 1.1), rng.uniform(0.2, 0.4))
        elif kind == 1:  # wheelie bin
            st.block(x, outer, 0.6, 0.7, 1.05, rng.uniform(0.1, 0.4), yaw=rng.normal(0, 0.2))
        elif kind == 2:  # dumpster or crate
            size = rng.choice([0.6, 1.0, 1.8])
            st.block(x, outer, size, min(size, 1.1), rng.uniform(0.5, 1.3), rng.uniform(0.2, 0.5))
        elif kind == 3:  # bush, partly sunk into the ground
            r, rv = rng.uniform(0.4, 1.1), rng.uniform(0.4, 0.9)
            if st.free(x, outer, 2 * r, 2 * r):
                st.shapes.spheroid((x, outer, st.footing(x, outer, r, r)[1] + 0.6 * rv), r, rv, VEGETATION)
                st.footprints.append((x, outer, 2 * r, 2 * r, 0.0))
        elif kind == 4:  # hydrant
            st.post(x, curb, 0.12, 0.75, 0.5)
        elif kind == 5:  # bollard
            st.post(x, curb, 0.08, 0.9, 0.5)
        elif st.block(x, outer, 1.6, 0.5, 0.45, 0.3):  # bench with a backrest
            st.shapes.box(
                (x, outer + side * 0.21, st.footing(x, outer, 1.6, 0.5)[1] + 0.68), (1.6, 0.08, 0.45), 0.3
            )


class _Placer:
    """Rejection sampling of actors whose footprints stay clear over the whole sequence."""

    def __init__(self, rng, times, static_footprints, ego_xy, ego_radius):
        self.rng, self.times = rng, times
        self.static = static_footprints
        self.ego_xy, self.radius = ego_xy, ego_radius
        self.actors: list[Actor] = []
        self.tracks: list[np.ndarray] = []  # (T, 5) footprint over time per placed body

    def add_obstacle(self, track: np.ndarray) -> None:
        self.tracks.append(track)

    def footprint(self, model, xy, heading, velocity, margin: float) -> np.ndarray:
        """(T, 5) BEV rectangle of ``model`` over the sequence times."""
        box = model.shape(0.0).box
        c, s = np.cos(heading), np.sin(heading)
        centre = np.asarray(xy) + (c * box[0] - s * box[1], s * box[0] + c * box[1])
        track = np.empty((len(self.times), 5))
        track[:, :2] = centre + self.times[:, None] * velocity
        track[:, 2:4] = box[3:5] + 2 * margin
        track[:, 4] = heading
        return track

    def try_add(self, model, xy, heading: float, speed: float, margin: float) -> bool:
        if np.hypot(*(np.asarray(xy) - self.ego_xy)) > self.radius:
            return False
        velocity = speed * np.array([np.cos(heading), np.sin(heading)])
        track = self.footprint(model, xy, heading, velocity, margin)
        if len(self.static) and bev_overlap(track, self.static).any():
            return False
        if self.tracks and bev_overlap(track[:, None], np.stack(self.tracks, axis=1)).any():
            return False
        self.actors.append(
            Actor(model, len(self.actors), np.asarray(xy, dtype=np.float64), heading, velocity)
        )
        self.tracks.append(track)
        return True

    def fill(self, count: int, propose) -> None:
        """Call ``propose()`` -> (model, xy, heading, speed, margin) until ``count`` are placed or 20 x
        ``count`` candidates were tried."""
        placed = 0
        for _ in range(20 * count):
            if placed == count:
                break
            placed += self.try_add(*propose())


def build_scene(
    rng: np.random.Generator,
    config: SceneConfig | None = None,
    mount_height: float = 1.8,
    num_frames: int = 1,
) -> Scene:
    """Generate a street scene whose actors stay collision-free over ``num_frames`` frames."""
    cfg = config or SceneConfig()
    road = _sample_road(rng, cfg)
    ground = Ground(road, _sample_waves(rng, cfg), cfg.curb_height)
    lw, hw = road.lane_width, road.half_width
    times = np.arange(num_frames) / cfg.frame_rate

    # Lanes: (fixed coordinate, heading, on main road); right-hand traffic.
    main_lanes = [(-d * (k + 0.5) * lw, 0.0 if d > 0 else np.pi) for d in (1, -1) for k in range(road.lanes)]
    lane_speed = {i: rng.uniform(*cfg.vehicle_speed) for i in range(len(main_lanes))}
    ego_lane = int(rng.integers(len(main_lanes)))
    ego_heading = float(main_lanes[ego_lane][1] + rng.normal(0.0, 0.005))
    ego_speed = rng.uniform(*cfg.ego_speed)
    lane_speed[ego_lane] = ego_speed
    ego_xy = np.array([0.0, main_lanes[ego_lane][0]])
    ego_velocity = ego_speed * np.array([np.cos(ego_heading), np.sin(ego_heading)])

    travel = abs(ego_speed) * (times[-1] if num_frames else 0.0)
    x0, x1 = -cfg.extent - travel, cfg.extent + travel
    st = _StaticBuilder(ground, rng)
    _buildings(st, road, cfg, x0, x1)
    _street_furniture(st, road, cfg, x0, x1)
    footprints = np.array(st.footprints).reshape(-1, 5)

    placer = _Placer(rng, times, footprints, ego_xy, cfg.radius)
    ego_track = np.empty((len(times), 5))
    ego_track[:, :2] = ego_xy + times[:, None] * ego_velocity
    ego_track[:, 2:] = (5.2, 2.3, ego_heading)
    placer.add_obstacle(ego_track)

    def along(fixed: float) -> tuple[float, float]:
        """A point on a line y = fixed, x near the ego."""
        return rng.uniform(-cfg.radius, cfg.radius), fixed

    def across(fixed: float) -> tuple[float, float]:
        """A point on a line x = cross_x + fixed, y near the ego."""
        return road.cross_x + fixed, rng.uniform(-cfg.radius, cfg.radius)

    cross_lanes = []
    if road.cross_x is not None:
        cross_lanes = [
            (d * (k + 0.5) * lw, d * 0.5 * np.pi) for d in (1, -1) for k in range(road.cross_lanes)
        ]
    cross_speed = [rng.uniform(*cfg.vehicle_speed) for _ in cross_lanes]

    n_vehicles = _count(rng, cfg.num_vehicles)
    n_parked = round(n_vehicles * cfg.parked_fraction) if road.parking else 0
    n_crossing = round(n_vehicles * cfg.crossing_fraction) if cross_lanes else 0

    def parked():
        side = rng.choice([-1, 1])
        heading = (0.0 if side < 0 else np.pi) + (np.pi if rng.random() < 0.2 else 0.0) + rng.normal(0, 0.02)
        fixed = side * (hw - 0.5 * road.parking) + rng.uniform(-0.2, 0.2)
        return A.sample_vehicle(rng), along(fixed), heading, 0.0, 0.25

    def driving(lanes, speeds, place):
        """A sampler of vehicles driving in one of ``lanes`` ((offset, heading) pairs), at ``place(offset)``."""

        def sample():
            i = int(rng.integers(len(lanes)))
            fixed, heading = lanes[i]
            return (
                A.sample_vehicle(rng),
                place(fixed + rng.normal(0, 0.15)),
                heading + rng.normal(0, 0.004),
                speeds[i],
                0.4,
            )

        return sample

    in_lane = driving(main_lanes, lane_speed, along)
    crossing = driving(cross_lanes, cross_speed, across)

    placer.fill(n_parked, parked)
    placer.fill(n_crossing, crossing)
    placer.fill(n_vehicles - n_parked - n_crossing, in_lane)

    def cyclist():
        side = rng.choice([-1, 1])
        edge = road.lanes * lw + 0.5 * road.bike_lane if road.bike_lane else road.lanes * lw - 0.9
        heading = (0.0 if side < 0 else np.pi) + rng.normal(0, 0.02)
        return (
            A.sample_cyclist(rng),
            along(side * edge + rng.normal(0, 0.1)),
            heading,
            rng.uniform(*cfg.cyclist_speed),
            0.3,
        )

    placer.fill(_count(rng, cfg.num_cyclists), cyclist)

    def pedestrian():
        speed = 0.0 if rng.random() < cfg.standing_fraction else rng.uniform(*cfg.pedestrian_speed)
        model = A.sample_pedestrian(rng, speed, cfg.varied_pedestrians)
        side = rng.choice([-1, 1])
        if rng.random() < cfg.jaywalking_fraction:  # crossing the main road
            if road.cross_x is not None and rng.random() < 0.6:
                x = road.cross_x + rng.choice([-1, 1]) * (road.cross_half_width + rng.uniform(1.0, 4.0))
            else:
                x = rng.uniform(-cfg.radius, cfg.radius)
            xy, heading = (x, rng.uniform(-hw, hw)), side * 0.5 * np.pi + rng.normal(0, 0.1)
        else:
            offset = road.sidewalk * rng.uniform(0.15, 0.85)
            if road.cross_x is not None and rng.random() < 0.25:
                xy = across(side * (road.cross_half_width + offset))
                heading = rng.choice([0.5, -0.5]) * np.pi
            else:
                xy, heading = along(side * (hw + offset)), rng.choice([0.0, np.pi])
            heading += rng.normal(0, 0.05) if speed > 0 else rng.uniform(-np.pi, np.pi)
        return model, xy, heading, speed, 0.3  # the margin covers the box growing with the stride

    placer.fill(_count(rng, cfg.num_pedestrians), pedestrian)

    return Scene(
        road=road,
        ground=ground,
        static=st.shapes.build(),
        actors=placer.actors,
        ego_position=ego_xy,
        ego_heading=ego_heading,
        ego_velocity=ego_velocity,
        mount_height=mount_height,
        frame_rate=cfg.frame_rate,
        num_frames=num_frames,
        footprints=footprints,
    )
