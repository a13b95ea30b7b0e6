"""A worker that cannot load its model: the node refuses to start and names the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

from dicom_node.testbed.node_process import NodeProcess
from model.engine.weights import DEFAULT_WEIGHTS, sidecar


def test_weights_that_fail_their_checksum_stop_the_start_with_the_reason(tmp_path: Path) -> None:
    weights = tmp_path / "weights" / DEFAULT_WEIGHTS.name
    weights.parent.mkdir()
    shutil.copyfile(sidecar(DEFAULT_WEIGHTS), sidecar(weights))
    data = bytearray(DEFAULT_WEIGHTS.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of one weight changed: the SHA-256 no longer matches
    weights.write_bytes(bytes(data))
    node = NodeProcess(tmp_path / "node", extra_config=f'weights = "{weights}"\n')
    result = node.cli("serve")
    assert result.returncode != 0
    assert "could not load the model: ValueError:" in result.stderr, result.stderr[-2000:]
    assert "differs from weights_sha256" in result.stderr
