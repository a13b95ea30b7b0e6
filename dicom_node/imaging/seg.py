"""Label map -> DICOM Segmentation: what the node sends back.

The SEG lies on the source images' own frames, not the assembled volume's grid (a viewer
overlays a SEG frame on the source frame it references; a tilted or irregular series' volume
slices are not its frames): `labels_on_frames` brings the labels back onto every frame.

The SEG is BINARY (bit-packed frames, Explicit VR Little Endian: what every viewer reads), one
segment per sided label present, coded by `dicom_node.imaging.codes`. Frames where a segment is
empty are left out. Patient, study and frame of reference come from the source headers (highdicom
copies them), so the SEG lands in the source study.

UIDs are derived, not random (`result_uids`): the same source series, model and generation
give the same instance, so a result delivered twice is the same instance. A reopened series is
a new generation: a new SEG series, its Series Description ending ", generation N".
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from dicom_node import __version__
from dicom_node.imaging.codes import SEGMENTS, SegmentDefinition
from dicom_node.imaging.source_repairs import repair_copied_attributes
from dicom_node.imaging.volume.assemble import AssembledVolume
from dicom_node.imaging.volume.geometry import SourceGeometry
from model.engine.postprocess import label_counts
from model.volume_io import Volume

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHORT_HASH = 12  # hex digits of the weights hash in AlgorithmVersion: 48 bits, no collisions
_LO_MAX = 64  # Long String
# Direction cosines closer than this are the same axes (headers round them to ~1e-7).
_SAME_DIRECTION = 1e-6
_CS = re.compile(r"[A-Z0-9 _]{1,16}")  # Code String
# Type 2 attributes of the source that highdicom reads as attributes (Patient and General
# Study modules): sloppy headers leave some out, and an empty value is what Type 2 allows.
_TYPE2_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# The dates and times among them that highdicom parses. A malformed one ("17.04.1923") would
# fail the whole SEG, and the parser's error quotes it: a birth date in the log and in the
# job's reason. Type 2, so it is left empty instead; the source file keeps its value.
_PARSED_SOURCE = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}


# What a SEG the node is unsure of says first, in its Series and segment descriptions.
UNVERIFIED = "UNVERIFIED"


def _long_string(text: str) -> str:
    """`text` as a DICOM Long String: control characters and backslashes become spaces, and
    it is cut to 64 characters."""
    cleaned = "".join(" " if ord(c) < 32 or c == "\\" else c for c in text)
    return cleaned[:_LO_MAX]


class SegError(ValueError):
    """A SEG that cannot be written for this series; str() is the reason."""


def check_lo(owner: str, name: str, value: object, *, required: bool = True) -> None:
    """A DICOM Long String: text, at most 64 characters, no backslash or control characters."""
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{name}: expected str, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{owner}.{name}: must not be empty")
    if len(value) > _LO_MAX:
        raise ValueError(f"{owner}.{name}: at most {_LO_MAX} characters, got {len(value)}")
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{owner}.{name}: no backslash or control characters, got {value!r}")


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that made the labels, as the SEG identifies it.

    `version` names the code that ran the model (see `from_metadata`), `weights_sha256` the
    weights: retrained weights under the same version are another algorithm as far as a reader
    of the SEG (and the deterministic UIDs) are concerned, so AlgorithmVersion carries both.
    """

    name: str
    version: str
    weights_sha256: str

    def __post_init__(self) -> None:
        check_lo("AlgorithmInfo", "name", self.name)
        check_lo("AlgorithmInfo", "version", self.version)
        if not isinstance(self.weights_sha256, str) or not _SHA256.fullmatch(self.weights_sha256):
            raise ValueError(
                "AlgorithmInfo.weights_sha256: expected 64 lowercase hex digits, "
                f"got {self.weights_sha256!r}"
            )
        check_lo("AlgorithmInfo", "algorithm_version", self.algorithm_version)

    @property
    def algorithm_version(self) -> str:
        """AlgorithmVersion as written: "1.0+sha256:85ab5176e0dc"."""
        return f"{self.version}+sha256:{self.weights_sha256[:_SHORT_HASH]}"

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, object], version: str | None = None
    ) -> AlgorithmInfo:
        """From a weights sidecar (`model.engine.weights`: name, weights_sha256).

        The version is `version`, else the sidecar's "version", else this package's: the
        sidecars carry none today, and the algorithm is this package's code (pre- and
        post-processing, inference) with those weights, which the hash names.
        """
        missing = [key for key in ("name", "weights_sha256") if not metadata.get(key)]
        if missing:
            raise ValueError(f"weights metadata lacks {', '.join(missing)}")
        version = version or str(metadata.get("version") or __version__)
        return cls(str(metadata["name"]), version, str(metadata["weights_sha256"]))


