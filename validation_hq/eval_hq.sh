#!/usr/bin/env bash
# Evaluate a model on the .bin verification sets of a folder (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw,
# vgg2_fp, whichever are there) with the 10-fold protocol; prints the table and writes the JSON to OUT_JSON
# (default: $OUT, else work_dirs/eval/<model file name>_hq.json in the repository).
#
#   bash validation_hq/eval_hq.sh CKPT_OR_ONNX BIN_DIR [OUT_JSON] [--color bgr] [--backbone r100] [--fusion sum]
set -euo pipefail
source "$(dirname "$0")/../scripts/eval_launcher.sh"
[[ $# -ge 2 ]] || launcher_usage
model=$1
bins=$2
shift 2
launcher_output "$model" hq.json "$@"
shift "$out_given"
mkdir -p "$(dirname "$out")"
exec "$python" -m validation_hq.evaluate --model "$model" --bin-dir "$bins" --json "$out" "$@"
