#!/usr/bin/env bash
# The reduced-scale reproduction of docs/reproduction.md on one GPU machine, from the repo root:
#
#     bash tests/gpu/run_repro_device.sh ablation|stress|all
#
# ablation: demo atlas (700 labelled PBMC cells + synthetic cells), softmax vs sigmoid (configs/repro_ablation_*.yaml,
#           same seeds), `launch eval` of both final checkpoints (scores.json, umap.png), `launch compare`.
# stress:   configs/stress_160m_8k_noclip_{sigmoid,softmax}.yaml on the synthetic 4K-8K-token stream, `launch compare`.
#
# Packages the machine lacks come from .devsite/ (tests/gpu/device_site.sh); our code runs from the source folders.
# Every step has a time limit and a failed step does not stop the next; the results are packed into $OUT (at most
# 8 files): <stage>_summary.txt, <stage>_mlruns.tar.gz (tracking store: params, metrics, small artifacts),
# <stage>_eval.tar.gz (scores, UMAPs, comparison figures), <stage>_logs.tar.gz (every step's output, Ray's logs).
# Work files live under $WORK (default /tmp/repro), which a second call on the same machine reuses.
#
# Environment: SMOKE=1 shrinks everything to a few CPU steps (tiny model, no GPU) to check the commands anywhere;
# DEVSITE=0 skips .devsite (use the current Python environment); PY (default python3); OUT (default /tmp/repro_out).
set -u
STAGE=${1:-all}
case "$STAGE" in ablation | stress | all) ;; *) echo "usage: $0 ablation|stress|all" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
PY=${PY:-python3}
OUT=${OUT:-/tmp/repro_out}
WORK=${WORK:-/tmp/repro}
SMOKE=${SMOKE:-0}
# Seconds for the whole script: later steps get what is left (a device call ends at 600 s).
BUDGET=${BUDGET:-$([ "$SMOKE" = 1 ] && echo 7200 || echo 555)}
mkdir -p "$OUT" "$WORK/logs" "$WORK/eval"
LOGS=$WORK/logs
SUMMARY=$OUT/${STAGE}_summary.txt
: >"$SUMMARY"
START_MARK=$WORK/.started_$STAGE
touch "$START_MARK"

if [ "${DEVSITE:-1}" != 0 ]; then
    # shellcheck source=tests/gpu/device_site.sh
    source tests/gpu/device_site.sh
else
    export PYTHONPATH="$ROOT/kernels:$ROOT/platform:$ROOT/data_service:$ROOT/launch${PYTHONPATH:+:$PYTHONPATH}"
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
LAUNCH=("$PY" -m scfm_launch)

say() { echo "$*" | tee -a "$SUMMARY"; }

