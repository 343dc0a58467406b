#!/usr/bin/env bash
# Evaluate a model on the .bin verification sets of a folder (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw,
# vgg2_fp, whichever are there) with the 10-fold protocol; prints the table and writes JSON beside the model.
#
#   bash validation_hq/eval_hq.sh CKPT_OR_ONNX BIN_DIR [--color bgr] [--backbone r100] [--fusion sum]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
model=$1
bins=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
exec "$python" -m validation_hq.evaluate --model "$model" --bin-dir "$bins" --json "${model%.*}_hq.json" "$@"
