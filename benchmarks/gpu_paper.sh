#!/usr/bin/env bash
# GPU check (issue: speed): studies/paper.toml end to end on one GPU, with per-trial times.
# Prepared for a session that has a GPU machine; prints the report's trial table and the total wall time.
#   bash benchmarks/gpu_paper.sh [DATA] [WEIGHTS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/cifar10-train-jpeg}
WEIGHTS=${2:-../shared/weights/squeezenet1_1-imagenet-features.pth}
OUT=${OUT:-/tmp}/paper-gpu
make install >/dev/null
rm -rf "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
.venv/bin/transferlab study run studies/paper.toml --dir "$OUT" --set data="$DATA" --set weights="$WEIGHTS" \
    --set device=cuda --set progress=false
echo "paper.toml end to end: $(( $(date +%s) - start )) s"
sed -n '/## All trials/,/## Reproduce/p' "$OUT/report.md"
