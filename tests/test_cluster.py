"""The node as a cluster (`[cluster]`, `dicom_node.cluster`): two reception nodes and up to
three inference workers as separate processes, on a real RabbitMQ broker, a real PostgreSQL
and a shared folder, delivering to a real Orthanc.

A worker's inference is held still where a test needs it running (SIGSTOP of the inference
process, whose worker keeps renewing its lease), so that "mid-inference" does not depend on
how fast two busy cores segment a small phantom; a delivery is held in flight the same way,
with the PACS stopped (its kernel still accepts the connection, and the association waits).
One worker (`NOTIFYING`) is started as systemd starts a `Type=notify` unit, with a unix
datagram socket of the test's as `NOTIFY_SOCKET` and a watchdog interval.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from dicom_node.app.config import ClusterConfig
from dicom_node.pipeline.state import NodeState, SeriesRecord
from dicom_node.testbed.node_process import (
    NodeProcess,
    destination_toml,
    start_storescu,
    storescu,
)
from dicom_node.testbed.peers import OrthancProcess, free_port
from dicom_node.testbed.postgres import PostgresServer
from dicom_node.testbed.rabbitmq import RabbitMQServer, running_rabbitmq
from tests.support import PhantomSeries
from tests.support.systemd import NotifySocket

LEASE_S = 4.0
DELIVERY = {"backoff_initial_s": 0.5, "backoff_max_s": 1, "max_attempts": 100}
FINAL = {"done", "no_findings", "failed", "skipped"}
NOTIFYING = "worker-3"  # started with NOTIFY_SOCKET: the test's socket gets its notifications
WATCHDOG_S = 2  # WATCHDOG_USEC: a ping every second


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMQServer]:
    with running_rabbitmq() as broker:
        yield broker


@dataclass
class Cluster:
    directory: Path
    database: str
    broker: str
    orthanc: OrthancProcess
    processes: dict[str, NodeProcess] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)  # /metrics, /readyz

    def __post_init__(self) -> None:
        self.state = NodeState(self.database)
        # systemd's end for NOTIFYING; at READY=1 it notes whether the worker answered ready.
        self.systemd = NotifySocket(
            self.directory / "notify", lambda: self.http(NOTIFYING, "/readyz")[0] == 200
        )

    @property
    def shared(self) -> Path:
        return self.directory / "shared"

    def cluster_config(self, node_id: str) -> ClusterConfig:
        return ClusterConfig(True, node_id, self.broker, str(self.shared), LEASE_S)

    def start(self, node_id: str, role: str) -> NodeProcess:
        """Start (or restart) reception node or worker `node_id`."""
        if node_id not in self.processes:
            config = self.cluster_config(node_id)
            extra = destination_toml(self.orthanc.destination(), **DELIVERY)
            extra += "[cluster]\nenabled = true\n" + "\n".join(
                f'{key} = "{getattr(config, key)}"' for key in ("node_id", "broker", "shared_dir")
            )
            extra += f"\nlease_s = {LEASE_S}\n"
            self.http_ports[node_id] = free_port()
            extra += (
                f"[http]\nenabled = true\ndashboard = false\nport = {self.http_ports[node_id]}\n"
            )
            self.processes[node_id] = NodeProcess(
                self.directory / node_id,
                extra_config=extra,
                role=role,
                threads=1,
                database=self.database,
            )
        with pytest.MonkeyPatch.context() as environment:
            if node_id == NOTIFYING:  # what systemd gives a `Type=notify` unit with WatchdogSec
                environment.setenv("NOTIFY_SOCKET", str(self.systemd.path))
                environment.setenv("WATCHDOG_USEC", str(WATCHDOG_S * 1_000_000))
            return self.processes[node_id].start()

    def job(self, uid: str) -> SeriesRecord | None:
        found = [job for job in self.state.jobs(limit=None) if job.series_instance_uid == uid]
        return found[0] if found else None

    def wait_for(self, uid: str, states: set[str], timeout: float = 240) -> SeriesRecord:
        deadline = time.monotonic() + timeout
        while (job := self.job(uid)) is None or job.state not in states:
            assert time.monotonic() < deadline, f"{uid} not {states} after {timeout} s: {job}"
            time.sleep(0.1)
        return job

    def reasons(self, series_id: int) -> list[str]:
        return [t.reason or "" for t in self.state.job(series_id).transitions]

    def owner(self, series_id: int) -> str:
        """The worker that claimed the series' running attempt (from its timeline)."""
        claims = [r for r in self.reasons(series_id) if r.startswith("attempt ")]
        return claims[-1].rsplit(" on ", 1)[1]

    def seg_instances(self, job: SeriesRecord) -> int:
        """The SEG instances the PACS holds of the series' SEG series."""
        found = self.orthanc.find_series("SEG", SeriesInstanceUID=job.seg_series_instance_uid)
        return sum(len(series["Instances"]) for series in found)

    def results_of(self, job: SeriesRecord) -> set[str]:
        """The names of the series' files under the shared results/ folder."""
        return {p.name for p in (self.shared / "results").glob(f"{job.id}-*")}

    def attempts_in_results(self, job: SeriesRecord) -> set[int]:
        """The attempts whose files (SEG, SR, key image, ...) lie under results/."""
        named = (re.match(r"\d+-\d+-(\d+)", name) for name in self.results_of(job))
        return {int(match.group(1)) for match in named if match is not None}

    def plant_results(self, job: SeriesRecord, attempt: int) -> set[str]:
        """Files named as the SEG and SR of `attempt` would be, as a crash leaves them."""
        names = {f"{job.id}-{job.generation}-{attempt}{end}" for end in (".dcm", "_sr.dcm")}
        for name in names:
            (self.shared / "results" / name).write_bytes(b"")
        return names

    def http(self, node_id: str, path: str) -> tuple[int, bytes]:
        """GET `path` from the process's HTTP endpoint: status and body."""
        url = f"http://127.0.0.1:{self.http_ports[node_id]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def delivery_claim(self, series_id: int) -> tuple[str, int, bool] | None:
        """(owner, attempt, in flight) of the series' delivery's last claim, if any."""
        query = text(
            "SELECT c.owner, c.attempt, d.next_attempt_at IS NULL AND d.state = 'pending' "
            "FROM delivery_claims c JOIN deliveries d ON d.id = c.delivery_id "
            "WHERE d.series_id = :series_id"
        )
        with self.state.engine.connect() as connection:
            row = connection.execute(query, {"series_id": series_id}).first()
        return (row[0], row[1], bool(row[2])) if row is not None else None

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
        self.state.close()
        self.systemd.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresServer,
    rabbitmq: RabbitMQServer,
    orthanc: OrthancProcess,
) -> Iterator[Cluster]:
    database = postgres.create_database(f"cluster_{uuid.uuid4().hex}")
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), database, rabbitmq.url, orthanc)
    try:
        for node_id in ("recv-a", "recv-b"):
            cluster.start(node_id, "receive")
        for node_id in ("worker-1", "worker-2"):
            cluster.start(node_id, "worker")
        yield cluster
    finally:
        cluster.stop()


