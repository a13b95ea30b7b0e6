"""Security controls against the real daemon and real peers (docs/security.md).

Certificates are made here with the openssl CLI: a CA, a server certificate for
127.0.0.1/localhost, a client certificate, and a second ("rogue") CA with a server
certificate of its own. DCMTK's storescu/echoscu/storescp speak DICOM TLS when Debian's
build has OpenSSL (it does since dcmtk 3.6.x; checked, skipped with the reason if not).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import psutil
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.app.config import Destination, NodeConfig
from dicom_node.imaging.seg import AlgorithmInfo, SegWriter
from dicom_node.imaging.volume.assemble import assemble_volume
from dicom_node.net.access import start_server
from dicom_node.net.receive import build_ae
from dicom_node.net.send import send_files
from dicom_node.net.tls import server_context
from dicom_node.testbed.ct_series import PatientInfo, write_ct_series
from dicom_node.testbed.node_process import NodeProcess, storescu
from dicom_node.testbed.peers import PEER_ENV, StoreSCP, free_port
from model.volume_io import Volume
from tests.support import require

# Distinctive values that must never reach a log line.
PATIENT = PatientInfo(
    name="QUILLONZEBRA^HORTENSIA", patient_id="PID-7Q4X-ZEBRA", birth_date=date(1923, 4, 17)
)
PHI = ("QUILLONZEBRA", "HORTENSIA", "PID-7Q4X-ZEBRA", "19230417", "1923-04-17")
STALL_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # signs rogue_cert, and nothing the node trusts
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run([require("openssl"), *map(str, args)], check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", folder / f"{name}.ext",
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    help_text = subprocess.run(
        [require("storescu"), "--help"], capture_output=True, text=True
    ).stdout
    if "+tls" not in help_text:
        pytest.skip("this DCMTK is built without OpenSSL: storescu has no +tls")
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "ca")
    server = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    server_cert, server_key = _leaf(folder, "server", ca, server)
    client_cert, client_key = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    rogue = _ca(folder, "rogue-ca")
    rogue_cert, rogue_key = _leaf(folder, "rogue", rogue, server + "\n")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return Pki(
        ca[0], server_cert, server_key, client_cert, client_key, rogue[0], rogue_cert, rogue_key
    )


def _ct_series(directory: Path, patient: PatientInfo = PATIENT) -> list[Path]:
    """40 slices of a soft-tissue cylinder around a bone-like ring: small enough for a quick
    inference, bony enough that the shipped weights find a segment (so a SEG is written)."""
    _, y, x = np.mgrid[:40, :96, :96]
    hu = np.where((y - 48) ** 2 + (x - 48) ** 2 < 40**2, 40, -1000)
    shaft = (y - 48) ** 2 + (x - 40) ** 2
    hu = np.where(shaft < 9**2, 1300, hu)
    hu = np.where(shaft < 5**2, 300, hu)
    volume = Volume(hu.astype(np.int16), spacing=(1.0, 1.0, 2.0), origin=(-48.0, -48.0, 0.0))
    return write_ct_series(volume, directory, patient=patient, uid_seed=f"security-{directory}")


def _tls(key: Path, cert: Path, ca: Path) -> tuple[str, ...]:
    """DCMTK's TLS options: +tls takes the private key first, then the certificate."""
    return ("+tls", str(key), str(cert), "+cf", str(ca))


def _destination_toml(port: int, pki: Pki) -> str:
    return (
        "[[destinations]]\nname = 'pacs'\nae_title = 'PACS'\nhost = '127.0.0.1'\n"
        f"port = {port}\ntls = true\ntls_ca_certificates = '{pki.ca}'\n"
        f"tls_certificate = '{pki.client_cert}'\ntls_private_key = '{pki.client_key}'\n"
    )


