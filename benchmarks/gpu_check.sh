#!/usr/bin/env bash
# The prepared GPU check: one script for one GPU machine, under 8 minutes on an H100/H200 (its
# steps' timeouts add up to 7.5 minutes, the wheel install aside).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# 1. With WHEEL_DIR (offline GPU clusters are common), installs every wheel in it with
#    pip --no-index --no-deps into OUT_DIR/site, put first on PYTHONPATH: e.g. fbgemm-gpu 1.6.0
#    (cu130) and torchrec 1.6.x for an image with torch 2.11 + CUDA 13, plus whatever of
#    requirements.txt the image lacks. Without it, uses the Python environment as it is.
# 2. Records the machine (nvidia-smi, versions) in OUT_DIR/gpu_check.md. Where torch sees no
#    CUDA device it says so there, runs nothing else and exits 0: a dry run.
# 3. Runs the tests marked `gpu` (tests/test_gpu.py: one GPU, fused Adam and LAMB, row-wise tables,
#    a bf16 tower (train.tower_precision), each run's streamed evaluation against CPU's, two GPUs
#    under torchrun where there are two) -> OUT_DIR/gpu_tests.log.
# 4. Runs benchmarks/scale.py on the GPU (pre-built batches, then shards) at 10^5-10^7 rows and
#    at the KuaiRand-1K catalogue size (4.37M videos) with batch 65,536: samples/s, peak device
#    memory and the HBM roofline fraction -> OUT_DIR/RESULTS_gpu.md and its plots.
#
# PYTHON (default python3) picks the interpreter; engagerec is imported from this checkout. Here:
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gpu_check   (a dry run without a GPU)
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/gpu_check.md"
export PYTHONPATH="$REPO/plugin${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$(date +%s)

if [[ -n "$WHEELS" ]]; then
    echo "installing the wheels of $WHEELS into $OUT/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" "$WHEELS"/*.whl || {
        echo "pip could not install $WHEELS/*.whl" | tee "$REPORT"; exit 1; }
    export PYTHONPATH="$OUT/site:$PYTHONPATH"
fi

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not found"
    "$PYTHON" - <<'PY' 2>&1
import importlib.metadata as m
import torch
print("python", __import__("platform").python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for package in ("fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"):
    try:
        print(package, m.version(package))
    except m.PackageNotFoundError:
        pass
print("cuda devices:", torch.cuda.device_count())
PY
    echo '```'
} > "$REPORT"
cat "$REPORT"

if ! "$PYTHON" -c "import torch, torchrec, engagerec" 2>"$OUT/import.log"; then
    tail -n 5 "$OUT/import.log" >> "$REPORT"
    echo "$PYTHON cannot import torch, torchrec and engagerec (above); give WHEEL_DIR or PYTHON." | tee -a "$REPORT"
    exit 1
fi
rm -f "$OUT/import.log"  # library warnings on a good import stay out of the report
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "No CUDA device is present (torch sees none): dry run, nothing was run." | tee -a "$REPORT"
    exit 0
fi

echo "## gpu tests" | tee -a "$REPORT"
timeout 180 "$PYTHON" -m pytest -q -m gpu "$REPO/tests/test_gpu.py" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "exit $?: $(tail -n 1 "$OUT/gpu_tests.log")" | tee -a "$REPORT"

echo "## scale on the GPU" | tee -a "$REPORT"
cp "$REPORT" "$OUT/RESULTS_gpu.md"
scale() {
    timeout 90 "$PYTHON" "$REPO/benchmarks/scale.py" --device cuda --no-memory --repeats 2 \
        --work-dir "$OUT/shards" --results "$OUT/RESULTS_gpu.md" "$@" >> "$OUT/scale.log" 2>&1
    echo "scale.py $*: exit $?" | tee -a "$REPORT"
}
scale --section scale_cuda --source prebuilt --rows 100000 1000000 10000000 --batch-size 16384 \
    --dense-max-rows 1000000
scale --section scale_cuda_kuairand_1k --source prebuilt --rows 4370000 --batch-size 65536 --steps 40 \
    --window 10 --dense-max-rows 0
scale --section scale_cuda_shards --source shards --rows 10000000 --batch-size 16384 --dense-max-rows 0
echo "done in $(( $(date +%s) - started )) s; results in $OUT" | tee -a "$REPORT"
