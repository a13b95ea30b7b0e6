"""Two legs and a pelvis from real bone shapes, posed: the skeleton of a subject phantom.

The pelvis and each leg come from LLP26 shapes (a training subject's, a held-out subject's or
new mode scores); the right leg is a left leg mirrored, drawn independently of the left. Each
femoral head is set in its acetabulum, the talus and calcaneus of a Visible Human foot under
each tibia (the talar dome 2 mm below the tibial plafond, between the malleoli), and the whole
is scaled to the body's size. Each leg is then posed: ankle flexion, knee flexion and
varus/valgus, hip flexion, abduction and rotation, each about its joint centre, distal joints
first. Landmarks (joint centres, femoral head radius) go through the same transforms, so the
phantom knows its geometry; the knee centres (femoral and tibial, apart once the knee is
posed), the ankle centre and the posterior condyles are then found on the posed bones
(:func:`.truth.joint_landmarks`, the definitions of :mod:`model.measure.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.labels import Bone
from model.phantom.subjects.shapes import (
    HELD_OUT_SUBJECTS,
    LLP26_SUBJECTS,
    Mesh,
    femoral_head,
    fit_sphere,
    foot,
    llp26,
)
from model.phantom.subjects.truth import joint_landmarks

SIDES = ("left", "right")
LONG_BONES = ("femur", "tibia", "fibula")
FOOT_LABELS = {"talus": Bone.TALUS, "calcaneus": Bone.CALCANEUS}


@dataclass
class BonePart:
    """One bone of the skeleton: its surface and how the phantom paints it."""

    name: str  # e.g. "femur_left", "sacrum", "navicular_right"
    mesh: Mesh
    label: int  # a Bone value, or 0 for bones that are not ours (sacrum, patella, foot)
    kind: str  # "long" (shaft with marrow), "flat" (hip bone, sacrum) or "short"
    axis: tuple[np.ndarray, np.ndarray] | None = None  # long bones: proximal and distal ends


@dataclass
class Skeleton:
    parts: list[BonePart]
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)
    geometry: dict = field(default_factory=dict)

    @property
    def lo(self) -> np.ndarray:
        return np.min([p.mesh.lo for p in self.parts], axis=0)

    @property
    def hi(self) -> np.ndarray:
        return np.max([p.mesh.hi for p in self.parts], axis=0)


def training_subjects() -> list[int]:
    return [s for s in range(LLP26_SUBJECTS) if s not in HELD_OUT_SUBJECTS]


def _rx(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _midline(bones: dict[str, Mesh]) -> float:
    return float(
        (bones["hip_left"].vertices[:, 0].mean() + bones["hip_right"].vertices[:, 0].mean()) / 2
    )


def _acetabulum(hip: Mesh, guess: np.ndarray) -> np.ndarray:
    """Centre of the acetabular cup near ``guess``: a sphere through the hip bone's vertices
    within 30 mm of it, refitted on the shell of that sphere."""
    v = hip.vertices
    centre = guess
    for radius_limit in (30.0, 30.0, 30.0):
        near = np.linalg.norm(v - centre, axis=1) < radius_limit
        centre, radius = fit_sphere(v[near])
        shell = np.abs(np.linalg.norm(v - centre, axis=1) - radius) < 4.0
        if shell.sum() > 20:
            centre, _ = fit_sphere(v[shell])
    return centre


@dataclass
class LegPose:
    hip_flexion_deg: float
    hip_abduction_deg: float
    hip_rotation_deg: float
    knee_flexion_deg: float
    knee_varus_deg: float
    ankle_flexion_deg: float
    foot_yaw_deg: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> LegPose:
        """Poses of a patient lying on a CT table: mostly straight, sometimes flexed."""
        bent = rng.random() < 0.3
        return cls(
            hip_flexion_deg=float(rng.uniform(-5, 30 if bent else 10)),
            hip_abduction_deg=float(rng.uniform(-6, 10)),
            hip_rotation_deg=float(rng.uniform(-20, 20)),
            knee_flexion_deg=float(rng.uniform(0, 45 if bent else 12)),
            knee_varus_deg=float(rng.uniform(-6, 6)),
            ankle_flexion_deg=float(rng.uniform(-20, 25)),
            foot_yaw_deg=float(rng.uniform(-12, 12)),
        )


def build_skeleton(
    rng: np.random.Generator,
    subject: int | None = None,
    feet: tuple[str, str] | None = None,
    poses: tuple[LegPose, LegPose] | None = None,
    scale: float | None = None,
) -> Skeleton:
    """A posed skeleton. ``subject`` given: that LLP26 subject's pelvis and both legs (the right
    mirrored); None: a training subject's or new mode scores, each leg drawn on its own."""
    model = llp26()
    if subject is not None:
        scores = [model.scores_of(subject)] * 3
        source: dict[str, object] = {"subject": int(subject)}
    else:
        scores = [_draw_scores(rng, model) for _ in range(3)]
        source = {"subject": None, "scores_sd": [list(np.round(s / model.sd, 2)) for s in scores]}
    pelvis = model.bones(scores[0])
    midline = _midline(pelvis)
    head_left, _ = femoral_head(pelvis["femur"], pelvis["hip_left"])
    # The head sits off the cup's fitted centre by a little; the right cup gets the same offset.
    cup_left = _acetabulum(pelvis["hip_left"], head_left)
    mirror_guess = head_left * np.array([-1, 1, 1]) + np.array([2 * midline, 0, 0])
    cup_right = _acetabulum(pelvis["hip_right"], mirror_guess)
    head_right = cup_right + (head_left - cup_left) * np.array([-1, 1, 1])
    parts = [
        BonePart("sacrum", pelvis["sacrum"], 0, "flat"),
        BonePart("hip_bone_left", pelvis["hip_left"], Bone.HIP_BONE, "flat"),
        BonePart("hip_bone_right", pelvis["hip_right"], Bone.HIP_BONE, "flat"),
    ]
    landmarks: dict[str, np.ndarray] = {}
    if not feet:
        left_foot, right_foot = (str(rng.choice(["VHM", "VHF"])) for _ in SIDES)
        feet = (left_foot, right_foot)
    poses = poses or (LegPose.draw(rng), LegPose.draw(rng))
    pelvis_centre = np.array([midline, *pelvis["sacrum"].vertices[:, 1:].mean(axis=0)])
    legs = []
    for side, leg_scores, foot_subject, head in zip(
        SIDES, scores[1:], feet, (head_left, head_right), strict=True
    ):
        leg = model.bones(leg_scores)
        leg_head, head_radius = femoral_head(leg["femur"], leg["hip_left"])
        leg_parts = _seated({name: leg[name] for name in ("femur", "patella", "tibia", "fibula")})
        if side == "right":
            plane = _midline(leg)
            leg_parts = {name: mesh.mirrored(plane) for name, mesh in leg_parts.items()}
            leg_head = leg_head * np.array([-1, 1, 1]) + np.array([2 * plane, 0, 0])
        shift = head - leg_head
        leg_parts = {n: m.transformed(np.eye(3), np.zeros(3), shift) for n, m in leg_parts.items()}
        bones_of_foot = _placed_foot(foot_subject, side, leg_parts, rng)
        lm = {
            "hip": head,
            "knee": _knee_centre(leg_parts),
            "ankle": _talar_dome(bones_of_foot["talus"]),
        }
        landmarks[f"femoral_head_radius_{side}"] = np.array([head_radius])
        legs.append((side, leg_parts, bones_of_foot, lm))
    # LLP26's frame leans the legs back (the ankles ~140 mm posterior of the hips); a patient
    # lies with hip-to-ankle axes along the table, give or take a pelvic tilt.
    axis = np.mean([lm["hip"] - lm["ankle"] for _, _, _, lm in legs], axis=0)
    tilt = np.arctan2(axis[1], axis[2]) + np.radians(rng.uniform(-5, 5))
    align = _rx(tilt)
    parts = [
        BonePart(p.name, p.mesh.transformed(align, pelvis_centre, np.zeros(3)), p.label, p.kind)
        for p in parts
    ]
    for (side, leg_parts, bones_of_foot, lm), pose in zip(legs, poses, strict=True):
        move = lambda m: m.transformed(align, pelvis_centre, np.zeros(3))  # noqa: E731
        leg_parts = {n: move(m) for n, m in leg_parts.items()}
        bones_of_foot = {n: move(m) for n, m in bones_of_foot.items()}
        lm = {k: (p - pelvis_centre) @ align.T + pelvis_centre for k, p in lm.items()}
        leg_parts, bones_of_foot, lm = _pose_leg(leg_parts, bones_of_foot, lm, pose, side)
        for name in ("femur", "tibia", "fibula"):
            mesh = leg_parts[name]
            parts.append(BonePart(f"{name}_{side}", mesh, Bone[name.upper()], "long", _ends(mesh)))
        parts.append(BonePart(f"patella_{side}", leg_parts["patella"], 0, "short"))
        for name, mesh in bones_of_foot.items():
            parts.append(BonePart(f"{name}_{side}", mesh, FOOT_LABELS.get(name, 0), "short"))
        for key, point in lm.items():
            landmarks[f"{key}_{side}"] = point
    factor = float(scale if scale is not None else rng.uniform(0.92, 1.08))
    for part in parts:
        part.mesh = part.mesh.scaled(factor, pelvis_centre)
        if part.axis is not None:
            part.axis = tuple((p - pelvis_centre) * factor + pelvis_centre for p in part.axis)
    for key, point in landmarks.items():
        landmarks[key] = (
            point * factor if "radius" in key else (point - pelvis_centre) * factor + pelvis_centre
        )
    # Knee and ankle centres on the posed bones, as the measurement defines them (no draws).
    for side in SIDES:
        landmarks.update(joint_landmarks(parts, landmarks[f"hip_{side}"], side))
    geometry = {
        "shape_source": source,
        "scale": factor,
        "feet": list(feet),
        "poses": {side: vars(pose) for side, pose in zip(SIDES, poses, strict=True)},
    }
    return Skeleton(parts, landmarks, geometry)


