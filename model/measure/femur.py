"""The femoral neck axis, the proximal shaft axis, femoral inclination and femoral version.

The geometry (:func:`neck_axis`, :func:`proximal_shaft_axis`, :func:`inclination_deg`,
:func:`version_deg`) works on points filling a femur (mm, LPS: voxel centres, evenly spread
whatever the voxels' shape, where a surface's points crowd on the faces the slices cut), so
the same functions measure a label map and the subject phantom's finely voxelised meshes
(:func:`model.phantom.subjects.truth.true_femoral_angles`). :func:`measure_femoral_angles`
applies them to a sided label map, on the femoral head, knee centre and posterior condyles
that :mod:`model.measure.alignment` found; what is not in view, or at a site with a metal
implant (:mod:`.implants`), is "not measurable" with the reason. docs/measurements.md
defines the axes and angles.
"""

from __future__ import annotations

import numpy as np

from model.labels import Bone, Side
from model.measure.alignment import CUT_MARGIN_MM, edges, measure_leg_alignment
from model.measure.bones import BoneSurface, bone_surfaces, bone_voxels
from model.measure.geometry import AXIS_ROUNDS, POSTERIOR, principal_axis, unit
from model.measure.implants import ImplantFinding, Site
from model.measure.results import FemoralAngles, LegAlignment, Measurement
from model.volume_io import Volume

# The neck: the femur's bone 3-12 mm beyond the head's sphere (past the head-neck junction,
# short of the trochanters); then the slab square to the neck's axis at that depth, within
# NECK_REACH_RADII head radii of the axis.
NECK_SHELL_MM = (3.0, 12.0)
NECK_REACH_RADII = 1.2
# The proximal diaphysis, below the lesser trochanter: 3.5-7 head radii below the head centre
# along the shaft's axis (about 80-170 mm in an adult).
SHAFT_WINDOW_RADII = (3.5, 7.0)


def neck_axis(femur: np.ndarray, head_centre: np.ndarray, head_radius: float) -> np.ndarray | None:
    """The femoral neck axis' direction, from the head centre towards the neck's base: first to
    the centroid of the femur's bone NECK_SHELL_MM beyond the head's sphere (a ring around
    the neck), then, AXIS_ROUNDS times, to the centroid of the bone in the slab square to
    the axis found at the same depth (NECK_SHELL_MM beyond the sphere along the axis) and
    within NECK_REACH_RADII head radii of it: the centre of the neck's cross-sections there.
    None when there is no such surface."""
    shell = neck_shell(femur, head_centre, head_radius)
    if shell.sum() < 30:
        return None
    offsets = femur - head_centre
    axis = unit(offsets[shell].mean(axis=0))
    inner, outer = NECK_SHELL_MM
    for _ in range(AXIS_ROUNDS):
        s = offsets @ axis
        radial = np.linalg.norm(offsets - s[:, None] * axis, axis=1)
        slab = (s > head_radius + inner) & (s < head_radius + outer)
        slab &= radial < NECK_REACH_RADII * head_radius
        if slab.sum() < 30:
            return None
        axis = unit(offsets[slab].mean(axis=0))
    return axis


def neck_shell(femur: np.ndarray, head_centre: np.ndarray, head_radius: float) -> np.ndarray:
    """Which points of ``femur`` lie NECK_SHELL_MM beyond the head's sphere (boolean)."""
    distance = np.linalg.norm(femur - head_centre, axis=1)
    inner, outer = NECK_SHELL_MM
    return (distance > head_radius + inner) & (distance < head_radius + outer)


def shaft_window(
    femur: np.ndarray, head_centre: np.ndarray, head_radius: float, axis: np.ndarray
) -> np.ndarray:
    """Which points of ``femur`` lie SHAFT_WINDOW_RADII head radii below the head centre along
    ``axis`` (pointing up the shaft, towards the head): boolean."""
    t = (femur - head_centre) @ axis
    near, far = SHAFT_WINDOW_RADII
    return (t < -near * head_radius) & (t > -far * head_radius)


def proximal_shaft_axis(
    femur: np.ndarray, head_centre: np.ndarray, head_radius: float
) -> np.ndarray | None:
    """The proximal shaft's axis, pointing towards the head: the principal axis of the femur's
    bone in the `shaft_window` (the diaphysis below the lesser trochanter), the window
    square to the axis found, iterated from the whole femur's principal axis. None when the
    femur does not reach the window's far end."""
    axis = principal_axis(femur, head_centre - femur.mean(axis=0))
    for _ in range(AXIS_ROUNDS + 1):
        t = (femur - head_centre) @ axis
        if t.min() > -SHAFT_WINDOW_RADII[1] * head_radius:
            return None
        axis = principal_axis(femur[shaft_window(femur, head_centre, head_radius, axis)], axis)
    return axis


def inclination_deg(neck: np.ndarray, shaft: np.ndarray) -> float:
    """Femoral inclination (neck-shaft angle), degrees: the angle between the neck axis (to the
    head) and the shaft axis (down the shaft), in 3-D. ``neck`` points from the head to the
    neck's base, ``shaft`` up the shaft: the same angle."""
    return float(np.degrees(np.arccos(np.clip(unit(neck) @ unit(shaft), -1.0, 1.0))))


