"""`[node] receive_processes = 2`: two processes share the DICOM port (SO_REUSEPORT).

A real node (`dicom-node serve`), real DCMTK `storescu` associations, /metrics and /readyz
over HTTP: concurrent associations are spread over both processes, every instance is stored
once whichever process received it (and its resend, a duplicate, whichever process that
reached), the series those associations delivered together completes and is segmented once,
and a SIGKILLed receiving process is replaced (while the series segments, to save time).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from dicom_node.app.config import ConfigError, NodeConfig
from dicom_node.testbed.node_process import NodeProcess
from dicom_node.testbed.peers import free_port
from tests.support.network import http_get, send_at_once
from tests.support.series import no_bone_series

SENDERS = 8  # associations at once; the series' slices are dealt among them, twice


def _metric(port: int, name: str, **labels: str) -> float:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in /metrics")


def _eventually(check: Any, timeout: float = 30) -> Any:
    """`check()` once it is truthy."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "not within the time-out"
        time.sleep(0.1)
    return result


def _receiver_pids(node: NodeProcess) -> list[int]:
    """From the pid file (what `status` reads), cheaper to poll than the CLI."""
    return json.loads((node.data_dir / "node.pid").read_text())["receivers"]


def test_two_processes_receive_one_series_once_and_a_killed_one_is_replaced(
    tmp_path: Path,
) -> None:
    files = no_bone_series(tmp_path / "ct", 48, "receivers")
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    (series_uid,) = {str(h.SeriesInstanceUID) for h in headers}
    http_port = free_port()
    node = NodeProcess(
        tmp_path / "node",
        complete_after_s=6,  # longer than a loaded machine's pause between the two rounds
        extra_config=f"[http]\nenabled = true\nport = {http_port}\n",
        receive_processes=2,
    ).start()
    try:
        parts = [files[i::SENDERS] for i in range(SENDERS)]
        send_at_once(node.port, parts)
        send_at_once(node.port, parts)  # every instance again: duplicates

        # Stored once: database rows == unique SOP Instance UIDs sent == spooled files.
        recorded = node.db_instances()
        assert set(recorded) == {str(h.SOPInstanceUID) for h in headers}
        assert set(recorded.values()) == node.spool_files()  # the duplicates' files gone

        # Both processes served associations (2 x SENDERS of them: all on one process is
        # a chance of 1 in 2^15); every answer and connection reaches /metrics.
        received = 2 * len(files)
        _eventually(lambda: _metric(http_port, "dicom_node_instances_received_total") == received)
        assert _metric(http_port, "dicom_node_associations_total") == 2 * SENDERS
        beside = _metric(http_port, "dicom_node_receiver_associations_total", receiver="1")
        assert 0 < beside < 2 * SENDERS
        assert _metric(http_port, "dicom_node_associations_active") == 0
        status, body = http_get(http_port, "/readyz")
        assert status == 200 and json.loads(body)["checks"]["receivers"]["ok"], body

        # A receiving process SIGKILLed is replaced and counted; `status` names the new one.
        (killed,) = node.status()["receiver_pids"]
        os.kill(killed, signal.SIGKILL)
        (replacement,) = _eventually(lambda: [p for p in _receiver_pids(node) if p != killed])
        assert node.status()["receiver_pids"] == [replacement]
        # The metrics follow within the daemon's next look at its receivers.
        _eventually(lambda: _metric(http_port, "dicom_node_receiver_restarts_total") == 1)
        _eventually(lambda: _metric(http_port, "dicom_node_receivers") == 1)
        assert b"receiver-1 (pid %d) died" % killed in node.log.read_bytes()

        # The series that both processes received: complete once, segmented once.
        node.wait_for_states({series_uid}, {"no_findings"}, timeout=120)
        assert _metric(http_port, "dicom_node_stage_duration_seconds_count", stage="segment") == 1
    finally:
        assert node.stop() == 0, node.log.read_text()


def test_receive_processes_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"node.receive_processes: must be >= 1, got 0"):
        NodeConfig(receive_processes=0)