def inference_process(worker: NodeProcess) -> psutil.Process:
    """The worker's inference process (`pipeline.worker`, spawned)."""
    assert worker.process is not None
    (child,) = [
        p
        for p in psutil.Process(worker.process.pid).children()
        if "spawn_main" in " ".join(p.cmdline())
    ]
    return child


@contextmanager
def held_still(worker: NodeProcess) -> Iterator[None]:
    """The worker's inference stopped (SIGSTOP) meanwhile; its lease is still renewed."""
    child = inference_process(worker)
    os.kill(child.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if child.is_running():
            os.kill(child.pid, signal.SIGCONT)


def test_a_worker_killed_mid_inference_hands_its_series_to_another(
    cluster: Cluster, phantom_series: PhantomSeries
) -> None:
    """SIGKILL the worker that runs a series: the broker hands the job to another worker,
    which takes the series over once the dead worker's lease ran out; the PACS holds one SEG."""
    uid = cluster.processes["recv-a"].send_series(phantom_series(1001)["ct"])
    job = cluster.wait_for(uid, {"segmenting"})
    first = cluster.owner(job.id)
    worker = cluster.processes[first]
    with held_still(worker):
        assert cluster.job(uid).state == "segmenting"  # type: ignore[union-attr]
        # As if it had written its SEG and SR before it died, and never recorded them.
        cluster.plant_results(job, 1)
        worker.crash()  # its inference process dies with it, stopped or not
    job = cluster.wait_for(uid, FINAL)
    assert job.state == "done", job
    second = cluster.owner(job.id)
    assert second != first
    reasons = cluster.reasons(job.id)
    assert f"attempt 1 on {first}" in reasons
    assert f"{first} lost attempt 1; retrying" in reasons
    assert f"attempt 2 on {second}" in reasons
    assert cluster.seg_instances(job) == 1
    # The dead attempt's files went once the attempt that took over was recorded.
    assert cluster.attempts_in_results(job) == {2}
    assert f"{job.id}-1-2.dcm" in cluster.results_of(job)


def test_no_node_requeues_or_claims_another_s_running_work(
    cluster: Cluster, phantom_series: PhantomSeries
) -> None:
    """While a worker runs a series: both reception nodes restart after a SIGKILL, the worker
    killed by the test before starts again, and a duplicate of the job reaches the broker.
    None of them touches the series: it finishes on its first attempt, on its first worker."""
    uid = cluster.processes["recv-b"].send_series(phantom_series(1002)["ct"])
    job = cluster.wait_for(uid, {"segmenting"})
    owner = cluster.owner(job.id)
    (other,) = [w for w in ("worker-1", "worker-2") if w != owner]
    with held_still(cluster.processes[owner]):
        live = cluster.plant_results(job, 1)  # the running attempt's, as if being written
        ended = cluster.plant_results(job, 7)  # an attempt that ended unrecorded
        for node_id, role in (("recv-a", "receive"), ("recv-b", "receive"), (other, "worker")):
            if cluster.processes[node_id].process is not None:  # the worker died in a test before
                cluster.processes[node_id].crash()
            cluster.start(node_id, role)
        # What another reception node publishes for the same queue entry: the idle worker
        # takes it, and drops it.
        from dicom_node.cluster.broker import celery_app, publish

        publish(celery_app(cluster.cluster_config("test")), job.id, job.generation)
        time.sleep(LEASE_S * 1.5)  # past a lease, had it not been renewed
        assert cluster.job(uid).state == "segmenting"  # type: ignore[union-attr]
        # Each start removed the ended attempt's files, none of the running one's.
        assert cluster.results_of(job) == live, ended
    job = cluster.wait_for(uid, FINAL)
    assert job.state == "done", job
    reasons = cluster.reasons(job.id)
    assert [r for r in reasons if r.startswith("attempt ")] == [f"attempt 1 on {owner}"]
    assert not [r for r in reasons if "restarted" in r or "lost" in r], reasons
    other_log = cluster.processes[other].log.read_text()
    assert f"series {job.id}: nothing to do" in other_log
    assert cluster.seg_instances(job) == 1


def test_a_reception_node_killed_mid_transfer_loses_no_acknowledged_instance(
    cluster: Cluster, phantom_series: PhantomSeries
) -> None:
    """SIGKILL a reception node after some instances were acknowledged: after its restart they
    are all recorded, in its own folder of the shared spool; the sender sends the series again
    to the other node, and the series, now in two nodes' folders, is segmented whole."""
    files = sorted(phantom_series(1003)["ct"].iterdir())
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node = cluster.processes["recv-a"]
    sender = start_storescu(node.port, *files)
    assert sender.stdout is not None
    acknowledged = 0
    for line in sender.stdout:
        if "Received Store Response" in line and "Success" in line:
            acknowledged += 1
            if acknowledged == len(files) // 2:
                node.crash()
                break
    sender.kill()
    sender.wait()
    told_stored = {
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[:acknowledged]
    }
    cluster.start("recv-a", "receive")
    recorded = _instances(cluster.database)
    assert told_stored <= set(recorded)
    for sop in told_stored:
        assert recorded[sop].startswith("recv-a/")
        assert (cluster.shared / "spool" / recorded[sop]).is_file()
    assert storescu(cluster.processes["recv-b"].port, *files).returncode == 0
    job = cluster.wait_for(uid, FINAL)
    assert job.state == "done", job
    assert job.instance_count == len(files)
    every_sop = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    recorded = _instances(cluster.database)
    assert {recorded[sop].split("/")[0] for sop in every_sop} == {"recv-a", "recv-b"}
    assert cluster.seg_instances(job) == 1


def test_a_worker_added_mid_load_takes_jobs(
    cluster: Cluster, phantom_series: PhantomSeries
) -> None:
    """One worker, held on its series, and a second series waiting: a worker started now
    takes the waiting series."""
    cluster.processes["worker-1"].stop()
    busy = cluster.processes["worker-2"]
    first = cluster.processes["recv-a"].send_series(phantom_series(1004)["ct"])
    cluster.wait_for(first, {"segmenting"})
    with held_still(busy):
        second = cluster.processes["recv-b"].send_series(phantom_series(1005)["ct"])
        cluster.wait_for(second, {"queued"})
        cluster.start("worker-3", "worker")
        job = cluster.wait_for(second, FINAL)
        assert job.state == "done", job
        assert cluster.owner(job.id) == "worker-3"
    job = cluster.wait_for(first, FINAL)
    assert job.state == "done" and cluster.owner(job.id) == "worker-2", job


def _instances(database: str) -> dict[str, str]:
    """SOP Instance UID -> file name under the shared spool, straight from the database."""
    engine = create_engine(database)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT sop_instance_uid, file_name FROM instances"))
            return {sop: name for sop, name in rows}
    finally:
        engine.dispose()


def test_a_frozen_worker_s_series_is_taken_over_and_its_late_result_discarded(
    cluster: Cluster, phantom_series: PhantomSeries
) -> None:
    """A worker that hangs whole (SIGSTOP: its broker connection stays open, so RabbitMQ
    never hands its job on) stops renewing its lease: a reception node publishes the series
    again and another worker takes it over. Woken up, the frozen worker finishes, and its
    result is discarded: one SEG at the PACS, and only the new attempt's file."""
    uid = cluster.processes["recv-a"].send_series(phantom_series(1006)["ct"])
    job = cluster.wait_for(uid, {"segmenting"})
    frozen = cluster.processes[cluster.owner(job.id)]
    assert frozen.process is not None
    with held_still(frozen):
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            job = cluster.wait_for(uid, FINAL)
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
    assert job.state == "done", job
    first, second = f"attempt 1 on {frozen.directory.name}", cluster.owner(job.id)
    reasons = cluster.reasons(job.id)
    assert first in reasons and f"attempt 2 on {second}" in reasons, reasons
    deadline = time.monotonic() + 120
    while f"series {job.id}: attempt 1 was taken over" not in frozen.log.read_text():
        assert time.monotonic() < deadline, "the frozen worker never finished its attempt"
        time.sleep(0.5)
    # Its SEG and SR, written before it learnt, are deleted right after.
    while cluster.attempts_in_results(job) != {2}:
        assert time.monotonic() < deadline, cluster.results_of(job)
        time.sleep(0.5)
    assert f"{job.id}-1-2.dcm" in cluster.results_of(job)
    assert cluster.seg_instances(job) == 1


def test_a_reception_node_killed_mid_delivery_hands_the_delivery_to_another(
    cluster: Cluster, phantom_series: PhantomSeries
) -> None:
    """With the PACS stopped, a delivery stays in flight on the reception node that claimed
    it, which renews its lease meanwhile; SIGKILLed, its lease runs out and the other node
    takes the delivery over (attempt 2). The PACS, resumed, holds one SEG."""
    pacs = cluster.orthanc.process
    assert pacs is not None
    os.kill(pacs.pid, signal.SIGSTOP)
    try:
        uid = cluster.processes["recv-a"].send_series(phantom_series(1007)["ct"])
        job = cluster.wait_for(uid, {"sending"})
        deadline = time.monotonic() + 60
        while (claim := cluster.delivery_claim(job.id)) is None or not claim[2]:
            assert time.monotonic() < deadline, claim
            time.sleep(0.1)
        owner = claim[0]
        time.sleep(LEASE_S * 1.5)  # past a lease, had it not been renewed
        assert cluster.delivery_claim(job.id) == (owner, 1, True)
        cluster.processes[owner].crash()
        deadline = time.monotonic() + LEASE_S * 5
        while (claim := cluster.delivery_claim(job.id)) is None or claim[1] == 1:
            assert time.monotonic() < deadline, claim
            time.sleep(0.1)
        (other,) = {"recv-a", "recv-b"} - {owner}
        assert claim == (other, 2, True)
    finally:
        os.kill(pacs.pid, signal.SIGCONT)
    job = cluster.wait_for(uid, FINAL)
    assert job.state == "done", job
    (delivery,) = cluster.state.job(job.id).deliveries
    assert (delivery.state, delivery.attempts) == ("delivered", 2)
    assert cluster.seg_instances(job) == 1


def test_a_worker_serves_metrics_tells_systemd_and_is_not_ready_without_inference(
    cluster: Cluster,
) -> None:
    """A worker under systemd says READY=1 once its `/readyz` is 200, with every check
    passing, and pings the watchdog while it is. Once its inference process is killed (while
    idle: it is replaced at the next job) it is 503, naming the worker check, and the pings
    stop, so that systemd would restart it; SIGTERM: STOPPING=1."""
    name = NOTIFYING
    if cluster.processes.get(name) is None or cluster.processes[name].process is None:
        cluster.start(name, "worker")  # run alone: test_a_worker_added_mid_load_takes_jobs does
    ((_, _, answered_ready),) = cluster.systemd.wait_for("READY=1")
    assert answered_ready, "READY=1 before the worker's /readyz answered 200"
    deadline = time.monotonic() + 60

    def ready_with_its_process() -> tuple[tuple[int, bytes], psutil.Process]:
        # Ready, and ready with the process it has now: an earlier test's jobs may still have
        # it replace its inference process, and the one killed below must be the one it uses.
        child = inference_process(cluster.processes[name])
        ready = cluster.http(name, "/readyz")
        if ready[0] == 200:
            reason = json.loads(ready[1])["checks"]["worker"]["reason"]
            if reason != f"worker {child.pid} ready":
                ready = (0, ready[1])
        return ready, child

    while (found := ready_with_its_process())[0][0] != 200:  # the broker connection opens
        assert time.monotonic() < deadline, found[0]
        time.sleep(0.2)
    (_, body), child = found
    checks = json.loads(body)["checks"]
    assert set(checks) == {"database", "broker", "results_dir", "free_space", "worker"}
    healthy_since = time.monotonic()
    pings = cluster.systemd.wait_for("WATCHDOG=1", count=2, timeout=10, after=healthy_since)
    assert pings[1][0] - pings[0][0] < WATCHDOG_S  # every half of the interval
    assert cluster.http(name, "/healthz")[0] == 200
    status, metrics = cluster.http(name, "/metrics")
    assert status == 200
    assert b'dicom_node_series{state="done"}' in metrics
    assert b"dicom_node_model_info{" in metrics
    child.kill()
    # The worker sees the death when multiprocessing polls the process, which a loaded
    # machine may delay past the kill: readiness must turn within seconds, not at once.
    deadline = time.monotonic() + 10
    while (answer := cluster.http(name, "/readyz"))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    unready_at = time.monotonic()
    status, body = answer
    assert status == 503, body
    report = json.loads(body)
    assert report["reason"] == "not ready: worker", report
    # A round of checks under way when the death was seen may still ping; none after it.
    time.sleep(2 * WATCHDOG_S)
    assert cluster.systemd.received("WATCHDOG=1", after=unready_at + WATCHDOG_S / 2) == []
    worker = cluster.processes[name]
    assert "not pinging systemd's watchdog: worker: " in worker.log.read_text()
    assert worker.stop() == 0, worker.log.read_text()
    cluster.systemd.wait_for("STOPPING=1", after=unready_at)
