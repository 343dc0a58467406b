#!/usr/bin/env bash
# Evaluate a model on the .bin verification sets of a folder (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw,
# vgg2_fp, whichever are there) with the 10-fold protocol; prints the table and writes the JSON to $OUT
# (default work_dirs/eval/<model file name>_hq.json).
#
#   bash validation_hq/eval_hq.sh CKPT_OR_ONNX BIN_DIR [--color bgr] [--backbone r100] [--fusion sum]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,7p' "$0" >&2
    exit 2
fi
model=$1
bins=$2
shift 2
source "$(dirname "$0")/../scripts/eval_launcher.sh"
cd "$root"
out=${OUT:-work_dirs/eval/$(basename "${model%.*}")_hq.json}
mkdir -p "$(dirname "$out")"
exec "$python" -m validation_hq.evaluate --model "$model" --bin-dir "$bins" --json "$out" "$@"
