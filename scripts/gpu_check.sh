#!/usr/bin/env bash
# The GPU verdict in one run (under 8 minutes on one H100/H200): environment, training throughput and MFU
# of r50/r100/mbf in fp16, bf16, channels_last and compiled, the RecordIO input pipeline, Partial FC at
# 2,059,906 classes, a torchrun train.py run that checkpoints and resumes, and extraction speed with the
# projected IJB-C time. Prints one table and writes OUT_DIR/gpu_check.json (default work_dirs/gpu_check).
# Without a GPU it runs the CPU-sized version (about a minute) and says so in its first line.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--parts ...] [--budget-s 450] [--cpu]
#
# Environment: PYTHON (default: .venv/bin/python when present, else python3). Other arguments go to
# python -m scripts.gpu_check unchanged (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
out=work_dirs/gpu_check
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
exec "$python" -m scripts.gpu_check --out "$out" "$@"
