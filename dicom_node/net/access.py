"""Who may reach the node, over what, and for how long (docs/security.md).

In the order a connection meets them:

1. The server (`NodeServer`) caps the connections open at once, puts the network time-out on
   every accepted socket and does the TLS handshake in the connection's own thread. Its
   sockets (`BoundedReadSocket`) refuse a PDU longer than an instance may be.
2. At association: the peer address allow-list (`PeerPolicy`, here), then the called AE title
   and the calling-AE allow-list (pynetdicom, configured in `receive.build_ae`). Every
   rejection is logged with the peer's address and AE titles, never anything from a dataset.
3. At start: a warning for each of the config file, data_dir and weights that anyone on the
   machine can write, and for a TLS key anyone can read (`check_permissions`); the node still
   starts, the operator decides.

pynetdicom's own server needs two of these changes. It does the TLS handshake in the thread
that accepts connections, without a time-out: one peer that connects to a TLS port and says
nothing stops every later connection. And its sockets block without a time-out: a peer that
sends half a PDU holds two threads forever (its association thread waits on the reader,
which waits on the socket). Neither is configurable through `AE.start_server`. Nor is the
socket's read: pynetdicom reads whatever length a PDU header declares (up to 4 GiB) into
memory, 4 KiB per system call, which also caps reception at a fraction of the disk's speed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.app.config import Config, IPNetwork, NodeConfig
from dicom_node.net.reactors import make_prompt

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, by the service user, no reason given.
# No reason: an address refusal is policy, and the peer learns nothing by being told why.
_REJECTED_PERMANENT, _SERVICE_USER, _NO_REASON = 0x01, 0x01, 0x01
# Connections open at once (associating or associated, TLS handshakes included), as a multiple
# of node.max_associations: pynetdicom only counts associations once they are negotiated, so
# without a cap a flood of idle connections costs two threads each until it times out.
CONNECTIONS_PER_ASSOCIATION = 2
# Beyond node.max_instance_mb, what one PDU may hold: its header, a command set and a margin.
PDU_OVERHEAD_BYTES = 1 << 16
_READ_CHUNK_BYTES = 1 << 20  # per recv_into: a large PDU in a few system calls
_REFUSALS_LOGGED_EVERY_S = 10.0  # a flood is one warning per interval, not one per connection
# At stop, how long associations in flight may take to finish before they are aborted.
SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True)
class PeerPolicy:
    """The address allow-list: empty allows any peer."""

    networks: tuple[IPNetwork, ...] = ()

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 scope
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
        return any(ip in network for network in self.networks)


def describe_peer(assoc: Association) -> str:
    """'SCANNER at 10.1.2.3 calling BONESEG': what a log line may say about a peer. AE titles
    are the peer's bytes: repr() keeps a newline in one from forging a log line."""
    request = assoc.requestor.primitive
    calling = request.calling_ae_title if request is not None else "?"
    called = request.called_ae_title if request is not None else "?"
    return f"{calling!r} at {assoc.requestor.address} calling {called!r}"


def handle_requested(event: Event, policy: PeerPolicy) -> None:
    """EVT_REQUESTED (an A-ASSOCIATE-RQ arrived): reject a peer outside the allow-list, before
    pynetdicom negotiates anything."""
    assoc = event.assoc
    if policy.allows(assoc.requestor.address):
        return
    log.warning(
        "association from %s rejected: address not in node.allowed_peer_addresses",
        describe_peer(assoc),
    )
    assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, _NO_REASON)
    assoc.kill()  # as pynetdicom does after its own rejections: the reader thread ends too


def handle_rejected(event: Event) -> None:
    """EVT_REJECTED (pynetdicom rejected: calling or called AE title, association limit)."""
    rejection = event.assoc.acceptor.primitive
    reason = rejection.reason_str if rejection is not None else "unknown reason"
    reason = reason[:1].lower() + reason[1:]  # 'called AE title not recognised'
    log.warning("association from %s rejected: %s", describe_peer(event.assoc), reason)


