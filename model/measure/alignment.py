"""The mechanical axes of each leg and the hip-knee-ankle angle (HKA) from a sided label map.

:func:`measure_leg_alignment` finds, per leg, the femoral head centre and radius, the femoral
and tibial knee centres, the ankle centre and the posterior condyles
(:mod:`model.measure.geometry`) on the surfaces of the bones (:mod:`model.measure.bones`), and
measures the HKA in 3-D and in the leg's coronal plane (varus negative on both sides). What is
cut by the field of view, missing or at a site with a metal implant (:mod:`.implants`) is
reported as not measurable, with the reason, rather than measured wrong.
docs/measurements.md defines each landmark and angle.
"""

from __future__ import annotations

import numpy as np

from model.labels import Bone, Side
from model.measure.bones import BoneSurface, bone_surfaces
from model.measure.geometry import (
    FEMORAL_CONDYLE_SLAB_MM,
    MALLEOLUS_SLAB_MM,
    TALAR_DOME_SLAB_MM,
    TIBIAL_PLATEAU_SKIP_MM,
    TIBIAL_PLATEAU_SLAB_MM,
    end_slab_centre,
    femoral_head_sphere,
    femoral_knee_centre,
    hka_angles,
    posterior_condyles,
    principal_axis,
    tibial_centres,
    unit,
)
from model.measure.implants import ImplantFinding, Site
from model.measure.results import Landmark, LegAlignment, Measurement
from model.volume_io import Volume

# Femoral heads of adults are 18-30 mm in radius; outside this range no head was found.
HEAD_RADIUS_RANGE_MM = (12.0, 40.0)
# A joint's end slab counts as cut when the field of view's edge lies this much past it.
CUT_MARGIN_MM = 5.0
UP = np.array([0.0, 0.0, 1.0])  # LPS: +z is superior
LEG_BONES = (Bone.FEMUR, Bone.HIP_BONE, Bone.TIBIA, Bone.FIBULA, Bone.TALUS)
# The landmarks a metal implant at a site (other than the femoral head's) leaves unreported.
SITE_LANDMARKS = {
    Site.KNEE: (
        "femoral_knee_centre",
        "tibial_knee_centre",
        "posterior_condyle_medial",
        "posterior_condyle_lateral",
    ),
    Site.ANKLE: ("ankle_centre",),
}


def measure_leg_alignment(
    sided: Volume, implants: ImplantFinding | None = None
) -> dict[Side, LegAlignment]:
    """Each leg with a femur or a tibia in the sided label map (``model.labels.sided_label``
    values): its landmarks and HKA, or the reasons they are not measurable; ``implants``
    (`model.measure.implants.find_implants`) the sites with metal, whose landmarks are not."""
    present = set(np.unique(sided.array).tolist())
    out = {}
    for side in Side:
        labels = {int(bone) + (len(Bone) if side is Side.LEFT else 0) for bone in Bone}
        if present & labels:
            out[side] = measure_leg(sided, side, implants)
    return out


def measure_leg(sided: Volume, side: Side, implants: ImplantFinding | None = None) -> LegAlignment:
    """One leg's landmarks and HKA from the sided label map; the landmarks at a site with
    metal (``implants``) left out, and what needs them not measurable for that reason."""
    implants = ImplantFinding() if implants is None else implants
    bones = bone_surfaces(sided, side, LEG_BONES)
    landmarks: dict[str, np.ndarray] = {}
    reasons: list[str] = []
    femur = bones.get(Bone.FEMUR)
    head = radius = None
    if femur is None:
        reasons.append("no femur")
        radius_result = Measurement("femoral head radius", "mm", reason="no femur")
    else:
        head_metal = implants.reason(side, Site.FEMORAL_HEAD)
        fitted = head_metal or _femoral_head(femur, bones.get(Bone.HIP_BONE))
        if isinstance(fitted, str):
            reasons.append(fitted)
            radius_result = Measurement("femoral head radius", "mm", reason=fitted)
        else:
            head, radius = fitted
            landmarks["femoral_head_centre"] = head
            radius_result = Measurement("femoral head radius", "mm", value=radius)
        # Without a head, the shaft's proximal end stands in for it to orient the condyles.
        reference = head if head is not None else _proximal_end(femur)
        knee_f = femoral_knee_centre(femur.points, reference)
        cut = femur.cut_faces(_near_end(femur.points, knee_f - reference, FEMORAL_CONDYLE_SLAB_MM))
        if cut:
            reasons.append(f"distal femur not in view: cut by the {edges(cut)}")
        else:
            landmarks["femoral_knee_centre"] = knee_f
            if head is not None:
                medial, lateral = posterior_condyles(femur.points, head, knee_f)
                landmarks["posterior_condyle_medial"] = medial
                landmarks["posterior_condyle_lateral"] = lateral
    ankle_from = _tibial_landmarks(bones, landmarks, reasons)
    for site, names in SITE_LANDMARKS.items():
        if metal := implants.reason(side, site):
            reasons.append(metal)
            for name in names:
                landmarks.pop(name, None)
    if "ankle_centre" not in landmarks:
        ankle_from = None
    keys = ("femoral_head_centre", "femoral_knee_centre", "tibial_knee_centre", "ankle_centre")
    if all(k in landmarks for k in (*keys, "posterior_condyle_medial")):
        angle_3d, coronal = hka_angles(
            landmarks["femoral_head_centre"],
            landmarks["femoral_knee_centre"],
            landmarks["tibial_knee_centre"],
            landmarks["ankle_centre"],
            landmarks["posterior_condyle_medial"],
            landmarks["posterior_condyle_lateral"],
        )
        hka_3d = Measurement("HKA (3-D)", "deg", value=angle_3d)
        hka_coronal = Measurement("HKA (coronal)", "deg", value=coronal)
    else:
        why = "; ".join(dict.fromkeys(reasons)) or "landmarks missing"
        hka_3d = Measurement("HKA (3-D)", "deg", reason=why)
        hka_coronal = Measurement("HKA (coronal)", "deg", reason=why)
    return LegAlignment(
        side=side,
        landmarks=tuple(
            Landmark(name, (float(p[0]), float(p[1]), float(p[2]))) for name, p in landmarks.items()
        ),
        femoral_head_radius=radius_result,
        hka_3d=hka_3d,
        hka_coronal=hka_coronal,
        ankle_centre_from=ankle_from,
    )


