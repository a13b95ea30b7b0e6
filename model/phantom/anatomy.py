"""Anatomy of the phantom: a kinematic skeleton sampled per seed, bones and soft tissue built on it.

All lengths are millimetres for an average adult, multiplied by the seed's body ``scale``; points
are LPS patient coordinates (+x left, +y posterior, +z superior). The patient lies supine on a
table at ``table_y`` (posterior). Joint spaces are made real with :class:`~.sdf.Clear`: each bone is
kept at least the joint's gap away from the bones it articulates with, so two labelled bones never
share a voxel face at spacings below the smallest gap (1.5 mm).

Bones labelled for the model: femur, hip bone, tibia, fibula, talus, calcaneus (both sides).
Distractors (label 0, bone-like): patella, sacrum, coccyx, L4 and L5, navicular, cuboid,
cuneiforms, metatarsals and phalanges. Metal implants (label 0) appear in about 12% of seeds:
a hip prosthesis (ball, stem, cup; femoral head resected), a total knee (femoral shell, tibial
tray and keel) or a distal tibial plate with screws.

It is one module past 500 lines on purpose: `build_anatomy` builds the bones in one order, each
cleared against the bones it articulates with, and each builder reads the skeleton's private
parameters; kept together, the order and the clearances read top-down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.labels import Bone
from model.phantom.sdf import (
    ArrayF,
    Block,
    Capsule,
    Clear,
    Cylinder,
    Ellipsoid,
    HalfSpace,
    Intersect,
    RoundBox,
    Sdf,
    Shell,
    Sphere,
    Subtract,
    Union,
    Vec,
    rotation,
    unit,
    vec,
)

SIDES: tuple[tuple[str, int], ...] = (("left", 1), ("right", -1))
"""Patient sides and the sign of their lateral direction along +x (LPS: +x is patient left)."""

IMPLANTS = ("hip_prosthesis", "knee_prosthesis", "tibial_plate")
IMPLANT_PROBABILITY = 0.12


@dataclass(frozen=True)
class Shaft:
    """Diaphysis of a long bone: thick cortex and fatty marrow away from the two metaphyses."""

    top: Vec
    bottom: Vec
    cortex_mm: float

    def weight(self, b: Block) -> ArrayF:
        """1 in the mid-diaphysis, easing to 0 towards both ends (thin cortex, cancellous bone)."""
        X, Y, Z = b.axes()
        axis = self.bottom - self.top
        length = float(np.linalg.norm(axis))
        u = (axis / length**2).astype(np.float32)
        t = self.top.astype(np.float32)
        s = (X - t[0]) * u[0] + (Y - t[1]) * u[1] + (Z - t[2]) * u[2]
        return _smoothstep(0.08, 0.28, s) * (1.0 - _smoothstep(0.72, 0.92, s))


def _smoothstep(e0: float, e1: float, x: ArrayF) -> ArrayF:
    t = np.clip((x - np.float32(e0)) / np.float32(e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Part:
    """One rendered object: a bone (labelled or distractor) or a metal implant."""

    name: str
    sdf: Sdf
    label: int = 0
    metal: bool = False
    cortex_mm: float = 1.0
    shaft: Shaft | None = None


@dataclass
class SoftTissue:
    """Skin surface and what lies under it; fat thickness is a function of z (legs run along z)."""

    body: Sdf
    fat_z: list[float]
    fat_mm: list[float]
    bladder: Sdf | None
    gas: list[Sdf]
    table_y: float
    sole_z: float


@dataclass
class Anatomy:
    parts: list[Part]
    soft: SoftTissue
    geometry: dict
    landmarks: dict[str, Vec] = field(default_factory=dict)


class Frame:
    """Orthonormal axes (lateral, anterior, up) at an origin; ``p`` maps local mm to world."""

    def __init__(self, origin: Vec, lat: Vec, ant: Vec, up: Vec, scale: float) -> None:
        self.o, self.lat, self.ant, self.up, self.s = origin, lat, ant, up, scale

    def p(self, lat: float, ant: float, up: float) -> Vec:
        return self.o + self.s * (lat * self.lat + ant * self.ant + up * self.up)

    def d(self, lat: float, ant: float, up: float) -> Vec:
        """A direction (unit vector) given in local components."""
        return unit(lat * self.lat + ant * self.ant + up * self.up)

    @property
    def rot(self) -> np.ndarray:
        return np.stack([self.lat, self.ant, self.up])

    def ellipsoid(self, lat: float, ant: float, up: float, radii: tuple[float, ...]) -> Ellipsoid:
        return Ellipsoid(self.p(lat, ant, up), self.s * np.asarray(radii), self.rot)

    def capsule(
        self, a: tuple[float, float, float], b: tuple[float, float, float], ra: float, rb: float
    ) -> Capsule:
        return Capsule(self.p(*a), self.p(*b), self.s * ra, self.s * rb)


def _orthonormal(up: Vec, lat_hint: Vec, ant_hint: Vec) -> tuple[Vec, Vec, Vec]:
    up = unit(up)
    lat = unit(lat_hint - np.dot(lat_hint, up) * up)
    ant = np.cross(up, lat)
    if np.dot(ant, ant_hint) < 0:
        ant = -ant
    return lat, ant, up


@dataclass
class _Params:
    """Everything sampled per seed, drawn in one fixed order so that seeds stay reproducible."""

    sex: str
    scale: float
    femur_len: float
    tibia_ratio: float
    hip_half_width: float
    pelvis_deg: tuple[float, float, float]
    fat_leg: float
    fat_torso: float
    muscle: float
    gaps: dict[str, float]
    side: dict[str, dict[str, float]]
    implant: str | None
    implant_side: str
    gas_count: int
    bladder: bool


def sample_params(rng: np.random.Generator) -> _Params:
    sex = "female" if rng.random() < 0.5 else "male"
    scale = float(np.clip(rng.normal(1.02 if sex == "male" else 0.94, 0.06), 0.85, 1.15))
    female = sex == "female"
    base_hka = rng.uniform(-6.0, 6.0)
    base_version = rng.uniform(3.0, 22.0)
    base_nsa = rng.uniform(122.0, 138.0)
    side = {}
    for name, _ in SIDES:
        side[name] = {
            "head_r": float(np.clip(rng.normal(22.5 + 8 * (scale - 0.85), 0.8), 22.0, 26.0)),
            "hka": float(np.clip(base_hka + rng.normal(0, 1.5), -8.0, 8.0)),
            "nsa": float(np.clip(base_nsa + rng.normal(0, 2.0), 120.0, 140.0)),
            "version": float(np.clip(base_version + rng.normal(0, 3.0), 0.0, 25.0)),
            "knee_half_sep": float(rng.uniform(55.0, 85.0)),
            "hip_height": float(rng.uniform(95.0, 120.0)),
            "knee_lift": float(rng.uniform(0.0, 25.0)),
            "plantarflexion": float(rng.uniform(5.0, 35.0)),
            "foot_rotation": float(rng.uniform(-5.0, 20.0)),
            "neck_len": float(rng.uniform(46.0, 54.0)),
            "cortex": float(rng.uniform(4.0, 7.0)),
        }
    gaps = {
        "hip": float(rng.uniform(1.5, 4.0)),
        "knee": float(rng.uniform(3.0, 6.0)),
        "ankle": float(rng.uniform(2.0, 3.0)),
        "subtalar": float(rng.uniform(1.5, 2.0)),
        "tibiofibular": float(rng.uniform(1.8, 2.5)),
        "sacroiliac": float(rng.uniform(2.0, 3.0)),
        "symphysis": float(rng.uniform(3.5, 5.0)),
        "patellofemoral": float(rng.uniform(2.5, 4.0)),
        "foot": float(rng.uniform(1.5, 2.5)),
    }
    implant = None
    if rng.random() < IMPLANT_PROBABILITY:
        implant = IMPLANTS[int(rng.integers(len(IMPLANTS)))]
    return _Params(
        sex=sex,
        scale=scale,
        femur_len=float(rng.uniform(430.0, 480.0)) * scale,
        tibia_ratio=float(rng.uniform(0.79, 0.85)),
        hip_half_width=float(rng.uniform(84.0, 92.0) + (5.0 if female else 0.0)),
        pelvis_deg=(
            float(rng.uniform(-6, 6)),
            float(rng.uniform(-3, 3)),
            float(rng.uniform(-5, 5)),
        ),
        fat_leg=float(rng.uniform(6.0, 22.0) + (6.0 if female else 0.0)),
        fat_torso=float(rng.uniform(12.0, 40.0)),
        muscle=float(rng.uniform(0.9, 1.1)),
        gaps=gaps,
        side=side,
        implant=implant,
        implant_side="left" if rng.random() < 0.5 else "right",
        gas_count=int(rng.integers(0, 6)),
        bladder=bool(rng.random() < 0.7),
    )


def _torso_frame(prm: _Params) -> Frame:
    tilt, obliquity, twist = prm.pelvis_deg
    rot = rotation(vec(0, 0, 1), twist) @ rotation(vec(0, 1, 0), obliquity)
    rot = rot @ rotation(vec(1, 0, 0), tilt)
    hip_height = prm.femur_len * (1 + prm.tibia_ratio) + 60.0 * prm.scale
    return Frame(
        vec(0, 0, hip_height),
        rot @ vec(1, 0, 0),
        rot @ vec(0, -1, 0),
        rot @ vec(0, 0, 1),
        prm.scale,
    )


def _pelvis_side(torso: Frame, sign: int) -> Frame:
    return Frame(torso.o, sign * torso.lat, torso.ant, torso.up, torso.s)


@dataclass
class _Leg:
    """Key points and frames of one leg, from hip centre to foot."""

    name: str
    sign: int
    hip: Vec
    knee: Vec
    ankle: Vec
    neck_base: Vec
    shaft_dir: Vec
    knee_frame: Frame
    ankle_frame: Frame
    foot: Frame
    hka: float


def _build_leg(prm: _Params, torso: Frame, name: str, sign: int, table_y: float) -> _Leg:
    """Kinematic chain hip -> knee -> ankle -> foot, resting on the table at ``table_y``."""
    sp = prm.side[name]
    s = prm.scale
    g = prm.gaps
    hip = _pelvis_side(torso, sign).p(prm.hip_half_width, 0.0, 0.0)
    lat_w = vec(sign, 0, 0)
    head_r = sp["head_r"]

    # Femur: hip -> knee with the sampled abduction and the knee's height above the table.
    knee_height = (55.0 + sp["knee_lift"]) * s + prm.fat_leg
    ankle_height = 72.0 * s + 14.0
    femur_mech = prm.femur_len - head_r + g["knee"] / 2
    tibia_mech = prm.femur_len * prm.tibia_ratio + (g["knee"] + g["ankle"]) / 2
    dy_f = (table_y - knee_height) - hip[1]
    rem_f = np.sqrt(femur_mech**2 - dy_f**2)
    dy_t = knee_height - ankle_height
    rem_t = np.sqrt(tibia_mech**2 - dy_t**2)
    # Knees sit medial of the hips; move them apart if the HKA angle would bring the ankles
    # closer than a leg's width (the knee's coronal offset sets the femur's coronal angle).
    knee_x = (sp["knee_half_sep"] + 0.5 * prm.fat_leg) * s
    min_ankle_x = 45.0 * s + 0.5 * prm.fat_leg
    for _ in range(6):
        abd = np.arcsin((knee_x - sign * hip[0]) / rem_f)
        gamma_t = abd - np.radians(sp["hka"])  # varus (positive HKA) brings the ankle medial
        ankle_x = knee_x + rem_t * np.sin(gamma_t)
        knee_x += max(0.0, min_ankle_x - ankle_x) / 1.5
    knee = hip + vec(sign * rem_f * np.sin(abd), dy_f, -rem_f * np.cos(abd))
    ankle = knee + vec(sign * rem_t * np.sin(gamma_t), dy_t, -rem_t * np.cos(gamma_t))
    down = unit(ankle - knee)
    lat, ant, up = _orthonormal(-down, lat_w, vec(0, -1, 0))
    knee_frame = Frame(knee, lat, ant, up, s)
    ankle_frame = Frame(ankle, lat, ant, up, s)

    # Proximal femur: anatomical shaft axis through the neck base and the distal metaphysis.
    psi = np.radians(180.0 - sp["nsa"])
    ver = np.radians(sp["version"])
    shaft_low = knee_frame.p(0, 0, 60) + up * g["knee"] / 2
    shaft_dir = unit(hip - shaft_low)
    for _ in range(4):
        _, ant_s, _ = _orthonormal(shaft_dir, -lat_w, vec(0, -1, 0))
        medial = unit(np.cross(ant_s, shaft_dir))
        medial = medial if np.dot(medial, lat_w) < 0 else -medial
        neck_dir = np.cos(psi) * shaft_dir + np.sin(psi) * (
            np.cos(ver) * medial + np.sin(ver) * ant_s
        )
        neck_base = hip - sp["neck_len"] * s * neck_dir
        shaft_dir = unit(neck_base - shaft_low)

    # Foot: rotates about the talar dome centre (so the ankle joint space is kept).
    dome_r = 17.0
    dome = ankle - (g["ankle"] / 2 + dome_r * s) * up
    rot_ext = np.radians(sp["foot_rotation"])
    fwd0 = np.cos(rot_ext) * ant + np.sin(rot_ext) * lat
    lat_f = np.cos(rot_ext) * lat - np.sin(rot_ext) * ant
    beta = np.radians(sp["plantarflexion"])
    fwd = np.cos(beta) * fwd0 + np.sin(beta) * down
    up_f = np.cos(beta) * up + np.sin(beta) * fwd0
    foot = Frame(dome, lat_f, fwd, up_f, s)
    return _Leg(
        name, sign, hip, knee, ankle, neck_base, shaft_dir, knee_frame, ankle_frame, foot, sp["hka"]
    )


def _femur(prm: _Params, leg: _Leg, resect_head: bool) -> tuple[Sdf, Shaft]:
    sp = prm.side[leg.name]
    s, g = prm.scale, prm.gaps["knee"]
    kf = leg.knee_frame
    lat_w = vec(leg.sign, 0, 0)
    post = vec(0, 1, 0)
    e = leg.shaft_dir
    base = leg.neck_base
    shaft_low = kf.p(0, 0, 60) + kf.up * g / 2
    mid = shaft_low + 0.3 * (base - shaft_low)
    up_g = g / 2 / s  # joint half gap in local (unscaled) units
    parts: list[Sdf] = [
        Sphere(leg.hip, sp["head_r"]),
        Capsule(base, leg.hip, 17.0 * s, 15.0 * s),
        Capsule(base - 45 * s * e, base + 8 * s * e, 16.5 * s, 19.0 * s),
        Ellipsoid(
            base + s * (21 * lat_w + 16 * e + 4 * post), s * vec(14, 17, 27), _axes(e, lat_w)
        ),
        Sphere(base + s * (-36 * e - 13 * lat_w + 9 * post), 9.0 * s),
        Capsule(base - 40 * s * e, mid, 15.5 * s, 13.5 * s),
        Capsule(mid, shaft_low, 13.5 * s, 23.0 * s),
        kf.ellipsoid(0, -2, 58 + up_g, (37, 25, 32)),
        kf.ellipsoid(0, 12, 40 + up_g, (35, 16, 26)),
        kf.ellipsoid(-22, -8, 24 + up_g, (14, 30, 24)),
        kf.ellipsoid(22, -6, 24 + up_g, (15, 28, 24)),
    ]
    bone: Sdf = Union(parts, smooth=5.0 * s)
    if resect_head:
        neck_dir = unit(leg.hip - base)
        bone = Subtract(bone, HalfSpace(leg.hip - 0.4 * sp["neck_len"] * s * neck_dir, -neck_dir))
    return bone, Shaft(base - 50 * s * e, shaft_low, sp["cortex"])


def _axes(main: Vec, lat: Vec) -> np.ndarray:
    """Rows (lateral, anterior-ish, main) for primitives oriented along ``main``."""
    lat_, ant, up = _orthonormal(main, lat, vec(0, -1, 0))
    return np.stack([lat_, ant, up])


def _condyles(prm: _Params, leg: _Leg) -> Sdf:
    """The distal femur's articular surface alone (for a knee prosthesis shell)."""
    kf, up_g = leg.knee_frame, prm.gaps["knee"] / 2 / prm.scale
    return Union(
        [
            kf.ellipsoid(-22, -8, 24 + up_g, (14, 30, 24)),
            kf.ellipsoid(22, -6, 24 + up_g, (15, 28, 24)),
            kf.ellipsoid(0, 12, 40 + up_g, (35, 16, 26)),
        ],
        smooth=5.0 * prm.scale,
    )


