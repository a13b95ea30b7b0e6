"""deploy/container/: the node's image in compose.yaml's stack with Orthanc and the viewer's proxy,
run with podman. A phantom series goes from DCMTK on the host to the node container's published
DICOM port; the SEG must come back through the proxy's DICOMweb, as OHIF reads it.

Opt-in (DICOM_NODE_CONTAINER_TESTS=1): it needs podman, podman-compose and the images of
deploy/container/build.sh, which take minutes to build and are no part of `make test`
(deploy/README.md, "Containers"; bench/container.py builds them and runs this same path)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from pydicom import dcmread

from dicom_node.testbed.containers import ComposeStack, http_get, podman_environment, require_images
from dicom_node.testbed.node_process import storescu
from tests.support import PhantomSeries

pytestmark = pytest.mark.skipif(
    os.environ.get("DICOM_NODE_CONTAINER_TESTS") != "1",
    reason="container tests are opt-in: DICOM_NODE_CONTAINER_TESTS=1 after "
    "deploy/container/build.sh (deploy/README.md, Containers)",
)


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    env = podman_environment()
    require_images(env)
    with ComposeStack(env) as running:
        yield running


def test_a_series_sent_to_the_node_container_comes_back_as_a_seg_over_dicomweb(
    stack: ComposeStack, phantom_series: PhantomSeries
) -> None:
    ct = phantom_series(1001)["ct"]
    sent = storescu(stack.ports["NODE_DICOM_PORT"], ct, extra=("+sd", "+r"))
    assert sent.returncode == 0, sent.stderr
    study_uid = dcmread(next(ct.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID

    deadline = time.monotonic() + 150  # [series] complete_after_s = 20, then the model
    while not (segs := stack.dicomweb_series(study_uid, Modality="SEG")):
        assert time.monotonic() < deadline, stack.logs("node")
        time.sleep(1)
    assert len(segs) == 1
    # The node's metrics, on its published HTTP port, counted the series' instances.
    status, metrics = http_get(f"http://127.0.0.1:{stack.ports['NODE_HTTP_PORT']}/metrics")
    assert status == 200
    received = [
        line
        for line in metrics.decode().splitlines()
        if line.startswith("dicom_node_instances_received_total")
    ]
    assert received and sum(float(line.split()[-1]) for line in received) == len(
        list(ct.rglob("*.dcm"))
    ), received


def test_healthy_unprivileged_services_and_a_clean_stop_of_the_node(stack: ComposeStack) -> None:
    for service in stack.services:
        assert stack.healthcheck(service), f"{service}:\n{stack.logs(service)}"
    assert stack.exec("node", "id", "-u").strip() == "10001"
    assert stack.exec("orthanc", "id", "-un").strip() == "orthanc"
    assert stack.exec("viewer-proxy", "id", "-un").strip() == "www-data"
    # The node's spool and results are in its volume, which its user owns.
    assert {"spool", "results"} <= set(stack.exec("node", "ls", "/data").split())
    assert stack.exec("node", "stat", "-c", "%u", "/data").strip() == "10001"
    # `podman stop` (SIGTERM through tini): the node stops cleanly.
    assert stack.stop("node") == 0, stack.logs("node")
