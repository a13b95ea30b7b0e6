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