def _hip_bone(prm: _Params, torso: Frame, leg: _Leg, femur: Sdf, sacrum: Sdf) -> Sdf:
    g = prm.gaps
    pf = _pelvis_side(torso, leg.sign)
    hw = prm.hip_half_width
    sym = g["symphysis"] / 2 / prm.scale
    head_r = prm.side[leg.name]["head_r"]
    opening = pf.d(1.0, 0.45, -0.6)
    socket = Intersect(
        Sphere(pf.p(hw - 12, 0, 8), head_r + 13 * prm.scale),
        HalfSpace(leg.hip + 3.0 * opening, opening),
    )
    wing_c = (hw + 2, -8, 72)
    normal = pf.d(-1.0, 0.8, 0.1)
    wing_rot = _orthonormal(pf.up, np.cross(pf.up, normal), normal)
    wing = Intersect(
        Shell(Sphere(pf.p(*wing_c) + 150 * prm.scale * normal, 150 * prm.scale), 3.5 * prm.scale),
        Ellipsoid(
            pf.p(*wing_c), prm.scale * vec(76, 46, 30), np.stack([wing_rot[0], wing_rot[1], normal])
        ),
    )
    ring = [
        (hw - 18, 10, -14),
        (sym + 14, 50, -30),
        (sym + 10, 44, -60),
        (hw - 36, -5, -86),
        (hw - 16, -24, -80),
        (hw - 10, -15, -20),
    ]
    ring_r = [9.5, 10.0, 7.0, 9.0, 12.0, 12.0]
    parts: list[Sdf] = [
        socket,
        wing,
        pf.capsule((hw - 12, -2, 18), (hw + 2, -12, 60), 20, 13),
        pf.capsule((hw - 14, -10, 22), (hw - 42, -62, 50), 17, 15),
        pf.ellipsoid(hw - 16, -26, -86, (13, 16, 19)),
    ]
    parts += [
        pf.capsule(ring[i], ring[(i + 1) % len(ring)], ring_r[i], ring_r[(i + 1) % len(ring)])
        for i in range(len(ring))
    ]
    bone = Intersect(
        Union(parts, smooth=6.0 * prm.scale),
        HalfSpace(torso.o + pf.lat * g["symphysis"] / 2, -pf.lat),
    )
    return Clear(Clear(bone, [femur], g["hip"]), [sacrum], g["sacroiliac"])


