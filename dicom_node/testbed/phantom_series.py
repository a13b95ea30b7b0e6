"""Phantom CTs as the node receives them: a DICOM CT series plus the ground truth beside it.

End-to-end tests send the series to the node and score the returned SEG against labels.nii.gz,
so the truth must lie on the series' grid. The same phantom always becomes the same study
(UIDs derived from the phantom's ground truth), so re-sending it is a re-send, not a new study.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

from dicom_node.testbed.ct_series import PatientInfo, StudyInfo, write_ct_series
from model.phantom import Phantom, generate_phantom, write_phantom_nifti, write_phantom_truth

PHANTOM_FORMATS = ("dicom", "nifti")
# A fixed study time keeps the headers of one phantom identical from one run to the next.
PHANTOM_STUDY_TIME = datetime(2000, 1, 1, 8, 0, 0)
# Body Part Examined (DICOM defined terms) of the phantom regions; EXTREMITY when unknown.
_BODY_PARTS = {
    "whole_legs": "EXTREMITY",
    "lower_legs": "LEG",
    "torso": "PELVIS",
    "hip": "HIP",
    "knee": "KNEE",
    "ankle": "ANKLE",
}


def phantom_uid_seed(phantom: Phantom) -> str:
    """UID seed of a phantom: a digest of its ground truth (version, seed, size, region, grid).

    Any change to what was generated (another seed, region, spacing or phantom version) gives
    another study; the same arguments give the same one.
    """
    truth = json.dumps(phantom.geometry, sort_keys=True)
    return "phantom:" + hashlib.sha256(truth.encode()).hexdigest()


def write_phantom_series(phantom: Phantom, out_dir: Path) -> dict[str, Path]:
    """Write OUT/ct/ (the CT series), OUT/labels.nii.gz and OUT/geometry.json; returns them.

    The patient is synthetic ("PHANTOM^SEED<n>", ID "PH<n>"): no real identifiers.
    """
    out_dir = Path(out_dir)
    seed = int(phantom.geometry["seed"])
    region = str(phantom.geometry.get("region", ""))
    ct_dir = out_dir / "ct"
    write_ct_series(
        phantom.image,
        ct_dir,
        patient=PatientInfo(name=f"PHANTOM^SEED{seed}", patient_id=f"PH{seed}", sex="O"),
        study=StudyInfo(
            date_time=PHANTOM_STUDY_TIME,
            accession_number=f"PH{seed}",
            description=f"Phantom lower extremity CT ({region})",
        ),
        series_description=f"Phantom {region} {phantom.geometry.get('size', '')}".strip(),
        slice_thickness_mm=phantom.slice_thickness_mm,
        uid_seed=phantom_uid_seed(phantom),
        body_part=_BODY_PARTS.get(region, "EXTREMITY"),
    )
    return {"ct": ct_dir, **write_phantom_truth(phantom, out_dir)}


def write_phantom(
    out_dir: Path,
    *,
    seed: int,
    size: str = "full",
    output_format: str = "dicom",
    spacing: tuple[float, float, float] | None = None,
    region: str | None = None,
) -> dict[str, Path]:
    """Generate the phantom of `seed` and write it as a DICOM series or as NIfTI files."""
    if output_format not in PHANTOM_FORMATS:
        raise ValueError(f"format must be one of {PHANTOM_FORMATS}, got {output_format!r}")
    phantom = generate_phantom(seed, size, spacing=spacing, region=region)
    if output_format == "nifti":
        return write_phantom_nifti(phantom, out_dir)
    return write_phantom_series(phantom, out_dir)
