"""Write a `Volume` as a DICOM CT series, one CT Image Storage file per slice.

The node is fed over DICOM, so phantoms and test volumes must look like what a scanner sends:
the headers a real CT writes (patient, study, series, frame of reference, equipment, image
plane, CT image, VOI LUT, SOP common), the geometry that readers rebuild the volume from
(ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing), and stored values with
a rescale that gives back the Hounsfield units exactly.

Speed matters (a full lower-extremity CT is ~1400 slices of 512x512), so one dataset is built
per series and only the per-slice elements (position, instance number, UID, pixels) are replaced
before each write; pixel bytes are written as they are, without pydicom's pixel handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from model.volume_io import Volume

log = logging.getLogger(__name__)

MANUFACTURER = "dicom-node phantom"
# Stored as unsigned 12 bits with intercept -1024 when the volume fits this HU range (what most
# scanners do); otherwise as signed 16 bits with intercept 0. Both give back HU exactly.
HU_12BIT_RANGE = (-1024, 3071)
_INT16_RANGE = (-32768, 32767)
# Bone window first (the default a viewer shows), then a soft-tissue window.
WINDOWS = (("BONE", 500, 2000), ("SOFT TISSUE", 40, 400))
_ORTHONORMAL_TOLERANCE = 1e-4
_UID_NAMESPACE = "dicom-node/ct_series"
_SEXES = ("M", "F", "O", "")
# Body Part Examined terms of paired structures met in lower-extremity CT: these need a (Type 2)
# Laterality, left empty because a scan of both legs has no single side.
PAIRED_BODY_PARTS = frozenset(
    {"LEG", "EXTREMITY", "HIP", "THIGH", "KNEE", "CALF", "ANKLE", "FOOT", "CALCANEUS", "PATELLA"}
)


@dataclass(frozen=True)
class PatientInfo:
    """Patient module values. `name` is a DICOM person name ("FAMILY^GIVEN")."""

    name: str
    patient_id: str
    birth_date: date | None = None
    sex: str = ""  # "M", "F", "O" or "" (unknown), DICOM's enumerated values

    def __post_init__(self) -> None:
        if self.sex not in _SEXES:
            raise ValueError(f"sex must be one of {_SEXES}, got {self.sex!r}")


@dataclass(frozen=True)
class StudyInfo:
    """General Study values. Unset UID and date/time are derived at write time.

    `study_instance_uid` None: deterministic from `uid_seed` when one is given, random otherwise.
    `date_time` None: the time of writing.
    """

    study_instance_uid: str | None = None
    date_time: datetime | None = None
    accession_number: str = ""
    description: str = ""
    referring_physician: str = ""  # DICOM person name, empty if unknown (Type 2)
    study_id: str = "1"


@dataclass(frozen=True)
class _SliceGeometry:
    """Slice stack of a volume in the form DICOM needs: a right-handed frame, slice by slice.

    DICOM has no slice direction of its own: readers sort slices along row x column of
    ImageOrientationPatient. A left-handed volume (e.g. z flipped) is therefore stored with its
    slices reversed, which is the same image in patient space.
    """

    array: np.ndarray  # (z, y, x), slices in the order they are written
    origin: np.ndarray  # position of the first written slice's first voxel
    row_cosines: np.ndarray  # direction of increasing column index (x)
    column_cosines: np.ndarray  # direction of increasing row index (y)
    slice_step: np.ndarray  # offset from one written slice to the next, mm
    spacing: tuple[float, float, float]

    @classmethod
    def of(cls, volume: Volume) -> _SliceGeometry:
        if volume.array.ndim != 3 or 0 in volume.array.shape:
            raise ValueError(f"expected a non-empty 3-D array, got shape {volume.array.shape}")
        matrix = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
        if not np.allclose(matrix.T @ matrix, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
            raise ValueError(f"direction is not orthonormal: {volume.direction}")
        spacing_x, spacing_y, spacing_z = (float(s) for s in volume.spacing)
        spacing = (spacing_x, spacing_y, spacing_z)
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        origin = np.asarray(volume.origin, dtype=np.float64)
        array = volume.array
        slice_step = matrix[:, 2] * spacing_z
        if np.linalg.det(matrix) < 0:
            origin = origin + slice_step * (array.shape[0] - 1)
            slice_step = -slice_step
            array = array[::-1]
        return cls(array, origin, matrix[:, 0], matrix[:, 1], slice_step, spacing)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosines, self.column_cosines)

    def position(self, index: int) -> np.ndarray:
        return self.origin + index * self.slice_step


@dataclass(frozen=True)
class _PixelEncoding:
    """How HU become stored values: Image Pixel attributes and RescaleIntercept (slope 1)."""

    pixel_representation: int  # 0 unsigned, 1 signed
    bits_stored: int
    intercept: int
    dtype: str

    @classmethod
    def for_array(cls, array: np.ndarray) -> _PixelEncoding:
        if array.dtype.kind == "f":
            if not np.array_equal(array, np.rint(array)):
                raise ValueError("CT values must be whole Hounsfield units; round the volume first")
        elif array.dtype.kind not in "iub":
            raise ValueError(f"unsupported voxel type {array.dtype}")
        low, high = int(array.min()), int(array.max())
        if HU_12BIT_RANGE[0] <= low and high <= HU_12BIT_RANGE[1]:
            return cls(0, 12, HU_12BIT_RANGE[0], "<u2")
        if _INT16_RANGE[0] <= low and high <= _INT16_RANGE[1]:
            return cls(1, 16, 0, "<i2")
        raise ValueError(f"values {low}..{high} do not fit 16-bit CT pixels")

    def encode(self, hu_slice: np.ndarray) -> bytes:
        if self.intercept == 0:
            return np.ascontiguousarray(hu_slice, dtype=self.dtype).tobytes()
        stored = np.subtract(hu_slice, self.intercept, dtype=np.int32)
        return stored.astype(self.dtype).tobytes()


def _ds(values: Sequence[float] | np.ndarray, decimals: int = 8) -> list[str]:
    """Decimal String values (at most 16 characters); rounding drops float noise like 6e-17."""
    return [format_number_as_ds(round(float(v), decimals) + 0.0) for v in values]


def _uid(uid_seed: str | None, *parts: str) -> UID:
    """Deterministic UID from the seed and the UID's role, or a random one without a seed."""
    if uid_seed is None:
        return generate_uid()
    # generate_uid concatenates its sources; join with a separator so ("a", "bc") != ("ab", "c").
    return generate_uid(entropy_srcs=["\x1f".join((_UID_NAMESPACE, uid_seed, *parts))])


