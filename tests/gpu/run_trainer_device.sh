#!/usr/bin/env bash
# The trainer on one GPU of the device machine, from the repo root, in one call:
#
#     bash tests/gpu/run_trainer_device.sh [run] [bench]      (default: both, `run` first)
#
# run:   `launch run configs/h200_160m_8k.yaml` through Ray Train + DeepSpeed ZeRO-2 + MLflow on full-length
#        synthetic cells (data.atlas=synthetic:20000:full: 8 cells x 8,192 tokens per batch, the bench's batch),
#        compiled, with rank 0's step profile (train.profile_steps) — the full stack against the model-only step.
#        Needs .devsite/part0-train.tar.xz (one call) or both .devsite parts unpacked (tests/gpu/device_site.sh);
#        skipped with a note when Ray is missing.
# bench: `python -m scfm_platform.bench --compile --profile` (sigmoid, SDPA flash, SDPA cuDNN in one script).
#        Needs only omegaconf (a wheel under .whl/, installed into /tmp/site).
#
# Output under $OUT (default /tmp/trainer_out): run.log, run_metrics.json (medians of the run's MLflow metrics
# from step 10 on), trainer.json, bench.log. RUN_STEPS, RUN_LIMIT, BENCH_LIMIT override the run's steps and the
# two time limits (seconds); BACKENDS (comma list) and BENCH_ARGS (more flags) change the bench; RUN_ARGS adds
# overrides to the run (a CPU smoke: RUN_ARGS="model.preset=tiny resources.use_gpu=false data.max_len=256
# data.tokens_per_batch=2048 resources.cpus_per_worker=1").
set -u
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-/tmp/trainer_out}
mkdir -p "$OUT"
STAGES=${*:-run bench}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# shellcheck source=tests/gpu/device_site.sh
source tests/gpu/device_site.sh
export PYTHONPATH="$PYTHONPATH:/tmp/site"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

for stage in $STAGES; do
    case $stage in
    run)
        if ! python3 -c 'import ray, deepspeed, mlflow' >/dev/null 2>&1; then
            echo "run: skipped, Ray/DeepSpeed/MLflow missing (carry .devsite/part0-train.tar.xz)" | tee "$OUT/run.log"
            continue
        fi
        W=/tmp/trainer_work && rm -rf "$W" && mkdir -p "$W"
        timeout -k 20 "${RUN_LIMIT:-300}" python3 -m scfm_launch run configs/h200_160m_8k.yaml \
            data.atlas=synthetic:20000:full train.steps="${RUN_STEPS:-40}" \
            train.profile_steps=3 train.profile_after=25 train.val_every=0 train.checkpoint_every=0 \
            train.output_dir="$W/runs" tracking.local_dir="$W/mlruns" \
            ${RUN_ARGS:-} --no-progress --worker-logs >"$OUT/run.log" 2>&1
        echo "run: rc=$?" | tee -a "$OUT/run.log"
        grep -A30 "profile of" "$OUT/run.log" | head -40
        python3 - "$W/mlruns/mlflow.db" "$OUT/run_metrics.json" <<'EOF'
import json, sqlite3, statistics, sys
rows = sqlite3.connect(sys.argv[1]).execute("SELECT key, value, step FROM metrics WHERE step >= 10").fetchall()
keys = ("mfu", "tokens_per_s", "step_time_s", "data_wait_frac", "peak_mem_gib", "loss")
out = {k: statistics.median(v for key, v, _ in rows if key == k) for k in keys if any(r[0] == k for r in rows)}
out["steps"] = max((s for _, _, s in rows), default=0)
json.dump(out, open(sys.argv[2], "w"), indent=1)
print("run metrics (medians from step 10):", out)
EOF
        python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
        ;;
    bench)
        timeout -k 20 "${BENCH_LIMIT:-280}" python3 -m scfm_platform.bench --steps 8 --warmup 3 --compile \
            --profile --backends "${BACKENDS:-sigmoid,flash,cudnn}" --json "$OUT/trainer.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60
        ;;
    *) echo "unknown stage $stage (run, bench)" >&2 ;;
    esac
done
