#!/usr/bin/env bash
# Evaluate a model on IJB-B or IJB-C (insightface IJB_release layout): 1:1 TAR@FAR and 1:N rank / TPIR, with
# the N/D/F switches printed beside each result. Writes the table, JSON and ROC PNG to $OUT (default
# work_dirs/eval/<model file name>_<dataset>) and keeps the per-image features in $CACHE (default
# work_dirs/eval/cache), so a re-run with other switches does not run the model again.
#
#   bash validation_ijb/eval_ijb.sh CKPT_OR_ONNX IJB_ROOT ijbc|ijbb [--color bgr] [--backbone r100]
#        [--norm-score 0 1] [--detector-score 0 1] [--flip 1] [--batch-size 256] [--workers 8]
set -euo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
model=$1
ijb_root=$2
dataset=$3
shift 3
source "$(dirname "$0")/../scripts/eval_launcher.sh"
cd "$root"
out=${OUT:-work_dirs/eval/$(basename "${model%.*}")_${dataset}}
cache=${CACHE:-work_dirs/eval/cache}
exec "$python" -m validation_ijb.evaluate --model "$model" --ijb-root "$ijb_root" --dataset "$dataset" \
    --out "$out" --cache "$cache" "$@"
