"""The assembly policy: which series qualify and how their geometry is handled.

`AssemblyPolicy` is `[series]` in config.toml, `AssemblyError` the reason a series does not
become a volume. The configuration imports this module, and loading the configuration must
not import SimpleITK (or torch): so this module imports neither, nor pydicom, nor numpy
(tests/test_config.py checks it in a fresh interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from dicom_node.logs import escape

_POLICY_CHOICES = ("resample", "reject")
_CHOICE_RULE = "expected 'resample' or 'reject'"
# The model's grid (model.engine.network.CascadeConfig.spacing_mm; not imported: the daemon and the
# configuration load this module, and they do not load torch).
MODEL_SPACING_MM = 0.8


@dataclass(frozen=True)
class AssemblyPolicy:
    """Which series qualify and how their geometry is handled: `[series]` in config.toml.

    `axial_tolerance_deg` 30: the largest gantry tilt CT scanners offer is about 30 deg (the
    tilted series at hand are 16.5 and 18.5 deg), so every tilted axial acquisition qualifies,
    while coronal and sagittal reformats (90 deg) and steep obliques do not.
    `spacing_tolerance`: how far (fraction of the spacing) a slice may sit from the regular
    grid and still count as on it. `max_gap_factor` 3: up to two consecutive missing slices
    are interpolated; a wider hole means the series does not cover one continuous region.
    `resample_spacing_mm` 0: resample along the normal at the stack's own spacing (the mean
    when regular, else the smallest gap that repeats, e.g. 4.0 mm for a 4 mm + 7 mm series:
    no detail is lost where slices are dense, and no single odd gap sets the grid). The
    spacing is then adjusted to whole steps from the first slice to the last.
    `min_slices` is at least 2: one slice is not a volume. `max_slices` 5000 and `max_voxels`
    500 M bound what a header can make the node allocate: a full-leg CT at 0.5 mm has ~2600
    slices, and inference peaked at 8.9 GB for the 378 M voxels of the full-leg phantom at
    0.8 mm (bench/README.md), so the default keeps the worker near 12 GB.
    """

    min_slices: int = 20
    max_slices: int = 5000
    max_voxels: int = 500_000_000
    max_slice_thickness_mm: float = 5.0
    axial_tolerance_deg: float = 30.0
    irregular_spacing: str = "resample"  # "resample" or "reject"
    gantry_tilt: str = "resample"  # "resample" or "reject"
    spacing_tolerance: float = 0.05
    max_gap_factor: float = 3.0
    resample_spacing_mm: float = 0.0  # 0: the stack's own spacing
    # Body Part Examined values (PS3.16 Annex L, compared ignoring case and spacing) of series
    # that hold none of the six bones: skipped before any inference. A series without the
    # attribute, or with another value (PELVIS, LEG, WHOLEBODY, PARTIALBODY, ...), goes on; what
    # the model then finds is checked for anatomical sense (model/engine/anatomy.py).
    skip_body_parts: tuple[str, ...] = (
        "HEAD", "BRAIN", "SKULL", "FACE", "ORBIT", "SINUS", "IAC", "EAR", "JAW", "TMJ", "NECK",
        "CSPINE", "TSPINE", "CHEST", "THORAX", "LUNG", "HEART", "BREAST", "CLAVICLE", "SHOULDER",
        "SCAPULA", "ARM", "UPRARM", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER",
    )  # fmt: skip

    def __post_init__(self) -> None:
        rules = (
            ("min_slices", self.min_slices >= 2, "must be >= 2 (one slice is not a volume)"),
            ("max_slices", self.max_slices >= self.min_slices, "must be >= series.min_slices"),
            ("max_voxels", self.max_voxels >= 1, "must be >= 1"),
            ("max_slice_thickness_mm", self.max_slice_thickness_mm > 0, "must be > 0"),
            ("axial_tolerance_deg", 0 <= self.axial_tolerance_deg <= 90, "must be 0..90"),
            ("irregular_spacing", self.irregular_spacing in _POLICY_CHOICES, _CHOICE_RULE),
            ("gantry_tilt", self.gantry_tilt in _POLICY_CHOICES, _CHOICE_RULE),
            ("spacing_tolerance", 0 < self.spacing_tolerance < 0.5, "must be in (0, 0.5)"),
            ("max_gap_factor", self.max_gap_factor >= 1, "must be >= 1"),
            ("resample_spacing_mm", self.resample_spacing_mm >= 0, "must be >= 0"),
        )
        for name, valid, rule in rules:
            if not valid:
                raise ValueError(f"series.{name}: {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_section(cls, section: object) -> AssemblyPolicy:
        """The policy keys of a config section object (`[series]` holds other keys too)."""
        names = [f.name for f in fields(cls)]
        return cls(**{name: getattr(section, name) for name in names if hasattr(section, name)})


class AssemblyError(ValueError):
    """A series that cannot (or by policy must not) become a volume; str() is the reason.

    Reasons quote header values (UIDs, acquisition numbers, library messages) and end up in
    the database and the log: characters that are not printable are escaped, so that a
    hostile value cannot forge a log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(escape(reason))