def access_handlers(node: NodeConfig) -> list[tuple[evt.EventType, Callable, list]]:
    return [
        (evt.EVT_REQUESTED, handle_requested, [PeerPolicy(node.allowed_peer_networks)]),
        (evt.EVT_REJECTED, handle_rejected, []),
    ]


class BoundedReadSocket(AssociationSocket):
    """pynetdicom's socket with its one read replaced: large reads into one buffer, and a PDU
    declared longer than the server's `max_pdu_bytes` read as a closed connection (nothing of
    it is read; pynetdicom ends the association)."""

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        server = self.assoc._server
        assert isinstance(server, NodeServer)
        if nr_bytes > server.max_pdu_bytes:
            log.warning(
                "association from %s aborted: a PDU of %d MiB, more than an instance may be "
                "(node.max_instance_mb)",
                self.assoc.requestor.ae_title,
                nr_bytes >> 20,
            )
            return bytearray()
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            count = self.socket.recv_into(view[read:], min(nr_bytes - read, _READ_CHUNK_BYTES))
            if not count:  # closed by the peer: what arrived, as pynetdicom's recv does
                del view
                del buffer[read:]
                return buffer
            read += count
        return buffer


class NodeRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom makes its AssociationSocket right there, with no parameter for another
        # class; the subclass adds no state, so the object can take its class instead.
        assoc.dul.socket.__class__ = BoundedReadSocket
        make_prompt(assoc)
        return assoc


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with what one peer can hold bounded (see the module
    docstring): a socket time-out, the TLS handshake off the accepting thread, a cap on open
    connections. With `reuse_port` its socket shares the port with the node's other
    receiving processes (SO_REUSEPORT, Linux): the kernel hands each new connection to one
    of them."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        max_connections: int,
        max_pdu_bytes: int,
        reuse_port: bool = False,
    ) -> None:
        """As `AE.make_server` calls a server class, with the two bounds on top."""
        self.max_connections = max_connections
        self.max_pdu_bytes = max_pdu_bytes
        self.reuse_port = reuse_port
        self._lock = threading.Lock()
        self._pending = 0  # accepted, association thread not started yet (TLS handshakes)
        self._refused = 0
        self._refusal_logged_at = -_REFUSALS_LOGGED_EVERY_S
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers,
            request_handler=NodeRequestHandler,
        )

    def server_bind(self) -> None:
        """socketserver's step that binds (pynetdicom's sets SO_REUSEADDR there). Should
        pynetdicom bind elsewhere, the node's second receiving process could not bind: its
        start fails, and so does tests/test_receive_processes.py."""
        if self.reuse_port:
            assert self.socket is not None, "socketserver makes the socket before binding it"
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, without a handshake: here it would block every later connection."""
        assert self.socket is not None, "the server binds its socket in __init__"
        client, address = self.socket.accept()
        # recv and send on this socket now fail after this long without progress, which ends
        # the association (pynetdicom's own idle time-out only runs between whole PDUs).
        client.settimeout(self.ae.network_timeout)
        # Each C-STORE response is a small write the sender waits for: with Nagle on it sits
        # in the kernel until the delayed ACK (~40 ms), per instance.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """The connection cap (runs in the accepting thread, before any byte is read)."""
        with self._lock:
            if len(self.active_associations) + self._pending < self.max_connections:
                self._pending += 1  # until its association thread runs (finish_request)
                return True
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= _REFUSALS_LOGGED_EVERY_S:
            log.warning(
                "connection from %s closed: %d connections open, the most allowed (%d x "
                "node.max_associations); %d refused since the last such warning",
                client_address[0],
                self.max_connections,
                CONNECTIONS_PER_ASSOCIATION,
                self._refused,
            )
            self._refused, self._refusal_logged_at = 0, now
        return False

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The connection's thread: TLS handshake (under the socket's time-out), then
        pynetdicom's handler, which starts the association thread and returns."""
        try:
            if self.ssl_context is not None:
                request = self._handshake(request, client_address[0])
                if request is None:
                    return
            super().finish_request(request, client_address)
        finally:
            self._done_pending()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:  # no thread: finish_request will not run
            self._done_pending()
            raise

    def _done_pending(self) -> None:
        with self._lock:
            self._pending -= 1

    def _handshake(self, request: socket.socket, address: str) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        try:
            return self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as error:  # ssl.SSLError, TimeoutError, reset, ...
            log.warning("TLS handshake with %s failed: %s", address, _tls_error(error))
            request.close()
            return None


