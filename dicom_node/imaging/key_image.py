"""The key image of a job's measurements: a PNG for people, beside the SR.

A coronal view of the CT (a maximum intensity projection in a bone window, resampled to a
square grid in patient LPS axes: the patient's right on the image's left, the head at the
top) with what `model.measure` found drawn on it: per leg the femoral mechanical axis (head
centre to femoral knee centre), the tibial mechanical axis (tibial knee centre to ankle
centre), the landmarks and the femoral neck axis, and the values beside each leg; per hip
measured, a view of the hip (a projection of a slab as thick as the femoral head) with the
head's sphere, the neck axis, the acetabular rim, and the lateral centre-edge angle's two
lines (the pelvic frame's vertical through the head centre and the line to the lateral edge
of the roof), with its values. Values that could not be measured say so; why is in the SR and
in `dicom-node job ID`. docs/measurements.md defines what is drawn. `key_image_sc` makes
the same picture a DICOM Secondary Capture in the CT's study (`[measurements] key_image`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset

from dicom_node.imaging.seg import AlgorithmInfo, result_uids
from dicom_node.imaging.sr import clock_text
from model.labels import Side
from model.measure import FemoralAngles, HipParameters, LegAlignment, Measurement
from model.resample import image_to_model_grid
from model.volume_io import Volume

BONE_WINDOW_HU = (150.0, 1300.0)  # a projection: soft tissue dark, bone bright
# The view's grid: square voxels of at least this size, coarser for a large scan so that the
# resampled copy stays this many voxels at most (a whole leg's CT fits in ~60 MB of int16).
VIEW_SPACING_MM = 1.0
VIEW_MAX_VOXELS = 30_000_000
# A hip view spans this many head radii either side of the head's centre; its slab is as
# thick as the head, and a little more.
HIP_VIEW_RADII = 3.2
HIP_SLAB_RADII = 1.2
NECK_DRAWN_RADII = 2.4  # the neck axis is drawn this long from the head's centre
COLOURS = {
    "femur": "#ffcc00",
    "tibia": "#33ccff",
    "landmark": "#ff4d4d",
    "neck": "#66ff66",
    "rim": "#ff66ff",
    "head": "#ffffff",
    "lce": "#ff9900",
    "text": "#ffffff",
}
KEY_IMAGE_SERIES_NUMBER = 903  # after the SEG's 901 and the SR's 902
KEY_IMAGE_SERIES_DESCRIPTION = "Measurements key image (dicom-node)"


def key_image_png(
    ct: Volume,
    alignments: Mapping[Side, LegAlignment],
    femoral: Mapping[Side, FemoralAngles] | None = None,
    hips: Mapping[Side, HipParameters] | None = None,
) -> bytes:
    """The key image of the measurements of ``ct`` (HU, any grid) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    view = _View(ct)
    hip_sides = [
        side
        for side in (Side.RIGHT, Side.LEFT)  # the patient's right on the left, as in the view
        if hips is not None and side in hips and side in alignments
        if alignments[side].landmark("femoral_head_centre") is not None
        and alignments[side].femoral_head_radius.value is not None
    ]
    figure = Figure(figsize=(13.0 if hip_sides else 8.0, 10.0), dpi=100, facecolor="black")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(max(1, len(hip_sides)), 2 if hip_sides else 1, width_ratios=None)
    coronal = figure.add_subplot(grid[:, 0])
    view.draw_coronal(coronal)
    for side, leg in sorted(alignments.items(), key=lambda item: item[0].value):
        view.draw_leg(coronal, leg, None if femoral is None else femoral.get(side))
    for row, side in enumerate(hip_sides):
        assert hips is not None
        axes = figure.add_subplot(grid[row, 1])
        angles = None if femoral is None else femoral.get(side)
        view.draw_hip(axes, alignments[side], angles, hips[side])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="black")
    return buffer.getvalue()


