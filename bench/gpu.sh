#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100, 16 cores, at most 8 minutes; device tool):
# the CUDA tests, the inference bench on CUDA (whole legs: time and GPU memory), then training
# on subject phantoms with 15 sampling workers for the time left; results, the log and a
# checkpoint land in $OUT.
#
# Here, once (the GPU machine reaches no package index and does not see ../shared):
#     bench/gpu.sh prepare     # wheels the machine lacks into .whl/, the shapes into .shapes/
# Then, through the device tool, from the repo root:
#     run(command="bench/gpu.sh run", carry=[".whl", ".shapes"], timeout_s=540)
# The machine's python3 (3.12) holds CUDA PyTorch; the wheels add SimpleITK and cc3d.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
BUDGET_S=${BUDGET_S:-480}   # the whole run, start to end
START=$(date +%s)

if [ "$MODE" = prepare ]; then
    grep -qxF /.whl/ .git/info/exclude || echo /.whl/ >>.git/info/exclude
    grep -qxF /.shapes/ .git/info/exclude || echo /.shapes/ >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl SimpleITK connected-components-3d
    mkdir -p .shapes && cp -r ../shared/data/shapes/. .shapes/
    du -sh .whl .shapes
    exit 0
fi

OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" DICOM_NODE_SHAPES="$PWD/.shapes"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# 1. The tests that need CUDA (they skip on the CPU machines CI runs on).
timeout 90 python3 -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt" || true

# 2. Inference on CUDA: the inference bench (whole-leg phantom with fast; fast against paper).
timeout 150 python3 -m bench.inference --device cuda --out "$OUT/inference_cuda.json" 2>&1 \
    | tail -n 30 >"$OUT/inference.txt" || true

# 3. Training for what is left (40 s kept to copy the checkpoint), 15 sampling workers.
timeout $(( $(left) - 40 )) python3 - "$OUT/run" <<'PY' 2>&1 | tail -n 40 >"$OUT/train.txt" || true
import sys
from pathlib import Path

from model.engine.network import CascadeConfig
from model.training.loop import TrainingSettings, load_cases, train

out = Path(sys.argv[1])
config = CascadeConfig()
cases, metadata = load_cases([], [], "full", config, out / "cases", workers=15,
                             subject_seeds=range(1, 31))
settings = TrainingSettings(
    steps=100_000, batch_size=16, learning_rate=5e-4, device="cuda", workers=15,
    checkpoint_every=50, bone_fraction=0.55, joint_fraction=0.15, distractor_fraction=0.15,
    metal_fraction=0.05, init_weights=Path("model/weights/cascade_128-64-32.safetensors"),
)
train(cases, out, config, settings, metadata, progress=False)
PY
cp "$OUT/run/checkpoint.safetensors" "$OUT/" 2>/dev/null || true
rm -rf "$OUT/run"
echo "done in $(( $(date +%s) - START )) s" | tee "$OUT/done.txt"
