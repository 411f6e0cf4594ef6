#!/usr/bin/env bash
# The paper config and the large config (configs/scale.yaml) on one GPU, in one command (issue 18):
# step times and peak memory of the paper config (bench/step.py), the large committee's full and routed
# steps with their peak memory and the largest committee whose full step fits (bench/routed.py --largest),
# iterations per second of short training runs of both configs (the metrics' step_ms), and the scale
# suite (configs/scale/suite.yaml) through launch/reproduce.py for a few iterations.
#
#   OUT=runs/gpu_scale bash bench/gpu_scale.sh          # at most 18.5 minutes (the sum of its timeouts)
#   OUT=/tmp/smoke DEVICE=cpu SMOKE=1 bash bench/gpu_scale.sh   # every command with tiny settings (CI)
#
# DATA_ROOT (default data) is where the MNIST cache and the classifiers are (carry it to a GPU machine).
#
# SMOKE=1 shrinks every command (a few experts, steps and iterations) so that the same script runs in
# CI on the CPU, and the first GPU session runs it unchanged. A failing command does not stop the others
# (a GPU session's minutes are few); the script exits 1 at the end if any failed.
set -u -o pipefail
failed=0
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-runs/gpu_scale}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA_ROOT:-data}
T_STEP=120 T_ROUTED=240 T_TRAIN=150
if [ "${SMOKE:-0}" = 1 ]; then
    # One thread per process, and room in the timeouts: CI runs this beside other tests on 2 cores.
    export OMP_NUM_THREADS=1; T_STEP=400 T_ROUTED=400 T_TRAIN=400
    STEP="--experts 2 --steps 1 --no-memory"
    ROUTED="--experts 4 --k 2 --steps 1 --largest --max-experts 4 --set train.compile=false train.batch_size=16"
    TRAIN="expert.num=5 train.batch_size=16 identity_init.max_steps=2 eval.final_examples=100 eval.classifier_epochs=1
        train.compile=false"
    ITERS=(3 3 3); SUITE="expert.num=5 train.batch_size=16 identity_init.max_steps=2 train.iterations=2
        eval.every=0 eval.final_examples=100 eval.classifier_epochs=1 train.compile=false train.route_warmup=1
        train.stop_when_stable=null"
else
    STEP="--experts 10 --steps 10"; ROUTED="--steps 10 --largest"; TRAIN=""; ITERS=(300 200 200)
    SUITE="train.iterations=100 eval.every=0 train.stop_when_stable=null"
fi
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
# shellcheck disable=SC2086  # the settings above are word lists
timeout $T_STEP $PY bench/step.py $STEP --device "$DEVICE" --set data.root="$DATA" --json "$OUT/step.json" 2>&1 | tee "$OUT/step.txt" || failed=1
# shellcheck disable=SC2086
timeout $T_ROUTED $PY bench/routed.py --device "$DEVICE" --data-root "$DATA" $ROUTED 2>&1 | tee "$OUT/routed.txt" || failed=1
# The runs' loop is a pipeline's subshell: it reports a failure by its exit status.
{ rc=0
for run in "paper configs/paper.yaml train.iterations=${ITERS[0]}" \
           "scale configs/scale.yaml train.iterations=${ITERS[1]}" \
           "scale_routed configs/scale.yaml train.iterations=${ITERS[2]} train.route_k=2 train.route_warmup=1 train.route_min_recall=0"; do
    set -- $run
    name=$1 config=$2; shift 2
    # shellcheck disable=SC2086
    timeout $T_TRAIN $PY launch/train.py --config "$config" device="$DEVICE" data.root="$DATA" run.out_dir="$OUT/$name" eval.every=0 \
        checkpoint.every=0 tracking.figures_every=0 eval.final_examples=1000 run.progress=false \
        train.stop_when_stable=null $TRAIN "$@" > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; rc=1; continue; }
    $PY - "$OUT/$name" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
ms = [r["step_ms"] for r in rows if "step_ms" in r]
ms = ms[1:] or ms  # the first window holds compilation
print(f"{sys.argv[1]}: median {statistics.median(ms):.1f} ms per iteration ({1000 / statistics.median(ms):.1f} it/s) "
      f"over {len(ms)} logged windows")
PY
    [ $? = 0 ] || rc=1
done
exit $rc; } 2>&1 | tee "$OUT/train.txt" || failed=1
# shellcheck disable=SC2086
timeout 300 $PY launch/reproduce.py --suite configs/scale/suite.yaml --out "$OUT/suite" --seeds 1 --jobs 2 device="$DEVICE" \
    data.root="$DATA" threads=1 tracking.wandb.mode=disabled $SUITE 2>&1 | tail -20 | tee "$OUT/suite.txt" || failed=1
exit $failed