def test_tls_reception_with_client_certificates_delivery_and_no_phi_in_logs(
    pki: Pki, tmp_path: Path
) -> None:
    """The node listens with TLS only and requires a client certificate from its CA; its
    SEG goes to a storescp that also requires one. The patient's name, ID and birth date
    appear in no log line."""
    paths = _ct_series(tmp_path / "ct")
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    storescp_tls = (*_tls(pki.server_key, pki.server_cert, pki.ca), "-rc")
    with StoreSCP(tmp_path / "pacs", options=storescp_tls) as pacs:
        node = NodeProcess(
            tmp_path / "node",
            extra_config=_destination_toml(pacs.port, pki),
            tls_certificate=str(pki.server_cert),
            tls_private_key=str(pki.server_key),
            tls_ca_certificates=str(pki.ca),
            tls_require_client_certificate=True,
            network_timeout_s=STALL_TIMEOUT_S,
        ).start()
        # A peer that connects and never starts the handshake: it must not stop the others
        # (pynetdicom's own server handshakes in its accepting thread, without a time-out).
        silent = socket.create_connection(("127.0.0.1", node.port))
        try:
            plain = storescu(node.port, paths[0])
            assert plain.returncode != 0
            no_certificate = storescu(node.port, paths[0], extra=("+tla", "+cf", str(pki.ca)))
            assert no_certificate.returncode != 0
            rogue = _tls(pki.rogue_key, pki.rogue_cert, pki.ca)  # a certificate, not ours
            assert storescu(node.port, paths[0], extra=rogue).returncode != 0
            assert node.db_instances() == {}

            client = _tls(pki.client_key, pki.client_cert, pki.ca)
            sent = storescu(node.port, *paths, extra=client)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert len(node.db_instances()) == len(paths)
            node.wait_for_states({series_uid}, {"done", "no_findings", "failed"}, timeout=60)
            series = node.series()[series_uid]
            assert series["state"] == "done", series
            (seg,) = [p for p in pacs.files() if p.name.startswith("SG")]
            assert dcmread(seg).PatientID == PATIENT.patient_id  # the SEG carries it, by TLS
        finally:
            silent.close()
            assert node.stop() == 0, node.log.read_text()
    log = node.log.read_text()
    assert "listening on 127.0.0.1" in log and "(TLS)" in log
    assert "failed: no handshake within node.network_timeout_s" in log, log
    assert "TLS handshake with 127.0.0.1 failed: wrong version number" in log, log
    assert "failed: peer did not return a certificate" in log, log
    assert "failed: client certificate not verified: unable to get local issuer" in log, log
    leaked = [value for value in PHI if value in log]
    assert not leaked, f"{leaked} in the node's log:\n{log}"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the test's own assignment
def test_a_malformed_birth_date_neither_fails_the_seg_nor_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """highdicom parses the birth date it copies; a malformed one failed the series with
    "Unable to convert '17.04.1923' to 'DA' object" in the log and the job's reason."""
    caplog.set_level(logging.DEBUG)
    for path in _ct_series(tmp_path / "ct"):
        ds = dcmread(path)
        ds.PatientBirthDate = "17.04.1923"
        ds.save_as(path)
    caplog.clear()  # pydicom warned about the test's own assignment above
    assembled = assemble_volume([tmp_path / "ct"])
    labels = (assembled.volume.array > 700).astype(np.uint8)  # the ring: right femur (1)
    writer = SegWriter(AlgorithmInfo("test", "1.0", "0" * 64))
    seg = writer.write(assembled, assembled.volume.with_array(labels))
    assert seg is not None and seg.PatientBirthDate == "" and seg.PatientID == PATIENT.patient_id
    assert "1923" not in caplog.text and PATIENT.patient_id not in caplog.text


def _pacs_destination(pki: Pki, port: int, **changes: object) -> Destination:
    destination = Destination(
        "pacs",
        "PACS",
        "127.0.0.1",
        port,
        tls=True,
        tls_ca_certificates=str(pki.ca),
        tls_certificate=str(pki.client_cert),
        tls_private_key=str(pki.client_key),
    )
    return dataclasses.replace(destination, **changes)


