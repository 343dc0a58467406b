#!/usr/bin/env bash
# Evaluate a model on IJB-B or IJB-C (insightface IJB_release layout): 1:1 TAR@FAR and 1:N rank / TPIR, with
# the N/D/F switches printed beside each result. Writes the table, JSON and ROC PNG to the folder OUT_DIR
# (default: $OUT, else work_dirs/eval/<model file name>_<dataset> in the repository) and keeps the per-image
# features in $CACHE (default work_dirs/eval/cache in the repository), so a re-run with other switches does
# not run the model again.
#
#   bash validation_ijb/eval_ijb.sh CKPT_OR_ONNX IJB_ROOT ijbc|ijbb [OUT_DIR] [--color bgr] [--backbone r100]
#        [--norm-score 0 1] [--detector-score 0 1] [--flip 1] [--batch-size 256] [--workers 8]
set -euo pipefail
source "$(dirname "$0")/../scripts/eval_launcher.sh"
[[ $# -ge 3 ]] || launcher_usage
model=$1
ijb_root=$2
dataset=$3
shift 3
launcher_output "$model" "$dataset" "$@"
shift "$out_given"
cache=${CACHE:-$root/work_dirs/eval/cache}
exec "$python" -m validation_ijb.evaluate --model "$model" --ijb-root "$ijb_root" --dataset "$dataset" \
    --out "$out" --cache "$cache" "$@"