def _spine(torso: Frame) -> tuple[list[Part], Sdf]:
    """Sacrum, coccyx, L5 and L4 (distractors); returns the parts and the sacrum's shape."""
    t = torso
    sacrum = Subtract(
        Union(
            [
                t.ellipsoid(0, -40, 60, (24, 17, 14)),
                t.ellipsoid(0, -52, 46, (50, 18, 24)),
                t.capsule((0, -45, 45), (0, -62, 5), 20, 14),
                t.capsule((0, -62, 5), (0, -72, -30), 14, 7),
            ],
            smooth=6.0,
        ),
        t.capsule((0, -58, 72), (0, -66, 5), 6, 4),
    )
    parts = [
        Part("sacrum", sacrum, cortex_mm=1.0),
        Part("coccyx", t.capsule((0, -73, -40), (0, -62, -62), 5, 3), cortex_mm=0.8),
    ]
    lordosis = rotation(t.lat, 12.0)
    for name, (ant, up) in {"L5": (-28, 93), "L4": (-22, 132)}.items():
        body_axis = lordosis @ t.up
        centre = t.p(0, ant, up)
        body = Cylinder(
            centre, 22 * t.s, 12.5 * t.s, np.stack([t.lat, np.cross(body_axis, t.lat), body_axis])
        )
        arch = [
            t.capsule((side * 13, ant - 16, up), (side * 14, ant - 44, up), 6, 5)
            for side in (-1, 1)
        ]
        arch += [
            t.capsule((-14, ant - 44, up), (14, ant - 44, up), 5, 5),
            t.capsule((0, ant - 44, up), (0, ant - 74, up - 8), 5, 4),
            t.capsule((-16, ant - 40, up + 2), (-46, ant - 42, up + 4), 5, 4),
            t.capsule((16, ant - 40, up + 2), (46, ant - 42, up + 4), 5, 4),
        ]
        parts.append(Part(name, Union([body, Union(arch, smooth=3.0)]), cortex_mm=1.0))
    return parts, sacrum