def test_delivery_over_tls_verifies_the_pacs(pki: Pki, tmp_path: Path) -> None:
    (path, *_) = _ct_series(tmp_path / "ct")
    server = (*_tls(pki.server_key, pki.server_cert, pki.ca), "-rc")
    with StoreSCP(tmp_path / "pacs", options=server) as pacs:
        result = send_files(_pacs_destination(pki, pacs.port), [path], "BONESEG", timeout_s=10)
        assert result.delivered, result.reason
        assert len(pacs.files()) == 1

        # A PACS whose certificate our CA did not sign: nothing is sent, and the reason says so.
        wrong_ca = _pacs_destination(pki, pacs.port, tls_ca_certificates=str(pki.rogue_ca))
        result = send_files(wrong_ca, [path], "BONESEG", timeout_s=10)
        assert not result.delivered
        assert "TLS: the certificate of 127.0.0.1:" in result.reason, result.reason
        assert "does not verify: self-signed certificate in certificate chain" in result.reason

        # The certificate names 127.0.0.1 and localhost, not the address we asked for.
        wrong_name = _pacs_destination(pki, pacs.port, host="127.0.0.2")
        result = send_files(wrong_name, [path], "BONESEG", timeout_s=10)
        assert not result.delivered and "IP address mismatch" in result.reason, result.reason

        # This PACS wants a client certificate from our CA (storescp -rc).
        anonymous = _pacs_destination(pki, pacs.port, tls_certificate="", tls_private_key="")
        result = send_files(anonymous, [path], "BONESEG", timeout_s=10)
        assert "does it want a client certificate?" in result.reason, result.reason
        untrusted = _pacs_destination(
            pki, pacs.port, tls_certificate=str(pki.rogue_cert), tls_private_key=str(pki.rogue_key)
        )
        result = send_files(untrusted, [path], "BONESEG", timeout_s=10)
        assert "did it refuse our client certificate?" in result.reason, result.reason
        plain = Destination("pacs", "PACS", "127.0.0.1", pacs.port)
        result = send_files(plain, [path], "BONESEG", timeout_s=10)
        assert "does it expect TLS?" in result.reason, result.reason
        assert len(pacs.files()) == 1

    rogue = (*_tls(pki.rogue_key, pki.rogue_cert, pki.ca), "-rc")
    with StoreSCP(tmp_path / "rogue", options=rogue) as impostor:
        result = send_files(_pacs_destination(pki, impostor.port), [path], "BONESEG", 10)
        assert not result.delivered and "does not verify" in result.reason, result.reason
        assert impostor.files() == []


def test_optional_client_certificate_is_verified_when_presented(pki: Pki) -> None:
    """With a CA but no requirement, a peer may come without a certificate, but one it
    presents must verify (in-process server: the mode, not the daemon, is under test)."""
    echoscu = require("echoscu")
    node = NodeConfig(
        ae_title="BONESEG",
        port=free_port(),
        tls_certificate=str(pki.server_cert),
        tls_private_key=str(pki.server_key),
        tls_ca_certificates=str(pki.ca),
    )
    server = start_server(build_ae(node), node, [], server_context(node))
    try:

        def echo(*tls: str) -> int:
            command = [echoscu, "-aec", "BONESEG", *tls, "127.0.0.1", str(node.port)]
            return subprocess.run(command, capture_output=True, env=PEER_ENV).returncode

        assert echo("+tla", "+cf", str(pki.ca)) == 0  # no certificate
        assert echo(*_tls(pki.client_key, pki.client_cert, pki.ca)) == 0
        assert echo(*_tls(pki.rogue_key, pki.rogue_cert, pki.ca)) != 0
        assert echo() != 0  # plain DICOM
    finally:
        server.shutdown()


def test_connection_cap_closes_a_flood_and_recovers() -> None:
    """At most 2 x max_associations connections at once, idle ones included: the next is
    closed on arrival (in-process server: NodeServer, as the daemon runs it)."""
    echoscu = require("echoscu")
    node = NodeConfig(ae_title="BONESEG", port=free_port(), max_associations=1, acse_timeout_s=1)
    server = start_server(build_ae(node), node, [])
    try:
        idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", node.port), timeout=1)
        assert _closed_by_peer(extra), "a connection beyond the cap was accepted"
        command = [echoscu, "-aec", "BONESEG", "127.0.0.1", str(node.port)]
        deadline = time.monotonic() + 10  # the idle ones time out after 1 s, then room again
        while subprocess.run(command, capture_output=True, env=PEER_ENV).returncode != 0:
            assert time.monotonic() < deadline, "the cap never freed up"
            time.sleep(0.2)
        for sock in (*idle, extra):
            sock.close()
    finally:
        server.shutdown()