def _tls_error(error: Exception) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate not verified: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")  # e.g. 'wrong version number'
    if isinstance(error, TimeoutError):
        return "no handshake within node.network_timeout_s"
    return str(error) or type(error).__name__


def start_server(
    ae: AE,
    node: NodeConfig,
    evt_handlers: list,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> NodeServer:
    """What `ae.start_server(block=False)` does, with `NodeServer`, the access handlers and
    TLS when `ssl_context` is given (pynetdicom's start_server takes no server class);
    `reuse_port`: the port is shared with the node's other receiving processes."""
    try:
        server = ae.make_server(
            (node.bind, node.port),
            ssl_context=ssl_context,
            evt_handlers=[*evt_handlers, *access_handlers(node)],
            server_class=NodeServer,
            max_connections=CONNECTIONS_PER_ASSOCIATION * node.max_associations,
            max_pdu_bytes=(node.max_instance_mb << 20) + PDU_OVERHEAD_BYTES,
            reuse_port=reuse_port,
        )
    except PermissionError as refused:  # the CLI prints it as one line
        raise PermissionError(
            f"{node.bind}:{node.port}: {refused.strerror}; a port under 1024 needs root or "
            "the capability CAP_NET_BIND_SERVICE (deploy/dicom-node.service grants it)"
        ) from refused
    # make_server returns an instance of server_class; its annotation adds the default class.
    server = cast(NodeServer, server)
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it again
    threading.Thread(target=server.serve_forever, name="dicom-node-server", daemon=True).start()
    return server


def stop_server(ae: AE, server: NodeServer) -> None:
    """Stop accepting, give the associations in flight SHUTDOWN_GRACE_S to finish, abort the
    rest (an aborted C-STORE was never acknowledged: the sender still has it)."""
    server.shutdown()  # no new associations; those in flight carry on
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    for association in ae.active_associations:
        log.warning("aborting an association from %s", association.requestor.ae_title)
        association.abort()


def check_permissions(config: Config, config_path: Path | None) -> list[Path]:
    """Warn about files others on this machine could change or read; returns those paths.

    A world-writable config file lets anyone redirect results or open the allow-lists; a
    world-writable data_dir lets anyone swap received instances, results or the database; a
    world-writable weights file lets anyone change the model. A private key others can read
    is no longer private, nor are the dashboard's credentials in a config file others can
    read. The node still starts: the operator decides.
    """
    writable = {
        "the config file": config_path,
        "node.data_dir": config.node.data_path,
        "inference.weights": Path(config.inference.weights) if config.inference.weights else None,
    }
    flagged = []
    for what, path in writable.items():
        mode = _mode(path)
        if path is not None and mode is not None and mode & stat.S_IWOTH:
            log.warning(
                "%s %s is world-writable (mode %04o): anyone on this machine can change it; "
                "chmod o-w it",
                what,
                path,
                stat.S_IMODE(mode),
            )
            flagged.append(path)
    http_secrets = config.http.token or config.http.password
    secret = {
        "node.tls_private_key": Path(config.node.tls_private_key)
        if config.node.tls_private_key
        else None,
        "the config file (http.token or http.password)": config_path if http_secrets else None,
    }
    for what, path in secret.items():
        mode = _mode(path)
        if path is not None and mode is not None and mode & stat.S_IROTH:
            log.warning(
                "%s %s is readable by everyone (mode %04o); chmod o-r it",
                what,
                path,
                stat.S_IMODE(mode),
            )
            flagged.append(path)
    return flagged


def _mode(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_mode
    except OSError:
        return None