def _tibia(prm: _Params, leg: _Leg, femur: Sdf) -> tuple[Sdf, Shaft]:
    kf, af = leg.knee_frame, leg.ankle_frame
    s = prm.scale
    gk, ga = prm.gaps["knee"] / 2 / s, prm.gaps["ankle"] / 2 / s
    length = float(np.linalg.norm(leg.ankle - leg.knee)) / s
    plateau_top = leg.knee - prm.gaps["knee"] / 2 * kf.up
    plafond = leg.ankle + prm.gaps["ankle"] / 2 * kf.up
    parts: list[Sdf] = [
        Intersect(kf.ellipsoid(0, -3, -gk - 22, (40, 27, 28)), HalfSpace(plateau_top, kf.up)),
        kf.ellipsoid(0, -3, -gk - 1, (7, 9, 6)),
        kf.ellipsoid(0, 22, -gk - 42, (12, 8, 16)),
        kf.capsule((0, -3, -gk - 40), (0, 0, -0.35 * length), 22, 14),
        kf.capsule((0, 0, -0.35 * length), (-2, 0, -length + 50), 14, 12),
        kf.capsule((0, 9, -0.15 * length), (0, 7, -0.7 * length), 7, 6),
        Intersect(af.ellipsoid(-3, 0, ga + 16, (19, 20, 20)), HalfSpace(plafond, -kf.up)),
        af.capsule((-21, 0, ga + 12), (-21, 2, -12), 7, 6),
    ]
    bone = Clear(Union(parts, smooth=6.0 * s), [femur], prm.gaps["knee"])
    return bone, Shaft(kf.p(0, 0, -gk - 60), af.p(0, 0, 60), prm.side[leg.name]["cortex"] * 0.9)


