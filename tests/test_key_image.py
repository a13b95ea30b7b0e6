"""The key image: a PNG of the measurements drawn on a coronal view of the CT, beside the SR.

Drawn directly from the synthetic pelvis' measurements (`tests.test_hip_measure`), whose hip
views must appear only when hips are measured; and end to end, a phantom series through the
running node: the PNG lies in the job's results folder beside the SEG and SR, `dicom-node job
ID` names it, and its Secondary Capture reaches a storage SCP with the SEG and SR.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.imaging.key_image import COLOURS, KEY_IMAGE_SERIES_DESCRIPTION, key_image_png
from dicom_node.pipeline.inference import key_image_path_beside, sr_path_beside
from dicom_node.testbed.node_process import NodeProcess, destination_toml
from dicom_node.testbed.peers import PynetdicomSCP
from model.measure import measure_femoral_angles, measure_hip_parameters, measure_leg_alignment
from tests.support import PhantomSeries
from tests.test_hip_measure import synthetic_pelvis
from tests.test_sr import _dciodvfy_errors


def _pixels_of(png: bytes, colour: str) -> int:
    """How many pixels of the PNG are (nearly) ``colour`` ("#rrggbb")."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    wanted = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - wanted).max(axis=2) <= 12).sum())


def test_the_hip_views_show_the_rim_and_the_lce_lines_when_hips_are_measured() -> None:
    labels = synthetic_pelvis()
    ct = labels.with_array(np.where(labels.array > 0, 700, -50).astype(np.int16))
    legs = measure_leg_alignment(labels)
    femoral = measure_femoral_angles(labels, legs)
    hips = measure_hip_parameters(labels, legs, femoral)
    assert all(hip.lateral_centre_edge.value is not None and hip.rim_mm for hip in hips.values())

    with_hips = key_image_png(ct, legs, femoral, hips)
    without = key_image_png(ct, legs, femoral)
    for png in (with_hips, without):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert _pixels_of(png, COLOURS["neck"]) > 50  # the neck axes, in the coronal view
    assert Image.open(io.BytesIO(with_hips)).width > Image.open(io.BytesIO(without)).width
    for drawn in ("rim", "lce"):
        assert _pixels_of(with_hips, COLOURS[drawn]) > 50
        assert _pixels_of(without, COLOURS[drawn]) == 0


def test_the_node_writes_the_key_image_beside_the_sr_and_sends_it_as_a_secondary_capture(
    tmp_path: Path, phantom_series: PhantomSeries
) -> None:
    """With `[measurements] key_image = true` the PNG also goes to the PACS, a Secondary
    Capture in the CT's study that dciodvfy finds no error in."""
    ct_dir = phantom_series(1003)["ct"]
    ct = dcmread(next(ct_dir.iterdir()), stop_before_pixels=True)
    with PynetdicomSCP(directory=tmp_path / "pacs") as pacs:
        extra = destination_toml(pacs.destination("pacs")) + "[measurements]\nkey_image = true\n"
        node = NodeProcess(tmp_path / "node", extra_config=extra).start()
        try:
            uid = node.send_series(ct_dir)
            node.wait_for_states({uid}, {"done", "failed"}, timeout=240)
            status = node.series()[uid]
            job = json.loads(node.cli("job", str(status["id"]), "--json").stdout)
            shown = node.cli("job", str(status["id"])).stdout
        finally:
            assert node.stop() == 0, node.log.read_text()
        received = [dcmread(path) for path in pacs.files()]
    assert status["state"] == "done", status

    key_image = Path(job["result"]["key_image"])
    seg = node.data_dir / "results" / job["seg_file"]
    assert key_image == key_image_path_beside(seg) and sr_path_beside(seg).is_file()
    assert key_image.resolve().is_relative_to(node.data_dir.resolve())  # only under data_dir
    png = key_image.read_bytes()
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert _pixels_of(png, COLOURS["landmark"]) > 0  # the femoral head the hip phantom holds
    assert f"keyimage:{key_image}" in "".join(shown.split())  # however rich wraps it

    modalities = sorted(str(d.Modality) for d in received)
    assert modalities == ["OT", "SEG", "SR"], modalities
    (sc,) = (d for d in received if d.SOPClassUID == SecondaryCaptureImageStorage)
    assert sc.StudyInstanceUID == ct.StudyInstanceUID and sc.PatientID == ct.PatientID
    assert sc.SeriesDescription == KEY_IMAGE_SERIES_DESCRIPTION
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(sc.pixel_array, pixels)
    sc_path = next(
        p for p in (tmp_path / "pacs").iterdir() if dcmread(p).SOPClassUID == sc.SOPClassUID
    )
    assert _dciodvfy_errors(sc_path) == []