def seg_uids(source_series_uid: str, algorithm: AlgorithmInfo, generation: int) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SEG of this series, model and generation."""
    return result_uids("seg", source_series_uid, algorithm, generation)


def result_uids(
    kind: str, source_series_uid: str, algorithm: AlgorithmInfo, generation: int, *more: str
) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of a result of `kind` ("seg", "sr") of this series,
    model and generation (and `more`, what else makes the result what it is).

    A function of its arguments only (the full weights hash included): a repeated delivery of
    one result is the same instance, anything else that differs is another.
    """
    if not source_series_uid:
        raise ValueError("source_series_uid: must not be empty")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError(f"generation: expected an int >= 1, got {generation!r}")
    # generate_uid concatenates its sources; join with a separator so ("a", "bc") != ("ab", "c").
    parts = (
        f"dicom-node/{kind}",
        source_series_uid,
        algorithm.name,
        algorithm.version,
        algorithm.weights_sha256,
        str(generation),
        *more,
    )

    def uid(role: str) -> str:
        return str(generate_uid(entropy_srcs=["\x1f".join((*parts, role))]))

    return uid("series"), uid("sop-instance")


def _source_header(ds: Dataset, sop_instance_uid: str, repairs: list[str]) -> Dataset:
    """A source instance's header, completed where highdicom needs what sloppy headers lack.

    `ds` is the header assembly read (no pixel data: highdicom needs only the metadata). An
    empty SOP Class UID is taken from the file meta information, or as CT Image as `volume`
    takes it; an empty SOP Instance UID is the one assembly found (file meta). The Patient and
    Study attributes the SEG copies are made valid (`source_repairs`; what was changed is added
    to `repairs`, once). The patches go to these in-memory headers only: the files are untouched.
    """
    meta = getattr(ds, "file_meta", None) or Dataset()
    if not ds.get("SOPClassUID"):
        ds.SOPClassUID = meta.get("MediaStorageSOPClassUID") or CTImageStorage
    if not ds.get("SOPInstanceUID"):
        ds.SOPInstanceUID = sop_instance_uid
    repairs.extend(r for r in repair_copied_attributes(ds) if r not in repairs)
    for keyword in _TYPE2_SOURCE:
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword, parse in _PARSED_SOURCE.items():
        try:
            parse(ds[keyword].value or "")
        except (ValueError, TypeError):  # malformed, or several values where one belongs
            setattr(ds, keyword, "")
    return ds


