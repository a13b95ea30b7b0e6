"""The measurement report (DICOM Comprehensive 3D SR, TID 1500) the node sends with its SEG.

Synthetic legs of known geometry (`tests.test_measure.synthetic_leg`) are written as a CT
series, assembled and encoded as a SEG as the node would, measured (`model.measure`) and
reported; every SR is written to a file and read back with highdicom, and checked with
dciodvfy. The phantom series goes through the real node to a real Orthanc and through
`dicom-node segment`: its small field of view holds no whole leg, so HKA comes back as not
measurable, with the reason, end to end.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.app.config import ConfigError, load_config
from dicom_node.imaging import codes
from dicom_node.imaging.key_image import COLOURS, KEY_IMAGE_SERIES_DESCRIPTION
from dicom_node.imaging.seg import AlgorithmInfo, SegWriter
from dicom_node.imaging.sr import (
    FEMORAL_MEASUREMENTS,
    HIP_MEASUREMENTS,
    LEG_MEASUREMENTS,
    SrWriter,
    clock_text,
    measurements_summary,
    not_measurable_text,
    sr_uids,
)
from dicom_node.imaging.volume.assemble import assemble_volume
from dicom_node.pipeline.inference import key_image_path_beside, save_dicom, sr_path_beside
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess, destination_toml, storescu
from dicom_node.testbed.peers import OrthancProcess
from model.labels import Bone, Side
from model.measure import (
    FemoralAngles,
    HipParameters,
    LegAlignment,
    find_implants,
    measure_femoral_angles,
    measure_hip_parameters,
    measure_leg_alignment,
)
from model.volume_io import Volume
from tests.support import VIEWER, PhantomSeries, dciodvfy_errors, require_dcmjs
from tests.test_hip_measure import synthetic_pelvis
from tests.test_implants import metal_ball
from tests.test_key_image import pixels_of
from tests.test_measure import synthetic_leg

ALGORITHM = AlgorithmInfo("dicom-node bone segmentation", "1.0", "ab" * 32)
BOTH = ("hka", "femoral_angles")


def _leg_case(directory: Path, labels: Volume, seed: str) -> tuple[Dataset, Path]:
    """The labels as a CT series (bone 700 HU), assembled, and their SEG: what the SR joins."""
    hu = np.where(labels.array > 0, 700, 0).astype(np.int16)
    paths = write_ct_series(
        labels.with_array(hu),
        directory / "ct",
        patient=PatientInfo(name="LEG^SYNTHETIC", patient_id="LEG1", sex="O"),
        uid_seed=seed,
    )
    seg = SegWriter(ALGORITHM).write(assemble_volume(paths), labels)
    assert seg is not None
    return seg, paths[0]


def _measured_leg_case(directory: Path, labels: np.ndarray, name: str) -> dict:
    """A leg's SEG and CT, its alignment and femoral angles, and the SR written from them."""
    seg, ct = _leg_case(directory, labels, name)
    alignments = measure_leg_alignment(labels)
    femoral = measure_femoral_angles(labels, legs=alignments)
    path = directory / "sr.dcm"
    save_dicom(SrWriter(ALGORITHM, which=BOTH).write(seg, alignments, femoral=femoral), path)
    return {"seg": seg, "ct": ct, "alignments": alignments, "femoral": femoral, "path": path}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A whole left leg in 4 deg of varus: every measurement made."""
    labels, _ = synthetic_leg(4.0, Side.LEFT)
    return _measured_leg_case(tmp_path_factory.mktemp("measured"), labels, "sr-measured")


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A right leg cut 5 mm above the femoral head's centre: HKA and the radius not
    measurable, the landmarks below still found."""
    labels, _ = synthetic_leg(6.0, Side.RIGHT, z_top=505.0)
    return _measured_leg_case(tmp_path_factory.mktemp("cut"), labels, "sr-cut")


