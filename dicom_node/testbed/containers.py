"""The node's container images and compose stack (`deploy/container/`) as the container test and
`bench/container.py` drive them: podman found and able to start a container on this host, the
images built by `deploy/container/build.sh`, and `compose.yaml`'s services brought up with
podman-compose on free host ports, checked, and taken down with their volumes.

Images live in podman's own storage and the build's work files under /var/tmp, never in the
repository. A host without podman, podman-compose or the images raises
`ContainersUnavailableError` (a PeerNotInstalledError: the tests skip)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from dicom_node.testbed.peers import PeerNotInstalledError, find_binary, free_port

CONTAINER_DIR = Path(__file__).resolve().parents[2] / "deploy" / "container"
COMPOSE_FILE = CONTAINER_DIR / "compose.yaml"
BUILD_SCRIPT = CONTAINER_DIR / "build.sh"
RESTRICTED_HOST_CONF = CONTAINER_DIR / "restricted-host.conf"
BASE_IMAGE = "localhost/debian:bookworm-minbase"
NODE_IMAGE = "localhost/dicom-node:latest"
IMAGES = (
    NODE_IMAGE,
    "localhost/dicom-node-orthanc:latest",
    "localhost/dicom-node-viewer-proxy:latest",
)
# OHIF's image comes from a registry; the stack runs without it where none is reachable.
SERVICES_WITHOUT_VIEWER = ("node", "orthanc", "viewer-proxy")


class ContainersUnavailableError(PeerNotInstalledError):
    """podman, podman-compose or the images are missing, or podman cannot run a container."""


def _podman(
    env: dict[str, str], *args: str, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("podman"), *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def build_base_image(env: dict[str, str]) -> None:
    """The Debian base that the images start from (build.sh base: mmdebstrap, podman import);
    nothing to do when it exists. It needs no container to run."""
    find_binary("mmdebstrap")
    subprocess.run(["sh", str(BUILD_SCRIPT), "base"], env=env, check=True)


def podman_environment() -> dict[str, str]:
    """The environment podman runs containers in here: this process's, with CONTAINERS_CONF
    set to restricted-host.conf where podman's defaults cannot start one (the reason is then
    in "DICOM_NODE_PODMAN_RESTRICTED"). Needs the base image."""
    env = dict(os.environ)
    if _podman(env, "image", "exists", BASE_IMAGE).returncode != 0:
        raise ContainersUnavailableError(
            f"no {BASE_IMAGE} image: deploy/container/build.sh builds it (deploy/README.md)"
        )
    plain = _podman(env, "run", "--rm", BASE_IMAGE, "true")
    if plain.returncode == 0:
        return env
    restricted = {**env, "CONTAINERS_CONF": str(RESTRICTED_HOST_CONF)}
    with_conf = _podman(restricted, "run", "--rm", BASE_IMAGE, "true")
    if with_conf.returncode == 0:
        return {**restricted, "DICOM_NODE_PODMAN_RESTRICTED": plain.stderr.strip()}
    raise ContainersUnavailableError(
        f"podman cannot run a container here: {plain.stderr.strip()}; with "
        f"{RESTRICTED_HOST_CONF.name}: {with_conf.stderr.strip()}"
    )


def require_images(env: dict[str, str]) -> None:
    """ContainersUnavailableError unless build.sh's images are in podman's storage."""
    missing = [i for i in IMAGES if _podman(env, "image", "exists", i).returncode != 0]
    if missing:
        raise ContainersUnavailableError(
            f"images not built: {', '.join(missing)} (deploy/container/build.sh)"
        )


def image_size_mb(env: dict[str, str], image: str) -> float:
    """The image's size in podman's storage, all layers, in MB."""
    size = _podman(env, "image", "inspect", "--format", "{{.Size}}", image)
    return round(int(size.stdout.strip()) / 1e6, 1)


def http_get(url: str, timeout_s: float = 5) -> tuple[int, bytes]:
    """Status and body of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class ComposeStack:
    """`compose.yaml`'s `services` under a project name of their own, on free host ports (the
    compose file's port variables); `down` removes the containers, network and volumes."""

    def __init__(self, env: dict[str, str], services: tuple[str, ...] = SERVICES_WITHOUT_VIEWER):
        self.compose = find_binary("podman-compose")
        self.services = services
        self.project = f"dicomnode{uuid.uuid4().hex[:8]}"
        self.ports = {
            name: free_port()
            for name in (
                "NODE_DICOM_PORT",
                "NODE_HTTP_PORT",
                "ORTHANC_DICOM_PORT",
                "ORTHANC_HTTP_PORT",
                "VIEWER_PORT",
            )
        }
        self.env = {**env, **{name: str(port) for name, port in self.ports.items()}}

    def _compose(self, *args: str, timeout_s: float = 300) -> str:
        command = [self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)}: rc {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def container(self, service: str) -> str:
        """podman-compose's name for the service's container."""
        return f"{self.project}_{service}_1"

    def up(self, timeout_s: float = 240) -> None:
        """Starts the services and waits until the node is ready (/readyz 200 on its published
        HTTP port) and Orthanc and the proxy answer."""
        self._compose("up", "-d", *self.services)
        checks = {
            "node": f"http://127.0.0.1:{self.ports['NODE_HTTP_PORT']}/readyz",
            "orthanc": f"http://127.0.0.1:{self.ports['ORTHANC_HTTP_PORT']}/system",
            "viewer-proxy": f"http://127.0.0.1:{self.ports['VIEWER_PORT']}/healthz",
        }
        deadline = time.monotonic() + timeout_s
        for service, url in checks.items():
            if service not in self.services:
                continue
            while self._status(url) != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{service} not ready after {timeout_s} s:\n{self.logs(service)}"
                    )
                time.sleep(0.5)

    @staticmethod
    def _status(url: str) -> int:
        try:
            return http_get(url, timeout_s=2)[0]
        except OSError:
            return 0

    def logs(self, service: str) -> str:
        done = _podman(self.env, "logs", "--tail", "60", self.container(service))
        return done.stdout + done.stderr

    def healthcheck(self, service: str) -> bool:
        """The image's or compose file's health check, run now (`podman healthcheck run`)."""
        return _podman(self.env, "healthcheck", "run", self.container(service)).returncode == 0

    def exec(self, service: str, *command: str) -> str:
        done = _podman(self.env, "exec", self.container(service), *command)
        if done.returncode != 0:
            raise RuntimeError(f"{command}: {done.stderr}")
        return done.stdout

    def stop(self, service: str) -> int:
        """SIGTERM to the service's container (through its init), then its exit code."""
        _podman(self.env, "stop", "--time", "30", self.container(service))
        code = _podman(
            self.env, "inspect", "--format", "{{.State.ExitCode}}", self.container(service)
        )
        return int(code.stdout.strip())

    def down(self) -> None:
        self._compose("down", "-v", timeout_s=120)
        # podman-compose 1.0.3 leaves the project's network behind.
        _podman(self.env, "network", "rm", "--force", f"{self.project}_default")

    def __enter__(self) -> ComposeStack:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def dicomweb_series(self, study_uid: str, **query: str) -> list[dict[str, Any]]:
        """QIDO-RS through the viewer's proxy: the study's series, as OHIF would list them."""
        params = "&".join(f"{key}={value}" for key, value in query.items())
        url = f"http://127.0.0.1:{self.ports['VIEWER_PORT']}/dicom-web/studies/{study_uid}/series"
        status, body = http_get(f"{url}?{params}" if params else url)
        if status == 204 or not body:
            return []
        if status != 200:
            raise RuntimeError(f"QIDO {url}: {status} {body[:200]!r}")
        result: list[dict[str, Any]] = json.loads(body)
        return result
