"""pynetdicom's two reactor threads, woken by what they wait for instead of polling.

pynetdicom (3.0) runs two threads per association, and both poll. Its DUL reactor (the
socket's side) checks the socket with a zero time-out and sleeps 1 ms when nothing is there;
its association reactor (the side that runs the handlers) sleeps 1 ms, then looks for a
decoded message. A C-STORE meets both on its way: the request waits for the association
reactor's next look, then the response waits for the DUL reactor's next one. On a 0.5 MB
slice that is ~1-2 ms of a few ms per instance, and the sender sends nothing meanwhile.

Here, on an established association (state Sta6), the DUL reactor waits in `select` on its
socket and on a wake-up socket that `send_pdu` writes to, so it reads a PDU when one arrives
and sends a response as soon as the handler gives it; the association reactor waits on its
message queue. Both waits are bounded (`_DUL_WAIT_S`, `_MESSAGE_WAIT_S`): the reactors'
other duties (time-outs, release, abort, being stopped) run between waits as before, and an
idle association wakes far less often than pynetdicom's 1000 times a second.

This reaches inside pynetdicom (private methods and states); everything that does is in this
module, and tests/test_reception_reactors.py fails when the pynetdicom code it relies on
changes.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import struct
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

# The longest a reactor waits before doing its other duties: a release, an abort or a
# stop is seen at most this late (pynetdicom's polls see them within 1 ms).
_DUL_WAIT_S = 0.02
_MESSAGE_WAIT_S = 0.005
_DATA_TRANSFER = "Sta6"  # PS3.8 9.2: association established, ready for P-DATA
# PS3.8 E.2 message control header: a command, its last (here only) fragment.
_LAST_COMMAND_FRAGMENT = b"\x03"
_C_STORE_RSP = 0x8001  # PS3.7 9.3.1.2 Command Field
_NO_DATASET = 0x0101  # PS3.7 E.1 Command Data Set Type
# The largest command set a C-STORE-RSP may be, with room for the PDV item's header.
_RSP_ROOM = 256


class PromptDUL(DULServiceProvider):
    """The DUL reactor, waiting for its socket or for a PDU to send (see the module doc)."""

    _wake_reader: socket.socket
    _wake_writer: socket.socket

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive to send (pynetdicom's only way in), and wake the reactor."""
        super().send_pdu(primitive)
        self._wake_up()

    def _wake_up(self) -> None:
        # Fails only when full (the reactor is awake already) or closed (it has ended).
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _is_transport_event(self) -> bool:
        """pynetdicom's check, after waiting for something to do on an established
        association; a PDU to send counts as an event, so it goes out on this loop."""
        if self.state_machine.current_state == _DATA_TRANSFER and self.event_queue.empty():
            woken = self._wait()
            if woken and self._process_recv_primitive():
                return True
        return super()._is_transport_event()

    def _wait(self) -> bool:
        """Wait up to `_DUL_WAIT_S` for incoming data or a wake-up; True if woken up."""
        connection = self.socket.socket if self.socket is not None else None
        if connection is None or not self.to_provider_queue.empty():
            return True
        if isinstance(connection, ssl.SSLSocket) and connection.pending():
            return False  # decrypted bytes that select cannot see
        try:
            readable, _, _ = select.select([connection, self._wake_reader], [], [], _DUL_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's check reports it
            return False
        if self._wake_reader not in readable:
            return False
        with contextlib.suppress(OSError):
            self._wake_reader.recv(4096)
        return True

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake_up()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_reader.close()
            self._wake_writer.close()


class PromptDIMSE(DIMSEServiceProvider):
    """The DIMSE provider, whose non-blocking look for a message (the association reactor's,
    once a loop) waits up to `_MESSAGE_WAIT_S` for one instead, and which encodes a plain
    C-STORE response itself.

    pynetdicom encodes every response through a pydicom Dataset, element by element with
    validation: ~1 ms of CPU for the seven elements of a C-STORE-RSP, per instance received.
    A response that carries only a status (what reception answers) is the same bytes every
    time but for its UIDs, message ID and status, and is encoded here directly (PS3.7 E.1,
    implicit VR little endian); anything else goes through pynetdicom. EVT_DIMSE_SENT is not
    triggered for those responses (the node does not handle it).
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command_set = encode_store_response(primitive)
        peer_max = self.maximum_pdu_size
        if command_set is None or (peer_max and peer_max < len(command_set) + _RSP_ROOM):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append(
            (context_id, _LAST_COMMAND_FRAGMENT + command_set)
        )
        self.dul.send_pdu(pdata)

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=_MESSAGE_WAIT_S)
        except queue.Empty:
            return None, None


def make_prompt(assoc: Association) -> None:
    """Fit an association's reactors with the waits above; before its threads start."""
    dul = assoc.dul
    dul.__class__ = PromptDUL
    assert isinstance(dul, PromptDUL)
    dul._wake_reader, dul._wake_writer = socket.socketpair()
    dul._wake_reader.setblocking(False)
    dul._wake_writer.setblocking(False)
    assoc.dimse.__class__ = PromptDIMSE


def encode_store_response(primitive: Any) -> bytes | None:
    """A C-STORE-RSP's command set with only a status (PS3.7 9.3.1.2), encoded as pynetdicom
    encodes it; None for anything else (a request, an error comment, an offending element)."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status is None or primitive.OffendingElement or primitive.ErrorComment:
        return None
    elements = [
        _uid(0x0002, primitive.AffectedSOPClassUID),
        struct.pack("<HHIH", 0, 0x0100, 2, _C_STORE_RSP),
        struct.pack("<HHIH", 0, 0x0120, 2, primitive.MessageIDBeingRespondedTo),
        struct.pack("<HHIH", 0, 0x0800, 2, _NO_DATASET),
        struct.pack("<HHIH", 0, 0x0900, 2, primitive.Status),
        _uid(0x1000, primitive.AffectedSOPInstanceUID),
    ]
    body = b"".join(elements)
    return struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body


def _uid(element: int, uid: str | None) -> bytes:
    """A UI element of group 0000, padded with NUL to even length; absent if not set."""
    if not uid:
        return b""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", 0, element, len(value)) + value