def _fibula(prm: _Params, leg: _Leg, tibia: Sdf) -> Sdf:
    kf, af = leg.knee_frame, leg.ankle_frame
    gk = prm.gaps["knee"] / 2 / prm.scale
    head = kf.p(36, -21, -gk - 40)
    malleolus = af.p(24.5, -5, -8)
    parts = [
        Sphere(head, 12.0 * prm.scale),
        Capsule(head, malleolus, 7.0 * prm.scale, 6.0 * prm.scale),
        af.ellipsoid(24.5, -6, -8, (7, 11, 20)),
    ]
    return Clear(Union(parts, smooth=6.0 * prm.scale), [tibia], prm.gaps["tibiofibular"])


def _foot(prm: _Params, leg: _Leg, tibia: Sdf, fibula: Sdf) -> tuple[Sdf, Sdf, list[Part]]:
    """Talus and calcaneus (labelled) and the distractor foot bones, in the foot frame."""
    f = leg.foot
    g = prm.gaps
    rot = np.stack([f.lat, f.ant, f.up])
    talus: Sdf = Union(
        [
            Cylinder(f.o, 17.0 * f.s, 14.0 * f.s, np.stack([f.ant, f.up, f.lat])),
            f.capsule((0, 5, -5), (-4, 28, -9), 13, 11),
            f.ellipsoid(-5, 32, -9, (12, 12, 12)),
            f.ellipsoid(3, -16, -11, (8, 8, 7)),
        ],
        smooth=5.0 * f.s,
    )
    talus = Clear(talus, [tibia, fibula], g["ankle"])
    calcaneus: Sdf = Union(
        [
            f.capsule((4, -40, -36), (10, 28, -33), 17, 14),
            Ellipsoid(f.p(4, -48, -42), f.s * vec(15, 14, 20), rot),
            f.capsule((-16, 2, -24), (-8, 6, -26), 6, 6),
        ],
        smooth=6.0 * f.s,
    )
    calcaneus = Clear(calcaneus, [talus, fibula, tibia], g["subtalar"])
    gf = g["foot"]
    navicular = Clear(f.ellipsoid(-6, 51, -10, (15, 7, 14)), [talus], gf)
    cuboid = Clear(f.ellipsoid(16, 53, -33, (11, 13, 11)), [calcaneus], gf)
    small = [Part("navicular", navicular, cortex_mm=0.8), Part("cuboid", cuboid, cortex_mm=0.8)]
    for i, (lat, up, r) in enumerate(
        ((-18, -16, (8, 9, 13)), (-4, -12, (6, 8, 11)), (7, -18, (6, 9, 11)))
    ):
        cune = Clear(f.ellipsoid(lat, 67, up, r), [navicular, cuboid], gf)
        small.append(Part(f"cuneiform{i + 1}", cune, cortex_mm=0.8))
    rays = (
        # base lat, base fwd, base up, head lat, head fwd, head up, base r, head r, phalanges
        (-18, 80, -18, -24, 140, -34, 9.0, 8.0, (30, 22)),
        (-5, 79, -19, -9, 150, -37, 6.0, 5.5, (25, 14, 10)),
        (4, 78, -24, 3, 147, -39, 5.5, 5.0, (22, 12, 9)),
        (12, 72, -28, 15, 140, -40, 5.5, 5.0, (20, 11, 8)),
        (21, 68, -34, 27, 130, -42, 6.0, 5.0, (18, 10, 8)),
    )
    for i, (bl, bf, bu, hl, hf, hu, br, hr, phalanges) in enumerate(rays):
        small.append(Part(f"metatarsal{i + 1}", f.capsule((bl, bf, bu), (hl, hf, hu), br, hr)))
        direction = unit(vec(hl - bl, hf - bf, 0.3 * (hu - bu)))
        start = vec(hl, hf, hu) + (hr + gf / f.s + 1.0) * direction
        radius = hr * 0.9
        for j, plen in enumerate(phalanges):
            end = start + plen * direction
            small.append(
                Part(
                    f"phalanx{i + 1}.{j + 1}",
                    f.capsule(
                        tuple(start), tuple(end - 0.5 * radius * direction), radius, radius * 0.8
                    ),
                    cortex_mm=0.7,
                )
            )
            start = end + (gf / f.s + 1.0 + 0.5 * radius) * direction
            radius *= 0.8
    return talus, calcaneus, small


