#!/usr/bin/env bash
# One GPU session's worth of measurements (used through the device tool; works on any CUDA machine):
# bench/step.py on the GPU, then the paper suite (launch/reproduce.py) with many runs sharing the GPU.
# Usage: OUT=/some/dir SUITE_SECONDS=420 bash bench/gpu_suite.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
SUITE=${SUITE_DIR:-/tmp/suite}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout "${BENCH_SECONDS:-90}" python3 bench/step.py --experts 10 100 --steps 10 --device cuda --no-memory \
    --json "$OUT/bench_step_gpu.json" 2>&1 | tee "$OUT/bench_step_gpu.txt"
# JOBS: 14 runs at once on one H200 (no MPS) took ~380 s each, far longer than one alone: keep it small.
timeout "${SUITE_SECONDS:-420}" python3 launch/reproduce.py --out "$SUITE" --jobs "${JOBS:-4}" \
    device=cuda data.root=data threads=1 tracking.wandb.mode=disabled 2>&1 | tail -60
python3 launch/reproduce.py --out "$SUITE" --report-only > /dev/null 2>&1
(cd "$SUITE" && tar czf "$OUT/suite.tgz" --exclude='*.safetensors' --exclude='*.png' .)
(cd "$SUITE" && tar czf "$OUT/figures.tgz" $(ls -d main/seed*/figures capacity/seed*/figures 2>/dev/null))
(cd "$SUITE" && tar czf "$OUT/experts.tgz" $(ls main/seed[012]/checkpoints/*/expert_*.safetensors main/seed[012]/checkpoints/latest \
    main/seed[012]/summary.json main/seed[012]/config.yaml 2>/dev/null))
ls -la "$OUT"
