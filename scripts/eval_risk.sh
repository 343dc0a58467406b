#!/usr/bin/env bash
# ProbFace risk-controlled verification (SPEC §5.6) of a ProbFace checkpoint on .bin sets: the sigma^2
# percentiles and, for risk factors 0 / 0.1 / 0.2 / 0.3, the 10-fold cosine and MLS accuracy on the pairs
# kept; the JSON goes to $OUT (default work_dirs/eval/<model file name>_risk.json).
#
#   bash scripts/eval_risk.sh CKPT BIN [BIN ...] [--pair-uncertainty sum] [--no-flip] [--risks 0 0.05 0.1]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
model=$1
shift
bins=()
while [[ $# -gt 0 && $1 != -* ]]; do
    bins+=("$1")
    shift
done
cd "$(dirname "$0")/.."
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
out=${OUT:-work_dirs/eval/$(basename "${model%.*}")_risk.json}
mkdir -p "$(dirname "$out")"
exec "$python" -m probface.risk --model "$model" --bin "${bins[@]}" --json "$out" "$@"
