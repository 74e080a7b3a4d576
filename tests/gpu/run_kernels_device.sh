#!/usr/bin/env bash
# GPU correctness tests and the kernel benchmark in one go, on the device machine, from the repo root.
# Expects TritonSigmoid as a wheel under .whl/ (optional; .whl/ is git-ignored, so the device call must name
# ".whl" in its carry list or the TS columns stay empty); logs and bench.json go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/kernels${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  SCFM_KERNELS_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q tests/gpu/test_kernels_gpu.py \
    -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
python3 -m scfm_kernels.bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
