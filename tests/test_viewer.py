"""The OHIF viewer's SEG reader (dcmjs) decodes the node's SEG with the source CT.

`tests/viewer/read_seg.js` places the SEG's frames on the source images with dcmjs's
Cornerstone adapter and a metadata provider built from the CT files, as OHIF does, and reports
the segment labels, the voxels per segment and a hash of every source image's decoded mask.
All of it must equal the node's own mask: the sided label map sampled on the source frames
(`labels_on_frames`), which is what `SegWriter.write` encodes. Voxel for voxel, not only in
total, so a frame dcmjs put on the wrong image or flipped would fail too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.app.config import Config
from dicom_node.imaging.codes import SEGMENTS
from dicom_node.imaging.seg import AlgorithmInfo, SegWriter, labels_on_frames
from dicom_node.imaging.volume.assemble import (
    AssembledVolume,
    assemble_volume,
    choose_series,
    survey_series,
)
from dicom_node.imaging.volume.headers import read_headers
from dicom_node.imaging.volume.policy import AssemblyPolicy
from dicom_node.pipeline.inference import build_segmenter, build_writer, save_seg, segment_series
from model.labels import Bone, Side, sided_label
from tests.support import VIEWER, PhantomSeries, require_data, require_dcmjs

READ_SEG = VIEWER / "read_seg.js"
# A hip: femur and hip bone of one side, what tests/test_pipeline.py sends through the node.
PHANTOM_SEED = 1003


@dataclasses.dataclass
class NodeSeg:
    """A SEG the node wrote, the CT folder it derives from, and the node's own mask."""

    path: Path
    ct_dir: Path
    dataset: Dataset
    uids: list[str]  # SOP Instance UID of every source frame, in the mask's frame order
    mask: np.ndarray  # sided labels on the source frames: what the SEG encodes