def version_deg(
    neck: np.ndarray,
    head_centre: np.ndarray,
    knee_centre: np.ndarray,
    medial_condyle: np.ndarray,
    lateral_condyle: np.ndarray,
) -> float:
    """Femoral version, degrees, anteversion positive: the angle between the neck axis and the
    posterior condylar axis, both projected on the plane square to the femoral mechanical axis
    (knee centre to head centre); positive when the neck turns the head anterior of the
    condylar axis' medial direction. Either side alike."""
    up = unit(head_centre - knee_centre)
    across = medial_condyle - lateral_condyle
    medial = unit(across - (across @ up) * up)
    anterior = unit(np.cross(up, medial))
    if anterior @ POSTERIOR > 0:
        anterior = -anterior
    to_head = -unit(neck)
    return float(np.degrees(np.arctan2(to_head @ anterior, to_head @ medial)))


def femoral_angles(
    femur: np.ndarray,
    head_centre: np.ndarray,
    head_radius: float,
    condyles: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray | None, np.ndarray | None, float | None, float | None]:
    """Neck axis, shaft axis, inclination and version (None where not found) of points
    filling a femur; ``condyles``: (knee centre, medial and lateral posterior condyle) or None."""
    neck = neck_axis(femur, head_centre, head_radius)
    shaft = proximal_shaft_axis(femur, head_centre, head_radius)
    inclination = None if neck is None or shaft is None else inclination_deg(neck, shaft)
    version = (
        None if neck is None or condyles is None else version_deg(neck, head_centre, *condyles)
    )
    return neck, shaft, inclination, version


def measure_femoral_angles(
    sided: Volume,
    legs: dict[Side, LegAlignment] | None = None,
    implants: ImplantFinding | None = None,
) -> dict[Side, FemoralAngles]:
    """Each leg's femoral neck and shaft axes, inclination and version from the sided label
    map, on the landmarks of ``legs`` (`measure_leg_alignment`'s, measured here if not given);
    ``implants`` the sites with metal (`model.measure.implants.find_implants`)."""
    legs = measure_leg_alignment(sided, implants) if legs is None else legs
    out = {}
    for side, leg in legs.items():
        femur = bone_surfaces(sided, side, (Bone.FEMUR,)).get(Bone.FEMUR)
        solid = bone_voxels(sided, side, Bone.FEMUR)
        out[side] = femoral_angles_of_leg(femur, solid, leg, implants)
    return out


def femoral_angles_of_leg(
    femur: BoneSurface | None,
    solid: np.ndarray | None,
    leg: LegAlignment,
    implants: ImplantFinding | None = None,
) -> FemoralAngles:
    """One leg's femoral angles from its femur's solid (the axes) and surface (what the field
    of view cut) and its alignment's landmarks (none at a site with metal: a femoral head's
    makes both angles not measurable, a knee's the version)."""
    head = leg.landmark("femoral_head_centre")
    radius = leg.femoral_head_radius.value
    if femur is None or solid is None or head is None or radius is None:
        why = "no femur" if femur is None else str(leg.femoral_head_radius.reason)
        return _not_measurable(leg.side, why, why)
    centre = np.asarray(head)
    points = femur.points
    neck = neck_axis(solid, centre, radius)
    neck_why = None
    if neck is None:
        neck_why = "femoral neck not found: no femur surface beyond the head"
    elif cut := femur.cut_faces(neck_shell(points, centre, radius)):
        neck_why = f"femoral neck not in view: cut by the {edges(cut)}"
    shaft = proximal_shaft_axis(solid, centre, radius)
    shaft_why = None
    if shaft is None:
        t = (points - centre) @ principal_axis(points, centre - points.mean(axis=0))
        cut = femur.cut_faces(t < t.min() + CUT_MARGIN_MM)
        shaft_why = "proximal femoral shaft not in view" + (
            f": cut by the {edges(cut)}" if cut else ""
        )
    elif cut := femur.cut_faces(shaft_window(points, centre, radius, shaft)):
        shaft_why = f"proximal femoral shaft not in view: cut by the {edges(cut)}"
    if neck_why or shaft_why:
        inclination = Measurement(
            "femoral inclination", "deg", reason="; ".join(w for w in (neck_why, shaft_why) if w)
        )
    else:
        assert neck is not None and shaft is not None
        inclination = Measurement("femoral inclination", "deg", value=inclination_deg(neck, shaft))
    knee = leg.landmark("femoral_knee_centre")
    medial = leg.landmark("posterior_condyle_medial")
    lateral = leg.landmark("posterior_condyle_lateral")
    if neck_why:
        version = Measurement("femoral version", "deg", reason=neck_why)
    elif knee is None or medial is None or lateral is None:
        knee_metal = None if implants is None else implants.reason(leg.side, Site.KNEE)
        why = knee_metal or "posterior condyles not in view"
        version = Measurement("femoral version", "deg", reason=why)
    else:
        assert neck is not None
        value = version_deg(neck, centre, np.asarray(knee), np.asarray(medial), np.asarray(lateral))
        version = Measurement("femoral version", "deg", value=value)
    return FemoralAngles(
        side=leg.side,
        neck_axis=None if neck is None else _triple(neck),
        shaft_axis=None if shaft is None else _triple(shaft),
        inclination=inclination,
        version=version,
    )


def _not_measurable(side: Side, inclination: str, version: str) -> FemoralAngles:
    return FemoralAngles(
        side=side,
        neck_axis=None,
        shaft_axis=None,
        inclination=Measurement("femoral inclination", "deg", reason=inclination),
        version=Measurement("femoral version", "deg", reason=version),
    )


def _triple(vector: np.ndarray) -> tuple[float, float, float]:
    return float(vector[0]), float(vector[1]), float(vector[2])
