"""Metrics and health over HTTP (`[http]`), scraped from a real daemon.

The tests run `dicom-node serve` as a process with the endpoint on a free loopback port, send
over DICOM as a scanner would, and read `/metrics` (parsed with prometheus-client's own
parser), `/healthz` and `/readyz` over HTTP. Delivery's counters are read from the delivery
stage run in this process against a real storescp, so that no test waits for a segmentation
that finds bones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.app.config import Config, ConfigError, DeliveryConfig, HttpConfig, load_config
from dicom_node.net.statuses import OUT_OF_RESOURCES, SUCCESS
from dicom_node.pipeline.deliver import DeliveryStage
from dicom_node.pipeline.spool import Spool, SpooledFile
from dicom_node.pipeline.state import NodeState, ReceivedInstance, Target
from dicom_node.pipeline.worker import InferenceWorker
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import AE_TITLE, NodeProcess
from dicom_node.testbed.peers import PeerDidNotStartError, StoreSCP, free_port
from dicom_node.web.metrics import NodeMetrics
from dicom_node.web.server import HttpEndpoint
from model.engine.weights import DEFAULT_WEIGHTS, sidecar
from model.volume_io import Volume
from tests.support import ROOT
from tests.support.disk import MIB, fill_to
from tests.support.network import http_get
from tests.support.series import no_bone_series

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _http_node(directory: Path, extra_config: str = "", **node: Any) -> tuple[NodeProcess, int]:
    """A node (not started) with [http] on a free port; the port."""
    port = free_port()
    http = f"[http]\nenabled = true\nport = {port}\n"
    return NodeProcess(directory, extra_config=http + extra_config, **node), port


def _readiness(port: int) -> tuple[int, dict[str, Any]]:
    status, body = http_get(port, "/readyz")
    return status, json.loads(body)


def _wait_for_readiness(port: int, status: int, timeout: float = 60) -> dict[str, Any]:
    """Poll /readyz until it answers `status`; its report."""
    deadline = time.monotonic() + timeout
    while True:
        answered, report = _readiness(port)
        if answered == status:
            return report
        assert time.monotonic() < deadline, f"/readyz not {status} after {timeout} s: {report}"
        time.sleep(0.05)


def _scrape(port: int) -> Samples:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _stage_count(samples: Samples, stage: str) -> float:
    return _value(samples, "dicom_node_stage_duration_seconds_count", stage=stage)


def test_metrics_count_a_series_as_it_arrives_and_is_processed(tmp_path: Path) -> None:
    files = no_bone_series(tmp_path / "ct", 30, "http")
    node, port = _http_node(tmp_path / "node")
    node.start()
    try:
        before = _scrape(port)
        assert _value(before, "dicom_node_instances_received_total") == 0
        assert _value(before, "dicom_node_series", state="no_findings") == 0
        assert _stage_count(before, "receive") == 0
        uid = node.send_series(tmp_path / "ct")  # one storescu association
        node.wait_for_states({uid}, {"no_findings"}, timeout=120)
        after = _scrape(port)
    finally:
        assert node.stop() == 0, node.log.read_text()

    assert _value(after, "dicom_node_instances_received_total") == len(files)
    pixel_bytes = len(files) * 64 * 64 * 2
    received_bytes = _value(after, "dicom_node_received_bytes_total")
    assert pixel_bytes <= received_bytes <= sum(f.stat().st_size for f in files)
    assert _value(after, "dicom_node_instances_refused_total", status="0xA700") == 0
    assert _value(after, "dicom_node_associations_total") == 1
    assert _value(after, "dicom_node_series", state="no_findings") == 1
    assert _value(after, "dicom_node_series", state="receiving") == 0
    assert _value(after, "dicom_node_queue_depth") == 0
    for stage in ("receive", "assemble", "segment", "seg"):  # seg: timed, though none made
        assert _stage_count(after, stage) == 1, stage
    assert _value(after, "dicom_node_stage_duration_seconds_sum", stage="segment") > 0
    assert _stage_count(after, "send") == 0  # no SEG, nothing sent
    assert _value(after, "dicom_node_worker_restarts_total") == 0
    assert _value(after, "dicom_node_data_disk_free_bytes") > 0
    assert _value(after, "dicom_node_data_disk_min_free_bytes") == 1024 * MIB
    shipped = json.loads(sidecar(DEFAULT_WEIGHTS).read_text())
    (model,) = [labels for (name, labels) in after if name == "dicom_node_model_info"]
    assert dict(model)["weights_sha256"] == shipped["weights_sha256"]


def test_delivery_attempts_and_failures_are_counted_by_destination(tmp_path: Path) -> None:
    """The delivery stage alone (no model needed), with the daemon's metrics and endpoint in
    this process: a SEG to a PACS that takes it and to one that is down."""
    (seg_stand_in,) = no_bone_series(tmp_path / "ct", 30, "http")[:1]
    state = NodeState(f"sqlite:///{tmp_path / 'node.db'}")
    with StoreSCP(tmp_path / "pacs") as pacs:
        targets = [Target("pacs", pacs.ae_title, "127.0.0.1", pacs.port)]
        targets.append(Target("down", "NOBODY", "127.0.0.1", free_port()))
        series_id = state.record_instance(
            ReceivedInstance(
                "1.2.3.1", CTImageStorage, "1.2.840.10008.1.2.1", "1.2.3", "1.2", "CT", "CT1"
            ),
            SpooledFile("1.dcm", 10),
        ).series_id
        state.complete_if_idle(series_id, 0)
        state.enqueue(series_id, 1)
        claim = state.claim_next_queued()
        assert claim is not None
        results = tmp_path / "results"
        results.mkdir()
        shutil.copy(seg_stand_in, results / "seg.dcm")
        assert state.mark_segmented(claim, "seg.dcm", ("9.1", "9.2"), "{}", targets)

        config = Config(delivery=DeliveryConfig(max_attempts=1, timeout_s=5))
        metrics = NodeMetrics(
            state, Spool(tmp_path / "spool"), InferenceWorker(config), ["pacs", "down"]
        )
        endpoint = HttpEndpoint(HttpConfig(enabled=True, port=free_port()), metrics.registry)
        endpoint.start()
        try:
            stage = DeliveryStage(config, state, results, BackgroundScheduler(), metrics)
            for due in state.claim_due_deliveries():
                stage.attempt(due)
            samples = _scrape(endpoint.config.port)
        finally:
            endpoint.stop()
            state.close()
        assert len(pacs.files()) == 1
    assert _value(samples, "dicom_node_delivery_attempts_total", destination="pacs") == 1
    assert _value(samples, "dicom_node_delivery_failures_total", destination="pacs") == 0
    assert _value(samples, "dicom_node_delivery_attempts_total", destination="down") == 1
    assert _value(samples, "dicom_node_delivery_failures_total", destination="down") == 1
    assert _stage_count(samples, "send") == 2
    assert _value(samples, "dicom_node_series", state="failed") == 1  # "down" gave up


def _ct_files(directory: Path, slices: int) -> list[Path]:
    rng = np.random.default_rng(20)
    hu = rng.integers(-1000, 2000, (slices, 128, 128)).astype(np.int16)
    patient = PatientInfo(name="HTTP^TESTPATIENT", patient_id="PID-HTTP")
    return write_ct_series(Volume(hu, (0.8, 0.8, 2.0)), directory, patient=patient)


def _send(port: int, paths: list[Path]) -> list[int]:
    """C-STORE each file on one association; the statuses."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def test_readiness_fails_below_the_free_space_watermark_and_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    paths = _ct_files(tmp_path / "ct", 2)
    node, port = _http_node(tmp_path / "node", complete_after_s=600, min_free_mb=8)
    node.start()
    try:
        status, report = _readiness(port)
        assert status == 200 and report["ready"], report
        assert set(report["checks"]) == {
            "database", "data_dir", "free_space", "worker", "scheduler", "scp"
        }  # fmt: skip
        assert _send(node.port, paths[:1]) == [SUCCESS]

        ballast = fill_to(small_disk, 4 * MIB)  # below the 8 MiB watermark
        status, report = _readiness(port)
        assert status == 503 and not report["ready"], report
        assert report["reason"] == "not ready: free_space"
        assert "below node.min_free_mb (8 MiB)" in report["checks"]["free_space"]["reason"]
        assert all(c["ok"] for name, c in report["checks"].items() if name != "free_space")
        assert _send(node.port, paths[1:]) == [OUT_OF_RESOURCES]
        refused = _scrape(port)
        assert _value(refused, "dicom_node_instances_refused_total", status="0xA700") == 1
        assert _value(refused, "dicom_node_instances_received_total") == 1
        assert _value(refused, "dicom_node_data_disk_free_bytes") < 8 * MIB

        ballast.unlink()
        status, report = _readiness(port)
        assert status == 200 and report["checks"]["free_space"]["ok"], report
        assert _send(node.port, paths[1:]) == [SUCCESS]
    finally:
        assert node.stop() == 0, node.log.read_text()


