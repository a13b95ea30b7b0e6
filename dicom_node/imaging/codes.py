"""Coded concepts of the SEG the node writes: the one place that says what each segment is.

A viewer or PACS does not read our label values; it reads codes. Every sided label (1..12, see
`model.labels`) becomes a segment with a category, a property type, a laterality modifier, a
label and a display colour, all defined here so that the SEG writer, its tests and any future
report agree on them.

Codes come from pydicom's code dictionary (DICOM PS3.16) wherever it has them, so their code
meanings are the ones the standard prints:

- Segmented Property Category (CID 7150): SCT 91723000 "Anatomical Structure", the value
  CID 7150 lists today. Older tools (dcmqi templates, TotalSegmentator) write SCT 123037004,
  the mechanical SNOMED mapping of the retired SRT code T-D000A; in SNOMED CT 123037004 is
  "Body structure", the top of the body structure hierarchy, not what CID 7150 names.
- Segmented Property Type (CID 7151, extensible; the bones are in CID 4031 / 7304): "Femur",
  "Tibia", "Fibula", "Talus", "Calcaneus" as pydicom names them.
- Segmented Property Type Modifier (CID 244 Laterality): SCT 24028007 Right, SCT 7771000 Left.
  One code per bone plus a modifier is how DICOM (and TotalSegmentator, and the TG-263 to
  SNOMED mapping) express sided anatomy, rather than pre-coordinated "right femur" concepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.color import CIELabColor
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from model.labels import BONE_NAMES, Bone, Side, sided_label

ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure  # SCT 91723000, CID 7150

# The hip bone (os coxae: ilium, ischium and pubis fused) has no code in DICOM's context groups
# and none in pydicom's dictionary. The candidates, from most to least precise:
#   - SCT 28254004 "Innominate bone structure": exactly the hip bone, but found in only one
#     published mapping (the German MII radiotherapy target ConceptMap) and in no DICOM or
#     pydicom table; it could not be checked against a SNOMED CT release here, and a wrong
#     code in a clinical object is worse than a broader right one.
#   - SCT 118645006 "Bone structure of pelvis" (fully specified name "Structure of innominate
#     bone and/or sacrum and/or coccyx"): in pydicom's dictionary (CID 7304) and the code the
#     TG-263 to SNOMED CT mapping gives Bone_Pelvic_L / Bone_Pelvic_R, i.e. one side of the
#     bony pelvis, which is what a lateralised hip bone segment is. An "and/or" grouper: one
#     innominate bone is a correct instance of it. Chosen.
#   - SCT 22356005 "Ilium" (CID 4031): only one of the three fused bones: too narrow.
#   - SCT 816092008 "Pelvis" (CID 4031) and SCT 29836001 "Hip" (TotalSegmentator's choice):
#     body regions with their soft tissue and joints, not a bone.
# The code meaning is SNOMED's preferred term rather than pydicom's "Pelvis", which would read
# like the region code 816092008.
HIP_BONE = Code("118645006", "SCT", "Bone structure of pelvis")

BONE_CODES: dict[Bone, Code] = {
    Bone.FEMUR: codes.SCT.Femur,  # 71341001
    Bone.HIP_BONE: HIP_BONE,  # 118645006, see above
    Bone.TIBIA: codes.SCT.Tibia,  # 12611008
    Bone.FIBULA: codes.SCT.Fibula,  # 87342007
    Bone.TALUS: codes.SCT.Talus,  # 67453005
    Bone.CALCANEUS: codes.SCT.Calcaneus,  # 80144004
}

LATERALITY_CODES: dict[Side, Code] = {
    Side.RIGHT: codes.SCT.Right,  # 24028007, CID 244
    Side.LEFT: codes.SCT.Left,  # 7771000, CID 244
}

# Display colours (sRGB) of the right side, one hue per bone, far apart so that neighbouring
# bones (femur/hip bone at the hip, femur/tibia/fibula at the knee, tibia/talus/calcaneus at
# the ankle) are told apart at a glance. The left side is the same hue, darker.
BONE_RGB: dict[Bone, tuple[int, int, int]] = {
    Bone.FEMUR: (241, 214, 145),  # bone ivory
    Bone.HIP_BONE: (177, 122, 101),  # brown
    Bone.TIBIA: (111, 184, 210),  # blue
    Bone.FIBULA: (144, 238, 144),  # green
    Bone.TALUS: (220, 110, 140),  # rose
    Bone.CALCANEUS: (230, 160, 60),  # orange
}
LEFT_SHADE = 0.7  # left colour = right colour x this, per channel


@dataclass(frozen=True)
class SegmentDefinition:
    """What one sided label is, in DICOM terms.

    `rgb` is the display colour in sRGB; DICOM stores it as CIELab (`display_color`), which
    highdicom converts with the standard's D65 white point.
    """

    sided_label: int
    bone: Bone
    side: Side
    category: Code
    property_type: Code
    laterality: Code
    rgb: tuple[int, int, int]
    label: str  # Segment Label, e.g. "Right femur"

    @property
    def display_color(self) -> CIELabColor:
        return CIELabColor.from_rgb(*self.rgb)

    @property
    def tracking_id(self) -> str:
        """A stable human-readable identifier across SEGs, e.g. "right-femur"."""
        return self.label.lower().replace(" ", "-")


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    red, green, blue = (round(channel * factor) for channel in rgb)
    return red, green, blue


def _definitions() -> dict[int, SegmentDefinition]:
    definitions = {}
    for side in Side:
        for bone in Bone:
            value = sided_label(bone, side)
            rgb = BONE_RGB[bone] if side is Side.RIGHT else _shade(BONE_RGB[bone], LEFT_SHADE)
            definitions[value] = SegmentDefinition(
                sided_label=value,
                bone=bone,
                side=side,
                category=ANATOMICAL_STRUCTURE,
                property_type=BONE_CODES[bone],
                laterality=LATERALITY_CODES[side],
                rgb=rgb,
                label=f"{side.name.capitalize()} {BONE_NAMES[bone]}",
            )
    return dict(sorted(definitions.items()))


SEGMENTS: dict[int, SegmentDefinition] = _definitions()


# -- The measurement report (SR, `dicom_node.imaging.sr`) --------------------------------------
#
# Standard codes where DICOM, SNOMED CT or LOINC have one (pydicom's dictionary, so the meanings
# are the standard's); the rest coined under the private scheme MEASURE_SCHEME, each listed in
# docs/measurements.md. No code for the hip-knee-ankle angle, the mechanical axis or the knee
# and ankle centres was found in DICOM PS3.16 (pydicom's dictionary), nor one that could be
# checked in a SNOMED CT or LOINC release here: coining is better than a wrong standard code.

MEASURE_SCHEME = "99DCMNODE"
MEASURE_SCHEME_NAME = "dicom-node measurements"
MEASURE_SCHEME_ORGANIZATION = "dicom-node project"


def _coined(value: str, meaning: str) -> Code:
    return Code(value, MEASURE_SCHEME, meaning)


# Measurements (TID 300 concept names).
HKA_3D = _coined("HKA-3D", "Hip-knee-ankle angle, 3-D")
HKA_CORONAL = _coined("HKA-COR", "Hip-knee-ankle angle, coronal")
RADIUS: Code = codes.SCT.Radius  # 131190003, CID 7470 (linear measurements)
# Femoral inclination (neck-shaft angle) and version (anteversion positive): no code in PS3.16
# (pydicom's dictionary) and none that could be checked in a SNOMED CT release here.
FEMORAL_INCLINATION = _coined("FEM-INCL", "Femoral inclination (neck-shaft angle)")
FEMORAL_VERSION = _coined("FEM-VERS", "Femoral version")
FEMUR: Code = codes.SCT.Femur  # 71341001: the finding site of the femoral angles
# The hip parameters (`which` "hip"): acetabular version (anteversion positive), the lateral
# centre-edge angle (Wiberg), acetabular coverage of the femoral head and the alpha angle
# (Nötzli): none in PS3.16 (pydicom's dictionary; DCM 121224 "Acetabular angle" is an
# obstetric ultrasound measurement) nor in a SNOMED CT or LOINC release that could be checked.
ACETABULAR_VERSION = _coined("ACET-VERS", "Acetabular version")
LATERAL_CENTRE_EDGE = _coined("LCE", "Lateral centre-edge angle")
ACETABULAR_COVERAGE = _coined("ACET-COV", "Acetabular coverage of the femoral head")
ALPHA_ANGLE = _coined("ALPHA", "Alpha angle")
ACETABULUM: Code = codes.SCT.Acetabulum  # 37783008: the finding site of the acetabular ones
# TEXT items of the hip: the pelvic frame the angles were taken in, the alpha angle's clock
# position.
PELVIC_FRAME = _coined("PELVIC-FRAME", "Pelvic reference frame")
ALPHA_CLOCK = _coined("ALPHA-CLOCK", "Alpha angle clock position")

# Landmarks (the finding of each TID 1410 point group), by model.measure's landmark name.
LANDMARK_CODES: dict[str, Code] = {
    "femoral_head_centre": codes.DCM.FemurHeadCenterOfRotation,  # 112304, CID 7305
    "femoral_knee_centre": _coined("KNEE-FEM", "Femoral knee centre"),
    "tibial_knee_centre": _coined("KNEE-TIB", "Tibial knee centre"),
    "ankle_centre": _coined("ANKLE-CTR", "Ankle centre"),
    "posterior_condyle_medial": _coined("PCOND-MED", "Medial posterior condyle point"),
    "posterior_condyle_lateral": _coined("PCOND-LAT", "Lateral posterior condyle point"),
    "asis": _coined("ASIS", "Anterior superior iliac spine point"),
    "pubic_tubercle": _coined("PUB-TUB", "Pubic tubercle point"),
    "acetabular_centre": codes.DCM.AcetabularCenterOfRotation,  # 112303, CID 7305
    "acetabular_lateral_edge": _coined("ACET-EDGE", "Lateral edge of the acetabular roof"),
}
# Where each landmark lies (finding site, with the leg's laterality).
LANDMARK_SITES: dict[str, Code] = {
    "femoral_head_centre": codes.SCT.FemoralHead,  # 2812003
    "femoral_knee_centre": codes.SCT.Femur,
    "tibial_knee_centre": codes.SCT.Tibia,
    "ankle_centre": codes.SCT.AnkleJoint,  # 70258002
    "posterior_condyle_medial": codes.SCT.Femur,
    "posterior_condyle_lateral": codes.SCT.Femur,
    "asis": HIP_BONE,
    "pubic_tubercle": HIP_BONE,
    "acetabular_centre": codes.SCT.Acetabulum,
    "acetabular_lateral_edge": codes.SCT.Acetabulum,
}
LOWER_LIMB: Code = codes.SCT.LowerLimb  # 61685007: the finding site of a leg's angles
FEMORAL_HEAD: Code = codes.SCT.FemoralHead  # the finding site of its radius
LEG_ALIGNMENT = _coined("LEG-ALIGN", "Mechanical alignment of the lower limb")  # group finding
# A measurement that could not be made: the qualitative evaluation's value (CID 42), with the
# reason as TEXT under UMLS "Qualitative Evaluations" (TID 1501's free-text evaluation).
MEASUREMENT_FAILURE: Code = codes.DCM.MeasurementFailure  # 114006
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
DEGREE: Code = codes.UCUM.Degree  # deg
MILLIMETRE: Code = codes.UCUM.Millimeter  # mm
PERCENT: Code = codes.UCUM.Percent  # %