def _associate(port: int, source: str, called: str = "BONESEG", calling: str = "MODALITY"):
    """A pynetdicom association from `source` (any 127.x.y.z address is this machine)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))


def _connections(process: psutil.Process, port: int) -> list[str]:
    """The node's TCP connections on its port other than the listening socket."""
    return [
        c.status
        for c in process.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
    ]


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_refused_peers_stalled_connections_and_permissions(tmp_path: Path) -> None:
    """Peer addresses and the called AE title are checked; peers that connect and stall are
    dropped after the time-out without leaking threads while others are served; a
    world-writable config file and data_dir are warned about, and the node starts anyway."""
    node = NodeProcess(
        tmp_path / "node",
        allowed_peer_addresses=["127.0.0.2"],
        allowed_calling_aets=["SCANNER", "MODALITY"],
        network_timeout_s=STALL_TIMEOUT_S,
        acse_timeout_s=STALL_TIMEOUT_S,
    )
    node.data_dir.mkdir()
    for path in (node.config, node.data_dir):
        path.chmod(path.stat().st_mode | stat.S_IWOTH)
    paths = _ct_series(tmp_path / "ct")
    node.start()
    try:
        # storescu from 127.0.0.1, outside the allow-list: rejected, nothing stored.
        refused = storescu(node.port, paths[0], aet="SCANNER")
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr
        assert node.db_instances() == {}
        # From 127.0.0.2, inside it, but calling another AE title, or as an unknown AE.
        assert _associate(node.port, "127.0.0.2", called="NOT-BONESEG").is_rejected
        assert _associate(node.port, "127.0.0.2", calling="INTRUDER").is_rejected

        process = psutil.Process(node.process.pid)
        time.sleep(1.0)  # the scheduler's and delivery's threads have started
        baseline = process.num_threads()
        stalled = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
        for _ in range(3):  # half of an A-ASSOCIATE-RQ: a header promising 200 bytes, then 10
            sock = socket.create_connection(("127.0.0.1", node.port))
            sock.sendall(b"\x01\x00\x00\x00\x00\xc8" + bytes(10))
            stalled.append(sock)
        held = time.monotonic() + STALL_TIMEOUT_S / 2
        while process.num_threads() < baseline + len(stalled) and time.monotonic() < held:
            time.sleep(0.05)
        assert process.num_threads() >= baseline + len(stalled)  # they do hold threads

        # Meanwhile the node serves an allowed peer.
        assoc = _associate(node.port, "127.0.0.2")
        assert assoc.is_established
        assert assoc.send_c_store(dcmread(paths[0])).Status == 0x0000
        assoc.release()
        assert len(node.db_instances()) == 1

        deadline = time.monotonic() + 4 * STALL_TIMEOUT_S
        for sock in stalled:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert _closed_by_peer(sock), "a stalled connection was not dropped"
            sock.close()
        while process.num_threads() > baseline + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.num_threads() <= baseline + 1, (baseline, process.num_threads())
        assert _connections(process, node.port) == []  # no socket left open either
    finally:
        assert node.stop() == 0, node.log.read_text()
    log = node.log.read_text()
    assert f"the config file {node.config} is world-writable" in log, log
    assert f"node.data_dir {node.data_dir} is world-writable" in log, log
    assert (
        "association from 'SCANNER' at 127.0.0.1 calling 'BONESEG' rejected: address not in "
        "node.allowed_peer_addresses" in log
    ), log
    assert (
        "association from 'MODALITY' at 127.0.0.2 calling 'NOT-BONESEG' rejected: "
        "called AE title not recognised" in log
    ), log
    assert (
        "association from 'INTRUDER' at 127.0.0.2 calling 'BONESEG' rejected: "
        "calling AE title not recognised" in log
    ), log
