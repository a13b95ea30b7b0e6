"""Series files in, a SEG dataset and its measurement report (SR) (or "no findings", or a
reason it failed) out.

`segment_series` is the whole volume -> segment -> SEG stage as one function, with no process
or queue around it: the offline `dicom-node segment DICOM_DIR -o seg.dcm` calls it directly, the
daemon through `dicom_node.pipeline.worker`, which runs it in a process of its own. The
measurement report (SR: `[measurements]`, `dicom_node.imaging.sr`) and its key image (a PNG
for people, `dicom_node.imaging.key_image`) lie beside the SEG (`sr_path_beside`,
`key_image_path_beside`): the state stores only the SEG's file name; they go where it goes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.app.config import Config, InferenceConfig
from dicom_node.imaging.key_image import key_image_png, key_image_sc
from dicom_node.imaging.seg import AlgorithmInfo, SegWriter
from dicom_node.imaging.sr import SrWriter, measurements_summary
from dicom_node.imaging.volume.assemble import assemble_volume
from dicom_node.imaging.volume.policy import AssemblyError, AssemblyPolicy
from dicom_node.pipeline.spool import write_durably
from model.engine.verdict import Verdict
from model.measure import (
    find_implants,
    measure_femoral_angles,
    measure_hip_parameters,
    measure_leg_alignment,
)
from model.volume_io import Volume

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch loads slowly: model.engine.inference is imported where a model is built
    from model.engine.inference import Segmentation, Segmenter


class VolumeSegmenter(Protocol):
    """What the node needs of a segmenter: the weights' metadata for the SEG's algorithm
    identification, and a volume's segmentation. `model.engine.inference.Segmenter` is one."""

    @property
    def metadata(self) -> Mapping[str, object]: ...

    def segment(self, volume: Volume) -> Segmentation: ...


@dataclass(frozen=True)
class SeriesResult:
    """What became of a series: a SEG (dataset) or none (no bone, or failed with a reason)."""

    dataset: Dataset | None
    reason: str | None  # why it failed; None for a SEG or no findings
    summary: dict[str, Any] = field(default_factory=dict)  # segments, timings, notes
    labels: Volume | None = None  # the sided labels the SEG encodes (misplaced pieces left out)
    sr: Dataset | None = None  # the measurement report beside the SEG ([measurements])
    key_image: bytes | None = None  # its key image, a PNG
    key_image_sc: Dataset | None = None  # the same as a Secondary Capture (key_image_dicom)

    @property
    def no_findings(self) -> str | None:
        """Why there is no SEG of a series that did not fail."""
        return self.summary.get("no_findings")

    @property
    def failed(self) -> bool:
        return self.reason is not None


def build_segmenter(config: InferenceConfig, anatomy_check: bool = True) -> Segmenter:
    """The cascade from the [inference] section (imported here: torch loads slowly); the CLI
    can leave the anatomy check out to score the raw output."""
    from model.engine.inference import InferenceSettings, Segmenter
    from model.engine.weights import DEFAULT_WEIGHTS

    settings = InferenceSettings(
        strategy=config.strategy,
        device=config.device,
        precision=config.precision,
        threads=config.threads or None,
        anatomy_check=anatomy_check,
    )
    return Segmenter(Path(config.weights) if config.weights else DEFAULT_WEIGHTS, settings)


def build_sr_writer(config: Config, algorithm: AlgorithmInfo) -> SrWriter | None:
    """The SR writer of `[measurements]`, or None when measurements are off."""
    if not config.measurements.enabled or not config.measurements.which:
        return None
    return SrWriter(algorithm, which=config.measurements.which)


def build_writer(config: Config, segmenter: VolumeSegmenter) -> SegWriter:
    """The SEG writer for this model (named by its weights' hash) and the [seg] section."""
    return SegWriter(
        AlgorithmInfo.from_metadata(segmenter.metadata),
        series_number=config.seg.series_number,
        series_description=config.seg.series_description,
    )


