"""The hip parameters of a sided label map: the pelvic frame of the anterior pelvic plane
(:mod:`.pelvis`), and per hip the acetabular version, lateral centre-edge angle, coverage and
alpha angle (:mod:`.acetabulum`), on the femoral heads and necks that :mod:`.alignment` and
:mod:`.femur` found. What the field of view cuts, the map lacks or a metal implant occupies
(:mod:`.implants`) is "not measurable" with the reason. docs/measurements.md defines each
measurement.
"""

from __future__ import annotations

import numpy as np

from model.labels import Bone, Side
from model.measure.acetabulum import CUP_RADIUS_RANGE, LabelReader, hip_parameters
from model.measure.alignment import CUT_MARGIN_MM, edges, measure_leg_alignment
from model.measure.bones import BoneSurface, bone_surfaces, largest_pieces
from model.measure.femur import measure_femoral_angles
from model.measure.implants import ImplantFinding, Site
from model.measure.pelvis import PelvicFrame, anterior_pelvic_plane, landmark_regions
from model.measure.results import FemoralAngles, HipParameters, Landmark, LegAlignment, Measurement
from model.volume_io import Volume

# A landmark of the pelvic frame is not in view when the field of view cuts the hip bone where
# it lies within this depth of the landmark (along the frame's anterior): the bone cut away
# may have held a more anterior point.
LANDMARK_CUT_DEPTH_MM = 10.0
NAMES = {
    "acetabular_version": "acetabular version",
    "lateral_centre_edge": "lateral centre-edge angle",
    "coverage": "acetabular coverage",
    "alpha": "alpha angle",
}


def measure_hip_parameters(
    sided: Volume,
    legs: dict[Side, LegAlignment] | None = None,
    femoral: dict[Side, FemoralAngles] | None = None,
    implants: ImplantFinding | None = None,
) -> dict[Side, HipParameters]:
    """Each leg's hip parameters (the legs of ``legs``, `measure_leg_alignment`'s, and the
    neck axes of ``femoral``, `measure_femoral_angles`'s; measured here when not given).
    ``implants``: the sites with metal (`model.measure.implants.find_implants`); a femoral
    head's leaves the hip without a head (so none of its parameters; the metal stands in for
    the head to place the pelvic frame's landmarks), an acetabulum's without a cup."""
    implants = ImplantFinding() if implants is None else implants
    legs = measure_leg_alignment(sided, implants) if legs is None else legs
    femoral = measure_femoral_angles(sided, legs, implants) if femoral is None else femoral
    hips = {
        side: surface[Bone.HIP_BONE]
        for side in legs
        if Bone.HIP_BONE in (surface := bone_surfaces(sided, side, (Bone.HIP_BONE,)))
    }
    heads = {
        side: np.asarray(centre)
        for side, leg in legs.items()
        if (centre := leg.landmark("femoral_head_centre")) is not None
    }
    # A head replaced by metal: the metal stands in to place the frame's landmark regions.
    located = {side: metal for side in legs if (metal := implants.hip_metal(side)) is not None}
    frame, frame_why = pelvic_frame(hips, {**located, **heads})
    read = LabelReader(largest_pieces(sided, (Bone.HIP_BONE, Bone.FEMUR)))
    out = {}
    for side, leg in legs.items():
        angles = femoral.get(side)
        cup_metal = implants.reason(side, Site.ACETABULUM)
        out[side] = _hip(read, side, leg, angles, hips.get(side), frame, frame_why, cup_metal)
    return out


def pelvic_frame(
    hips: dict[Side, BoneSurface], heads: dict[Side, np.ndarray]
) -> tuple[PelvicFrame | None, str]:
    """The pelvic frame on the hip bones whose ASIS and pubic tubercle are in view (both, or
    one), or None and why not."""
    sides = [s for s in (Side.RIGHT, Side.LEFT) if s in hips and s in heads]
    reasons = [f"no {s.name.lower()} hip bone" for s in Side if s not in hips]
    reasons += [f"no {s.name.lower()} femoral head" for s in Side if s in hips and s not in heads]
    while sides:
        frame = anterior_pelvic_plane(
            {s: hips[s].points for s in sides}, {s: heads[s] for s in sides}
        )
        cut = {}
        for side in sides:
            hip = hips[side]
            depth = hip.points @ frame.anterior
            regions = landmark_regions(hip.points, heads[side], side, frame.left, frame.superior)
            for name, point in frame.landmarks[side].items():
                # Bone the field of view cuts this close to the plane may hide the landmark.
                near = regions[name] & (depth > point @ frame.anterior - LANDMARK_CUT_DEPTH_MM)
                if faces := hip.cut_faces(near):
                    cut[side] = f"{side.name.lower()} {_words(name)} not in view: cut by the " + (
                        edges(faces)
                    )
        if not cut:
            return frame, ""
        reasons += cut.values()
        sides = [s for s in sides if s not in cut]
    return None, "anterior pelvic plane not found: " + ("; ".join(reasons) or "no hip bone")


