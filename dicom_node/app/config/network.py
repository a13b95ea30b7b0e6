"""What faces the network: [node] (the DICOM daemon: its AE title, port, peers allowed, TLS,
time-outs and where it keeps everything), [[destinations]] (the peers every SEG goes to) and
[http] (metrics, health checks and the dashboard)."""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dicom_node.app.config.checks import (
    ConfigError,
    check_ae_title,
    check_key_pair,
    check_network,
    check_timeout,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DATABASE_SCHEMES = ("sqlite://", "postgresql://", "postgresql+")


@dataclass(frozen=True)
class NodeConfig:
    """The DICOM daemon: who it is on the network and where it keeps everything it writes."""

    ae_title: str = "BONESEG"
    bind: str = "127.0.0.1"
    port: int = 11112
    # Everything the node writes lives under here; a relative path is relative to the config
    # file's folder (load_config makes it absolute).
    data_dir: str = "var"
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE
    max_associations: int = 10  # per receiving process (see receive_processes)
    # Processes that receive on the DICOM port (Linux: SO_REUSEPORT, the kernel spreads the
    # associations across them), the daemon included: one Python process is CPU-bound on a
    # few associations, so concurrent senders use more cores with more (dicom_node/net/
    # receivers.py). 1: the daemon alone.
    receive_processes: int = 1
    # Largest P-DATA PDU the node accepts (0: no limit). The sender splits each instance into
    # PDUs of at most this size, so small values cost throughput (pynetdicom's default 16382).
    max_pdu_size: int = 0
    # Largest instance (MiB of encoded dataset) the node takes. pynetdicom gathers a C-STORE's
    # dataset in memory before the handler sees it, so without a cap one sender declaring an
    # endless dataset takes all memory; past it the association is aborted. A whole-leg
    # Enhanced CT (1400 frames of 512 x 512 x 16 bits) is 734 MiB.
    max_instance_mb: int = 1024
    database: str = ""  # "": SQLite under data_dir; or a postgresql:// URL
    # Free space (MiB) every received instance must leave on the spool's file system; below it
    # a C-STORE is answered out-of-resources before anything is written (dicom_node/spool.py),
    # so a full disk never breaks the database or the results beside the spool. 0: off.
    min_free_mb: int = 1024
    # Peers by network address: IP addresses or CIDR networks (IPv4 or IPv6); empty: any. An
    # association from elsewhere is rejected before anything is stored (dicom_node/access.py).
    allowed_peer_addresses: tuple[str, ...] = ()
    # Time-outs (seconds) so that a stalled or hostile peer cannot hold a thread forever.
    network_timeout_s: float = 60.0  # peer silent mid-PDU, mid-handshake or between messages
    acse_timeout_s: float = 30.0  # connection open without an A-ASSOCIATE-RQ; release
    dimse_timeout_s: float = 30.0  # a DIMSE message the node waits for
    # DICOM TLS (PS3.15 B.1) on the node's port: certificate and key both (then the port speaks
    # TLS only) or neither. PEM files, relative to the config file like data_dir.
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_certificates: str = ""  # verifies client certificates that peers present
    tls_require_client_certificate: bool = False  # True: no verified certificate, no entry

    def __post_init__(self) -> None:
        check_ae_title("node.ae_title", self.ae_title)
        if self.min_free_mb < 0:
            raise ConfigError(f"node.min_free_mb: must be >= 0 (0: off), got {self.min_free_mb}")
        for title in self.allowed_calling_aets:
            check_ae_title("node.allowed_calling_aets", title)
        if not self.bind:
            raise ConfigError("node.bind: must be an address, e.g. '127.0.0.1' or '0.0.0.0'")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"node.port: must be 1..65535, got {self.port}")
        if not self.data_dir:
            raise ConfigError("node.data_dir: must not be empty")
        if self.max_associations < 1:
            raise ConfigError(f"node.max_associations: must be >= 1, got {self.max_associations}")
        if self.receive_processes < 1:
            raise ConfigError(f"node.receive_processes: must be >= 1, got {self.receive_processes}")
        if self.receive_processes > 1 and not sys.platform.startswith("linux"):
            raise ConfigError(
                "node.receive_processes: more than 1 needs Linux (processes sharing the DICOM "
                f"port through SO_REUSEPORT); this is {sys.platform}"
            )
        if self.max_instance_mb < 1:
            raise ConfigError(f"node.max_instance_mb: must be >= 1, got {self.max_instance_mb}")
        if self.max_pdu_size != 0 and not 4096 <= self.max_pdu_size <= 2**32 - 1:
            raise ConfigError(
                f"node.max_pdu_size: 0 (no limit) or 4096..4294967295, got {self.max_pdu_size}"
            )
        if self.database and not self.database.startswith(_DATABASE_SCHEMES):
            raise ConfigError(
                f"node.database: expected '' (SQLite under data_dir), a sqlite:// or a "
                f"postgresql:// URL, got {self.database.split(':', 1)[0]!r}..."
            )
        for entry in self.allowed_peer_addresses:
            check_network("node.allowed_peer_addresses", entry)
        for key in ("network_timeout_s", "acse_timeout_s", "dimse_timeout_s"):
            check_timeout(f"node.{key}", getattr(self, key))
        check_key_pair("node", self.tls_certificate, self.tls_private_key)
        if not self.tls_certificate and self.tls_ca_certificates:
            raise ConfigError(
                "node.tls_ca_certificates: client certificates are verified only over TLS; "
                "set node.tls_certificate and node.tls_private_key too"
            )
        if self.tls_require_client_certificate and not self.tls_ca_certificates:
            raise ConfigError(
                "node.tls_require_client_certificate: needs node.tls_ca_certificates "
                "(the CA that signs the clients' certificates)"
            )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def tls(self) -> bool:
        return bool(self.tls_certificate)

    @property
    def allowed_peer_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(entry) for entry in self.allowed_peer_addresses)

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_path / 'node.db'}"


