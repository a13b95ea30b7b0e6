"""Measurements -> DICOM Comprehensive 3D SR: the leg alignment the node sends beside its SEG.

A TID 1500 Measurement Report (highdicom) built from the SEG the node wrote and
`model.measure`'s per-leg `LegAlignment`, so it lands where the SEG lands:

- **same study, patient and frame of reference as the SEG** (copied from it; the SEG copied
  them from the source CT), the SEG and the source CT instances as evidence;
- per leg, a **TID 1411 volumetric ROI group per femur and tibia segment** of that side,
  referencing the SEG segment and the source series: what the numbers were measured on;
- per leg, a **TID 1501 group "Mechanical alignment of the lower limb"** (finding site lower
  limb with the leg's laterality) holding HKA in 3-D and coronal (UCUM deg) and the femoral
  head radius (mm, finding site femoral head), and with `which` "femoral_angles" femoral
  inclination and version (deg, anteversion positive, finding site femur), and with `which`
  "hip" acetabular version, the lateral centre-edge angle and acetabular coverage (deg, deg,
  %, finding site acetabulum) and the alpha angle (deg, finding site femoral head), with
  TEXT items naming the pelvic frame and the alpha angle's clock position. A measurement
  that could not be made is a qualitative evaluation "Measurement failure" (DCM 114006)
  under the measurement's own concept name, and a TEXT "Qualitative Evaluations" item
  "<name>: not measurable (<reason>)";
- per landmark found, a **TID 1410 group** whose region is a SCOORD3D POINT in the CT's frame
  of reference (LPS mm), its finding the landmark's code, its site the bone and laterality.

The coded concepts are `dicom_node.imaging.codes` (coined ones under 99DCMNODE, documented in
docs/measurements.md). UIDs are derived like the SEG's (`sr_uids`): the same source series,
algorithm, generation and measurements give the same SR series and instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage, generate_uid

from dicom_node import __version__
from dicom_node.imaging.codes import (
    ACETABULAR_COVERAGE,
    ACETABULAR_VERSION,
    ACETABULUM,
    ALPHA_ANGLE,
    ALPHA_CLOCK,
    DEGREE,
    FEMORAL_HEAD,
    FEMORAL_INCLINATION,
    FEMORAL_VERSION,
    FEMUR,
    HKA_3D,
    HKA_CORONAL,
    LANDMARK_CODES,
    LANDMARK_SITES,
    LATERAL_CENTRE_EDGE,
    LATERALITY_CODES,
    LEG_ALIGNMENT,
    LOWER_LIMB,
    MEASURE_SCHEME,
    MEASURE_SCHEME_NAME,
    MEASURE_SCHEME_ORGANIZATION,
    MEASUREMENT_FAILURE,
    MILLIMETRE,
    PELVIC_FRAME,
    PERCENT,
    QUALITATIVE_EVALUATIONS,
    RADIUS,
    SEGMENTS,
)
from dicom_node.imaging.seg import AlgorithmInfo, check_lo, check_result_series, result_uids
from model.labels import Bone, Side
from model.measure import FemoralAngles, HipParameters, Landmark, LegAlignment, Measurement

_UID_NAMESPACE = "dicom-node/sr"
# The segments an alignment is measured on, per leg.
MEASURED_BONES = (Bone.FEMUR, Bone.TIBIA)


@dataclass(frozen=True)
class ReportedMeasurement:
    """One measurement as the SR carries it: its concept, unit, finding site and the
    `LegAlignment` (or `FemoralAngles`, `HipParameters`) attribute it comes from."""

    attribute: str
    concept: Code
    unit: Code
    site: Code


# The leg group's measurements, in the order written.
LEG_MEASUREMENTS = (
    ReportedMeasurement("hka_3d", HKA_3D, DEGREE, LOWER_LIMB),
    ReportedMeasurement("hka_coronal", HKA_CORONAL, DEGREE, LOWER_LIMB),
    ReportedMeasurement("femoral_head_radius", RADIUS, MILLIMETRE, FEMORAL_HEAD),
)
# `which` "femoral_angles": the femur's measurements, in the same leg group, after those.
FEMORAL_MEASUREMENTS = (
    ReportedMeasurement("inclination", FEMORAL_INCLINATION, DEGREE, FEMUR),
    ReportedMeasurement("version", FEMORAL_VERSION, DEGREE, FEMUR),
)
# `which` "hip": the acetabular parameters and the alpha angle, in the same leg group, last.
HIP_MEASUREMENTS = (
    ReportedMeasurement("acetabular_version", ACETABULAR_VERSION, DEGREE, ACETABULUM),
    ReportedMeasurement("lateral_centre_edge", LATERAL_CENTRE_EDGE, DEGREE, ACETABULUM),
    ReportedMeasurement("coverage", ACETABULAR_COVERAGE, PERCENT, ACETABULUM),
    ReportedMeasurement("alpha", ALPHA_ANGLE, DEGREE, FEMORAL_HEAD),
)


def sr_uids(
    source_series_uid: str, algorithm: AlgorithmInfo, generation: int, which: Sequence[str]
) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR of this series, model, generation and
    set of measurements: a repeated delivery of one result is the same instance."""
    return result_uids("sr", source_series_uid, algorithm, generation, ",".join(sorted(which)))