def test_readiness_fails_while_the_worker_is_down_and_recovers(tmp_path: Path) -> None:
    node, port = _http_node(tmp_path / "node")
    node.start()
    try:
        _wait_for_readiness(port, 200)
        first_worker = node.worker_pid()
        os.kill(first_worker, signal.SIGKILL)
        report = _wait_for_readiness(port, 503)
        assert not report["checks"]["worker"]["ok"], report
        assert report["checks"]["scp"]["ok"]  # reception is untouched
        status, body = http_get(port, "/healthz")  # alive all the while
        assert status == 200 and json.loads(body)["status"] == "alive"

        report = _wait_for_readiness(port, 200)  # the supervisor replaced it
        assert node.worker_pid() != first_worker
        assert f"worker {node.worker_pid()} ready" == report["checks"]["worker"]["reason"]
        assert _value(_scrape(port), "dicom_node_worker_restarts_total") == 1
        assert http_get(port, "/nothing")[0] == 404
    finally:
        assert node.stop() == 0, node.log.read_text()
    assert "died while idle (exit -9); restarting it" in node.log.read_text()


def test_a_taken_http_port_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = NodeProcess(tmp_path, extra_config=f"[http]\nenabled = true\nport = {port}\n")
        with pytest.raises(
            PeerDidNotStartError, match=f"http.port: cannot listen on 127.0.0.1:{port}"
        ):
            node.start()


def test_http_is_off_by_default() -> None:
    http = load_config(ROOT / "config.toml").http
    assert not http.enabled and http.bind == "127.0.0.1" and http.port == 9104


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[http]\nport = 0\n", "http.port: must be 1..65535, got 0"),
        ("[http]\nport = '9104'\n", "http.port"),
        ("[http]\nbind = ''\n", "http.bind"),
        ("[http]\nenabled = 'yes'\n", "http.enabled"),
        ("[http]\npath = '/metrics'\n", "http.path: unknown key"),
        ("[node]\nport = 9104\n[http]\nenabled = true\n", "http.port: must differ from node.port"),
    ],
)
def test_bad_http_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)