def _implant(kind: str, prm: _Params, leg: _Leg) -> list[Part]:
    s = prm.scale
    sp = prm.side[leg.name]
    if kind == "hip_prosthesis":
        e, base = leg.shaft_dir, leg.neck_base
        opening = _pelvis_side(_torso_frame(prm), leg.sign).d(1.0, 0.45, -0.6)
        cup_r = sp["head_r"] + prm.gaps["hip"] - 1.0
        shapes: list[Sdf] = [
            Sphere(leg.hip, 15.0 * s),
            Capsule(leg.hip, base - 10 * s * e, 6.0 * s, 8.0 * s),
            Capsule(base - 10 * s * e, base - 140 * s * e, 8.5 * s, 5.0 * s),
            Intersect(Shell(Sphere(leg.hip, cup_r), 2.0), HalfSpace(leg.hip, opening)),
        ]
    elif kind == "knee_prosthesis":
        kf = leg.knee_frame
        gk = prm.gaps["knee"] / 2 / s
        shapes = [
            Intersect(Shell(_condyles(prm, leg), 1.5), HalfSpace(kf.p(0, 0, 45 + gk), kf.up)),
            RoundBox(kf.p(0, -3, -gk - 2.5), s * vec(34, 23, 2.5), kf.rot, 2.0),
            kf.capsule((0, -3, -gk - 5), (0, -3, -gk - 50), 7, 5),
        ]
    else:
        af = leg.ankle_frame
        shapes = [RoundBox(af.p(-15.5, 2, 80), s * vec(1.8, 7, 65), af.rot, 1.5)]
        shapes += [af.capsule((-16, 2, up), (14, 2, up), 2.0, 2.0) for up in (40, 65, 100, 125)]
    return [Part(f"{kind}_{i}", shape, metal=True) for i, shape in enumerate(shapes)]


