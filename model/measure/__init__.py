"""Orthopaedic measurements from a sided label map: pure geometry, no DICOM (issue 19).

:func:`measure_leg_alignment` gives each leg's mechanical axes and hip-knee-ankle angle
(:mod:`.alignment`), :func:`measure_femoral_angles` each femur's neck and shaft axes,
inclination and version (:mod:`.femur`), as the frozen records of :mod:`.results`.
docs/measurements.md defines the landmarks and angles.
"""

from model.measure.alignment import measure_leg, measure_leg_alignment
from model.measure.femur import measure_femoral_angles
from model.measure.results import FemoralAngles, Landmark, LegAlignment, Measurement

__all__ = [
    "FemoralAngles",
    "Landmark",
    "LegAlignment",
    "Measurement",
    "measure_femoral_angles",
    "measure_leg",
    "measure_leg_alignment",
]
