#!/usr/bin/env bash
# The paper config and the large config (configs/scale.yaml) on one GPU, in one command (issue 18):
# step times and peak memory of the paper config (bench/step.py), the large committee's full and routed
# steps with their peak memory and the largest committee whose full step fits (bench/routed.py --largest),
# and iterations per second of short training runs of both configs (the metrics' step_ms).
#
#   OUT=runs/gpu_scale bash bench/gpu_scale.sh          # at most 14 minutes (the sum of its timeouts)
set -u -o pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-runs/gpu_scale}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 120 $PY bench/step.py --experts 10 --steps 10 --device cuda --json "$OUT/step.json" 2>&1 | tee "$OUT/step.txt"
timeout 240 $PY bench/routed.py --device cuda --steps 10 --largest 2>&1 | tee "$OUT/routed.txt"
for run in "paper configs/paper.yaml train.iterations=300" \
           "scale configs/scale.yaml train.iterations=200" \
           "scale_routed configs/scale.yaml train.iterations=200 train.route_k=4 train.route_warmup=50 train.route_min_recall=0"; do
    set -- $run
    name=$1 config=$2; shift 2
    timeout 150 $PY launch/train.py --config "$config" device=cuda run.out_dir="$OUT/$name" eval.every=0 \
        checkpoint.every=0 tracking.figures_every=0 eval.final_examples=1000 run.progress=false "$@" \
        > "$OUT/$name.log" 2>&1
    $PY - "$OUT/$name" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
ms = [r["step_ms"] for r in rows if "step_ms" in r][1:]  # the first window holds compilation
print(f"{sys.argv[1]}: median {statistics.median(ms):.1f} ms per iteration ({1000 / statistics.median(ms):.1f} it/s) "
      f"over {len(ms)} logged windows")
PY
done 2>&1 | tee "$OUT/train.txt"