def _dicom_date(value: date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


def _dicom_time(value: datetime) -> str:
    return value.strftime("%H%M%S")


def _series_dataset(
    geometry: _SliceGeometry,
    encoding: _PixelEncoding,
    *,
    patient: PatientInfo,
    study: StudyInfo,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_description: str,
    series_number: int,
    body_part: str,
    slice_thickness_mm: float,
    now: datetime,
) -> Dataset:
    """Everything that is the same on every slice; the writer fills in the per-slice rest."""
    n_rows, n_columns = geometry.array.shape[1:]
    spacing_x, spacing_y, _ = geometry.spacing
    study_time = study.date_time or now

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate = _dicom_date(now)
    ds.InstanceCreationTime = _dicom_time(now)
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = _dicom_date(patient.birth_date)
    ds.PatientSex = patient.sex
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _dicom_date(study_time)
    ds.StudyTime = _dicom_time(study_time)
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.description
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.BodyPartExamined = body_part
    if body_part in PAIRED_BODY_PARTS:
        ds.Laterality = ""
    ds.PatientPosition = "FFS"  # feet first supine, usual for lower-extremity CT
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic CT"
    ds.SoftwareVersions = "dicom-node"
    # General Image / General Acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    # Image Plane
    ds.PixelSpacing = _ds((spacing_y, spacing_x))  # row spacing, then column spacing
    ds.ImageOrientationPatient = _ds(
        np.concatenate([geometry.row_cosines, geometry.column_cosines]), decimals=10
    )
    ds.SliceThickness = _ds((slice_thickness_mm,))[0]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = n_rows
    ds.Columns = n_columns
    ds.BitsAllocated = 16
    ds.BitsStored = encoding.bits_stored
    ds.HighBit = encoding.bits_stored - 1
    ds.PixelRepresentation = encoding.pixel_representation
    # CT Image
    ds.RescaleIntercept = str(encoding.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds((max(n_columns * spacing_x, n_rows * spacing_y),))[0]
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = 200
    ds.Exposure = 200
    ds.FilterType = "BODY"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "BONE"
    # VOI LUT
    ds.WindowCenter = [str(center) for _, center, _ in WINDOWS]
    ds.WindowWidth = [str(width) for _, _, width in WINDOWS]
    ds.WindowCenterWidthExplanation = [name for name, _, _ in WINDOWS]
    # Per-slice values, replaced for every file.
    ds.SOPInstanceUID = ""
    ds.InstanceNumber = 0
    ds.ImagePositionPatient = _ds((0.0, 0.0, 0.0))
    ds.SliceLocation = "0"
    ds.add_new(0x7FE00010, "OW", b"")  # PixelData; explicit OW so no VR lookup per write
    return ds


def write_ct_series(
    volume: Volume,
    out_dir: Path,
    *,
    patient: PatientInfo,
    study: StudyInfo | None = None,
    series_description: str = "Lower extremity CT",
    slice_thickness_mm: float | None = None,
    uid_seed: str | None = None,
    series_number: int = 1,
    body_part: str = "LEG",
) -> list[Path]:
    """Write `volume` (HU) as a CT series into `out_dir`, one file per slice; returns the paths.

    `uid_seed` makes every UID (study unless given in `study`, series, frame of reference, SOP
    instances) a function of the seed, so writing the same volume again yields the same series
    and a receiver sees a re-send, not a new study. Without it the UIDs are random.
    `slice_thickness_mm` defaults to the slice spacing. `out_dir` must be new or empty: files
    of two series in one folder would be read as one.
    """
    geometry = _SliceGeometry.of(volume)
    encoding = _PixelEncoding.for_array(geometry.array)
    study = study or StudyInfo()
    if slice_thickness_mm is None:
        slice_thickness_mm = geometry.spacing[2]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; write each series to a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    ds = _series_dataset(
        geometry,
        encoding,
        patient=patient,
        study=study,
        study_uid=study.study_instance_uid or _uid(uid_seed, "study"),
        series_uid=_uid(uid_seed, "series"),
        frame_of_reference_uid=_uid(uid_seed, "frame-of-reference"),
        series_description=series_description,
        series_number=series_number,
        body_part=body_part,
        slice_thickness_mm=slice_thickness_mm,
        now=datetime.now(),
    )
    normal = geometry.normal
    paths = []
    for index, hu_slice in enumerate(geometry.array):
        position = geometry.position(index)
        sop_uid = _uid(uid_seed, "sop-instance", str(index))
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = _ds(position)
        ds.SliceLocation = _ds((float(position @ normal),))[0]
        ds.PixelData = encoding.encode(hu_slice)
        path = out_dir / f"CT{index + 1:06d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    log.info("wrote a CT series of %d slices to %s", len(paths), out_dir)
    return paths
