#!/bin/sh
# Builds the images of deploy/container/compose.yaml with podman, from Debian's packages and
# PyPI only (no image registry):
#   localhost/debian:bookworm-minbase    mmdebstrap's minimal Debian 12, imported (once)
#   localhost/dicom-node:VERSION[-cuda]  the node (Containerfile), also tagged :latest[-cuda]
#   localhost/dicom-node-orthanc:latest  Orthanc + DICOMweb (Containerfile.orthanc)
#   localhost/dicom-node-viewer-proxy:latest  nginx before OHIF (Containerfile.viewer-proxy)
#
# Usage: deploy/container/build.sh [cpu|cuda|base]   (as root, or a user set up for rootless
# podman); base: only the Debian base image.
# Environment:
#   TORCH_VERSION    2.13.0, as the Makefile
#   TORCH_INDEX_URL  where pip gets torch's wheel: empty uses pip's own configuration (on the
#                    development machine that finds the CPU build, as `make install` does);
#                    elsewhere https://download.pytorch.org/whl/cpu for cpu. For cuda, empty is
#                    PyPI's build (torch 2.13.0: CUDA 13.0's libraries as nvidia-* wheels), or
#                    torch's index for another CUDA version (https://download.pytorch.org/whl/cuNNN)
#   CA_BUNDLE        the CA certificates pip in the image trusts while building (default: $PIP_CERT,
#                    else /etc/ssl/certs/ca-certificates.crt of the building host)
#   PYTHON           the Python 3.11 that builds the node's wheel (default python3)
#   WORK             where the build context and mmdebstrap's tarball go
#                    (default /var/tmp/dicom-node-container; never inside the repository)
#   DEBIAN_MIRROR    http://deb.debian.org/debian
set -eu

variant=${1:-cpu}
case $variant in
cpu) suffix= ;;
cuda) suffix=-cuda ;;
base) ;;
*) echo "usage: $0 [cpu|cuda|base]" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/var/tmp/dicom-node-container}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/debian:bookworm-minbase

# HEALTHCHECK and the other Docker-only instructions are kept only in the docker format.
build() { nice -n 10 podman build --format docker --build-arg "BASE=$base" "$@"; }

mkdir -p "$WORK"
if ! podman image exists "$base"; then
    nice -n 10 mmdebstrap --variant=minbase --mode=root bookworm "$WORK/bookworm-minbase.tar" \
        "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
        "deb $DEBIAN_MIRROR-security bookworm-security main"
    podman import --change 'CMD ["/bin/bash"]' "$WORK/bookworm-minbase.tar" "$base"
    rm "$WORK/bookworm-minbase.tar"
fi
[ "$variant" = base ] && exit 0

# The build context: the files the Containerfiles copy, and the wheels.
context=$WORK/context
rm -rf "$context"
mkdir -p "$context/wheels/torch" "$context/wheels/node"
cp "$here"/config.toml "$here"/orthanc.json "$here"/viewer-proxy.conf.in "$here"/viewer-proxy.sh \
    "$context/"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels/node" "$repo"
if [ "$variant" = cpu ] || [ -n "$TORCH_INDEX_URL" ]; then
    # torch alone: its dependencies come from PyPI in the image, as the node's do.
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_28_x86_64 \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        --dest "$context/wheels/torch" "torch==$TORCH_VERSION"
fi

# The node's version, and its dependencies for the image's layer below the node's own.
"$PYTHON" - "$repo/pyproject.toml" "$context/requirements.txt" "$context/version" <<'PY'
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
open(sys.argv[2], "w").write("\n".join(project["dependencies"]) + "\n")
open(sys.argv[3], "w").write(project["version"])
PY
version=$(cat "$context/version")
build -f "$here/Containerfile" --secret "id=ca,src=$CA_BUNDLE" --build-arg "VARIANT=$variant" \
    --build-arg "TORCH_VERSION=$TORCH_VERSION" \
    -t "localhost/dicom-node:$version$suffix" -t "localhost/dicom-node:latest$suffix" "$context"
build -f "$here/Containerfile.orthanc" -t localhost/dicom-node-orthanc:latest "$context"
build -f "$here/Containerfile.viewer-proxy" -t localhost/dicom-node-viewer-proxy:latest "$context"
