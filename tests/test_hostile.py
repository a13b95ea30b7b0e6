"""Hostile input over real associations: truncated and overwritten datasets, wrong VRs, huge
declared lengths, pixel data of the wrong size, absurd rows/columns/frames, UIDs that look like
paths or log lines, missing mandatory attributes, non-images claiming CT, deep sequences,
transfer syntax mismatches and a deflate bomb (tests/support/hostile/ builds them).

One real node (`dicom-node serve`) takes a few hundred cases drawn by Hypothesis, each sent
as its raw bytes. The node must answer every C-STORE with a status (success, or refusal
before anything is stored), stay up (C-ECHO after every case), write nothing outside its
data_dir, keep its database and spool consistent, and settle every series it stored in a
final state with a reason, never a crash. `python -m bench.fuzz` runs thousands.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.net.receive import MAX_INFLATED_BYTES
from dicom_node.net.statuses import CANNOT_UNDERSTAND, SUCCESS
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import AE_TITLE, NodeProcess
from model.volume_io import Volume
from tests.support import ROOT, hostile
from tests.support.hostile import UNSENDABLE, Case, HostileSender, Spec

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"  # little endian VR
CASES = 90  # plus EXAMPLES; about 20 s on 2 cores (`bench.fuzz` runs thousands)
# One explicit case per kind (Hypothesis runs these first), so every kind is always covered.
EXAMPLES = [
    Spec("valid", in_series=True),
    Spec("truncated", (("syntax", IMPLICIT), ("keep", 0.5))),
    Spec("overwritten", (("syntax", EXPLICIT), ("writes", ((0.3, b"\xff" * 8),)))),
    Spec("wrong_vr", (("syntax", EXPLICIT), ("element", 3), ("vr", b"SQ"))),
    Spec("huge_length", (("syntax", EXPLICIT), ("element", 5), ("length", 2**32 - 16))),
    Spec("pixel_length", (("delta", -100),), in_series=True),
    Spec("pixel_length", (("delta", 1000),), in_series=True),
    Spec("absurd_dims", (("set", (("Rows", 65535), ("Columns", 65535))),), in_series=True),
    Spec("absurd_dims", (("set", (("NumberOfFrames", "2147483647"),)),), in_series=True),
    Spec("bad_uid", (("uid", f"../../../{hostile.CANARY}"), ("keyword", "SeriesInstanceUID"))),
    Spec("bad_uid", (("uid", f"1.2.3\x00{hostile.CANARY}"), ("keyword", "SOPInstanceUID"))),
    Spec("bad_request_uid", (("uid", f"/tmp/{hostile.CANARY}"),)),
    Spec("bad_request_uid", (("uid", "1" * 65),)),
    Spec("missing_tag", (("delete", ("SeriesInstanceUID",)),)),
    Spec("missing_tag", (("delete", ("PixelData",)),), in_series=True),
    Spec("not_an_image", (("what", "sr_document"),)),
    Spec("not_an_image", (("what", "empty"),)),
    Spec("bad_geometry", (("set", ("PixelSpacing", ["1e6", "1e6"])), ("slices", "all")), True),
    Spec(
        "bad_geometry",
        (("set", ("ImagePositionPatient", ["nan", "0", "0"])), ("slices", "one")),
        True,
    ),
    Spec("deep_sequence", (("depth", 3000),)),
    Spec("syntax_mismatch", (("syntax", IMPLICIT), ("sent_as", "1.2.840.10008.1.2.1.99"))),
    Spec("sop_class", (("sop_class", "1.2.840.10008.5.1.4.1.1.88.11"),)),
]
PATIENT = PatientInfo(name="HOSTILE^TEST", patient_id="PID-HOSTILE")


class Run:
    """What one node was sent and answered."""

    def __init__(self, node: NodeProcess, workdir: Path) -> None:
        self.node = node
        self.sender = HostileSender(node.port, workdir)
        self.serial = 0
        self.statuses: Counter[str] = Counter()
        self.stored: set[str] = set()  # SOP Instance UIDs answered success
        self.answered: set[str] = set()  # ... answered anything

    def send(self, case: Case) -> int:
        for companion in case.companions:
            assert self.sender.send(companion) == SUCCESS, case.spec.describe()
            self.stored.add(companion.sop_instance_uid)
        status = self.sender.send(case.hostile)
        self.statuses[hex(status) if status >= 0 else str(status)] += 1
        if status == SUCCESS:
            self.stored.add(hostile.as_received(case.hostile.sop_instance_uid))
        return status


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("hostile")
    node = NodeProcess(directory / "node", series={"min_slices": hostile.SLICES}).start()
    yield node
    assert node.stop() == 0, node.log.read_text(errors="replace")[-5000:]


def test_fuzzed_datasets_get_a_status_and_never_hurt_the_node(node: NodeProcess) -> None:
    root = node.directory.parent
    run = Run(node, root / "sender")
    mine = [node.data_dir, node.log, root / "sender"]  # the node's, and the sender's file
    outside_before = hostile.tree(root, skip=mine)
    started = time.monotonic()

    @settings(
        max_examples=CASES,
        derandomize=True,  # the same cases every run: `make test` must not be flaky
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking against a live node
        suppress_health_check=list(HealthCheck),
    )
    @given(spec=hostile.specs())
    def one_case(spec: Spec) -> None:
        run.serial += 1
        case = hostile.build(spec, run.serial)
        status = run.send(case)
        assert status == UNSENDABLE or status in hostile.allowed_answers(spec), (
            hex(status),
            spec.describe(),
        )
        assert run.sender.echo(), f"node down after {spec.describe()}"

    for spec in EXAMPLES:
        one_case = example(spec=spec)(one_case)
    one_case()
    run.sender.close()
    print(f"{run.serial} cases in {time.monotonic() - started:.0f} s: {dict(run.statuses)}")

    # Every series settles with a reason, never a crash; the node stored exactly what it
    # acknowledged, once, each in a complete file named by itself; no handler raised.
    report = hostile.inspect_node(node.data_dir, node.log, run.stored)
    assert node.process is not None and node.process.poll() is None
    assert report.problems() == {}, report
    assert report.states.get("skipped") and report.states.get("failed"), report.states

    # Nothing written outside data_dir, whatever the UIDs looked like.
    assert hostile.tree(root, skip=mine) == outside_before
    assert hostile.canaries(root, ROOT) == []
    assert not any(hostile.CANARY in p.name for p in Path("/tmp").iterdir())


def test_deflate_bomb_refused_without_inflating_it(node: NodeProcess, tmp_path: Path) -> None:
    bomb = hostile.deflate_bomb(MAX_INFLATED_BYTES + (1 << 20))
    assert len(bomb.dataset) < MAX_INFLATED_BYTES // 500  # a few hundred KB on the wire
    sender = HostileSender(node.port, tmp_path)
    process = psutil.Process(node.process.pid)
    before = process.memory_info().rss
    try:
        assert sender.send(bomb) == CANNOT_UNDERSTAND
        assert sender.echo()
        # Inflated in chunks and counted, never held: the node did not grow by the bomb.
        assert process.memory_info().rss - before < 64 << 20
        fits = hostile.deflate_bomb(8 << 20)  # 8 MiB inflated: an ordinary deflated dataset
        assert sender.send(fits) == SUCCESS
    finally:
        sender.close()
    assert "inflates to more than 256 MiB" in node.log.read_text(errors="replace")


@pytest.mark.parametrize(
    ("max_pdu_size", "refusal"),
    [
        (0, "a PDU of 2 MiB, more than an instance may be"),  # the sender's one large PDU
        (16384, "an instance of more than 1 MiB"),  # many small PDUs, counted
    ],
)
def test_oversized_instance_aborts_the_association(
    tmp_path: Path, max_pdu_size: int, refusal: str
) -> None:
    """Past node.max_instance_mb the association is aborted while the dataset is still
    arriving (pynetdicom would gather all of it in memory first, however long the PDU
    header says it is); nothing is stored, the node stays up and takes instances under the
    cap."""
    big, small = (
        write_ct_series(
            Volume(np.zeros((1, n, n), np.int16), (0.5, 0.5, 1.0)),
            tmp_path / f"{n}",
            patient=PATIENT,
        )
        for n in (1024, 256)  # 2 MiB and 128 KiB of pixel data
    )
    node = NodeProcess(tmp_path / "node", max_instance_mb=1, max_pdu_size=max_pdu_size).start()
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert assoc.is_established
        answer = assoc.send_c_store(big[0])
        assert "Status" not in answer  # no answer: the node aborted
        assoc.join(10)  # the association ends with the connection the node closed
        assert not assoc.is_alive()
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert int(assoc.send_c_store(small[0]).Status) == SUCCESS
        assoc.release()
        uid = str(dcmread(small[0], stop_before_pixels=True).SOPInstanceUID)
        assert set(node.db_instances()) == {uid}
        assert len(node.spool_files()) == 1
        log = node.log.read_text()
        assert f"association from SCANNER aborted: {refusal} (node.max_instance_mb)" in log
    finally:
        assert node.stop() == 0, node.log.read_text()