NO_BONE = "none of the six bones found"


def segment_series(
    paths: list[Path],
    policy: AssemblyPolicy,
    segmenter: VolumeSegmenter,
    writer: SegWriter,
    generation: int = 1,
    mark_unsure: bool = False,
    sr_writer: SrWriter | None = None,
    key_image_dicom: bool = False,
) -> SeriesResult:
    """Assemble the series, segment it, write its SEG dataset (not yet to disk).

    A series that cannot be assembled fails with the assembler's reason; a volume without any
    of the six bones, or whose segmentation is implausible (`model.engine.verdict`: bones where no
    lower extremity has them, bones no adult has, a model unsure of much of it), is "no
    findings" (no SEG), with the reason in the summary; a few misplaced bones are left out of
    the SEG. `mark_unsure`: a SEG the verdict is unsure of says UNVERIFIED and why in its
    Series Description and each segment's description. `sr_writer`: the measurements
    (`model.measure`, on the sided labels) as an SR beside the SEG, and in the summary under
    "measurements", with their key image (PNG; `key_image_dicom`: also as a DICOM Secondary
    Capture); none without a SEG. A measurement that fails outright costs the SR and the key
    image, never the SEG; a key image that fails, only itself.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        assembled = assemble_volume(paths, policy)
    except AssemblyError as error:
        return SeriesResult(None, f"cannot assemble: {error}")
    timings["assemble_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # The segmentation comes checked for anatomical sense (`model.engine.anatomy`): misplaced pieces
    # are already left out of it, and an implausible one gets no SEG.
    segmentation = segmenter.segment(assembled.volume)
    timings["segment_s"] = time.perf_counter() - t
    t = time.perf_counter()
    assessment, sided = segmentation.assessment, segmentation.sided
    dataset = None
    repairs: list[str] = []  # what the SEG copies of the source, made valid
    if assessment.verdict is not Verdict.IMPLAUSIBLE:
        unsure = mark_unsure and assessment.verdict is Verdict.UNSURE
        notes = assessment.segment_notes() if unsure else None
        dataset = writer.write(assembled, sided, generation, unverified=notes, repairs=repairs)
    timings["seg_encode_s"] = time.perf_counter() - t
    reported = ("segments", "dropped_as_misplaced", "implausible", "verdict")
    summary = {
        "series_instance_uid": assembled.series_instance_uid,
        "frames": len(assembled.frames),
        "notes": assembled.notes,
        "segments": segmentation.summary["segments"],
        # Pieces found where no lower extremity has them (model/engine/anatomy.py): not in the SEG.
        "dropped_as_misplaced": segmentation.summary["dropped_as_misplaced"],
        # How far to trust it (model/engine/verdict.py): what the node does with it follows.
        "verdict": segmentation.summary["verdict"],
        # The source's Patient and Study attributes changed in the SEG (imaging/source_repairs).
        "source_repairs": repairs,
        "inference": {k: v for k, v in segmentation.summary.items() if k not in reported},
        "timings_s": {
            **{k: round(v, 3) for k, v in timings.items()},
            "inference_detail": segmentation.timings,
        },
    }
    if dataset is None:
        implausible = assessment.verdict is Verdict.IMPLAUSIBLE
        summary["no_findings"] = assessment.headline() if implausible else NO_BONE
        return SeriesResult(None, None, summary)
    sr, key_image, sc = None, None, None
    if sr_writer is not None:
        sr, key_image, sc = _measure(
            assembled.volume, sided, dataset, sr_writer, generation, summary, key_image_dicom
        )
    return SeriesResult(dataset, None, summary, sided, sr, key_image, sc)


def _measure(
    ct: Volume,
    sided: Volume,
    seg: Dataset,
    writer: SrWriter,
    generation: int,
    summary: dict[str, Any],
    key_image_dicom: bool = False,
) -> tuple[Dataset | None, bytes | None, Dataset | None]:
    """The SR of the measurements picked ("hka": the leg alignment; "femoral_angles": femoral
    inclination and version, on the alignment's landmarks, measured once; "hip": the
    acetabular parameters and alpha angle, on both of those) and their key image on ``ct``
    (and its Secondary Capture with ``key_image_dicom``), their numbers into
    `summary["measurements"]`; None (and the error's type in the summary) for what fails.
    What depends on a site with a metal implant (the CT's metal, `model.measure.implants`;
    the segmentation is on the CT's grid) is not measurable, with that reason."""
    t = time.perf_counter()
    try:
        implants = find_implants(sided, ct) if writer.which else None
        alignments = measure_leg_alignment(sided, implants) if writer.which else {}
        femoral = (
            measure_femoral_angles(sided, legs=alignments, implants=implants)
            if "femoral_angles" in writer.which
            else None
        )
        hips = (
            measure_hip_parameters(sided, legs=alignments, femoral=femoral, implants=implants)
            if "hip" in writer.which
            else None
        )
        summary["measurements"] = measurements_summary(alignments, femoral, hips)
        sr = writer.write(seg, alignments, generation, femoral, hips) if alignments else None
    except Exception as error:  # the SEG still goes out; the reason is in the job
        log.error("measurements failed: %s", type(error).__name__)
        log.debug("measurements failed", exc_info=True)
        summary["measurements"] = {"error": f"{type(error).__name__} (node log at debug level)"}
        summary["timings_s"]["measure_s"] = round(time.perf_counter() - t, 3)
        return None, None, None
    summary["timings_s"]["measure_s"] = round(time.perf_counter() - t, 3)
    if not alignments:
        return sr, None, None
    t = time.perf_counter()
    try:
        key_image = key_image_png(ct, alignments, femoral, hips)
        sc = (
            key_image_sc(key_image, seg, writer.algorithm, generation, tuple(alignments))
            if key_image_dicom
            else None
        )
    except Exception as error:  # the SEG and the SR still go out
        log.error("key image failed: %s", type(error).__name__)
        log.debug("key image failed", exc_info=True)
        summary["key_image_error"] = f"{type(error).__name__} (node log at debug level)"
        key_image, sc = None, None
    summary["timings_s"]["key_image_s"] = round(time.perf_counter() - t, 3)
    return sr, key_image, sc


def save_dicom(dataset: Dataset, path: Path) -> int:
    """Write a result (SEG, SR) durably (see `spool.write_durably`); returns its size in bytes."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return write_durably(path, [buffer.getbuffer()])


save_seg = save_dicom  # the name its callers know


def sr_path_beside(seg_path: Path) -> Path:
    """Where the SR of the SEG at `seg_path` lies: `<stem>_sr.dcm` beside it."""
    return seg_path.with_name(f"{seg_path.stem}_sr.dcm")


def key_image_path_beside(seg_path: Path) -> Path:
    """Where the key image of the SEG at `seg_path` lies: `<stem>_key.png` beside it."""
    return seg_path.with_name(f"{seg_path.stem}_key.png")


def key_image_sc_path_beside(seg_path: Path) -> Path:
    """Where its Secondary Capture lies, when one was made: `<stem>_key.dcm`."""
    return seg_path.with_name(f"{seg_path.stem}_key.dcm")


def result_paths(seg_path: Path) -> list[Path]:
    """The DICOM files of one result, the ones delivered: the SEG, then its SR and the key
    image's Secondary Capture where they were written."""
    beside = (sr_path_beside(seg_path), key_image_sc_path_beside(seg_path))
    return [seg_path, *(path for path in beside if path.is_file())]


def result_files(seg_path: Path) -> list[Path]:
    """Every file of one result: its DICOM files and its key image when one was written."""
    key_image = key_image_path_beside(seg_path)
    return result_paths(seg_path) + ([key_image] if key_image.is_file() else [])