def labels_on_frames(labels: Volume, geometry: SourceGeometry) -> np.ndarray:
    """`labels` sampled at every source frame's pixel centres, nearest neighbour: what
    `geometry.resample_to_frames(labels)` gives, faster where the grids share a direction.

    The label map normally lies on the assembled volume's grid, whose axes are the frames' row,
    column and normal (tilted and irregular stacks are resampled along the normal, never
    rotated). Then each frame is one plane of the label map, shifted in-plane for a tilted
    stack: a copy (or gather) by index vectors, with ITK's rounding (half up) and ITK's bounds
    (outside is 0). SimpleITK resamples a 512x512 frame in 5-9 ms on a busy CPU, 10 s for a
    1400-frame scan; the copy takes ~0.3 ms a frame, and nothing at all when the frames are
    the label map's slices (an untilted, regular series): that array is returned as it is.
    Other axes (a label map in another orientation) go through SimpleITK.
    """
    frame_axes = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    label_axes = np.asarray(labels.direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(frame_axes, label_axes, atol=_SAME_DIRECTION):
        return geometry.resample_to_frames(labels)
    array = labels.array
    depth, height, width = array.shape
    spacing_x, spacing_y, spacing_z = (float(s) for s in labels.spacing)
    row_spacing, column_spacing = geometry.pixel_spacing
    # Continuous index of every frame's first pixel along the label map's axes (x, y, z).
    start = (geometry.positions - np.asarray(labels.origin, dtype=np.float64)) @ label_axes
    start /= np.array([spacing_x, spacing_y, spacing_z])
    columns = np.arange(geometry.columns) * (column_spacing / spacing_x)
    rows = np.arange(geometry.rows) * (row_spacing / spacing_y)
    index_z = np.floor(start[:, 2] + 0.5).astype(np.int64)
    index_x = np.floor(start[:, :1] + columns + 0.5).astype(np.int64)  # (frames, columns)
    index_y = np.floor(start[:, 1:2] + rows + 0.5).astype(np.int64)  # (frames, rows)
    if (
        (depth, height, width) == (len(index_z), geometry.rows, geometry.columns)
        and np.array_equal(index_z, np.arange(depth))
        and np.array_equal(index_x, np.broadcast_to(np.arange(width), index_x.shape))
        and np.array_equal(index_y, np.broadcast_to(np.arange(height), index_y.shape))
    ):
        return array
    out = np.zeros((len(index_z), geometry.rows, geometry.columns), dtype=array.dtype)
    for frame, (z, xs, ys) in enumerate(zip(index_z, index_x, index_y, strict=True)):
        inside_x = (xs >= 0) & (xs < width)
        inside_y = (ys >= 0) & (ys < height)
        if not (0 <= z < depth and inside_x.any() and inside_y.any()):
            continue
        # Indices grow along a frame's rows and columns, so the inside part is one run.
        target = (frame, _run(np.flatnonzero(inside_y)), _run(np.flatnonzero(inside_x)))
        source_y, source_x = ys[inside_y], xs[inside_x]
        if _is_run(source_y) and _is_run(source_x):  # same pixel size: a copy, not a gather
            out[target] = array[z, _run(source_y), _run(source_x)]
        else:
            out[target] = array[z][np.ix_(source_y, source_x)]
    return out


def _is_run(indices: np.ndarray) -> bool:
    return bool(np.all(np.diff(indices) == 1))


def _run(indices: np.ndarray) -> slice:
    """Consecutive indices as a slice."""
    return slice(int(indices[0]), int(indices[-1]) + 1)


def _renumbered(frames: np.ndarray, present: list[int], slab: int = 16) -> np.ndarray:
    """Sided labels -> segment numbers 1..n (the rank of each label among `present`).

    Every non-zero value of `frames` is in `present` (sorted), so a label's number is the
    label less the labels absent below it: one compare-and-subtract per absent label, slab by
    slab. A lookup-table gather (`table[frames]`) widens every index to int64 first.
    """
    absent = [value for value in range(1, present[-1]) if value not in present]
    out = np.empty_like(frames)
    for start in range(0, len(frames), slab):
        block, target = frames[start : start + slab], out[start : start + slab]
        np.copyto(target, block)
        for value in absent:
            target -= block > value
    return out


def check_result_series(owner: str, algorithm: object, series_number: object) -> None:
    """What every result writer (SEG, SR) is given: its model and its Series Number (IS)."""
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(
            f"{owner}.algorithm: expected AlgorithmInfo, got {type(algorithm).__name__}"
        )
    if isinstance(series_number, bool) or not isinstance(series_number, int):
        raise TypeError(f"{owner}.series_number: expected int, got {series_number!r}")
    if not 1 <= series_number <= 2**31 - 1:
        raise ValueError(f"{owner}.series_number: must be 1..2147483647, got {series_number}")


class SegWriter:
    """Writes the node's DICOM SEGs: one writer per model, configured once.

    Arguments are checked here, each error naming its argument, so that a bad configuration
    fails at start-up rather than on the first series.
    """

    def __init__(
        self,
        algorithm: AlgorithmInfo,
        *,
        series_number: int = 901,
        series_description: str = "Bone segmentation",
        manufacturer: str = "dicom-node",
        manufacturer_model_name: str = "dicom-node bone segmentation",
        software_versions: str = __version__,
        device_serial_number: str = "0",
        content_label: str = "BONES",
        content_description: str | None = None,
    ) -> None:
        owner = "SegWriter"
        check_result_series(owner, algorithm, series_number)
        for name, value in (
            ("series_description", series_description),
            ("manufacturer", manufacturer),
            ("manufacturer_model_name", manufacturer_model_name),
            ("software_versions", software_versions),
            ("device_serial_number", device_serial_number),
        ):
            check_lo(owner, name, value)
        if not isinstance(content_label, str) or not _CS.fullmatch(content_label):
            raise ValueError(
                f"{owner}.content_label: 1-16 of A-Z, 0-9, space, underscore; got {content_label!r}"
            )
        if content_description is None:
            content_description = f"{algorithm.name} {algorithm.algorithm_version}"[:_LO_MAX]
        check_lo(owner, "content_description", content_description)
        self.algorithm = algorithm
        self.series_number = series_number
        self.series_description = series_description
        self.manufacturer = manufacturer
        self.manufacturer_model_name = manufacturer_model_name
        self.software_versions = software_versions
        self.device_serial_number = device_serial_number
        self.content_label = content_label
        self.content_description = content_description

    def _algorithm_identification(self) -> AlgorithmIdentificationSequence:
        return AlgorithmIdentificationSequence(
            name=self.algorithm.name,
            family=codes.DCM.ArtificialIntelligence,
            version=self.algorithm.algorithm_version,
            source=self.manufacturer,
            parameters={"weights_sha256": self.algorithm.weights_sha256},
        )

    def _description(
        self, number: int, segment: SegmentDefinition, algorithm: AlgorithmIdentificationSequence
    ) -> SegmentDescription:
        description = SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=segment.category,
            segmented_property_type=segment.property_type,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=segment.display_color,
        )
        # Laterality is a modifier of the property type (nested in its code item, PS3.3
        # C.8.20.2); highdicom has no argument for it.
        laterality = segment.laterality
        property_type = description.SegmentedPropertyTypeCodeSequence[0]
        property_type.SegmentedPropertyTypeModifierCodeSequence = [
            CodedConcept(laterality.value, laterality.scheme_designator, laterality.meaning)
        ]
        return description

    def write(
        self,
        assembled: AssembledVolume,
        sided_labels: Volume,
        generation: int = 1,
        unverified: Mapping[int, str] | None = None,
        repairs: list[str] | None = None,
    ) -> Dataset | None:
        """The SEG of `sided_labels` (0 background, 1..12 `model.labels.sided_label`) on the
        source frames of `assembled`; None when no bone label is present on them.

        `sided_labels` may lie on any grid in patient space (normally the assembled volume's);
        it is sampled at every source frame's pixel centres, nearest neighbour.

        `unverified` (sided label -> why, in a few words): the node is unsure of this SEG. Its
        Series Description starts with UNVERIFIED, and each segment's description (0062,0006)
        says UNVERIFIED and why: what a PACS lists and a viewer shows beside the segment.

        `repairs`: what was changed in the source's Patient and Study attributes to make the
        SEG valid (`source_repairs`) is added to it.
        """
        started = time.perf_counter()
        array = sided_labels.array
        if array.dtype.kind not in "ub" and not (
            array.dtype.kind == "i" and (array.size == 0 or array.min() >= 0)
        ):
            raise ValueError(f"sided_labels: expected non-negative integers, got {array.dtype}")
        if not array.any():
            return None
        if array.dtype != np.uint8:
            if array.max() > 255:
                raise ValueError(f"sided_labels: value {array.max()} is not a sided label")
            sided_labels = sided_labels.with_array(array.astype(np.uint8))
        if not assembled.series_instance_uid:
            raise SegError("the source series has no SeriesInstanceUID: a SEG cannot refer to it")
        series_uid, sop_uid = seg_uids(assembled.series_instance_uid, self.algorithm, generation)
        frames = labels_on_frames(sided_labels, assembled.source_geometry)
        resampled = time.perf_counter()

        counts = label_counts(frames)
        unknown = [int(v) for v in np.flatnonzero(counts) if int(v) not in SEGMENTS]
        if unknown:
            raise ValueError(f"sided_labels: values {unknown} are not sided labels (1..12)")
        present = [value for value in SEGMENTS if counts[value]]
        if not present:
            return None
        # Segment numbers 1..n in sided-label order: highdicom wants them consecutive, and a
        # label-map style array with consecutive numbers is its fast path.
        if present != list(range(1, len(present) + 1)):
            frames = _renumbered(frames, present)
        counted = time.perf_counter()

        sources, frames = self._sources(assembled, frames, [] if repairs is None else repairs)
        if not sources[0].get("StudyInstanceUID"):
            raise SegError("the source series has no StudyInstanceUID: a SEG cannot join it")
        headers = time.perf_counter()
        algorithm = self._algorithm_identification()
        descriptions = [
            self._description(number, SEGMENTS[value], algorithm)
            for number, value in enumerate(present, 1)
        ]
        prefix = f"{UNVERIFIED} " if unverified is not None else ""
        suffix = f", generation {generation}" if generation > 1 else ""  # a reopened series
        series_description = (prefix + self.series_description)[: _LO_MAX - len(suffix)] + suffix
        if unverified is not None:
            for description, value in zip(descriptions, present, strict=True):
                why = unverified.get(value, "the series as a whole")
                description.SegmentDescription = _long_string(f"{UNVERIFIED}: {why}")
        seg = Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=self.series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=self.manufacturer,
            manufacturer_model_name=self.manufacturer_model_name,
            software_versions=self.software_versions,
            device_serial_number=self.device_serial_number,
            content_description=self.content_description,
            content_label=self.content_label,
            series_description=series_description,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            omit_empty_frames=True,
        )
        seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime  # for series lists
        done = time.perf_counter()
        log.info(
            "SEG of series %s: %d segments, %d frames (resample %.2f s, labels %.2f s, "
            "headers %.2f s, encode %.2f s)",
            assembled.series_instance_uid,
            len(present),
            int(seg.NumberOfFrames),
            resampled - started,
            counted - resampled,
            headers - counted,
            done - headers,
        )
        return seg

    @staticmethod
    def _sources(
        assembled: AssembledVolume, frames: np.ndarray, repairs: list[str]
    ) -> tuple[list[Dataset], np.ndarray]:
        """Source headers for highdicom, and the label frames in the order it pairs them.

        highdicom pairs label frame i with source image i (single-frame instances) or with
        frame i of one multi-frame instance; several multi-frame instances in one SEG it
        cannot reference by position, so such a series is refused with the reason.
        """
        refs = assembled.frames
        paths = list(dict.fromkeys(ref.path for ref in refs))
        if all(ref.frame_number is None for ref in refs):
            headers = assembled.headers
            sources = [_source_header(headers[r.path], r.sop_instance_uid, repairs) for r in refs]
            return sources, frames
        if len(paths) > 1:
            raise SegError(
                f"the series' frames come from {len(paths)} multi-frame instances; highdicom "
                "writes a SEG of one multi-frame source instance only"
            )
        source = _source_header(assembled.headers[paths[0]], refs[0].sop_instance_uid, repairs)
        ordered = np.zeros((int(source.NumberOfFrames), *frames.shape[1:]), dtype=frames.dtype)
        for index, ref in enumerate(refs):
            ordered[(ref.frame_number or 1) - 1] = frames[index]
        return [source], ordered