def _soft_tissue(prm: _Params, torso: Frame, legs: list[_Leg], table_y: float) -> SoftTissue:
    s = prm.scale
    fl, ft = prm.fat_leg, prm.fat_torso
    m = prm.muscle
    hip_z = float(np.mean([leg.hip[2] for leg in legs]))
    half_lat = (150.0 * m + 10 * (prm.sex == "female")) * s + ft
    # torso: a rounded box whose back reaches past the table plane (flattened against it)
    back = table_y + 12.0
    front = torso.o[1] - (95.0 * m * s + ft)
    centre = torso.p(0, 0, 60)
    centre[1] = (back + front) / 2
    torso_box = RoundBox(centre, vec(half_lat, (back - front) / 2, 170 * s), torso.rot, 70.0 * s)
    shapes: list[Sdf] = [torso_box]
    feet: list[Sdf] = []
    for leg in legs:
        lat_w = vec(leg.sign, 0, 0)
        kf, af, f = leg.knee_frame, leg.ankle_frame, leg.foot
        thigh_top = leg.hip + s * (8 * lat_w + vec(0, 12, -10))
        thigh_r = 78.0 * m * s + fl
        shapes += [
            Capsule(thigh_top, kf.p(-4, -6, 10), thigh_r, 46.0 * m * s + fl),
            Capsule(kf.p(-4, -6, 10), kf.p(0, -18, -110), 46.0 * m * s + fl, 54.0 * m * s + fl),
            Capsule(kf.p(0, -18, -110), af.p(0, -8, 30), 54.0 * m * s + fl, 27.0 * s + 0.5 * fl),
            Capsule(af.p(0, -8, 30), f.p(0, -10, -8), 27.0 * s + 0.5 * fl, 28.0 * s + 4),
        ]
        feet += [
            Sphere(f.p(3, -42, -44), 30.0 * s),
            RoundBox(f.p(5, 80, -28), s * vec(38, 110, 30), f.rot, 18.0 * s),
        ]
    body = Intersect(Union(shapes + feet, smooth=18.0), HalfSpace(vec(0, table_y, 0), vec(0, 1, 0)))
    knee_z = float(np.mean([leg.knee[2] for leg in legs]))
    ankle_z = float(np.mean([leg.ankle[2] for leg in legs]))
    fat_z = [ankle_z - 60, ankle_z + 40, knee_z, hip_z - 60, hip_z + 30]
    fat_mm = [3.0, 0.6 * fl, fl, 1.2 * fl, ft]
    sole_z = min(float(shape.lo[2]) for shape in feet)
    return SoftTissue(body, fat_z, fat_mm, None, [], table_y, sole_z)


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """Sample a patient and build every part, in painting order (distractors, bones, metal)."""
    prm = sample_params(rng)
    torso = _torso_frame(prm)
    table_y = float(
        torso.o[1]
        + np.mean([prm.side[n]["hip_height"] for n, _ in SIDES]) * prm.scale
        + 0.3 * prm.fat_torso
    )
    legs = [_build_leg(prm, torso, name, sign, table_y) for name, sign in SIDES]
    distractors, sacrum = _spine(torso)
    bones: list[Part] = []
    metal: list[Part] = []
    for leg in legs:
        implant = prm.implant if prm.implant_side == leg.name else None
        femur, femur_shaft = _femur(prm, leg, resect_head=implant == "hip_prosthesis")
        hip_bone = _hip_bone(prm, torso, leg, femur, sacrum)
        tibia, tibia_shaft = _tibia(prm, leg, femur)
        fibula = _fibula(prm, leg, tibia)
        talus, calcaneus, foot_bones = _foot(prm, leg, tibia, fibula)
        kf = leg.knee_frame
        patella = Clear(
            kf.ellipsoid(0, 41 + prm.gaps["knee"] / 2 / prm.scale, 44, (22, 10, 23)),
            [femur],
            prm.gaps["patellofemoral"],
        )
        distractors += [Part(f"patella_{leg.name}", patella, cortex_mm=1.2)]
        distractors += [
            Part(f"{p.name}_{leg.name}", p.sdf, cortex_mm=p.cortex_mm) for p in foot_bones
        ]
        c = prm.side[leg.name]["cortex"]
        bones += [
            Part(f"femur_{leg.name}", femur, Bone.FEMUR, cortex_mm=1.2, shaft=femur_shaft),
            Part(f"hip_bone_{leg.name}", hip_bone, Bone.HIP_BONE, cortex_mm=1.5),
            Part(f"tibia_{leg.name}", tibia, Bone.TIBIA, cortex_mm=1.2, shaft=tibia_shaft),
            Part(f"fibula_{leg.name}", fibula, Bone.FIBULA, cortex_mm=min(c * 0.5, 2.5)),
            Part(f"talus_{leg.name}", talus, Bone.TALUS, cortex_mm=1.0),
            Part(f"calcaneus_{leg.name}", calcaneus, Bone.CALCANEUS, cortex_mm=1.0),
        ]
        if implant is not None:
            metal += _implant(implant, prm, leg)
    soft = _soft_tissue(prm, torso, legs, table_y)
    soft.bladder = torso.ellipsoid(0, 25, -5, (38, 28, 30)) if prm.bladder else None
    gas_rng = np.random.default_rng(rng.integers(2**32))
    soft.gas = [
        torso.ellipsoid(
            gas_rng.uniform(-80, 80),
            gas_rng.uniform(-20, 50),
            gas_rng.uniform(40, 150),
            tuple(gas_rng.uniform(6, 22, size=3)),
        )
        for _ in range(prm.gas_count)
    ]
    geometry = _geometry(prm, legs, distractors)
    landmarks: dict[str, Vec] = {}
    for leg in legs:
        landmarks[f"hip_{leg.name}"] = leg.hip
        landmarks[f"knee_{leg.name}"] = leg.knee
        landmarks[f"ankle_{leg.name}"] = leg.ankle
        landmarks[f"subtalar_{leg.name}"] = leg.foot.p(0, -10, -25)
    hip_bones = [p.sdf for p in bones if p.label == Bone.HIP_BONE]
    landmarks["crest_top"] = vec(0, 0, max(float(h.hi[2]) for h in hip_bones))
    l4 = next(p for p in distractors if p.name == "L4")
    landmarks["l4_top"] = vec(0, 0, float(l4.sdf.hi[2]))
    landmarks["sole"] = vec(0, 0, soft.sole_z)
    return Anatomy(distractors + bones + metal, soft, geometry, landmarks)


