"""Orthopaedic measurements from a sided label map: pure geometry, no DICOM (issue 19).

:func:`measure_leg_alignment` gives each leg's mechanical axes and hip-knee-ankle angle
(:mod:`.alignment`), as the frozen records of :mod:`.results`. docs/measurements.md defines
the landmarks and angles.
"""

from model.measure.alignment import measure_leg, measure_leg_alignment
from model.measure.results import Landmark, LegAlignment, Measurement

__all__ = ["Landmark", "LegAlignment", "Measurement", "measure_leg", "measure_leg_alignment"]