def _draw_scores(rng: np.random.Generator, model) -> np.ndarray:
    """A training subject's scores (40 %) or new ones within +-2.5 SD (60 %)."""
    if rng.random() < 0.4:
        return model.scores_of(int(rng.choice(training_subjects())))
    return model.draw_scores(rng)


def _ends(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Proximal and distal ends of a long bone along its principal axis."""
    v = mesh.vertices
    centre = v.mean(axis=0)
    _, _, vt = np.linalg.svd(v - centre, full_matrices=False)
    axis = vt[0] if vt[0][2] > 0 else -vt[0]
    t = (v - centre) @ axis
    return centre + axis * t.max(), centre + axis * t.min()


# Between the femoral condyles and the tibial plateaus, bone to bone: cartilage on both sides.
KNEE_JOINT_SPACE_MM = 4.5


def _seated(leg: dict[str, Mesh]) -> dict[str, Mesh]:
    """The leg with its tibia and fibula moved along z so that the femoral condyles rest on the
    tibial plateaus ``KNEE_JOINT_SPACE_MM`` apart.

    LLP26 aligned each subject's bones rigidly, one bone at a time, so its knees are not
    articulated: across the subjects the condyles sit from 11 mm above the tibia's top to 37 mm
    below it, deep inside the tibia. The gap is measured under each condyle: over the plateau's
    vertices 12-35 mm either side of the tibia's middle (not the intercondylar eminence, which
    rises into the notch that the femur's mesh closes), to the lowest femur vertex above each.
    """
    femur, tibia = leg["femur"].vertices, leg["tibia"].vertices
    top = tibia[tibia[:, 2] > tibia[:, 2].max() - 20.0]
    middle = float(np.median(top[:, 0]))
    plateau = top[(np.abs(top[:, 0] - middle) > 12.0) & (np.abs(top[:, 0] - middle) < 35.0)]
    low_femur = femur[femur[:, 2] < tibia[:, 2].max() + 60.0]
    across = np.linalg.norm(plateau[:, None, :2] - low_femur[None, :, :2], axis=2)
    above = np.where(across < 4.0, low_femur[None, :, 2], np.inf).min(axis=1)
    gaps = above - plateau[:, 2]
    gaps = gaps[np.isfinite(gaps)]
    if len(gaps) == 0:
        return leg
    shift = np.array([0.0, 0.0, float(gaps.min()) - KNEE_JOINT_SPACE_MM])
    moved = {
        name: leg[name].transformed(np.eye(3), np.zeros(3), shift) for name in ("tibia", "fibula")
    }
    return {**leg, **moved}


def _knee_centre(leg: dict[str, Mesh]) -> np.ndarray:
    """Midway between the femur's lowest point and the tibial plateau, over the plateau."""
    tibia = leg["tibia"].vertices
    top = tibia[tibia[:, 2] > tibia[:, 2].max() - 12.0]
    femur_low = leg["femur"].vertices[:, 2].min()
    return np.array([*top[:, :2].mean(axis=0), (femur_low + top[:, 2].max()) / 2])


def _talar_dome(talus: Mesh) -> np.ndarray:
    v = talus.vertices
    top = v[v[:, 2] > v[:, 2].max() - 4.0]
    return np.array([*top[:, :2].mean(axis=0), v[:, 2].max()])


def _placed_foot(
    subject: str, side: str, leg: dict[str, Mesh], rng: np.random.Generator
) -> dict[str, Mesh]:
    """The foot's bones moved under the tibia: the dome between the malleoli, 2 mm below the
    plafond, scaled with the tibia's length."""
    bones = foot(subject, side)
    tibia, fibula = leg["tibia"].vertices, leg["fibula"].vertices
    medial_tip = tibia[np.argmin(tibia[:, 2])]
    lateral_tip = fibula[np.argmin(fibula[:, 2])]
    target_xy = (medial_tip[:2] + lateral_tip[:2]) / 2
    length = tibia[:, 2].max() - tibia[:, 2].min()
    factor = float(np.clip(length / 365.0, 0.85, 1.15) * rng.uniform(0.96, 1.04))
    dome = _talar_dome(bones["talus"])
    yaw = _rz(np.radians(rng.uniform(-8, 8)))
    bones = {
        n: m.scaled(factor, dome).transformed(yaw, dome, np.zeros(3)) for n, m in bones.items()
    }
    # Start 30 mm below the lowest tibia point, then lift until the dome is 2 mm from the tibia.
    talus = bones["talus"].vertices
    start = np.array([*target_xy, tibia[:, 2].min() - 30.0]) - dome
    talus = talus + start
    width = talus[:, :2].max(axis=0) - talus[:, :2].min(axis=0)
    centre_xy = talus[:, :2].mean(axis=0)
    dome_points = talus[
        (talus[:, 2] > talus[:, 2].max() - 15.0)
        & np.all(np.abs(talus[:, :2] - centre_xy) < 0.3 * width, axis=1)
    ]
    distal = tibia[tibia[:, 2] < tibia[:, 2].min() + 40.0]
    gaps = distal[None, :, 2] - dome_points[:, None, 2]
    xy = np.linalg.norm(distal[None, :, :2] - dome_points[:, None, :2], axis=2)
    gap = float(gaps[xy < 3.0].min()) if np.any(xy < 3.0) else 30.0
    shift = start + np.array([0.0, 0.0, gap - float(rng.uniform(2.5, 4.0))])
    return {n: m.transformed(np.eye(3), np.zeros(3), shift) for n, m in bones.items()}


def _pose_leg(
    leg: dict[str, Mesh],
    foot_bones: dict[str, Mesh],
    landmarks: dict[str, np.ndarray],
    pose: LegPose,
    side: str,
) -> tuple[dict[str, Mesh], dict[str, Mesh], dict[str, np.ndarray]]:
    lateral = 1.0 if side == "left" else -1.0
    rad = np.radians
    ankle_r = _rz(rad(pose.foot_yaw_deg) * lateral) @ _rx(rad(pose.ankle_flexion_deg))
    foot_bones = {
        n: m.transformed(ankle_r, landmarks["ankle"], np.zeros(3)) for n, m in foot_bones.items()
    }
    # Knee: the shank swings posterior (+y) in flexion; varus moves the ankle medially.
    knee_r = _ry(rad(pose.knee_varus_deg) * lateral) @ _rx(rad(pose.knee_flexion_deg))
    # Flexion turns about the femoral condyles' centres, ~20 mm above the joint line.
    centre = landmarks["knee"] + np.array([0.0, 0.0, 20.0])
    for name in ("tibia", "fibula"):
        leg[name] = leg[name].transformed(knee_r, centre, np.zeros(3))
    # The patella rides half way with the shank.
    leg["patella"] = leg["patella"].transformed(
        _rx(rad(pose.knee_flexion_deg) / 2), centre, np.zeros(3)
    )
    foot_bones = {n: m.transformed(knee_r, centre, np.zeros(3)) for n, m in foot_bones.items()}
    landmarks["ankle"] = (landmarks["ankle"] - centre) @ knee_r.T + centre
    # Hip: flexion brings the knee anterior (-y), abduction lateral, rotation about the vertical.
    hip_r = (
        _rz(rad(pose.hip_rotation_deg) * lateral)
        @ _ry(-rad(pose.hip_abduction_deg) * lateral)
        @ _rx(-rad(pose.hip_flexion_deg))
    )
    centre = landmarks["hip"]
    leg = {n: m.transformed(hip_r, centre, np.zeros(3)) for n, m in leg.items()}
    foot_bones = {n: m.transformed(hip_r, centre, np.zeros(3)) for n, m in foot_bones.items()}
    for key in ("knee", "ankle"):
        landmarks[key] = (landmarks[key] - centre) @ hip_r.T + centre
    return leg, foot_bones, landmarks