@pytest.fixture(scope="module")
def hips(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both hips of the synthetic pelvis (femurs and hip bones, no knee): the hip parameters
    made, HKA not measurable."""
    labels = synthetic_pelvis()
    directory = tmp_path_factory.mktemp("hips")
    seg, ct = _leg_case(directory, labels, "sr-hips")
    alignments = measure_leg_alignment(labels)
    femoral = measure_femoral_angles(labels, legs=alignments)
    hip = measure_hip_parameters(labels, alignments, femoral)
    path = directory / "sr.dcm"
    writer = SrWriter(ALGORITHM, which=(*BOTH, "hip"))
    save_dicom(writer.write(seg, alignments, femoral=femoral, hips=hip), path)
    return {
        "seg": seg,
        "ct": ct,
        "alignments": alignments,
        "femoral": femoral,
        "hips": hip,
        "path": path,
    }


@pytest.fixture(scope="module")
def implanted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic pelvis with a metal ball in the right femoral head: the right hip's
    parameters and femoral angles not measurable for the implant, the left's made."""
    labels = synthetic_pelvis()
    directory = tmp_path_factory.mktemp("implanted")
    seg, _ = _leg_case(directory, labels, "sr-implanted")
    right_head = np.array([-100.0, 0.0, 0.0])  # where synthetic_pelvis puts it
    implants = find_implants(labels, metal_ball(labels, right_head, 15.0))
    alignments = measure_leg_alignment(labels, implants)
    femoral = measure_femoral_angles(labels, alignments, implants)
    hip = measure_hip_parameters(labels, alignments, femoral, implants)
    path = directory / "sr.dcm"
    writer = SrWriter(ALGORITHM, which=(*BOTH, "hip"))
    save_dicom(writer.write(seg, alignments, femoral=femoral, hips=hip), path)
    return {"seg": seg, "alignments": alignments, "femoral": femoral, "hips": hip, "path": path}


def _leg_group(
    report: hd.sr.MeasurementReport, side: Side
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = [
        g
        for g in report.get_image_measurement_groups()
        if g.finding_sites[0].laterality == codes.LATERALITY_CODES[side]
    ]
    assert len(groups) == 1
    return groups[0]


def _reasons(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]


def _check_report(
    path: Path,
    seg: Dataset,
    alignments: dict[Side, LegAlignment],
    femoral: dict[Side, FemoralAngles] | None = None,
    hips: dict[Side, HipParameters] | None = None,
) -> None:
    """highdicom reads back what the node measured: values, units, laterality, reasons (the
    femoral angles' and hip parameters' too, when given), landmarks in the CT's frame, and the
    SEG segments of that side with the source series."""
    sr = hd.sr.srread(path)
    report = sr.content
    labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert isinstance(report, hd.sr.MeasurementReport)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and sr.PatientID == seg.PatientID
    for side, leg in alignments.items():
        laterality = codes.LATERALITY_CODES[side]
        group = _leg_group(report, side)
        assert group.finding_sites[0].value == codes.LOWER_LIMB
        made = {m.name.value: m for m in group.get_measurements()}
        failed = {q.name.value: q for q in group.get_qualitative_evaluations()}
        reported_results = [(r, getattr(leg, r.attribute)) for r in LEG_MEASUREMENTS]
        if femoral is not None:
            angles = femoral[side]
            reported_results += [(r, getattr(angles, r.attribute)) for r in FEMORAL_MEASUREMENTS]
        landmarks = leg.landmarks
        if hips is not None:
            reported_results += [(r, getattr(hips[side], r.attribute)) for r in HIP_MEASUREMENTS]
            landmarks += hips[side].landmarks
        for reported, result in reported_results:
            key = reported.concept.value
            if result.value is not None:
                measurement = made.pop(key)
                assert measurement.value == pytest.approx(result.value, abs=1e-9)
                assert measurement.unit == reported.unit and result.unit == reported.unit.value
                (site,) = measurement.finding_sites
                assert site.value == reported.site and site.laterality == laterality
            else:
                assert failed.pop(key).value == codes.MEASUREMENT_FAILURE
                assert not_measurable_text(reported.concept, result) in _reasons(group)
        assert made == {} and failed == {}
        points = {
            g.finding_type.value: g
            for g in report.get_planar_roi_measurement_groups()
            if g.finding_sites[0].laterality == laterality
        }
        assert len(points) == len(landmarks)
        for landmark in landmarks:
            group_ = points[codes.LANDMARK_CODES[landmark.name].value]
            assert group_.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT
            assert group_.roi.frame_of_reference_uid == seg.FrameOfReferenceUID
            np.testing.assert_allclose(group_.roi.value[0], landmark.position_mm, atol=1e-6)
        volumes = [
            g
            for g in report.get_volumetric_roi_measurement_groups()
            if g.finding_sites[0].laterality == laterality
        ]
        segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
        in_seg = {
            codes.BONE_CODES[d.bone].value
            for d in codes.SEGMENTS.values()
            if d.side is side and d.bone in (Bone.FEMUR, Bone.TIBIA) and d.label in labels
        }
        assert {g.finding_type.value for g in volumes} == in_seg
        for g in volumes:
            reference = g.referenced_segment
            segment_item = reference[0].ReferencedSOPSequence[0]
            assert segment_item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            number = int(segment_item.ReferencedSegmentNumber)
            assert (
                segments[number].SegmentedPropertyTypeCodeSequence[0].CodeValue
                == g.finding_type.value
            )
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == reference[1].UID


def test_a_measured_leg_reads_back_as_measured(measured: dict) -> None:
    leg = measured["alignments"][Side.LEFT]
    assert leg.hka_coronal.value == pytest.approx(-4.0, abs=0.5)  # 4 deg varus: varus negative
    angles = measured["femoral"][Side.LEFT]
    assert angles.inclination.measurable and angles.version.measurable, angles
    _check_report(measured["path"], measured["seg"], measured["alignments"], measured["femoral"])
    group = _leg_group(hd.sr.srread(measured["path"]).content, Side.LEFT)
    made = {m.name.value: m for m in group.get_measurements()}
    inclination = made[codes.FEMORAL_INCLINATION.value]
    assert inclination.value == pytest.approx(angles.inclination.value, abs=1e-9)
    assert inclination.unit == codes.DEGREE
    assert inclination.finding_sites[0].value == codes.FEMUR
    assert inclination.finding_sites[0].laterality == codes.LATERALITY_CODES[Side.LEFT]
    version = made[codes.FEMORAL_VERSION.value]
    assert version.value == pytest.approx(angles.version.value, abs=1e-9)
    summary = measurements_summary(measured["alignments"], measured["femoral"])["left"]
    assert summary["femoral_inclination"]["value"] == round(angles.inclination.value, 3)
    assert summary["femoral_version"]["unit"] == "deg"


def test_what_was_not_measurable_reads_back_with_the_reason(cut: dict) -> None:
    leg = cut["alignments"][Side.RIGHT]
    assert not leg.hka_3d.measurable and "femoral head not in view" in str(leg.hka_3d.reason)
    angles = cut["femoral"][Side.RIGHT]
    assert not angles.inclination.measurable and not angles.version.measurable
    _check_report(cut["path"], cut["seg"], cut["alignments"], cut["femoral"])
    group = _leg_group(hd.sr.srread(cut["path"]).content, Side.RIGHT)
    assert any("not measurable (femoral head not in view" in r for r in _reasons(group))
    failed = {q.name.value for q in group.get_qualitative_evaluations()}
    assert {codes.FEMORAL_INCLINATION.value, codes.FEMORAL_VERSION.value} <= failed
    assert not_measurable_text(codes.FEMORAL_VERSION, angles.version) in _reasons(group)
    summary = measurements_summary(cut["alignments"], cut["femoral"])["right"]
    assert summary["femoral_version"] == {
        "unit": "deg",
        "value": None,
        "reason": angles.version.reason,
    }


def test_the_hip_parameters_read_back_as_measured(hips: dict) -> None:
    _check_report(hips["path"], hips["seg"], hips["alignments"], hips["femoral"], hips["hips"])
    report = hd.sr.srread(hips["path"]).content
    for side, hip in hips["hips"].items():
        assert hip.acetabular_version.measurable and hip.alpha.measurable, hip
        group = _leg_group(report, side)
        made = {m.name.value: m for m in group.get_measurements()}
        coverage = made[codes.ACETABULAR_COVERAGE.value]
        assert coverage.unit == codes.PERCENT and coverage.finding_sites[0].value == (
            codes.ACETABULUM
        )
        texts = {
            str(item.ConceptNameCodeSequence[0].CodeValue): str(item.TextValue)
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT"
        }
        assert texts[codes.PELVIC_FRAME.value] == hip.pelvic_frame
        assert hip.alpha_clock is not None
        assert texts[codes.ALPHA_CLOCK.value] == clock_text(hip.alpha_clock)
        summary = measurements_summary(hips["alignments"], hips["femoral"], hips["hips"])
        entry = summary[side.name.lower()]
        assert entry["lateral_centre_edge"]["value"] == round(hip.lateral_centre_edge.value, 3)
        assert "asis" in entry["landmarks_mm"]
    assert clock_text(12.5) == "12:30" and clock_text(3.0) == "3:00"


def test_a_metal_implant_reads_back_as_the_reason(implanted: dict) -> None:
    """The SR says why each measurement of the implanted hip is missing; the summary too."""
    _check_report(
        implanted["path"],
        implanted["seg"],
        implanted["alignments"],
        implanted["femoral"],
        implanted["hips"],
    )
    group = _leg_group(hd.sr.srread(implanted["path"]).content, Side.RIGHT)
    metal = "not measurable (metal implant at the right femoral head)"
    for concept in (codes.FEMORAL_INCLINATION, codes.ACETABULAR_COVERAGE, codes.ALPHA_ANGLE):
        assert f"{concept.meaning}: {metal}" in _reasons(group)
    made = _leg_group(hd.sr.srread(implanted["path"]).content, Side.LEFT).get_measurements()
    assert codes.ACETABULAR_COVERAGE.value in {m.name.value for m in made}
    summary = measurements_summary(implanted["alignments"], implanted["femoral"], implanted["hips"])
    assert summary["right"]["alpha"]["reason"] == "metal implant at the right femoral head"
    assert dciodvfy_errors(implanted["path"]) == []


def test_dciodvfy_finds_no_error(measured: dict, cut: dict, hips: dict) -> None:
    for case in (measured, cut, hips):
        assert dciodvfy_errors(case["path"]) == []


def _code(code: hd.sr.CodedConcept | None) -> tuple[str, str] | None:
    return None if code is None else (str(code.value), str(code.scheme_designator))


def _dcmjs_code(code: dict | None) -> tuple[str, str] | None:
    return None if code is None else (code["value"], code["scheme"])


def test_dcmjs_reads_the_measurements_back_as_highdicom_does(
    measured: dict, cut: dict, hips: dict
) -> None:
    """dcmjs (the OHIF viewer's DICOM library) reads every measurement group's values, units,
    finding sites with laterality, failures and landmarks as highdicom reads them; OHIF's own
    TID 1500 reader takes the document (it maps Cornerstone tools only, none of ours)."""
    node = require_dcmjs()
    read_back: dict[Path, list[dict]] = {}
    for case in (measured, cut, hips):
        result = subprocess.run(
            [node, str(VIEWER / "read_sr.js"), str(case["path"])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        read = json.loads(result.stdout)
        assert read["template"] == "1500"
        assert read["cornerstone"] == {"accepted": True, "error": None, "tool_measurements": 0}
        report = hd.sr.srread(case["path"]).content
        expected = [
            *report.get_image_measurement_groups(),
            *report.get_planar_roi_measurement_groups(),
            *report.get_volumetric_roi_measurement_groups(),
        ]
        assert len(read["groups"]) == len(expected) > 0
        by_tracking = {g["tracking_identifier"]: g for g in read["groups"]}
        for group in expected:
            got = by_tracking.pop(group.tracking_identifier)
            measurements = {
                _dcmjs_code(m["concept"]): (
                    m["value"],
                    _dcmjs_code(m["unit"]),
                    [
                        (_dcmjs_code(s["code"]), _dcmjs_code(s["laterality"]))
                        for s in m["finding_sites"]
                    ],
                )
                for m in got["measurements"]
            }
            assert measurements == {
                _code(m.name): (
                    pytest.approx(m.value, abs=1e-9),
                    _code(m.unit),
                    [(_code(s.value), _code(s.laterality)) for s in m.finding_sites],
                )
                for m in group.get_measurements()
            }
            evaluations = {
                _dcmjs_code(e["concept"]): _dcmjs_code(e["value"]) for e in got["evaluations"]
            }
            qualitative = group.get_qualitative_evaluations()
            assert evaluations.items() >= {(_code(q.name), _code(q.value)) for q in qualitative}
            roi = getattr(group, "roi", None)
            if roi is not None and roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT:
                (point,) = got["points"]
                np.testing.assert_allclose(point["data"], np.ravel(roi.value), atol=1e-6)
                assert point["frame_of_reference"] == roi.frame_of_reference_uid
        assert by_tracking == {}
        read_back[case["path"]] = read["groups"]
    # What was compared held something: values on the measured legs, reasons on the cut one.
    assert sum(len(g["measurements"]) for g in read_back[measured["path"]]) >= len(LEG_MEASUREMENTS)
    assert any(g["evaluations"] for g in read_back[cut["path"]])


def test_uids_are_derived_and_the_sr_joins_the_seg(measured: dict) -> None:
    seg, alignments = measured["seg"], measured["alignments"]
    first = SrWriter(ALGORITHM).write(seg, alignments)
    again = SrWriter(ALGORITHM).write(seg, alignments)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    source = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == sr_uids(
        source, ALGORITHM, 1, ("hka",)
    )
    assert sr_uids(source, ALGORITHM, 2, ("hka",)) != sr_uids(source, ALGORITHM, 1, ("hka",))
    assert sr_uids(source, ALGORITHM, 1, BOTH) != sr_uids(source, ALGORITHM, 1, ("hka",))
    assert sr_uids(source, ALGORITHM, 1, BOTH) == sr_uids(source, ALGORITHM, 1, BOTH[::-1])
    assert first.SOPInstanceUID not in (seg.SOPInstanceUID, seg.SeriesInstanceUID)
    ct = dcmread(measured["ct"], stop_before_pixels=True)
    assert first.StudyInstanceUID == ct.StudyInstanceUID
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in first.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert {str(seg.SOPInstanceUID), str(ct.SOPInstanceUID)} <= evidence


def test_writer_and_config_name_what_is_wrong(tmp_path: Path, measured: dict) -> None:
    with pytest.raises(TypeError, match=r"SrWriter\.algorithm"):
        SrWriter("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SrWriter\.series_description"):
        SrWriter(ALGORITHM, series_description="x" * 65)
    with pytest.raises(TypeError, match=r"SrWriter\.write: seg"):
        SrWriter(ALGORITHM).write(Dataset(), measured["alignments"])
    with pytest.raises(ValueError, match="alignments is empty"):
        SrWriter(ALGORITHM).write(measured["seg"], {})
    with pytest.raises(TypeError, match=r"SrWriter\.write: femoral"):
        SrWriter(ALGORITHM, which=BOTH).write(measured["seg"], measured["alignments"])
    config = tmp_path / "config.toml"
    config.write_text('[measurements]\nwhich = ["hka", "alpha"]\n')
    with pytest.raises(ConfigError, match=r"measurements\.which: unknown 'alpha'"):
        load_config(config)
    config.write_text("[measurements]\nenabled = false\n")
    assert load_config(config).measurements.enabled is False
    config.write_text('[measurements]\nwhich = ["hka", "femoral_angles"]\n')
    assert load_config(config).measurements.which == ("hka", "femoral_angles")
    config.write_text('[measurements]\nwhich = ["femoral_angles"]\n')
    assert load_config(config).measurements.which == ("femoral_angles",)
    config.write_text("")
    assert {"femoral_angles", "hip"} <= set(load_config(config).measurements.which)  # default


# -- the phantom through the node and the command line (the model runs) ----------------------


def _phantom_report(path: Path, ct_study: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The phantom's SR: valid, in the CT's study, its HKA not measurable with the reason."""
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == ct_study
    groups = sr.content.get_image_measurement_groups()
    assert groups
    for group in groups:
        names = {q.name.value for q in group.get_qualitative_evaluations()}
        assert codes.HKA_3D.value in names  # a hip phantom holds no knee or ankle
        assert any(
            r.startswith("Hip-knee-ankle angle, 3-D: not measurable (") for r in _reasons(group)
        )
    return groups[0]


def test_the_node_sends_the_sr_with_the_seg_into_the_study(
    tmp_path: Path, orthanc: OrthancProcess, phantom_series: PhantomSeries
) -> None:
    ct_dir = phantom_series(1003)["ct"]
    ct = dcmread(next(ct_dir.iterdir()), stop_before_pixels=True)
    # The key image as a Secondary Capture too ([measurements] key_image, off by default).
    extra = destination_toml(orthanc.destination()) + "[measurements]\nkey_image = true\n"
    node = NodeProcess(tmp_path, extra_config=extra).start()
    try:
        assert storescu(node.port, ct_dir, extra=("+sd", "+r")).returncode == 0
        node.wait_for_states({str(ct.SeriesInstanceUID)}, {"done", "failed"}, timeout=240)
        status = node.series()[str(ct.SeriesInstanceUID)]
        assert status["state"] == "done", status
        job = json.loads(node.cli("job", str(status["id"]), "--json").stdout)
        shown = node.cli("job", str(status["id"])).stdout
    finally:
        node.stop()
    study = str(ct.StudyInstanceUID)
    (sr_series,) = orthanc.find_series("SR", StudyInstanceUID=study)
    (seg_series,) = orthanc.find_series("SEG", StudyInstanceUID=study)
    assert sr_series["ParentStudy"] == seg_series["ParentStudy"]
    (instance,) = orthanc.instances_of_series(sr_series["ID"])
    path = tmp_path / "sr.dcm"
    path.write_bytes(orthanc.download(instance["ID"]))
    _phantom_report(path, study)
    assert dcmread(path).SOPInstanceUID == job["result"]["sr_sop_instance_uid"]
    measurements = job["result"]["measurements"]
    for leg in measurements.values():
        assert leg["hka_3d"]["value"] is None and leg["hka_3d"]["reason"]
        # The default `which`: the femoral angles and the hip parameters, each a value or a reason.
        hip = {"acetabular_version", "lateral_centre_edge", "coverage", "alpha"}
        assert {"femoral_inclination", "femoral_version"} | hip <= set(leg)
        assert all(leg[name]["value"] is not None or leg[name]["reason"] for name in hip)
    assert "not measurable" in shown

    # The key image: a PNG beside the SEG and SR (only under data_dir), named by `job ID`,
    # and the same pixels as a Secondary Capture in the CT's study that dciodvfy passes.
    key_image = Path(job["result"]["key_image"])
    seg = node.data_dir / "results" / job["seg_file"]
    assert key_image == key_image_path_beside(seg) and sr_path_beside(seg).is_file()
    assert key_image.resolve().is_relative_to(node.data_dir.resolve())
    png = key_image.read_bytes()
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert pixels_of(png, COLOURS["landmark"]) > 0  # the femoral head the hip phantom holds
    assert f"keyimage:{key_image}" in "".join(shown.split())  # however rich wraps it
    (sc_series,) = orthanc.find_series("OT", StudyInstanceUID=study)
    assert sc_series["ParentStudy"] == seg_series["ParentStudy"]
    (sc_instance,) = orthanc.instances_of_series(sc_series["ID"])
    sc_path = tmp_path / "sc.dcm"
    sc_path.write_bytes(orthanc.download(sc_instance["ID"]))
    sc = dcmread(sc_path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.PatientID == ct.PatientID
    assert sc.SeriesDescription == KEY_IMAGE_SERIES_DESCRIPTION
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(sc.pixel_array, pixels)
    assert dciodvfy_errors(sc_path) == []


def test_segment_command_writes_the_sr_beside_the_seg(
    tmp_path: Path, phantom_series: PhantomSeries
) -> None:
    ct_dir = phantom_series(1003)["ct"]
    out = tmp_path / "seg.dcm"
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node", "segment", str(ct_dir), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    sr_path = sr_path_beside(out)
    assert sr_path == tmp_path / "seg_sr.dcm" and str(sr_path) in run.stdout.splitlines()
    key_image = tmp_path / "seg_key.png"  # the measurements drawn on the CT, beside them
    assert str(key_image) in run.stdout.splitlines()
    assert key_image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ct = dcmread(next(ct_dir.iterdir()), stop_before_pixels=True)
    _phantom_report(sr_path, str(ct.StudyInstanceUID))
    seg = dcmread(out, stop_before_pixels=True)
    sr = dcmread(sr_path)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == seg.StudyInstanceUID


def test_a_pacs_that_refuses_srs_still_gets_the_seg(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery stage against a storage SCP that takes CT (the SEG's stand-in here) but
    no SR: the SEG is delivered, the series done, and the refused SR a warning."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        Comprehensive3DSRStorage,
        CTImageStorage,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    from dicom_node.app.config import Config, DeliveryConfig
    from dicom_node.pipeline.deliver import DeliveryStage
    from dicom_node.pipeline.spool import SpooledFile
    from dicom_node.pipeline.state import NodeState, ReceivedInstance, Target
    from dicom_node.testbed.peers import PynetdicomSCP

    results = tmp_path / "results"
    results.mkdir()
    hu = np.zeros((2, 16, 16), np.int16)
    patient = PatientInfo(name="SR^REFUSED", patient_id="PID-SR")
    (ct,) = write_ct_series(Volume(hu, (1.0, 1.0, 1.0)), tmp_path / "ct", patient=patient)[:1]
    (results / "seg.dcm").write_bytes(ct.read_bytes())
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID = Comprehensive3DSRStorage, generate_uid()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.save_as(sr_path_beside(results / "seg.dcm"), enforce_file_format=True)

    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    with PynetdicomSCP(sop_classes=[CTImageStorage]) as pacs:
        received = ReceivedInstance(
            "1.2.3.1", CTImageStorage, ExplicitVRLittleEndian, "1.2.3", "1.2", "CT", "CT1"
        )
        series_id = state.record_instance(received, SpooledFile("1.dcm", 10)).series_id
        state.complete_if_idle(series_id, 0)
        state.enqueue(series_id, 1)
        claim = state.claim_next_queued()
        assert claim is not None
        target = Target("pacs", pacs.ae_title, "127.0.0.1", pacs.port)
        assert state.mark_segmented(claim, "seg.dcm", ("9.1", "9.2"), "{}", [target])
        config = Config(delivery=DeliveryConfig(max_attempts=1, timeout_s=5))
        stage = DeliveryStage(config, state, results, BackgroundScheduler())
        with caplog.at_level("WARNING", logger="dicom_node.pipeline.deliver"):
            for due in state.claim_due_deliveries():
                stage.attempt(due)
        received_uids = list(pacs.received)
    record = state.job(series_id)
    state.close()
    assert received_uids == [dcmread(ct, stop_before_pixels=True).SOPInstanceUID]
    assert record is not None and record.series.state == "done", record
    assert "stored the SEG but not all that goes with it (seg_sr.dcm)" in caplog.text
