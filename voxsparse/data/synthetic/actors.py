"""Shapes of the labelled actors: vehicles, pedestrians, cyclists, built from oriented primitives.

Every model works in its *actor frame*: x along the heading, y to the left, z up, metres, origin on
the ground under the actor's reference point, the lowest point of the shape at z = 0. The ground-truth
box is the tight box of the shape in this frame, except for pedestrians, whose box is made symmetric
about the pelvis in x and y: swinging limbs then change its size but not its centre, so the box centre
moves exactly with the body (box velocity = displacement / time).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.synthetic.geometry import Primitives, ShapeBuilder

#: The synthetic world's classes, in label order (label ``i`` is ``CLASS_NAMES[i]``).
CLASS_NAMES: tuple[str, ...] = ("Vehicle", "Pedestrian", "Cyclist")
VEHICLE, PEDESTRIAN, CYCLIST = (CLASS_NAMES.index(name) for name in ("Vehicle", "Pedestrian", "Cyclist"))

# Diffuse reflectances of the surfaces the actors are made of.
GLASS, RUBBER, SKIN, METAL = 0.05, 0.04, 0.3, 0.5

_SIDE = (0.0, 1.0, 0.0)  # limbs keep their square section aligned with the body's left axis


@dataclass
class ActorShape:
    """One actor at one instant, in its actor frame.

    Attributes:
        primitives: the solid parts (owner -1; the scene assigns owners).
        box: (6,) box centre (x, y, z) and size (dx, dy, dz), metres.
        keypoints: (14, 3) joints in ``KEYPOINT_NAMES`` order, or None.
    """

    primitives: Primitives
    box: np.ndarray
    keypoints: np.ndarray | None = None


def _finish(
    builder: ShapeBuilder, keypoints: np.ndarray | None = None, symmetric: bool = False
) -> ActorShape:
    """Drop the shape onto z = 0 and compute its ground-truth box (symmetric about x = y = 0 if asked)."""
    prims = builder.build()
    bounds = prims.local_bounds()
    lo, hi = bounds[:, 0].min(0), bounds[:, 1].max(0)
    lift = np.array([0.0, 0.0, -lo[2]])
    prims = prims.shifted(lift)
    lo, hi = lo + lift, hi + lift
    if symmetric:
        reach = np.maximum(-lo[:2], hi[:2])
        lo[:2], hi[:2] = -reach, reach
    box = np.concatenate([0.5 * (lo + hi), hi - lo])
    return ActorShape(prims, box, None if keypoints is None else keypoints + lift)


def _two_link(
    root: np.ndarray, target: np.ndarray, upper: float, lower: float, bend: np.ndarray
) -> np.ndarray:
    """Middle joint (knee, elbow) of a two-segment limb reaching from ``root`` towards ``target``,
    bending towards ``bend``; a target out of reach gives a straight limb pointing at it."""
    axis = target - root
    dist = np.linalg.norm(axis)
    axis = axis / dist
    reach = min(dist, upper + lower - 1e-6)
    # Law of cosines for the angle at the root.
    cos_a = np.clip((upper**2 + reach**2 - lower**2) / (2 * upper * reach), -1.0, 1.0)
    perp = bend - np.dot(bend, axis) * axis
    perp /= np.linalg.norm(perp)
    return root + upper * (cos_a * axis + np.sqrt(1 - cos_a**2) * perp)


@dataclass
class Body:
    """Human proportions, scaled from the standing ``height`` (m); ``build`` scales widths (~0.85-1.15)."""

    height: float
    build: float
    shirt: float  # reflectances of clothing
    trousers: float

    @property
    def scale(self) -> float:
        return self.height / 1.75

    @property
    def thigh(self) -> float:
        return 0.245 * self.height

    @property
    def shin(self) -> float:
        return 0.245 * self.height

    @property
    def ankle_height(self) -> float:
        return 0.045 * self.height

    @property
    def torso(self) -> float:
        """Hip centre to shoulder centre."""
        return 0.275 * self.height

    @property
    def upper_arm(self) -> float:
        return 0.186 * self.height

    @property
    def forearm(self) -> float:
        return 0.146 * self.height

    @property
    def hip_offset(self) -> float:
        return 0.09 * self.scale * self.build

    @property
    def shoulder_offset(self) -> float:
        return 0.185 * self.scale * self.build

    @property
    def head_radii(self) -> tuple[float, float]:
        return 0.085 * self.scale, 0.115 * self.scale

    def add(
        self, b: ShapeBuilder, hips: np.ndarray, lean: float, knees, ankles, elbows, wrists
    ) -> np.ndarray:
        """Add the body's parts to ``b`` and return its 14 keypoints (KEYPOINT_NAMES order).

        ``hips`` is the hip centre; ``lean`` the torso's forward pitch from vertical (rad); ``knees``,
        ``ankles``, ``elbows``, ``wrists`` are (left, right) joint positions, left = +y.
        """
        s = self.scale
        up = np.array([np.sin(lean), 0.0, np.cos(lean)])
        neck = hips + self.torso * up
        shoulders = [neck + (0.0, side * self.shoulder_offset, 0.0) for side in (1, -1)]
        hip_joints = [hips + (0.0, side * self.hip_offset, 0.0) for side in (1, -1)]
        # The head sits more upright than the torso.
        head_dir = np.array([np.sin(0.4 * lean), 0.0, np.cos(0.4 * lean)])
        r_h, r_v = self.head_radii
        head = neck + (0.07 * self.height + r_v) * head_dir
        nose = head + np.array([0.8 * r_h, 0.0, -0.15 * r_v])

        # Torso: a box from just below the hips to just above the shoulders, pitched with the body.
        bottom, top = hips - 0.04 * self.height * up, neck + 0.03 * self.height * up
        rot = np.array(
            [[np.cos(lean), 0.0, np.sin(lean)], [0.0, 1.0, 0.0], [-np.sin(lean), 0.0, np.cos(lean)]]
        )
        width = 2 * (self.shoulder_offset - 0.035 * s)
        b.box(
            0.5 * (bottom + top),
            (0.21 * s * self.build, width, np.linalg.norm(top - bottom)),
            self.shirt,
            rotation=rot,
        )
        b.segment(neck, head - 0.5 * r_v * head_dir, 0.045 * s, SKIN)
        b.spheroid(head, r_h, r_v, SKIN)
        for i in range(2):
            b.segment(hip_joints[i], knees[i], 0.07 * s * self.build, self.trousers, _SIDE)
            b.segment(knees[i], ankles[i], 0.055 * s * self.build, self.trousers, _SIDE)
            b.segment(shoulders[i], elbows[i], 0.045 * s * self.build, self.shirt, _SIDE)
            b.segment(elbows[i], wrists[i], 0.037 * s * self.build, SKIN, _SIDE)
            # Flat foot: a box from the sole (ankle_height below the ankle) to the toes.
            h = self.ankle_height + 0.02 * s
            b.box(ankles[i] + (0.05 * s, 0.0, 0.02 * s - 0.5 * h), (0.25 * s, 0.095 * s, h), RUBBER)
        joints = {
            "nose": nose,
            "left_shoulder": shoulders[0],
            "left_elbow": elbows[0],
            "left_wrist": wrists[0],
            "left_hip": hip_joints[0],
            "left_knee": knees[0],
            "left_ankle": ankles[0],
            "right_shoulder": shoulders[1],
            "right_elbow": elbows[1],
            "right_wrist": wrists[1],
            "right_hip": hip_joints[1],
            "right_knee": knees[1],
            "right_ankle": ankles[1],
            "head_center": head,
        }
        return np.stack([joints[name] for name in KEYPOINT_NAMES])


def _limb(root: np.ndarray, angle: float, length: float, spread: float = 0.0) -> np.ndarray:
    """End of a limb hanging from ``root``, swung forward by ``angle`` and outward (to ``spread`` side)."""
    return root + length * np.array([np.sin(angle), spread, -np.cos(angle)]) / np.sqrt(1 + spread**2)


@dataclass
class PedestrianModel:
    """A walking (``speed`` > 0), standing or sitting person.

    Walking follows a simple gait: the thighs swing in anti-phase (amplitude growing with speed, at
    most 18 degrees), the swinging knee flexes, the arms swing against the legs (``arm_swing`` times
    the thigh angle), the torso leans slightly forward and the pelvis rises and falls so one foot is
    always on the ground. The gait frequency makes the stride match the speed. A standing person
    holds a fixed stance (feet ``stance`` apart, arms in ``arm_pose``); a ``sitting`` one (speed 0)
    sits on a stool with the thighs forward, the shins down and the arms in ``arm_pose``.
    ``backpack`` adds a box on the back, ``carried`` a bag hanging from the right hand.
    """

    body: Body
    speed: float  # m/s
    phase: float  # gait phase at t = 0, rad
    arm_pose: tuple[float, float, float, float]  # standing: shoulder swing L/R, elbow flexion L/R (rad)
    stance: float  # standing: thigh spread angle (rad); sitting: thigh angle from horizontal
    backpack: bool
    label: int = PEDESTRIAN
    arm_swing: float = 0.8  # walking: arm swing per radian of thigh swing
    sitting: bool = False
    carried: bool = False

    def shape(self, t: float) -> ActorShape:
        body = self.body
        if self.speed > 0:
            a = min(0.32, 0.1 + 0.12 * self.speed)  # thigh swing amplitude grows with speed
            stride = 4 * (body.thigh + body.shin) * np.sin(a)  # two steps
            phi = self.phase + 2 * np.pi * self.speed * t / stride
            thigh = (a * np.sin(phi), -a * np.sin(phi))
            flex = (0.6 * max(0.0, np.cos(phi)), 0.6 * max(0.0, -np.cos(phi)))
            arm = (-self.arm_swing * thigh[0], -self.arm_swing * thigh[1])
            elbow = tuple(0.3 + 0.3 * max(0.0, x) for x in arm)
        elif self.sitting:
            # Thighs near horizontal and a little apart in pitch, shins vertical (knee flexion = thigh angle).
            forward = 0.5 * np.pi - self.stance
            thigh = (forward, forward + 0.1)
            flex = thigh
            arm, elbow = self.arm_pose[:2], self.arm_pose[2:]
        else:
            thigh, flex = (self.stance, -self.stance), (0.03, 0.03)
            arm, elbow = self.arm_pose[:2], self.arm_pose[2:]

        # Leg drop below the hips for each leg; the lower foot touches the ground.
        drop = [body.thigh * np.cos(thigh[i]) + body.shin * np.cos(thigh[i] - flex[i]) for i in range(2)]
        hips = np.array([0.0, 0.0, max(drop) + body.ankle_height])
        lean = 0.06 * min(self.speed, 1.8)
        b = ShapeBuilder()
        knees, ankles, elbows, wrists = [], [], [], []
        for i, side in enumerate((1, -1)):
            hip = hips + (0.0, side * body.hip_offset, 0.0)
            knees.append(_limb(hip, thigh[i], body.thigh))
            ankles.append(_limb(knees[i], thigh[i] - flex[i], body.shin))
            shoulder = (
                hips
                + body.torso * np.array([np.sin(lean), 0.0, np.cos(lean)])
                + (0, side * body.shoulder_offset, 0)
            )
            elbows.append(_limb(shoulder, arm[i], body.upper_arm, side * 0.08))
            wrists.append(_limb(elbows[i], arm[i] + elbow[i], body.forearm, side * 0.08))
        keypoints = body.add(b, hips, lean, knees, ankles, elbows, wrists)
        s = body.scale
        if self.backpack:
            b.box(hips + (-0.19 * s, 0.0, 0.34 * body.height), (0.16 * s, 0.3 * s, 0.42 * s), 0.2)
        if self.sitting:  # the stool: from the ground (z = 0 here) to just below the thighs
            seat = hips[2] - 0.07 * s * body.build
            b.box((hips[0] - 0.05 * s, 0.0, 0.5 * seat), (0.4 * s, 0.45 * s, seat), METAL)
        if self.carried:
            b.box(wrists[1] + (0.0, -0.04 * s, -0.17 * s), (0.32 * s, 0.12 * s, 0.28 * s), 0.25)
        return _finish(b, keypoints, symmetric=True)


@dataclass
class VehicleModel:
    """A car, SUV, van or box truck of overall ``length`` x ``width`` x ``height`` (m).

    Sedans and SUVs are a body plus a narrower glass cabin set back from the bonnet; vans are a tall
    body with a short bonnet; trucks a cab and a taller cargo box. All stand on four wheels.
    """

    kind: str  # "sedan" | "suv" | "van" | "truck"
    length: float
    width: float
    height: float
    paint: float  # reflectance of the body
    label: int = VEHICLE

    @cached_property
    def _shape(self) -> ActorShape:
        b = ShapeBuilder()
        L, W, H = self.length, self.width, self.height
        wheel_r = {"sedan": 0.32, "suv": 0.36, "van": 0.36, "truck": 0.45}[self.kind]
        axle = 0.5 * L - {"sedan": 0.8, "suv": 0.85, "van": 0.8, "truck": 1.1}[self.kind]
        wheel_w = 0.25
        for x in (-axle, axle):
            for side in (1, -1):
                b.box(
                    (x, side * (0.5 * W - 0.5 * wheel_w - 0.02), wheel_r),
                    (2 * wheel_r, wheel_w, 2 * wheel_r),
                    RUBBER,
                )
        floor = 0.75 * wheel_r  # body underside: wheels show below it
        if self.kind in ("sedan", "suv"):
            belt = floor + (0.45 if self.kind == "sedan" else 0.55) * (H - floor)
            b.box((0.0, 0.0, 0.5 * (floor + belt)), (L, W, belt - floor), self.paint)
            cabin = (0.5 if self.kind == "sedan" else 0.62) * L
            b.box((-0.06 * L, 0.0, 0.5 * (belt + H)), (cabin, 0.88 * W, H - belt), GLASS)
            roof = 0.06
            b.box((-0.06 * L, 0.0, H - 0.5 * roof), (cabin - 0.3, 0.88 * W, roof), self.paint)
        elif self.kind == "van":
            bonnet = 0.7
            b.box((-0.5 * bonnet, 0.0, 0.5 * (floor + H)), (L - bonnet, W, H - floor), self.paint)
            top = floor + 0.45 * (H - floor)
            b.box(
                (0.5 * L - 0.5 * bonnet, 0.0, 0.5 * (floor + top)),
                (bonnet, W - 0.05, top - floor),
                self.paint,
            )
        else:
            cab, cab_h = 2.0, 0.85 * H
            b.box(
                (0.5 * L - 0.5 * cab - 0.01, 0.0, 0.5 * (floor + cab_h)),
                (cab - 0.02, W - 0.1, cab_h - floor),
                self.paint,
            )
            # Windscreen and side windows: a glass band standing 1-2 cm proud of the cab.
            b.box((0.5 * L - 0.5 * cab, 0.0, 0.75 * cab_h), (cab, W - 0.08, 0.3 * cab_h), GLASS)
            cargo = L - cab - 0.15
            b.box((-0.5 * L + 0.5 * cargo, 0.0, 0.5 * (floor + 0.25 + H)), (cargo, W, H - floor - 0.25), 0.6)
        return _finish(b)

    def shape(self, t: float) -> ActorShape:
        return self._shape


@dataclass
class CyclistModel:
    """A rider on a bicycle: octagonal tyres, frame tubes, handlebar, and a body posed by inverse
    kinematics (hips on the saddle, feet on the pedals, hands on the grips). Rigid over time."""

    body: Body
    wheel_radius: float  # m
    wheelbase: float  # m
    bar_width: float  # handlebar width, m
    crank: float  # pedal crank angle, rad
    frame_paint: float
    label: int = CYCLIST

    @cached_property
    def _shape(self) -> ActorShape:
        b = ShapeBuilder()
        body, r = self.body, self.wheel_radius
        tube = 0.018
        for hub_x in (-0.5 * self.wheelbase, 0.5 * self.wheelbase):
            angles = np.arange(9) * np.pi / 4
            rim = np.stack([hub_x + r * np.cos(angles), np.zeros(9), r + r * np.sin(angles)], axis=1)
            for k in range(8):
                b.segment(rim[k], rim[k + 1], 0.02, RUBBER, _SIDE)
        rear = np.array([-0.5 * self.wheelbase, 0.0, r])
        front = np.array([0.5 * self.wheelbase, 0.0, r])
        crank_center = np.array([rear[0] + 0.42 * self.wheelbase, 0.0, r - 0.03])
        # Saddle height follows the leg length; the seat tube leans back ~17 degrees.
        seat_dir = np.array([-np.sin(0.3), 0.0, np.cos(0.3)])
        saddle = crank_center + 0.88 * (body.thigh + body.shin) * seat_dir
        head_tube_lo = front + (-0.12, 0.0, 0.4)
        head_tube_hi = head_tube_lo + (-0.05, 0.0, 0.16)
        bar = head_tube_hi + (-0.04, 0.0, 0.1)
        for a, c in [
            (crank_center, saddle - 0.08 * seat_dir),
            (saddle - 0.12 * seat_dir, head_tube_hi),
            (crank_center, head_tube_lo),
            (crank_center, rear),
            (saddle - 0.12 * seat_dir, rear),
            (head_tube_lo, front),
            (head_tube_lo, bar),
        ]:
            b.segment(a, c, tube, self.frame_paint, _SIDE)
        half_bar = 0.5 * self.bar_width
        b.segment(bar + (0.0, half_bar, 0.0), bar - (0.0, half_bar, 0.0), tube, METAL, (1.0, 0.0, 0.0))
        b.box(saddle + (0.0, 0.0, 0.025), (0.26, 0.14, 0.05), RUBBER)

        hips = saddle + (0.0, 0.0, 0.05 + 0.07 * body.height)
        grips = [bar + (0.0, side * (half_bar - 0.06), 0.0) for side in (1, -1)]
        arm = body.upper_arm + body.forearm
        # Lean forward until the hands reach the grips with the elbows slightly bent.
        leans = np.linspace(0.1, 1.3, 61)
        necks = hips + body.torso * np.stack([np.sin(leans), np.zeros_like(leans), np.cos(leans)], axis=1)
        reach = np.linalg.norm(necks + (0.0, body.shoulder_offset, 0.0) - grips[0], axis=1)
        lean = float(leans[np.argmin(np.abs(reach - 0.93 * arm))])
        neck = hips + body.torso * np.array([np.sin(lean), 0.0, np.cos(lean)])
        knees, ankles, elbows = [], [], []
        for i, side in enumerate((1, -1)):
            angle = self.crank + i * np.pi
            pedal = crank_center + (0.17 * np.cos(angle), side * 0.12, 0.17 * np.sin(angle))
            b.box(pedal, (0.1, 0.08, 0.02), METAL)
            ankles.append(pedal + (0.0, 0.0, body.ankle_height))
            hip = hips + (0.0, side * body.hip_offset, 0.0)
            knees.append(_two_link(hip, ankles[i], body.thigh, body.shin, np.array([1.0, 0.0, 0.3])))
            shoulder = neck + (0.0, side * body.shoulder_offset, 0.0)
            elbows.append(
                _two_link(
                    shoulder, grips[i], body.upper_arm, body.forearm, np.array([-0.3, side * 0.5, -1.0])
                )
            )
        body.add(b, hips, lean, knees, ankles, elbows, grips)
        return _finish(b)

    def shape(self, t: float) -> ActorShape:
        return self._shape


# Vehicle kinds: (probability, length, width, height ranges in m).
VEHICLE_KINDS = {
    "sedan": (0.55, (3.8, 4.9), (1.7, 1.9), (1.4, 1.55)),
    "suv": (0.27, (4.3, 5.2), (1.8, 2.1), (1.6, 2.0)),
    "van": (0.11, (5.0, 6.0), (1.9, 2.1), (1.9, 2.6)),
    "truck": (0.07, (6.0, 7.0), (2.2, 2.5), (2.6, 3.0)),
}


def sample_vehicle(rng: np.random.Generator) -> VehicleModel:
    kinds = list(VEHICLE_KINDS)
    kind = kinds[rng.choice(len(kinds), p=[VEHICLE_KINDS[k][0] for k in kinds])]
    _, length, width, height = VEHICLE_KINDS[kind]
    return VehicleModel(
        kind, rng.uniform(*length), rng.uniform(*width), rng.uniform(*height), rng.uniform(0.1, 0.6)
    )


def sample_body(
    rng: np.random.Generator, height: tuple[float, float] = (1.5, 1.9), build: tuple[float, float] = (0.85, 1.15)
) -> Body:
    return Body(rng.uniform(*height), rng.uniform(*build), rng.uniform(0.08, 0.45), rng.uniform(0.08, 0.35))


def sample_pedestrian(rng: np.random.Generator, speed: float, varied: bool = False) -> PedestrianModel:
    """A pedestrian walking at ``speed`` (m/s) or, at 0, standing.

    ``varied`` widens the people (a keypoint-dataset option, :class:`~.scene.SceneConfig`
    ``varied_pedestrians``): children to tall adults (1.1-2.0 m) of slimmer and broader builds,
    arm swing from stiff to wide, arms raised up to 80 degrees and elbows bent up to 115 when
    still, a third of the still ones sitting, and a quarter carrying a bag. Without it the draws are
    the original ones, number for number, so the detection world does not change.
    """
    if varied:
        return _sample_varied_pedestrian(rng, speed)
    arm_pose = (
        rng.uniform(-0.25, 0.25),
        rng.uniform(-0.25, 0.25),
        rng.uniform(0.05, 1.4),
        rng.uniform(0.05, 1.4),
    )
    return PedestrianModel(
        sample_body(rng),
        speed,
        rng.uniform(0, 2 * np.pi),
        arm_pose,
        rng.uniform(0.05, 0.25),
        rng.random() < 0.3,
    )


def _sample_varied_pedestrian(rng: np.random.Generator, speed: float) -> PedestrianModel:
    sitting = speed == 0 and rng.random() < 0.35
    arm_pose = (rng.uniform(-0.4, 1.4), rng.uniform(-0.4, 1.4), rng.uniform(0.05, 2.0), rng.uniform(0.05, 2.0))
    return PedestrianModel(
        sample_body(rng, (1.1, 2.0), (0.75, 1.3)),
        speed,
        rng.uniform(0, 2 * np.pi),
        arm_pose,
        rng.uniform(-0.1, 0.15) if sitting else rng.uniform(0.0, 0.3),
        rng.random() < 0.25,
        arm_swing=rng.uniform(0.3, 1.3),
        sitting=sitting,
        carried=rng.random() < 0.25,
    )


def sample_cyclist(rng: np.random.Generator) -> CyclistModel:
    return CyclistModel(
        sample_body(rng, (1.5, 1.82)),
        rng.uniform(0.32, 0.36),
        rng.uniform(1.0, 1.12),
        rng.uniform(0.5, 0.66),
        rng.uniform(0, 2 * np.pi),
        rng.uniform(0.2, 0.7),
    )