def read_with_dcmjs(node: str, seg: Path, ct_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [node, str(READ_SEG), str(seg), str(ct_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_dcmjs_decodes_the_node_mask(node: str, seg: NodeSeg) -> dict[str, Any]:
    """dcmjs's labels, frames and masks equal the SEG's descriptions and the node's mask."""
    read = read_with_dcmjs(node, seg.path, seg.ct_dir)
    # Every frame lands on a source image: the node omits empty frames, so none is dropped
    # as empty either.
    assert read["warnings"] == []
    assert read["source_images"] == len(seg.uids)
    assert read["frames"] == int(seg.dataset.NumberOfFrames)
    assert read["frames_unmatched"] == 0
    assert read["frames_placed"] == read["frames"]
    assert read["labelmaps"] == 1  # segments of one label map never overlap

    # Segments: what the node described, and exactly the sided labels in its mask.
    written = [(int(item.SegmentNumber), item.SegmentLabel) for item in seg.dataset.SegmentSequence]
    assert [(s["number"], s["label"]) for s in read["segments"]] == written
    present = [int(value) for value in np.unique(seg.mask) if value]
    assert [label for _, label in written] == [SEGMENTS[value].label for value in present]

    # Voxels per segment, in total and per source image (mask hashed as dcmjs hashes it: one
    # byte per pixel holding the segment number, row by row).
    sided_of = {definition.label: value for value, definition in SEGMENTS.items()}
    numbers = np.zeros(seg.mask.shape, dtype=np.uint8)
    for number, label in written:
        numbers[seg.mask == sided_of[label]] = number
    assert {s["label"]: s["voxels"] for s in read["segments"]} == {
        label: int(np.count_nonzero(seg.mask == sided_of[label])) for _, label in written
    }
    expected = {}
    for uid, frame in zip(seg.uids, numbers, strict=True):
        values, counts = np.unique(frame[frame != 0], return_counts=True)
        if len(values):
            voxels = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
            expected[uid] = (voxels, hashlib.sha256(frame.tobytes()).hexdigest())
    assert {i["sop_instance_uid"]: (i["voxels"], i["sha256"]) for i in read["images"]} == expected
    return read


def source_uids(assembled: AssembledVolume) -> list[str]:
    return [frame.sop_instance_uid for frame in assembled.frames]


@pytest.fixture(scope="module")
def phantom_seg(tmp_path_factory: pytest.TempPathFactory, phantom_series: PhantomSeries) -> NodeSeg:
    """The node's SEG of a small hip phantom by the path of `dicom-node segment DIR -o`."""
    require_dcmjs()  # before the inference this fixture spends most of its time in
    out = tmp_path_factory.mktemp("phantom-seg")
    ct_dir = phantom_series(PHANTOM_SEED)["ct"]
    config = Config()
    paths = choose_series(survey_series(read_headers([ct_dir]), config.series), None).paths
    segmenter = build_segmenter(config.inference)
    result = segment_series(paths, config.series, segmenter, build_writer(config, segmenter))
    assert result.reason is None and result.dataset is not None and result.labels is not None
    path = out / "seg.dcm"
    save_seg(result.dataset, path)
    # The same assembly segment_series made (a pure function of the files), for the frames.
    # The labels are those the SEG encodes, after the anatomy check (the step-11000 weights put
    # a speck of "tibia" in this hip crop, which the check rightly left out).
    assembled = assemble_volume(paths, config.series)
    mask = labels_on_frames(result.labels, assembled.source_geometry)
    return NodeSeg(path, ct_dir, result.dataset, source_uids(assembled), mask)


def test_dcmjs_decodes_the_phantom_seg_as_the_node_wrote_it(phantom_seg: NodeSeg) -> None:
    read = assert_dcmjs_decodes_the_node_mask(require_dcmjs(), phantom_seg)
    assert [s["label"] for s in read["segments"]] == ["Left femur", "Left hip bone"]


# The GE headers' PatientName is "REMOVED"; highdicom warns as it copies it into the SEG.
@pytest.mark.filterwarnings('ignore:The string "REMOVED":UserWarning')
def test_dcmjs_decodes_a_seg_of_a_tilted_irregular_real_series(tmp_path: Path) -> None:
    """GE head CT, gantry tilt 18.5 degrees, slices 1.08-6.99 mm apart: the SEG's frames are
    the source frames, not the assembled volume's slices, and dcmjs must place them so.

    No bone model applies to a head; the labels are a threshold, split into sides at the
    image centre, written by the node's SegWriter as any label map is.
    """
    node = require_dcmjs()
    ct_dir = require_data() / "dcm_qa_ct" / "GE"
    assembled = assemble_volume(
        [ct_dir], AssemblyPolicy(max_slice_thickness_mm=7.0, skip_body_parts=())
    )
    assert assembled.resampled  # the frames are not the volume's slices
    hu = assembled.volume.array
    sided = np.zeros(hu.shape, dtype=np.uint8)
    bone = hu > 300
    half = hu.shape[2] // 2  # columns grow toward the patient's left (LPS +x)
    sided[:, :, :half][bone[:, :, :half]] = sided_label(Bone.FEMUR, Side.RIGHT)
    sided[:, :, half:][bone[:, :, half:]] = sided_label(Bone.FEMUR, Side.LEFT)
    labels = assembled.volume.with_array(sided)
    writer = SegWriter(AlgorithmInfo("threshold", "1.0", hashlib.sha256(b"300 HU").hexdigest()))
    dataset = writer.write(assembled, labels)
    assert dataset is not None
    path = tmp_path / "seg.dcm"
    save_seg(dataset, path)
    mask = labels_on_frames(labels, assembled.source_geometry)
    read = assert_dcmjs_decodes_the_node_mask(
        node, NodeSeg(path, ct_dir, dataset, source_uids(assembled), mask)
    )
    assert [s["label"] for s in read["segments"]] == ["Right femur", "Left femur"]
