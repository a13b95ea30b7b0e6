"""Reception's fast path: pynetdicom's reactors woken instead of polling and the C-STORE
response encoded directly (dicom_node/net/reactors.py), instance records committed by one
thread behind the answers, and the inference worker as a batch job for the scheduler.

The pynetdicom internals reactors.py relies on are pinned here: a pynetdicom release that
changes one fails the first test, so that the module is reviewed against it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.app.config import NodeConfig
from dicom_node.net.access import start_server
from dicom_node.net.reactors import encode_store_response
from dicom_node.net.receive import Reception, build_ae, event_handlers
from dicom_node.net.statuses import OUT_OF_RESOURCES, SUCCESS
from dicom_node.pipeline.spool import Spool
from dicom_node.pipeline.state import NodeState, Recorded
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess
from dicom_node.testbed.peers import free_port
from model.volume_io import Volume

# The pynetdicom code reactors.py overrides or calls, as of the version it was written for.
# On a mismatch, read the new code against reactors.py's assumptions (module docstring),
# then update the digests.
PINNED = {
    DULServiceProvider.run_reactor: "780cd7ed323ef3bb",
    DULServiceProvider._is_transport_event: "6868c3eee650bc3f",
    DULServiceProvider.send_pdu: "e95bd9b44d5ce0d0",
    DULServiceProvider.kill_dul: "81a5917503d167bf",
    DIMSEServiceProvider.get_msg: "c6102c95bb634fbb",
    DIMSEServiceProvider.send_msg: "b285f58a41affc09",
    Association._run_reactor: "cbf8d3c3eb37093a",
}


def _digest(function: object) -> str:
    source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_the_pynetdicom_code_reactors_rely_on_is_unchanged() -> None:
    changed = {
        function.__qualname__: _digest(function)
        for function, digest in PINNED.items()
        if _digest(function) != digest
    }
    assert not changed, f"pynetdicom {pynetdicom.__version__} changed: {changed}"


@pytest.mark.parametrize(
    ("sop_instance_uid", "status"),
    [("1.2.3.4.5", SUCCESS), ("1.2.3.45", SUCCESS), ("1.2.826.0.1.3680043.2.1", OUT_OF_RESOURCES)],
)
def test_store_response_encoded_as_pynetdicom_encodes_it(
    sop_instance_uid: str, status: int
) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.AffectedSOPClassUID = CTImageStorage
    response.AffectedSOPInstanceUID = sop_instance_uid
    response.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (pdata,) = message.encode_msg(1, 16384)
    ((context, fragment),) = pdata.presentation_data_value_list
    assert context == 1 and fragment[:1] == b"\x03"  # a command, in its last fragment
    assert encode_store_response(response) == fragment[1:]
    response.ErrorComment = "refused"  # type: ignore[assignment]  # anything beyond a status: pynetdicom encodes it
    assert encode_store_response(response) is None


@pytest.fixture
def reception(tmp_path: Path) -> Iterator[tuple[Reception, list[Recorded]]]:
    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    told: list[Recorded] = []
    reception = Reception(Spool(tmp_path / "spool"), state, told.append)
    yield reception, told
    reception.records.close()
    state.close()


def test_instances_are_recorded_before_the_release_is_answered(
    tmp_path: Path, reception: tuple[Reception, list[Recorded]]
) -> None:
    """Records trail the answers, but a sender that has released sees them all, and a
    resent instance's second file is gone: through the node's server, over a real socket."""
    receiving, told = reception
    volume = Volume(np.zeros((6, 16, 16), np.int16), (1.0, 1.0, 1.0))
    paths = write_ct_series(volume, tmp_path / "ct", patient=PatientInfo("A^B", "1"))
    node = NodeConfig(ae_title="NODE", port=free_port(), bind="127.0.0.1")
    server = start_server(build_ae(node), node, event_handlers(receiving, node))
    try:
        sender = AE(ae_title="SCANNER")
        sender.add_requested_context(CTImageStorage)
        assoc = sender.associate("127.0.0.1", node.port, ae_title="NODE")
        assert assoc.is_established
        for path in [*paths, paths[0], paths[1]]:  # two resent
            assert assoc.send_c_store(dcmread(path)).Status == SUCCESS
        assoc.release()
        names = receiving.state.file_names()
        assert len(names) == len(paths) == len(told)
        assert receiving.spool.names() == names
    finally:
        server.shutdown()


def test_the_worker_is_a_batch_job_and_the_daemon_is_not(node: NodeProcess) -> None:
    assert node.process is not None
    daemon = psutil.Process(node.process.pid)
    workers = [p for p in daemon.children() if "spawn_main" in " ".join(p.cmdline())]
    assert workers, "the worker process"
    for worker in workers:  # every thread: torch's too
        threads = [thread.id for thread in worker.threads()]
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_BATCH}
        assert worker.nice() == daemon.nice()  # its share of the machine is not lowered
    assert os.sched_getscheduler(daemon.pid) == os.SCHED_OTHER
