#!/usr/bin/env bash
# The GPU check of warm workers sharing one GPU: trials per hour at 1, 2, 4 and 8 trials per GPU,
# with the GPU's utilisation and memory (bench/gpu_check.py). About 6 minutes: 4 arms of a 70 s
# study each plus start-up. Needs the project's Python environment (make setup, or one with
# torch 2.14.1 built for CUDA) and nvidia-smi. Writes bench/results/gpu-check/results.{md,json}
# (or $OUT when set, as on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/operator:$PWD/trainer_image:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 STRATA_DATA_CHECK=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
exec timeout 470 "$PY" bench/gpu_check.py --out "${OUT:-bench/results/gpu-check}" "$@"