def key_image_sc(
    png: bytes, seg: Dataset, algorithm: AlgorithmInfo, generation: int, sides: Sequence[Side]
) -> Dataset:
    """The key image of the legs of ``sides`` as a DICOM Secondary Capture (RGB) in ``seg``'s
    study: patient and study copied from the SEG, UIDs derived like the SEG's and SR's
    (`result_uids`), so a repeated delivery of one result is the same instance."""
    source_series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    series_uid, sop_uid = result_uids("key-image", source_series_uid, algorithm, generation)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        seg,
        pixels,
        hd.PhotometricInterpretationValues.RGB,
        8,
        hd.CoordinateSystemNames.PATIENT,
        series_uid,
        KEY_IMAGE_SERIES_NUMBER,
        sop_uid,
        1,
        "dicom-node",
        # The coronal view's rows run to the patient's left, its columns to the feet.
        patient_orientation=("L", "F"),
    )
    sc.SeriesDescription = KEY_IMAGE_SERIES_DESCRIPTION
    # Both legs, or the one measured (the legs are paired: Image Laterality, or Laterality).
    sc.ImageLaterality = "B" if len(set(sides)) > 1 else ("L" if Side.LEFT in sides else "R")
    return sc


def shown(measurement: Measurement, digits: int = 1) -> str:
    """A value with its unit as the image writes it, or "not measurable"."""
    if measurement.value is None:
        return "not measurable"
    unit = "\N{DEGREE SIGN}" if measurement.unit == "deg" else f" {measurement.unit}"
    return f"{measurement.value:.{digits}f}{unit}"


