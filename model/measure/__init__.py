"""Orthopaedic measurements from a sided label map: pure geometry, no DICOM (issue 19).

:func:`measure_leg_alignment` gives each leg's mechanical axes and hip-knee-ankle angle
(:mod:`.alignment`), :func:`measure_femoral_angles` each femur's neck and shaft axes,
inclination and version (:mod:`.femur`), :func:`measure_hip_parameters` each hip's acetabular
version, lateral centre-edge angle, coverage and alpha angle in the pelvic frame of the
anterior pelvic plane (:mod:`.hip`, :mod:`.acetabulum`, :mod:`.pelvis`), as the frozen
records of :mod:`.results`. :func:`find_implants` says which of those sites carry a metal
implant (:mod:`.implants`); given to the three, what depends on such a site is not measurable.
docs/measurements.md defines the landmarks and angles.
"""

from model.measure.alignment import measure_leg, measure_leg_alignment
from model.measure.femur import measure_femoral_angles
from model.measure.hip import measure_hip_parameters
from model.measure.implants import ImplantFinding, Site, find_implants
from model.measure.results import (
    FemoralAngles,
    HipParameters,
    Landmark,
    LegAlignment,
    Measurement,
)

__all__ = [
    "FemoralAngles",
    "HipParameters",
    "ImplantFinding",
    "Landmark",
    "LegAlignment",
    "Measurement",
    "Site",
    "find_implants",
    "measure_femoral_angles",
    "measure_hip_parameters",
    "measure_leg",
    "measure_leg_alignment",
]
