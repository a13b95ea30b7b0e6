"""Clients the node tests talk to a running node with: its HTTP endpoint, concurrent senders."""

from __future__ import annotations

import http.client
import subprocess
from pathlib import Path

from dicom_node.testbed.node_process import storescu_command
from dicom_node.testbed.peers import PEER_ENV


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET a path of the node's HTTP endpoint on loopback: status and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def send_at_once(port: int, associations: list[list[Path]], timeout_s: float = 120) -> None:
    """One storescu per list of files, all started before any is waited for; each succeeds."""
    senders = [
        subprocess.Popen(
            storescu_command(port, *files),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=PEER_ENV,
        )
        for files in associations
    ]
    for sender in senders:
        output, _ = sender.communicate(timeout=timeout_s)
        assert sender.returncode == 0, output