def _tracking(text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=str(generate_uid(entropy_srcs=[_UID_NAMESPACE, "tracking", text])), identifier=text
    )


class SrWriter:
    """Writes the node's measurement reports: one writer per model, configured once; each
    argument is checked here, the error naming it."""

    def __init__(
        self,
        algorithm: AlgorithmInfo,
        *,
        which: Sequence[str] = ("hka",),
        series_number: int = 902,
        series_description: str = "Leg alignment (dicom-node)",
        manufacturer: str = "dicom-node",
    ) -> None:
        owner = "SrWriter"
        check_result_series(owner, algorithm, series_number)
        check_lo(owner, "series_description", series_description)
        check_lo(owner, "manufacturer", manufacturer)
        if isinstance(which, str) or not all(isinstance(w, str) and w for w in which):
            raise TypeError(f"{owner}.which: expected a sequence of names, got {which!r}")
        self.algorithm = algorithm
        self.which = tuple(which)
        self.series_number = series_number
        self.series_description = series_description
        self.manufacturer = manufacturer

    def _algorithm_id(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.algorithm.name,
            version=self.algorithm.algorithm_version,
            parameters=[f"dicom-node {__version__} model.measure"],
        )

    def write(
        self,
        seg: Dataset,
        alignments: Mapping[Side, LegAlignment],
        generation: int = 1,
        femoral: Mapping[Side, FemoralAngles] | None = None,
        hips: Mapping[Side, HipParameters] | None = None,
    ) -> hd.sr.Comprehensive3DSR:
        """The measurement report of `alignments` (`model.measure.measure_leg_alignment` on
        the sided labels `seg` encodes), in `seg`'s study and frame of reference; with
        `which` "femoral_angles", `femoral` (`model.measure.measure_femoral_angles` on those
        alignments) in each leg's group, with "hip" `hips`
        (`model.measure.measure_hip_parameters`) there too, and their landmarks."""
        if str(getattr(seg, "SOPClassUID", "")) != SegmentationStorage:
            raise TypeError("SrWriter.write: seg must be a DICOM Segmentation dataset")
        if not isinstance(alignments, Mapping) or not all(
            isinstance(side, Side) and isinstance(leg, LegAlignment)
            for side, leg in alignments.items()
        ):
            raise TypeError("SrWriter.write: alignments must map Side to LegAlignment")
        if not alignments:
            raise ValueError("SrWriter.write: alignments is empty: no leg to report")
        if "femoral_angles" in self.which:
            if not isinstance(femoral, Mapping) or not all(
                isinstance(angles, FemoralAngles) and angles.side is side
                for side, angles in femoral.items()
            ):
                raise TypeError(
                    "SrWriter.write: femoral must map Side to FemoralAngles (which has "
                    "'femoral_angles')"
                )
            if set(femoral) != set(alignments):
                raise ValueError("SrWriter.write: femoral and alignments differ in their legs")
        if "hip" in self.which:
            if not isinstance(hips, Mapping) or not all(
                isinstance(hip, HipParameters) and hip.side is side for side, hip in hips.items()
            ):
                raise TypeError(
                    "SrWriter.write: hips must map Side to HipParameters (which has 'hip')"
                )
            if set(hips) != set(alignments):
                raise ValueError("SrWriter.write: hips and alignments differ in their legs")
        source = seg.ReferencedSeriesSequence[0]
        source_series_uid = str(source.SeriesInstanceUID)
        frame_of_reference = str(seg.FrameOfReferenceUID)
        series_uid, sop_uid = sr_uids(source_series_uid, self.algorithm, generation, self.which)
        algorithm_id = self._algorithm_id()
        groups: list[Any] = []
        for side in sorted(alignments, key=lambda s: s.value):
            leg = alignments[side]
            groups += self._segment_groups(seg, source_series_uid, side, algorithm_id)
            angles = femoral[side] if femoral is not None else None
            hip = hips[side] if hips is not None and "hip" in self.which else None
            groups.append(self._leg_group(leg, angles, hip, algorithm_id))
            landmarks = leg.landmarks + (hip.landmarks if hip is not None else ())
            groups += self._landmark_groups(side, landmarks, frame_of_reference, algorithm_id)
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=str(generate_uid(entropy_srcs=[_UID_NAMESPACE, "device", self.manufacturer])),
                name=self.algorithm.name,
                manufacturer_name=self.manufacturer,
                model_name=f"dicom-node {__version__}",
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=groups,
        )
        evidence = [seg, *_source_instances(seg)]
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=series_uid,
            series_number=self.series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=self.manufacturer,
            is_complete=True,
            series_description=self.series_description,
        )
        scheme = Dataset()
        scheme.CodingSchemeDesignator = MEASURE_SCHEME
        scheme.CodingSchemeName = MEASURE_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = MEASURE_SCHEME_ORGANIZATION
        sr.CodingSchemeIdentificationSequence = [scheme]
        return sr

    def _segment_groups(
        self,
        seg: Dataset,
        source_series_uid: str,
        side: Side,
        algorithm_id: hd.sr.AlgorithmIdentification,
    ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
        """A TID 1411 group per femur and tibia segment of `side` in the SEG."""
        groups = []
        for number, definition in _segments(seg).items():
            if definition.side is not side or definition.bone not in MEASURED_BONES:
                continue
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(f"{definition.label} segment"),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=SegmentationStorage,
                        sop_instance_uid=str(seg.SOPInstanceUID),
                        segment_number=number,
                        source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
                    ),
                    finding_type=definition.property_type,
                    finding_sites=[
                        hd.sr.FindingSite(definition.property_type, definition.laterality)
                    ],
                    algorithm_id=algorithm_id,
                )
            )
        return groups

    def _reported(
        self, leg: LegAlignment, angles: FemoralAngles | None, hip: HipParameters | None
    ) -> list[tuple[ReportedMeasurement, Measurement]]:
        """The measurements of one leg that `which` picks, with their results."""
        out: list[tuple[ReportedMeasurement, Measurement]] = []
        if "hka" in self.which:
            out += [(r, getattr(leg, r.attribute)) for r in LEG_MEASUREMENTS]
        if "femoral_angles" in self.which and angles is not None:
            out += [(r, getattr(angles, r.attribute)) for r in FEMORAL_MEASUREMENTS]
        if hip is not None:
            out += [(r, getattr(hip, r.attribute)) for r in HIP_MEASUREMENTS]
        return out

    def _leg_group(
        self,
        leg: LegAlignment,
        angles: FemoralAngles | None,
        hip: HipParameters | None,
        algorithm_id: hd.sr.AlgorithmIdentification,
    ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        """The TID 1501 group of one leg's measurements, made or not."""
        laterality = LATERALITY_CODES[leg.side]
        measurements, failures, reasons = [], [], []
        for reported, result in self._reported(leg, angles, hip):
            if result.value is not None:
                measurements.append(
                    hd.sr.Measurement(
                        name=reported.concept,
                        value=float(result.value),
                        unit=reported.unit,
                        finding_sites=[hd.sr.FindingSite(reported.site, laterality)],
                        algorithm_id=algorithm_id,
                    )
                )
            else:
                failures.append(hd.sr.QualitativeEvaluation(reported.concept, MEASUREMENT_FAILURE))
                reasons.append(not_measurable_text(reported.concept, result))
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(f"{leg.side.name.capitalize()} leg alignment"),
            finding_type=LEG_ALIGNMENT,
            finding_sites=[hd.sr.FindingSite(LOWER_LIMB, laterality)],
            algorithm_id=algorithm_id,
            measurements=measurements or None,
            qualitative_evaluations=failures or None,
        )
        texts = [(QUALITATIVE_EVALUATIONS, text) for text in reasons]
        if hip is not None and hip.pelvic_frame is not None:
            texts.append((PELVIC_FRAME, hip.pelvic_frame))
        if hip is not None and hip.alpha_clock is not None:
            texts.append((ALPHA_CLOCK, clock_text(hip.alpha_clock)))
        for concept, text in texts:
            group[0].ContentSequence.append(
                hd.sr.TextContentItem(
                    name=concept,
                    value=text,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        return group

    def _landmark_groups(
        self,
        side: Side,
        landmarks: Sequence[Landmark],
        frame_of_reference: str,
        algorithm_id: hd.sr.AlgorithmIdentification,
    ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
        """A TID 1410 group per landmark found: a SCOORD3D POINT in the CT's frame."""
        laterality = LATERALITY_CODES[side]
        groups = []
        for landmark in landmarks:
            if landmark.name not in LANDMARK_CODES:
                raise ValueError(f"landmarks: no code for {landmark.name!r}")
            concept = LANDMARK_CODES[landmark.name]
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(
                        f"{side.name.capitalize()} {concept.meaning.lower()}"
                    ),
                    referenced_region=hd.sr.ImageRegion3D(
                        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                        graphic_data=np.array([landmark.position_mm], dtype=np.float64),
                        frame_of_reference_uid=frame_of_reference,
                    ),
                    finding_type=concept,
                    finding_sites=[hd.sr.FindingSite(LANDMARK_SITES[landmark.name], laterality)],
                    algorithm_id=algorithm_id,
                )
            )
        return groups


def clock_text(hours: float) -> str:
    """A clock position in hours as a clock reads it: 12.5 -> "12:30"."""
    whole = int(hours) % 12 or 12
    return f"{whole}:{round((hours % 1) * 60):02d}"


def not_measurable_text(concept: Code, result: Measurement) -> str:
    """The TEXT of a measurement not made: "<code meaning>: not measurable (<reason>)"."""
    return f"{concept.meaning}: not measurable ({result.reason})"


def _segments(seg: Dataset) -> dict[int, Any]:
    """The SEG's segment numbers and what each is (`codes.SEGMENTS`), by its codes."""
    by_codes = {(d.property_type.value, d.laterality.value): d for d in SEGMENTS.values()}
    out = {}
    for item in seg.SegmentSequence:
        property_type = item.SegmentedPropertyTypeCodeSequence[0]
        modifiers = property_type.get("SegmentedPropertyTypeModifierCodeSequence") or []
        if not modifiers:
            continue
        key = (str(property_type.CodeValue), str(modifiers[0].CodeValue))
        if key in by_codes:
            out[int(item.SegmentNumber)] = by_codes[key]
    return out


def _source_instances(seg: Dataset) -> list[Dataset]:
    """The source CT instances the SEG references, as evidence (UIDs only)."""
    out = []
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            ds = Dataset()
            ds.StudyInstanceUID = seg.StudyInstanceUID
            ds.SeriesInstanceUID = series.SeriesInstanceUID
            ds.SOPClassUID = item.ReferencedSOPClassUID
            ds.SOPInstanceUID = item.ReferencedSOPInstanceUID
            out.append(ds)
    return out


def measurements_summary(
    alignments: Mapping[Side, LegAlignment],
    femoral: Mapping[Side, FemoralAngles] | None = None,
    hips: Mapping[Side, HipParameters] | None = None,
) -> dict[str, Any]:
    """The alignments (and femoral angles and hip parameters, when given) as JSON for the job
    summary: per leg, each measurement's value and unit or its reason, and the landmarks in
    LPS mm."""
    legs = {}
    for side, leg in sorted(alignments.items(), key=lambda item: item[0].value):
        angles = femoral.get(side) if femoral is not None else None
        hip = hips.get(side) if hips is not None else None
        legs[side.name.lower()] = {
            **{
                reported.attribute: _measurement_json(getattr(leg, reported.attribute))
                for reported in LEG_MEASUREMENTS
            },
            **{
                f"femoral_{reported.attribute}": _measurement_json(
                    getattr(angles, reported.attribute)
                )
                for reported in FEMORAL_MEASUREMENTS
                if angles is not None
            },
            **{
                reported.attribute: _measurement_json(getattr(hip, reported.attribute))
                for reported in HIP_MEASUREMENTS
                if hip is not None
            },
            **(
                {"alpha_clock": hip.alpha_clock, "pelvic_frame": hip.pelvic_frame}
                if hip is not None
                else {}
            ),
            "ankle_centre_from": leg.ankle_centre_from,
            "landmarks_mm": {
                lm.name: [round(float(v), 2) for v in lm.position_mm]
                for lm in leg.landmarks + (hip.landmarks if hip is not None else ())
            },
        }
    return legs


def _measurement_json(result: Measurement) -> dict[str, Any]:
    if result.value is None:
        return {"unit": result.unit, "value": None, "reason": result.reason}
    return {"unit": result.unit, "value": round(float(result.value), 3), "reason": None}