# The files of each, which load_config makes absolute and checks exist.
NODE_TLS_FILES = ("tls_certificate", "tls_private_key", "tls_ca_certificates")
DESTINATION_TLS_FILES = ("tls_ca_certificates", "tls_certificate", "tls_private_key")


@dataclass(frozen=True)
class Destination:
    """[[destinations]]: a peer every SEG is sent to by C-STORE.

    With `reply_to_caller`, the SEG goes back to whoever sent the series: the calling AE title
    and the address of its association replace `ae_title` and `host`; `port` stays (DICOM does
    not tell us the sender's listening port).
    """

    name: str
    ae_title: str
    host: str
    port: int
    reply_to_caller: bool = False
    # DICOM TLS to this peer. Its certificate must verify against tls_ca_certificates (PEM;
    # "": the system's CAs) and name `host` (DNS name or IP address in subjectAltName).
    tls: bool = False
    tls_ca_certificates: str = ""
    tls_certificate: str = ""  # the node's client certificate, for a peer that asks for one
    tls_private_key: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", self.name):
            raise ConfigError(
                f"destinations.name: 1 to 32 letters, digits, '_', '.', '-', got {self.name!r}"
            )
        check_ae_title(f"destinations[{self.name}].ae_title", self.ae_title)
        if not self.host:
            raise ConfigError(f"destinations[{self.name}].host: must not be empty")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"destinations[{self.name}].port: must be 1..65535, got {self.port}")
        prefix = f"destinations[{self.name}]"
        check_key_pair(prefix, self.tls_certificate, self.tls_private_key)
        for key in DESTINATION_TLS_FILES:
            if getattr(self, key) and not self.tls:
                raise ConfigError(f"{prefix}.{key}: set, but {prefix}.tls is false")


@dataclass(frozen=True)
class HttpConfig:
    """[http]: metrics (Prometheus), health checks and the dashboard over HTTP, on a port of
    their own.

    Off by default; bound to the loopback interface by default. `/metrics`, `/healthz` and
    `/readyz` have no authentication (a scraper's and a prober's); the dashboard
    (`dicom_node.web.dashboard`) asks for `token` or `username`/`password` when either is
    set, and bound elsewhere than loopback it must have one: the node refuses to start
    without."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 9104  # not 8042 (Orthanc's HTTP) nor the DICOM port
    dashboard: bool = True  # the jobs at /, one page per job, and a failed job's retry
    # The dashboard's credentials: a bearer token (scripts: `Authorization: Bearer ...`; a
    # browser gives it as the password of HTTP basic auth, any user name), or a user name and
    # password (HTTP basic auth). Keep the config file unreadable to others when set.
    token: str = ""
    username: str = ""
    password: str = ""
    # Patient name, ID and birth date on a job's page (read from the series' files). Off:
    # the dashboard shows UIDs, AE titles and results only, as the node's log does.
    show_patient_identifiers: bool = False

    def __post_init__(self) -> None:
        if not self.bind:
            raise ConfigError("http.bind: must be an address, e.g. '127.0.0.1' or '0.0.0.0'")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"http.port: must be 1..65535, got {self.port}")
        if bool(self.username) != bool(self.password):
            raise ConfigError(
                "http.username and http.password: set both (HTTP basic auth) or neither"
            )
        if self.token and len(self.token) < 16:
            raise ConfigError("http.token: at least 16 characters (e.g. `openssl rand -hex 16`)")
        if self.enabled and self.dashboard and not self.loopback and not self.authenticated:
            raise ConfigError(
                f"http.bind: the dashboard bound to {self.bind} (not loopback) needs "
                "http.token or http.username and http.password (or http.dashboard = false)"
            )

    @property
    def authenticated(self) -> bool:
        """The dashboard asks for credentials."""
        return bool(self.token or self.username)

    @property
    def loopback(self) -> bool:
        """Bound to this machine only."""
        return is_loopback(self.bind)


def is_loopback(host: str) -> bool:
    """An address of this machine only: 127.0.0.0/8, ::1 or the name localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: whatever it resolves to, not known to be loopback
        return False