def _words(name: str) -> str:
    return "ASIS" if name == "asis" else name.replace("_", " ")


def _hip(
    read: LabelReader,
    side: Side,
    leg: LegAlignment,
    angles: FemoralAngles | None,
    hip: BoneSurface | None,
    frame: PelvicFrame | None,
    frame_why: str,
    cup_metal: str | None = None,
) -> HipParameters:
    centre, radius = leg.landmark("femoral_head_centre"), leg.femoral_head_radius.value
    if centre is None or radius is None:
        reason = str(leg.femoral_head_radius.reason)
        return _record(side, dict.fromkeys(NAMES), dict.fromkeys(NAMES, reason), {}, None, None)
    head = (np.asarray(centre), float(radius))
    why = dict.fromkeys(NAMES, "")
    neck = None if angles is None or angles.neck_axis is None else np.asarray(angles.neck_axis)
    if angles is not None and "femoral neck not in view" in str(angles.inclination.reason):
        neck = None
        why["alpha"] = str(angles.inclination.reason).split("; ")[0]
    elif neck is None:
        why["alpha"] = "femoral neck not found"
    if cup_metal:
        cup_why = cup_metal  # the cup is not looked for
    elif hip is None:
        cup_why = "no hip bone"
    else:
        cup_why = ""
        reach = CUP_RADIUS_RANGE[1] * head[1] + CUT_MARGIN_MM  # the largest cup's
        near = np.linalg.norm(hip.points - head[0], axis=1) < reach
        if faces := hip.cut_faces(near):
            cup_why = f"acetabulum not in view: cut by the {edges(faces)}"
    found = hip_parameters(
        read, side, np.empty((0, 3)) if cup_why or hip is None else hip.points, head, neck, frame
    )
    if not cup_why and found.cup_centre is None:
        cup_why = "acetabulum not found: no cup faces the femoral head"
    for name in ("acetabular_version", "lateral_centre_edge", "coverage"):
        why[name] = cup_why
    if frame is None:
        for name in ("acetabular_version", "lateral_centre_edge"):
            why[name] = why[name] or frame_why
    values = {
        "acetabular_version": found.version,
        "lateral_centre_edge": found.lce,
        "coverage": found.coverage,
        "alpha": found.alpha,
    }
    for name, value in values.items():
        if value is None and not why[name]:
            why[name] = f"{NAMES[name]} not found"
    points: dict[str, np.ndarray] = {}
    if frame is not None and side in frame.landmarks:
        points.update(frame.landmarks[side])
    if found.cup_centre is not None:
        points["acetabular_centre"] = found.cup_centre
    if found.lateral_edge is not None:
        points["acetabular_lateral_edge"] = found.lateral_edge
    described = frame.description if frame is not None else None
    record = _record(side, values, why, points, found.axis, described)
    rim = (
        () if found.rim is None else tuple((float(x), float(y), float(z)) for x, y, z in found.rim)
    )
    return HipParameters(**{**vars(record), "alpha_clock": found.alpha_clock, "rim_mm": rim})


def _record(
    side: Side,
    values: dict[str, float | None],
    why: dict[str, str],
    points: dict[str, np.ndarray],
    axis: np.ndarray | None,
    frame: str | None,
) -> HipParameters:
    """The record: each measurement its value, or not measurable for its reason in ``why``."""
    measurements = {
        name: Measurement(label, "%" if name == "coverage" else "deg", reason=why[name])
        if why[name]
        else Measurement(label, "%" if name == "coverage" else "deg", value=values[name])
        for name, label in NAMES.items()
    }
    return HipParameters(
        side=side,
        landmarks=tuple(
            Landmark(name, (float(p[0]), float(p[1]), float(p[2]))) for name, p in points.items()
        ),
        acetabular_axis=None if axis is None else (float(axis[0]), float(axis[1]), float(axis[2])),
        pelvic_frame=frame,
        acetabular_version=measurements["acetabular_version"],
        lateral_centre_edge=measurements["lateral_centre_edge"],
        coverage=measurements["coverage"],
        alpha=measurements["alpha"],
        alpha_clock=None,
    )
