"""Label map -> DICOM SEG: codes, pixels, references, UIDs, real tilted and irregular series.

Every SEG is written to a file and read back as a receiver would (highdicom's `segread`,
pydicom), and checked with dciodvfy: what counts is what lands at the PACS, not the dataset
in memory. Masks are compared with the label map sampled on the source frames by SimpleITK
(`SourceGeometry.resample_to_frames`), the reference the writer's fast path must equal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from highdicom.color import CIELabColor
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from dicom_node import __version__
from dicom_node.imaging.codes import BONE_CODES, SEGMENTS
from dicom_node.imaging.seg import (
    UNVERIFIED,
    AlgorithmInfo,
    SegError,
    SegWriter,
    labels_on_frames,
    seg_uids,
)
from dicom_node.imaging.volume.assemble import AssembledVolume, assemble_volume
from dicom_node.imaging.volume.policy import AssemblyPolicy
from dicom_node.pipeline.inference import save_seg
from model.engine.weights import DEFAULT_WEIGHTS
from model.labels import Bone, Side, sided_label
from model.volume_io import Volume, read_volume
from tests.support import PhantomSeries, dciodvfy_errors, require_data

SHA = "85ab5176e0dca350f83dacf8d9769291e9dbba57c1e1e58bd21d004c0b67cce5"
ALGORITHM = AlgorithmInfo("cascaded-vnet-lower-extremity", "1.0", SHA)
# The real series at hand are heads: these tests are about their geometry, not selection.
HEADS = AssemblyPolicy(skip_body_parts=())
HEADS_7MM = AssemblyPolicy(skip_body_parts=(), max_slice_thickness_mm=7.0)
RIGHT_FEMUR, LEFT_FEMUR = sided_label(Bone.FEMUR, Side.RIGHT), sided_label(Bone.FEMUR, Side.LEFT)


@dataclasses.dataclass
class Case:
    assembled: AssembledVolume
    sided: Volume  # sided labels on the assembled volume's grid


# -- helpers ---------------------------------------------------------------------------------


def assert_valid(path: Path, source: Path | None = None) -> None:
    """dciodvfy finds no error in the SEG, or (given the `source` instance) none that the
    source does not have: the Patient and Study modules are copied from it as they are."""
    errors = dciodvfy_errors(path)
    inherited = set(dciodvfy_errors(source)) if source is not None else set()
    assert not [e for e in errors if e not in inherited], errors


def write_and_read(
    writer: SegWriter, case: Case, path: Path, generation: int = 1
) -> hd.seg.Segmentation:
    dataset = writer.write(case.assembled, case.sided, generation)
    assert dataset is not None
    save_seg(dataset, path)
    return hd.seg.segread(path)


def sided_masks(seg: hd.seg.Segmentation, uids: list[str]) -> np.ndarray:
    """The SEG's masks on the source instances, as sided labels (by each segment's codes)."""
    numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    by_codes = {(d.property_type.value, d.laterality.value): value for value, d in SEGMENTS.items()}
    out = np.zeros(numbers.shape, dtype=np.uint8)
    for item in seg.SegmentSequence:
        property_type = item.SegmentedPropertyTypeCodeSequence[0]
        laterality = property_type.SegmentedPropertyTypeModifierCodeSequence[0]
        out[numbers == item.SegmentNumber] = by_codes[
            (property_type.CodeValue, laterality.CodeValue)
        ]
    return out


def frames_per_segment(labels_on_source: np.ndarray) -> int:
    """SEG frames when empty frames are omitted: one per (source frame, label present)."""
    return sum(
        int(np.any(labels_on_source == value, axis=(1, 2)).sum())
        for value in np.unique(labels_on_source)
        if value
    )


def source_positions(seg: Dataset) -> list[tuple[str, list[float]]]:
    """(referenced source instance, ImagePositionPatient) of every SEG frame."""
    pairs = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        pairs.append((source.ReferencedSOPInstanceUID, position))
    return pairs


def threshold_labels(assembled: AssembledVolume, hu: float = 300.0) -> Volume:
    """A synthetic result: everything above `hu` is femur, right of the image centre right."""
    array = assembled.volume.array
    labels = np.zeros(array.shape, dtype=np.uint8)
    bone = array > hu
    half = array.shape[2] // 2  # column index grows toward the patient's left (LPS +x)
    labels[:, :, :half][bone[:, :, :half]] = RIGHT_FEMUR
    labels[:, :, half:][bone[:, :, half:]] = LEFT_FEMUR
    return assembled.volume.with_array(labels)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writer() -> SegWriter:
    return SegWriter(ALGORITHM)


@pytest.fixture(scope="module")
def phantom(phantom_series: PhantomSeries) -> Case:
    """A small hip phantom as a CT series; its truth split into sides at the image centre:
    femur and hip bone of both sides (labels 1, 2, 7, 8: not consecutive, so renumbered)."""
    paths = phantom_series(2)
    assembled = assemble_volume([paths["ct"]])
    truth = read_volume(paths["labels"]).array.astype(np.uint8)
    assert truth.shape == assembled.volume.array.shape
    sided = truth.copy()
    half = truth.shape[2] // 2
    sided[:, :, half:][truth[:, :, half:] > 0] += len(Bone)
    assert set(np.unique(sided)) == {0, 1, 2, 7, 8}
    return Case(assembled, assembled.volume.with_array(sided))


# -- codes -----------------------------------------------------------------------------------


def test_twelve_segments_with_codes_labels_and_colours() -> None:
    assert list(SEGMENTS) == list(range(1, 13))
    right_femur, left_hip = SEGMENTS[1], SEGMENTS[8]
    assert (right_femur.label, left_hip.label) == ("Right femur", "Left hip bone")
    assert (right_femur.category.value, right_femur.category.scheme_designator) == (
        "91723000",
        "SCT",
    )
    assert right_femur.property_type.value == "71341001"
    assert (right_femur.laterality.value, left_hip.laterality.value) == ("24028007", "7771000")
    assert left_hip.property_type.value == "118645006"
    assert {code.value for code in BONE_CODES.values()} == {
        "71341001",
        "118645006",
        "12611008",
        "87342007",
        "67453005",
        "80144004",
    }
    # One colour per bone, the left side darker; CIELab as DICOM stores it, back to the RGB.
    right = [SEGMENTS[sided_label(bone, Side.RIGHT)].rgb for bone in Bone]
    assert len(set(right)) == len(Bone)
    for bone in Bone:
        r, left = (SEGMENTS[sided_label(bone, side)] for side in Side)
        assert r.display_color.l_star > left.display_color.l_star
        back = CIELabColor.from_dicom_value(r.display_color.value).to_rgb()
        assert np.abs(np.subtract(back, r.rgb)).max() <= 1


# -- arguments -------------------------------------------------------------------------------


def test_algorithm_info_from_the_shipped_weights() -> None:
    metadata = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    algorithm = AlgorithmInfo.from_metadata(metadata)
    assert algorithm.name == metadata["name"] == "cascaded-vnet-lower-extremity"
    sha = metadata["weights_sha256"]
    assert algorithm.algorithm_version == f"{__version__}+sha256:{sha[:12]}"
    assert AlgorithmInfo.from_metadata(metadata, "2.0").algorithm_version.startswith("2.0+")
    assert ALGORITHM.algorithm_version == "1.0+sha256:85ab5176e0dc"
    with pytest.raises(ValueError, match="weights_sha256"):
        AlgorithmInfo.from_metadata({"name": "x", "version": "1"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": ""}, r"AlgorithmInfo\.name: must not be empty"),
        ({"name": "x" * 65}, r"AlgorithmInfo\.name: at most 64"),
        ({"version": "1\\2"}, r"AlgorithmInfo\.version: no backslash"),
        ({"weights_sha256": "85AB"}, r"AlgorithmInfo\.weights_sha256: expected 64"),
    ],
)
def test_algorithm_info_names_the_bad_argument(arguments: dict, message: str) -> None:
    values = {"name": "m", "version": "1.0", "weights_sha256": SHA, **arguments}
    with pytest.raises(ValueError, match=message):
        AlgorithmInfo(**values)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"algorithm": "m"}, TypeError, r"SegWriter\.algorithm: expected AlgorithmInfo"),
        ({"series_number": 0}, ValueError, r"SegWriter\.series_number: must be 1\.\."),
        ({"series_number": True}, TypeError, r"SegWriter\.series_number: expected int"),
        ({"series_description": "x" * 65}, ValueError, r"SegWriter\.series_description"),
        ({"manufacturer": ""}, ValueError, r"SegWriter\.manufacturer: must not be empty"),
        ({"device_serial_number": 7}, TypeError, r"SegWriter\.device_serial_number"),
        ({"content_label": "bones"}, ValueError, r"SegWriter\.content_label: 1-16 of A-Z"),
        ({"content_description": "a\nb"}, ValueError, r"SegWriter\.content_description"),
    ],
)
def test_seg_writer_names_the_bad_argument(arguments: dict, error: type, message: str) -> None:
    algorithm = arguments.pop("algorithm", ALGORITHM)
    with pytest.raises(error, match=message):
        SegWriter(algorithm, **arguments)


# -- UIDs ------------------------------------------------------------------------------------


def test_uids_are_a_function_of_series_model_and_generation() -> None:
    series, instance = seg_uids("1.2.3", ALGORITHM, 1)
    assert seg_uids("1.2.3", ALGORITHM, 1) == (series, instance)
    assert series != instance
    others = [
        seg_uids("1.2.3", ALGORITHM, 2),
        seg_uids("1.2.4", ALGORITHM, 1),
        seg_uids("1.2.3", dataclasses.replace(ALGORITHM, weights_sha256="0" * 64), 1),
        seg_uids("1.2.3", dataclasses.replace(ALGORITHM, version="1.1"), 1),
    ]
    assert len({series, *(s for s, _ in others)}) == 5
    assert len({instance, *(i for _, i in others)}) == 5
    with pytest.raises(ValueError, match="generation"):
        seg_uids("1.2.3", ALGORITHM, 0)


# -- the phantom -----------------------------------------------------------------------------


def test_phantom_seg_overlays_the_source_and_is_valid(
    phantom: Case, writer: SegWriter, tmp_path: Path
) -> None:
    path = tmp_path / "seg.dcm"
    seg = write_and_read(writer, phantom, path)
    source = dcmread(phantom.assembled.frames[0].path, stop_before_pixels=True)
    uids = [f.sop_instance_uid for f in phantom.assembled.frames]

    # What it is, and where it belongs.
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (seg.SegmentationType, seg.BitsAllocated) == ("BINARY", 1)
    assert (seg.StudyInstanceUID, seg.PatientID, seg.PatientName) == (
        source.StudyInstanceUID,
        source.PatientID,
        source.PatientName,
    )
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == seg_uids(
        source.SeriesInstanceUID, ALGORITHM, 1
    )
    assert (seg.SeriesNumber, seg.SeriesDescription) == (901, "Bone segmentation")
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(uids)

    # One segment per sided label present, numbered in label order, coded.
    present = [1, 2, 7, 8]
    assert seg.segment_numbers == [1, 2, 3, 4]
    for number, value in enumerate(present, 1):
        item = seg.SegmentSequence[number - 1]
        expected = SEGMENTS[value]
        assert item.SegmentLabel == expected.label
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        property_type = item.SegmentedPropertyTypeCodeSequence[0]
        assert property_type.CodeValue == expected.property_type.value
        modifier = property_type.SegmentedPropertyTypeModifierCodeSequence[0]
        assert modifier.CodeValue == expected.laterality.value
        assert tuple(item.RecommendedDisplayCIELabValue) == expected.display_color.value
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ALGORITHM.name
        assert algorithm.AlgorithmVersion == "1.0+sha256:85ab5176e0dc"

    # The masks are the labels, frame by frame; no empty frame is stored.
    labels = phantom.sided.array  # an untilted regular series: its slices are the frames
    np.testing.assert_array_equal(sided_masks(seg, uids), labels)
    assert seg.NumberOfFrames == frames_per_segment(labels)
    assert_valid(path)


def test_a_repeated_delivery_is_the_same_instance_a_new_generation_is_not(
    phantom: Case, writer: SegWriter
) -> None:
    first = writer.write(phantom.assembled, phantom.sided, generation=1)
    again = writer.write(phantom.assembled, phantom.sided, generation=1)
    reopened = writer.write(phantom.assembled, phantom.sided, generation=2)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert reopened.SeriesInstanceUID != first.SeriesInstanceUID
    assert reopened.SOPInstanceUID != first.SOPInstanceUID
    assert first.PixelData == again.PixelData == reopened.PixelData


def test_a_reopened_series_seg_says_its_generation_where_the_pacs_lists_it(
    phantom: Case, tmp_path: Path
) -> None:
    """Both SEGs of a reopened series stay at the PACS: the later one says it is the later
    one in its Series Description (kept whole however long the configured text), and both
    carry the Series Date and Time a PACS lists series by."""
    writer = SegWriter(ALGORITHM, series_description="B" * 64)
    first = write_and_read(writer, phantom, tmp_path / "first.dcm")
    reopened = write_and_read(writer, phantom, tmp_path / "second.dcm", generation=2)
    assert first.SeriesDescription == "B" * 64
    assert reopened.SeriesDescription == "B" * 50 + ", generation 2"
    unsure = writer.write(phantom.assembled, phantom.sided, generation=3, unverified={1: "why"})
    assert unsure is not None
    assert unsure.SeriesDescription == f"{UNVERIFIED} " + "B" * 39 + ", generation 3"
    for seg in (first, reopened, unsure):
        assert (seg.SeriesDate, seg.SeriesTime) == (seg.ContentDate, seg.ContentTime)
        assert seg.SeriesNumber == first.SeriesNumber  # the same series number: [seg] config
    assert_valid(tmp_path / "second.dcm")


def test_no_bone_gives_no_seg(phantom: Case, writer: SegWriter) -> None:
    empty = phantom.sided.with_array(np.zeros_like(phantom.sided.array))
    assert writer.write(phantom.assembled, empty) is None
    # A label map whose bone lies outside every source frame: nothing to overlay either.
    far = dataclasses.replace(phantom.sided, origin=(5000.0, 5000.0, 5000.0))
    assert writer.write(phantom.assembled, far) is None


def test_values_that_are_not_sided_labels_are_refused(phantom: Case, writer: SegWriter) -> None:
    array = phantom.sided.array.copy()
    array[array == 8] = 13
    with pytest.raises(ValueError, match=r"sided_labels: values \[13\]"):
        writer.write(phantom.assembled, phantom.sided.with_array(array))
    negative = phantom.sided.array.astype(np.int16) - 1
    with pytest.raises(ValueError, match="sided_labels: expected non-negative"):
        writer.write(phantom.assembled, phantom.sided.with_array(negative))


def test_labels_on_another_grid_are_resampled_like_simpleitk(phantom: Case) -> None:
    """The fast path (same axes, other spacing and origin) and the fallback (other axes)."""
    geometry = phantom.assembled.source_geometry
    labels = phantom.sided.array
    coarse = Volume(
        np.ascontiguousarray(labels[::2, ::2, ::2]),
        tuple(2 * s for s in phantom.sided.spacing),
        tuple(np.asarray(phantom.sided.origin) + 0.3),
        phantom.sided.direction,
    )
    # The same voxels with the z axis flipped: another direction, the same patient space.
    matrix = np.asarray(phantom.sided.direction).reshape(3, 3) * [1, 1, -1]
    top = np.asarray(phantom.sided.origin) + (len(labels) - 1) * phantom.sided.spacing[2] * (
        -matrix[:, 2]
    )
    flipped = Volume(
        np.ascontiguousarray(labels[::-1]),
        phantom.sided.spacing,
        tuple(top),
        tuple(matrix.ravel()),
    )
    for volume in (coarse, flipped):
        expected = geometry.resample_to_frames(volume)
        np.testing.assert_array_equal(labels_on_frames(volume, geometry), expected)
    np.testing.assert_array_equal(labels_on_frames(flipped, geometry), labels)
    assert labels_on_frames(phantom.sided, geometry) is labels  # the frames are its slices


def test_legacy_converted_enhanced_ct(phantom: Case, writer: SegWriter, tmp_path: Path) -> None:
    """One multi-frame instance: label frames go to its own frame numbers."""
    frames = phantom.assembled.frames
    legacy = [dcmread(f.path) for f in reversed(frames)]  # frame order != stack order
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy, "1.2.826.0.1.3680043.8.498.7701", 2, "1.2.826.0.1.3680043.8.498.7702", 1
    )
    source = tmp_path / "enhanced.dcm"
    enhanced.save_as(source, enforce_file_format=True)
    assembled = assemble_volume([source])
    assert {f.path for f in assembled.frames} == {source}
    np.testing.assert_array_equal(assembled.volume.array, phantom.assembled.volume.array)

    case = Case(assembled, assembled.volume.with_array(phantom.sided.array))
    seg = write_and_read(writer, case, tmp_path / "seg.dcm")
    uid = assembled.frames[0].sop_instance_uid
    numbers = [f.frame_number for f in assembled.frames]
    masks = seg.get_pixels_by_source_frame(uid, numbers, combine_segments=True)
    expected = np.searchsorted([0, 1, 2, 7, 8], phantom.sided.array)  # segment numbers
    np.testing.assert_array_equal(masks, expected)
    assert_valid(tmp_path / "seg.dcm")


# -- real series -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "policy"),
    [
        ("dcm_qa_ct/GE", HEADS_7MM),  # tilt 18.5, irregular
        ("dcm_qa_ct/Philips/S21610/S3010", HEADS),  # tilt +16.5
    ],
)
def test_tilted_and_irregular_series_seg_lies_on_the_source_frames(
    folder: str, policy: AssemblyPolicy, writer: SegWriter, tmp_path: Path
) -> None:
    assembled = assemble_volume([require_data() / folder], policy)
    assert assembled.resampled
    labels = threshold_labels(assembled)
    path = tmp_path / "seg.dcm"
    seg = write_and_read(writer, Case(assembled, labels), path)

    # Every SEG frame sits where the source frame it references sits, in its orientation.
    headers = {
        f.sop_instance_uid: dcmread(f.path, stop_before_pixels=True) for f in assembled.frames
    }
    pairs = source_positions(seg)
    assert len(pairs) == seg.NumberOfFrames
    for uid, position in pairs:
        np.testing.assert_allclose(position, headers[uid].ImagePositionPatient, atol=1e-3)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    np.testing.assert_allclose(
        orientation.ImageOrientationPatient,
        headers[assembled.frames[0].sop_instance_uid].ImageOrientationPatient,
        atol=1e-6,
    )

    # Its masks are the label map sampled on the source frames (SimpleITK as the reference).
    expected = assembled.source_geometry.resample_to_frames(labels)
    uids = [f.sop_instance_uid for f in assembled.frames]
    np.testing.assert_array_equal(sided_masks(seg, uids), expected)
    assert seg.NumberOfFrames == frames_per_segment(expected)
    # GE's de-identified headers say PatientIdentityRemoved YES with an empty
    # DeidentificationMethod (Type 1C): the SEG carries the Patient module as it is.
    assert_valid(path, assembled.frames[0].path)


def test_fast_resampling_equals_simpleitk_on_tilted_series() -> None:
    """Random labels (every pixel counts) on the volume grid and on a shifted coarser grid."""
    rng = np.random.default_rng(7)
    for folder, policy in (
        ("dcm_qa_ct/GE", HEADS_7MM),
        ("dcm_qa_ct/Philips/S21610/S2010", HEADS),  # tilt -18.5
    ):
        assembled = assemble_volume([require_data() / folder], policy)
        volume = assembled.volume
        labels = rng.integers(0, 13, size=volume.array.shape, dtype=np.uint8)
        coarse = Volume(
            np.ascontiguousarray(labels[::2, ::2, ::2]),
            tuple(2 * s for s in volume.spacing),
            tuple(np.add(volume.origin, (0.37, -0.21, 0.5))),
            volume.direction,
        )
        for grid in (volume.with_array(labels), coarse):
            expected = assembled.source_geometry.resample_to_frames(grid)
            np.testing.assert_array_equal(
                labels_on_frames(grid, assembled.source_geometry), expected
            )


def test_sloppy_headers(phantom: Case, writer: SegWriter, tmp_path: Path) -> None:
    """SOP Class and Instance UIDs empty in the dataset (the file meta has them) and Type 2
    patient attributes missing, as some exporters write: the SEG references the instances by
    their real UIDs and is valid."""
    for ref in phantom.assembled.frames:
        ds = dcmread(ref.path)
        ds.SOPClassUID = ds.SOPInstanceUID = ""
        del ds.PatientSex, ds.PatientBirthDate
        ds.save_as(tmp_path / ref.path.name)  # file meta as it was
    assembled = assemble_volume([tmp_path])
    path = tmp_path / "seg.dcm"
    seg = write_and_read(writer, Case(assembled, phantom.sided), path)
    (referenced,) = seg.ReferencedSeriesSequence
    instances = referenced.ReferencedInstanceSequence
    assert {i.ReferencedSOPInstanceUID for i in instances} == {
        f.sop_instance_uid for f in phantom.assembled.frames
    }
    assert {i.ReferencedSOPClassUID for i in instances} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert seg.PatientSex == "" and seg.PatientBirthDate == ""
    assert_valid(path)


def test_a_series_without_study_and_series_uids_is_refused(writer: SegWriter) -> None:
    """TotalSegmentator's example CT has neither: a SEG would belong to no study."""
    assembled = assemble_volume([require_data() / "totalseg_example_ct_dicom"])
    with pytest.raises(SegError, match="no SeriesInstanceUID"):
        writer.write(assembled, threshold_labels(assembled))
    assembled.series_instance_uid = "1.2.826.0.1.3680043.8.498.7703"
    with pytest.raises(SegError, match="no StudyInstanceUID"):
        writer.write(assembled, threshold_labels(assembled))