def coronal_hka(hip: Vec, knee: Vec, ankle: Vec, sign: int) -> float:
    """Hip-knee-ankle angle in the coronal (x-z) plane, degrees, varus (knee lateral) positive.

    Measured as on an AP long-leg radiograph: the angle between hip->knee and knee->ankle.
    """
    f = (knee - hip)[[0, 2]]
    t = (ankle - knee)[[0, 2]]
    angle = np.degrees(np.arctan2(f[0] * t[1] - f[1] * t[0], f @ t))
    return float(-sign * angle)


def _geometry(prm: _Params, legs: list[_Leg], distractors: list[Part]) -> dict:
    sides = {}
    for leg in legs:
        sp = prm.side[leg.name]
        sides[leg.name] = {
            "femoral_head_centre_mm": [float(v) for v in leg.hip],
            "femoral_head_radius_mm": sp["head_r"],
            "knee_centre_mm": [float(v) for v in leg.knee],
            "ankle_centre_mm": [float(v) for v in leg.ankle],
            "hka_deg": coronal_hka(leg.hip, leg.knee, leg.ankle, leg.sign),
            "neck_shaft_angle_deg": sp["nsa"],
            "femoral_version_deg": sp["version"],
            "femur_length_mm": prm.femur_len,
            "tibia_length_mm": prm.femur_len * prm.tibia_ratio,
        }
    return {
        "sex": prm.sex,
        "scale": prm.scale,
        "sides": sides,
        "joint_gaps_mm": prm.gaps,
        "distractors": sorted(
            {
                p.name.rsplit("_", 1)[0] if p.name.endswith(("_left", "_right")) else p.name
                for p in distractors
            }
        ),
        "implant": None if prm.implant is None else {"type": prm.implant, "side": prm.implant_side},
    }
