"""A SEG seen from the front, as a small PNG: the dashboard's preview of a job's result.

Every segment is projected onto the coronal plane as a viewer's anterior 3-D view would show
it: the nearest bone in front, shaded darker with depth, in the segment's recommended display
colour; the patient's right on the image's left, the head at the top, millimetres square.
Drawn from the SEG file alone (its frames and their positions), one frame in memory at a
time, so a whole-leg SEG costs the daemon a few MiB, not the volume.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from highdicom.color import CIELabColor
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import iter_pixels

# Nearer surfaces are brighter; the farthest drawn at this fraction of the colour.
_FARTHEST_SHADE = 0.45
_BACKGROUND = (16, 16, 16)


def coronal_preview_png(seg_path: Path, height_px: int = 480) -> bytes:
    """The anterior view of a BINARY SEG with axial frames of one orientation, as PNG bytes
    `height_px` high; ValueError if the SEG has no frames."""
    header = dcmread(seg_path, stop_before_pixels=True)
    frames = header.PerFrameFunctionalGroupsSequence
    if not frames:
        raise ValueError("the SEG has no frames")
    shared = header.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    spacing = shared.PixelMeasuresSequence[0]
    column_mm = float(spacing.PixelSpacing[1])  # [0] is between rows
    heights = np.array(
        [np.dot(f.PlanePositionSequence[0].ImagePositionPatient, normal) for f in frames]
    )
    levels = np.unique(heights.round(3))
    slice_mm = float(np.diff(levels).min()) if len(levels) > 1 else float(spacing.SliceThickness)
    # The top row is the highest slice (towards the head).
    slice_rows = np.round((levels.max() - heights) / slice_mm).astype(int)
    colours = {
        s.SegmentNumber: np.array(
            CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb()
        )
        for s in header.SegmentSequence
    }

    rows, columns = int(header.Rows), int(header.Columns)
    image = np.zeros((slice_rows.max() + 1, columns, 3), np.float32)
    depth = np.full(image.shape[:2], rows, np.int32)  # row index of the nearest surface
    for frame_group, slice_row, pixels in zip(
        frames, slice_rows, iter_pixels(seg_path), strict=True
    ):
        number = frame_group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        hit = pixels.any(axis=0)
        nearest = np.where(hit, pixels.argmax(axis=0), rows)  # rows run front to back
        nearer = nearest < depth[slice_row]
        depth[slice_row, nearer] = nearest[nearer]
        shade = 1 - (1 - _FARTHEST_SHADE) * nearest[nearer] / rows
        image[slice_row, nearer] = colours[number] * shade[:, None]
    image[depth == rows] = _BACKGROUND

    width_mm, height_mm = columns * column_mm, image.shape[0] * slice_mm
    size = (max(1, round(height_px * width_mm / height_mm)), height_px)
    picture = Image.fromarray(image.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