def _femoral_head(femur: BoneSurface, hip: BoneSurface | None) -> tuple[np.ndarray, float] | str:
    """The head's centre and radius, or why there is none: a sphere first fitted to the femur's
    surface facing the acetabulum (or, without a hip bone, to the femur's top), then refitted
    on the surface near it (`refine_sphere`)."""
    points = femur.points
    top_cut = femur.cut_faces(_near_end(points, _proximal_end(femur) - points.mean(axis=0), 10.0))
    not_in_view = (
        f"femoral head not in view: the femur touches the {edges(top_cut)}" if top_cut else None
    )
    sphere = femoral_head_sphere(points, None if hip is None else hip.points)
    if sphere is None:
        return not_in_view or "femoral head not found: no femur surface faces the acetabulum"
    centre, radius, used = sphere
    low, high = HEAD_RADIUS_RANGE_MM
    if not low <= radius <= high or used < 100:
        return not_in_view or f"femoral head not found: no sphere of {low:.0f}-{high:.0f} mm radius"
    cut = femur.cut_faces(np.linalg.norm(points - centre, axis=1) < radius + CUT_MARGIN_MM)
    if cut:
        return f"femoral head not in view: cut by the {edges(cut)}"
    return centre, radius


def _tibial_landmarks(
    bones: dict[Bone, BoneSurface], landmarks: dict[str, np.ndarray], reasons: list[str]
) -> str | None:
    """Adds the tibial knee centre and the ankle centre to ``landmarks`` (or why not to
    ``reasons``); returns what the ankle centre was taken from."""
    tibia = bones.get(Bone.TIBIA)
    if tibia is None:
        reasons.append("no tibia")
        return None
    hint = landmarks.get("femoral_knee_centre", tibia.points.mean(axis=0) + UP) - tibia.points.mean(
        axis=0
    )
    talus, fibula = bones.get(Bone.TALUS), bones.get(Bone.FIBULA)
    axis = principal_axis(tibia.points, hint)
    if talus is not None and talus.cut_faces(_near_end(talus.points, axis, TALAR_DOME_SLAB_MM)):
        talus = None
    malleoli_cut = fibula is not None and (
        fibula.cut_faces(_near_end(fibula.points, -axis, MALLEOLUS_SLAB_MM))
        or tibia.cut_faces(_near_end(tibia.points, -axis, MALLEOLUS_SLAB_MM))
    )
    if malleoli_cut:
        fibula = None
    if talus is None and fibula is None:
        reasons.append("ankle centre not found: no talus and no malleoli in view")
        knee = _plateau_only(tibia, axis)
        ankle_from = None
    else:
        knee, ankle, ankle_from = tibial_centres(
            tibia.points,
            None if talus is None else talus.points,
            None if fibula is None else fibula.points,
            hint,
        )
        landmarks["ankle_centre"] = ankle
    cut = tibia.cut_faces(_near_end(tibia.points, axis, TIBIAL_PLATEAU_SLAB_MM))
    if cut:
        reasons.append(f"proximal tibia not in view: cut by the {edges(cut)}")
    else:
        landmarks["tibial_knee_centre"] = knee
    return ankle_from


def _plateau_only(tibia: BoneSurface, axis: np.ndarray) -> np.ndarray:
    return end_slab_centre(tibia.points, axis, TIBIAL_PLATEAU_SLAB_MM, TIBIAL_PLATEAU_SKIP_MM)


def _proximal_end(femur: BoneSurface) -> np.ndarray:
    t = femur.points @ principal_axis(femur.points, UP)
    return femur.points[int(np.argmax(t))]


def _near_end(points: np.ndarray, direction: np.ndarray, depth_mm: float) -> np.ndarray:
    """The points within ``depth_mm`` (plus CUT_MARGIN_MM) of the extreme along ``direction``."""
    t = points @ unit(direction)
    return t > t.max() - depth_mm - CUT_MARGIN_MM


def edges(faces: list[str]) -> str:
    """The edges of the field of view named in ``faces``, in words."""
    return " and ".join(f"{face} edge" for face in faces) + " of the field of view"
