"""What a measurement returns: plain frozen records, a value with its unit or the reason none."""

from __future__ import annotations

from dataclasses import dataclass

from model.labels import Side


@dataclass(frozen=True)
class Landmark:
    """A point in the volume's physical frame (DICOM patient coordinates, LPS, mm)."""

    name: str
    position_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Measurement:
    """A value in ``unit``, or None with the reason it could not be measured."""

    name: str
    unit: str
    value: float | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.reason is None):
            raise ValueError("a measurement has either a value or a reason, not both or neither")

    @property
    def measurable(self) -> bool:
        return self.value is not None

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.name}: not measurable ({self.reason})"
        return f"{self.name}: {self.value:.2f} {self.unit}"


@dataclass(frozen=True)
class LegAlignment:
    """One leg's mechanical axes: the landmarks found (named as in docs/measurements.md:
    femoral_head_centre, femoral_knee_centre, tibial_knee_centre, ankle_centre,
    posterior_condyle_medial, posterior_condyle_lateral) and the measurements, each with a
    value or the reason it has none."""

    side: Side
    landmarks: tuple[Landmark, ...]
    femoral_head_radius: Measurement
    hka_3d: Measurement
    hka_coronal: Measurement
    ankle_centre_from: str | None  # "talar dome", "malleoli", or None when not found

    def landmark(self, name: str) -> tuple[float, float, float] | None:
        return next((lm.position_mm for lm in self.landmarks if lm.name == name), None)


@dataclass(frozen=True)
class FemoralAngles:
    """One femur's neck and proximal shaft (docs/measurements.md): the axes as unit vectors
    (LPS; the neck axis from the head centre towards the neck's base, the shaft axis up the
    shaft), None where not found, and femoral inclination and version (deg, anteversion
    positive), each with a value or the reason it has none."""

    side: Side
    neck_axis: tuple[float, float, float] | None
    shaft_axis: tuple[float, float, float] | None
    inclination: Measurement
    version: Measurement


@dataclass(frozen=True)
class HipParameters:
    """One hip's acetabular parameters and alpha angle (docs/measurements.md): the landmarks
    found (asis, pubic_tubercle, acetabular_centre, acetabular_lateral_edge), the acetabular
    axis (unit, LPS, out of the cup; None where not found), the pelvic frame the angles are
    taken in (in words; None when none was found), and acetabular version (deg, anteversion
    positive), the lateral centre-edge angle (deg), the acetabular coverage of the femoral
    head (% of a hemisphere of it) and the alpha angle (deg, the largest from 12 to 3 o'clock, at
    ``alpha_clock`` hours), each with a value or the reason it has none; ``rim_mm`` the points
    of the acetabular rim the opening plane rests on (LPS mm; empty where no cup was found),
    for drawing."""

    side: Side
    landmarks: tuple[Landmark, ...]
    acetabular_axis: tuple[float, float, float] | None
    pelvic_frame: str | None
    acetabular_version: Measurement
    lateral_centre_edge: Measurement
    coverage: Measurement
    alpha: Measurement
    alpha_clock: float | None
    rim_mm: tuple[tuple[float, float, float], ...] = ()

    def landmark(self, name: str) -> tuple[float, float, float] | None:
        return next((lm.position_mm for lm in self.landmarks if lm.name == name), None)
