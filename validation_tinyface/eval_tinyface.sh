#!/usr/bin/env bash
# Evaluate a model on TinyFace closed-set identification (rank-1/5/20); prints the table and writes the
# JSON to OUT_JSON (default: $OUT, else work_dirs/eval/<model file name>_tinyface.json in the repository).
#
#   bash validation_tinyface/eval_tinyface.sh CKPT_OR_ONNX DATA_ROOT [OUT_JSON] [--color bgr] [--backbone r100]
#        [--workers 8]
#
# DATA_ROOT holds aligned_pad_0.1_pad_high/{Probe,Gallery_Match,Gallery_Distractor} (AdaFace's aligned copy).
set -euo pipefail
source "$(dirname "$0")/../scripts/eval_launcher.sh"
[[ $# -ge 2 ]] || launcher_usage
model=$1
data_root=$2
shift 2
launcher_output "$model" tinyface.json "$@"
shift "$out_given"
mkdir -p "$(dirname "$out")"
exec "$python" -m validation_tinyface.validate_tinyface --model "$model" --data_root "$data_root" \
    --json "$out" "$@"