# pack_out: the results so far into $OUT (after every step, so a call cut off at its limit still returns them).
pack_out() {
    # The tracking store: the sqlite file whatever its size (600 steps of two runs outgrow 5 MB; it compresses
    # well) + logged artifacts (text, configs) under 5 MB.
    (cd "$WORK" && find mlruns -type f \( -name mlflow.db -o -size -5120k \) 2>/dev/null |
        tar -czf "$OUT/${STAGE}_mlruns.tar.gz" -T -)
    # Eval: scores, UMAPs, comparison figures (no embeddings); run/checkpoint bookkeeping (launch.json, run.json).
    (cd "$WORK" && { find eval -type f \( -name '*.json' -o -name '*.png' -o -name '*.txt' \) -not -path '*.zarr/*'
        find runs -type f -name '*.json' -size -1024k -not -path '*/joinids/*'; } 2>/dev/null |
        tar -czf "$OUT/${STAGE}_eval.tar.gz" -T -)
    # Logs: every step's output and the logs of the Ray sessions this script started (each file's last 1 MB).
    RAYLOGS=$WORK/ray_logs
    rm -rf "$RAYLOGS" && mkdir -p "$RAYLOGS"
    for s in $(find "${RAY_TMPDIR:-/tmp}/ray" -maxdepth 1 -name 'session_2*' -newer "$START_MARK" 2>/dev/null); do
        mkdir -p "$RAYLOGS/$(basename "$s")"
        for f in "$s"/logs/*; do
            [ -f "$f" ] && [ -s "$f" ] && tail -c 1000000 "$f" >"$RAYLOGS/$(basename "$s")/$(basename "$f")"
        done
    done
    (cd "$WORK" && tar -czf "$OUT/${STAGE}_logs.tar.gz" logs ray_logs)
}


# step NAME LIMIT_S CMD...: run with a time limit (SIGTERM, then SIGKILL 30 s later), full output to $LOGS/NAME.log,
# its tail to stdout, one status line to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS left=$((BUDGET - SECONDS - 30))
    if [ $left -lt 20 ]; then
        say "--- $name: skipped (${SECONDS}s of the ${BUDGET}s budget used)"
        return 125
    fi
    [ "$limit" -gt $left ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    timeout -k 30 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$LOGS/$name.log"
    say "--- $name: rc=$rc$([ $rc = 124 ] && echo ' (time limit)') in $((SECONDS - t0)) s"
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        # A driver killed mid-start leaves its local Ray cluster and MLflow server (own session) behind. On the
        # device everything running is ours: end them. (SMOKE=1 runs on a shared machine: left alone there.)
        if [ "$SMOKE" != 1 ]; then
            "$PY" -m ray.scripts.scripts stop --force >>"$LOGS/$name.log" 2>&1
            for pid in $(pgrep -f -- "--backend-store-uri sqlite:///$WORK/mlruns/"); do kill -- "-$pid"; done
        fi
    fi
    pack_out
    return $rc
}

say "stage $STAGE, smoke=$SMOKE, $(date -u +%FT%TZ), work $WORK"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "ray", "deepspeed", "tiledbsoma", "mlflow", "numpy", "pandas", "pyarrow", "anndata",
          "scanpy", "zarr", "omegaconf", "pydantic", "sklearn", "igraph", "leidenalg"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} {getattr(mod, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m} MISSING: {type(e).__name__}: {e}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$SUMMARY"
if ! "$PY" -c 'import ray, deepspeed, tiledbsoma, mlflow, scanpy, zarr, omegaconf' >/dev/null 2>&1; then
    say "packages missing (see above): carry both .devsite parts (tests/gpu/device_site.sh); stopping"
    exit 3
fi

# --- settings ------------------------------------------------------------------------------------------------------
COMMON=(train.output_dir="$WORK/runs" tracking.local_dir="$WORK/mlruns")
SYN_CELLS=3000 # synthetic cells beside the 700 PBMC cells
ABL_LIMIT=190 # 600 steps end at ~165 s; shutdown of Ray and the MLflow server after that
EVAL_LIMIT=100
STRESS=(data.atlas=synthetic:20000 train.steps=250 train.val_every=50 train.checkpoint_every=0 tracking.experiment=stress)
STRESS_LIMIT=260 # 250 steps at ~0.5 s plus ~60 s start-up
if [ "$SMOKE" = 1 ]; then # a shared 2-core CPU machine: tiny runs, long limits
    SYN_CELLS=300 ABL_LIMIT=900 EVAL_LIMIT=600 STRESS_LIMIT=900
    CPU=(resources.use_gpu=false resources.cpus_per_worker=1 model.preset=tiny train.precision=auto)
    ABL=("${CPU[@]}" train.steps=6 train.val_every=3 train.val_batches=1 train.checkpoint_every=3 train.warmup_steps=1
        data.max_len=256 data.tokens_per_batch=2048 data.max_cells_per_batch=16 data.read_workers=1)
    STRESS=("${CPU[@]}" data.atlas=synthetic:200 data.max_len=512 data.tokens_per_batch=2048 data.max_cells_per_batch=8
        train.steps=4 train.val_every=2 train.val_batches=1 train.warmup_steps=1 train.checkpoint_every=0
        tracking.experiment=stress)
else
    ABL=()
fi
ATLAS=$WORK/atlases/demo
TRACKING_URI=sqlite:///$WORK/mlruns/mlflow.db

# --- ablation ------------------------------------------------------------------------------------------------------
if [ "$STAGE" = ablation ] || [ "$STAGE" = all ]; then
    if [ ! -d "$ATLAS" ]; then
        step atlas_demo 90 "${LAUNCH[@]}" atlas demo "$ATLAS" --synthetic-cells "$SYN_CELLS" --quiet
    fi
    step atlas_info 45 "${LAUNCH[@]}" atlas info "$ATLAS"
    for att in sigmoid softmax; do
        step "run_ablation_$att" "$ABL_LIMIT" "${LAUNCH[@]}" run "configs/repro_ablation_$att.yaml" \
            data.atlas="$ATLAS" "${COMMON[@]}" "${ABL[@]}" --no-progress --worker-logs
    done
    for att in sigmoid softmax; do
        step "eval_ablation_$att" "$EVAL_LIMIT" "${LAUNCH[@]}" eval "$WORK/runs/ablation-$att" --data "$ATLAS" \
            --label cell_type --datasets pbmc68k_reduced --out "$WORK/eval/$att"
    done
    step compare_ablation 90 "${LAUNCH[@]}" compare --experiment ablation --metric val_loss \
        --tracking-uri "$TRACKING_URI" --out "$WORK/eval/ablation_curves.png"
fi

# --- stress --------------------------------------------------------------------------------------------------------
if [ "$STAGE" = stress ] || [ "$STAGE" = all ]; then
    for att in sigmoid softmax; do
        step "run_stress_$att" "$STRESS_LIMIT" "${LAUNCH[@]}" run "configs/stress_160m_8k_noclip_$att.yaml" \
            "${STRESS[@]}" "${COMMON[@]}" tracking.run_name="stress-$att" --no-progress --worker-logs
    done
    step compare_stress 90 "${LAUNCH[@]}" compare --experiment stress --metric grad_norm \
        --tracking-uri "$TRACKING_URI" --out "$WORK/eval/stress_grad_norm.png"
fi

say "=== done in ${SECONDS}s"
pack_out
ls -la "$OUT" | tee -a "$SUMMARY"
grep -h -- '^--- ' "$SUMMARY"