class _View:
    """The CT on a square LPS grid, and points of patient space in its voxels."""

    def __init__(self, ct: Volume) -> None:
        extent_mm = np.array(ct.array.shape) * np.array(ct.spacing[::-1])
        spacing = max(VIEW_SPACING_MM, float(np.cbrt(extent_mm.prod() / VIEW_MAX_VOXELS)))
        self.image = image_to_model_grid(ct, spacing)
        self.hu = sitk.GetArrayViewFromImage(self.image)  # (z, y, x): x left, y back, z up
        self.spacing = spacing

    def index(self, point: tuple[float, float, float] | np.ndarray) -> np.ndarray:
        """The point's continuous (x, y, z) voxel index on the view's grid."""
        return np.array(
            self.image.TransformPhysicalPointToContinuousIndex([float(v) for v in point])
        )

    def _show(self, axes, hu: np.ndarray, x0: int = 0, z0: int = 0) -> None:
        rows, columns = hu.shape
        axes.imshow(
            np.clip(hu, *BONE_WINDOW_HU),
            cmap="gray",
            origin="lower",
            vmin=BONE_WINDOW_HU[0],
            vmax=BONE_WINDOW_HU[1],
            extent=(x0 - 0.5, x0 + columns - 0.5, z0 - 0.5, z0 + rows - 0.5),
            interpolation="bilinear",
        )
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_facecolor("black")

    def draw_coronal(self, axes) -> None:
        self._show(axes, self.hu.max(axis=1))
        axes.set_title("coronal (maximum intensity)", color=COLOURS["text"], fontsize=10)
        for where, letter in ((0.02, "R"), (0.95, "L")):
            axes.text(where, 0.01, letter, transform=axes.transAxes, color=COLOURS["text"])

    def _line(self, axes, a, b, colour: str, **style) -> None:
        (xa, _, za), (xb, _, zb) = self.index(a), self.index(b)
        axes.plot([xa, xb], [za, zb], color=colour, linewidth=style.pop("linewidth", 2), **style)

    def _points(self, axes, points, colour: str, size: float = 16.0) -> None:
        if len(points):
            xyz = np.array([self.index(p) for p in points])
            axes.scatter(xyz[:, 0], xyz[:, 2], s=size, color=colour, zorder=3)

    def draw_leg(self, axes, leg: LegAlignment, angles: FemoralAngles | None) -> None:
        """The mechanical axes, the landmarks, the neck axis and the values of one leg."""
        head, knee_f = leg.landmark("femoral_head_centre"), leg.landmark("femoral_knee_centre")
        knee_t, ankle = leg.landmark("tibial_knee_centre"), leg.landmark("ankle_centre")
        if head is not None and knee_f is not None:
            self._line(axes, head, knee_f, COLOURS["femur"])
        if knee_t is not None and ankle is not None:
            self._line(axes, knee_t, ankle, COLOURS["tibia"])
        radius = leg.femoral_head_radius.value
        if angles is not None and angles.neck_axis is not None and head is not None and radius:
            end = np.asarray(head) + NECK_DRAWN_RADII * radius * np.asarray(angles.neck_axis)
            self._line(axes, head, end, COLOURS["neck"])
        self._points(axes, [lm.position_mm for lm in leg.landmarks], COLOURS["landmark"])
        if not leg.landmarks:  # nothing of this leg found (a piece of the other side's bone)
            return
        lines = [
            f"{leg.side.name.lower()} leg",
            f"HKA coronal {shown(leg.hka_coronal)}",
            f"HKA 3-D {shown(leg.hka_3d)}",
        ]
        if angles is not None:
            lines += [
                f"inclination {shown(angles.inclination)}",
                f"version {shown(angles.version)}",
            ]
        right = leg.side is Side.RIGHT
        axes.text(
            0.02 if right else 0.98,
            0.98,
            "\n".join(lines),
            transform=axes.transAxes,
            ha="left" if right else "right",
            va="top",
            fontsize=9,
            color=COLOURS["text"],
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"},
        )

    def draw_hip(
        self, axes, leg: LegAlignment, angles: FemoralAngles | None, hip: HipParameters
    ) -> None:
        """A slab through the femoral head: sphere, neck axis, rim, LCE lines, values."""
        centre = np.asarray(leg.landmark("femoral_head_centre"))
        radius = float(leg.femoral_head_radius.value or 0.0)
        x, y, z = self.index(centre)
        half, slab = (
            max(2, round(k * radius / self.spacing)) for k in (HIP_VIEW_RADII, HIP_SLAB_RADII)
        )
        depth, rows, columns = self.hu.shape
        x0, x1 = max(0, round(x) - half), min(columns, round(x) + half + 1)
        z0, z1 = max(0, round(z) - half), min(depth, round(z) + half + 1)
        y0, y1 = max(0, round(y) - slab), min(rows, round(y) + slab + 1)
        self._show(axes, self.hu[z0:z1, y0:y1, x0:x1].max(axis=1), x0, z0)
        axes.set_xlim(x0 - 0.5, x1 - 0.5)
        axes.set_ylim(z0 - 0.5, z1 - 0.5)
        circle = np.linspace(0, 2 * np.pi, 120)
        axes.plot(
            x + radius / self.spacing * np.cos(circle),
            z + radius / self.spacing * np.sin(circle),
            color=COLOURS["head"],
            linewidth=1,
        )
        self._points(axes, [centre], COLOURS["landmark"], 24.0)
        if angles is not None and angles.neck_axis is not None:
            end = centre + NECK_DRAWN_RADII * radius * np.asarray(angles.neck_axis)
            self._line(axes, centre, end, COLOURS["neck"])
        self._points(axes, hip.rim_mm, COLOURS["rim"], 3.0)
        edge = hip.landmark("acetabular_lateral_edge")
        lce = hip.lateral_centre_edge.value
        if edge is not None and lce is not None:
            self._line(axes, centre, edge, COLOURS["lce"])
            # The vertical: the line to the edge turned back by the LCE angle towards the
            # midline, so that the two lines make the angle measured (in the pelvic frame's
            # frontal plane, which the coronal view shows nearly face on).
            ex, _, ez = self.index(edge)
            lateral = -1.0 if hip.side is Side.RIGHT else 1.0  # +x is the patient's left
            angle = np.arctan2((ex - x) * lateral, ez - z) - np.radians(lce)
            length = np.hypot(ex - x, ez - z)
            axes.plot(
                [x, x + lateral * length * np.sin(angle)],
                [z, z + length * np.cos(angle)],
                color=COLOURS["lce"],
                linewidth=2,
                linestyle="--",
            )
        lines = [
            f"{hip.side.name.lower()} hip",
            f"LCE {shown(hip.lateral_centre_edge)}",
            f"coverage {shown(hip.coverage)}",
            f"acetabular version {shown(hip.acetabular_version)}",
            f"alpha {shown(hip.alpha)}"
            + (f" at {clock_text(hip.alpha_clock)}" if hip.alpha_clock is not None else ""),
        ]
        if angles is not None:
            lines.append(f"inclination {shown(angles.inclination)}")
        axes.text(
            0.02,
            0.98,
            "\n".join(lines),
            transform=axes.transAxes,
            ha="left",
            va="top",
            fontsize=9,
            color=COLOURS["text"],
            bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"},
        )
