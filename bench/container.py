"""The node's container image, built and run here with podman (deploy/container/).

    python -m bench.container [--variant cpu] [--out bench/results/container.json]

As root on Debian 12; it installs what it needs with apt (APT_PACKAGES below, none of them in
the Makefile's: the build downloads Debian's packages and PyPI's wheels and takes minutes, so
it is not part of `make bench` either). Steps, each timed:

1. `deploy/container/build.sh VARIANT`: the Debian base (mmdebstrap, once, untimed), then the
   node's, Orthanc's and the viewer proxy's images with none of their layers cached (PyPI's and
   Debian's downloads included); then the same again, as after a change to the node's code
   (each build makes a new node wheel, so only the node's last layers are rebuilt).
2. `dicom-node demo` (its own pynetdicom PACS) on the host, then inside the node's image.
3. compose.yaml's stack without OHIF (no registry to pull it from): up until the node's
   /readyz answers 200, a small phantom series from DCMTK on the host to the node's published
   port, the SEG found through the viewer proxy's DICOMweb, the images' health checks, down.

What podman needed on this host (restricted-host.conf, and why) is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread

from bench.results_file import machine, write_result
from dicom_node.testbed.containers import (
    BUILD_SCRIPT,
    IMAGES,
    NODE_IMAGE,
    ComposeStack,
    build_base_image,
    image_size_mb,
    podman_environment,
    require_images,
)
from dicom_node.testbed.node_process import storescu
from dicom_node.testbed.phantom_series import write_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "container.json"
# podman and buildah build and run; mmdebstrap makes the base; runc for restricted-host.conf;
# dcmtk's storescu is the scanner (dcmdump stands for it: pynetdicom has a storescu too).
APT_PACKAGES = ("podman", "buildah", "mmdebstrap", "runc", "podman-compose", "dcmtk")
APT_BINARIES = ("podman", "buildah", "mmdebstrap", "runc", "podman-compose", "dcmdump")
PHANTOM_SEED = 1001


def timed_build(env: dict[str, str], variant: str) -> float:
    start = time.monotonic()
    subprocess.run(["sh", str(BUILD_SCRIPT), variant], env=env, check=True)
    return round(time.monotonic() - start, 1)


def demo(command: list[str], env: dict[str, str]) -> dict:
    """`dicom-node demo --pacs scp --json` by `command`: its report's figures and wall time."""
    start = time.monotonic()
    done = subprocess.run(
        [*command, "demo", "--pacs", "scp", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(done.stdout)
    return {
        "wall_s": round(time.monotonic() - start, 1),
        "pacs": report["pacs"],
        "phantom": report["phantom"],
        "timings_s": report["timings_s"],
        "any_bone_dice": report["any_bone_dice"],
    }


def compose_round_trip(env: dict[str, str], workdir: Path) -> dict:
    """The stack up, one series in, its SEG out through the viewer's DICOMweb, down."""
    ct = write_phantom(workdir, seed=PHANTOM_SEED, size="small")["ct"]
    files = sorted(ct.rglob("*.dcm"))
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    stack = ComposeStack(env)
    start = time.monotonic()
    with stack:
        ready_s = time.monotonic() - start
        sent_at = time.monotonic()
        sent = storescu(stack.ports["NODE_DICOM_PORT"], ct, extra=("+sd", "+r"))
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr)
        send_s = time.monotonic() - sent_at
        while not stack.dicomweb_series(study_uid, Modality="SEG"):
            if time.monotonic() - sent_at > 300:
                raise RuntimeError(f"no SEG after 300 s:\n{stack.logs('node')}")
            time.sleep(0.5)
        seg_s = time.monotonic() - sent_at
        healthy = {service: stack.healthcheck(service) for service in stack.services}
    return {
        "services": list(stack.services),
        "instances": len(files),
        "up_to_ready_s": round(ready_s, 1),
        "send_s": round(send_s, 1),
        "first_instance_to_seg_over_dicomweb_s": round(seg_s, 1),
        "healthcheck_passed": healthy,
        "note": "includes [series] complete_after_s = 20 of the image's config",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if not all(shutil.which(binary) for binary in APT_BINARIES):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *APT_PACKAGES],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=True,
        )
    build_base_image(dict(os.environ))
    env = podman_environment()
    # From the base image with no layer of the images cached; then as after a code change.
    # (every tag of them: the node's version tag would keep its layers).
    listed = subprocess.run(
        ["podman", "images", "--quiet", "--filter", "reference=localhost/dicom-node*"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    built = sorted(set(listed.stdout.split()))
    subprocess.run(["podman", "rmi", "--force", "--ignore", *built], env=env, check=True)
    subprocess.run(["podman", "image", "prune", "--force"], env=env, check=True)
    build_s = timed_build(env, args.variant)
    rebuild_s = timed_build(env, args.variant)
    require_images(env)
    # The same demo on the host (this virtual environment's node) and in the image.
    on_host = demo([str(Path(sys.executable).with_name("dicom-node"))], dict(os.environ))
    in_image = demo(["podman", "run", "--rm", NODE_IMAGE], env)
    with tempfile.TemporaryDirectory(prefix="bench-container-") as workdir:
        compose = compose_round_trip(env, Path(workdir))
    podman = subprocess.run(["podman", "--version"], capture_output=True, text=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "podman": podman.stdout.strip(),
        "restricted_host": {
            "needed": "DICOM_NODE_PODMAN_RESTRICTED" in env,
            "plain_podman_run_error": env.get("DICOM_NODE_PODMAN_RESTRICTED", ""),
        },
        "variant": args.variant,
        "build_s": build_s,
        "rebuild_s": rebuild_s,
        "image_size_mb": {image: image_size_mb(env, image) for image in IMAGES},
        "demo_on_host": on_host,
        "demo_in_image": in_image,
        "compose": compose,
        "not_run": "OHIF (docker.io/ohif/app): no image registry is reachable here",
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
