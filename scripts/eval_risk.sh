#!/usr/bin/env bash
# ProbFace risk-controlled verification (docs/methods.md §5.6) of a ProbFace checkpoint on .bin sets: the
# sigma^2 percentiles and, for risk factors 0 / 0.1 / 0.2 / 0.3, the 10-fold cosine and MLS accuracy on the
# pairs kept; the JSON goes to OUT.json, the last file named when it ends in .json (default: $OUT, else
# work_dirs/eval/<model file name>_risk.json in the repository).
#
#   bash scripts/eval_risk.sh CKPT BIN [BIN ...] [OUT.json] [--pair-uncertainty sum] [--flip] [--risks 0 0.05 0.1]
set -euo pipefail
source "$(dirname "$0")/eval_launcher.sh"
[[ $# -ge 2 ]] || launcher_usage
model=$1
shift
files=()
while [[ $# -gt 0 && $1 != -* ]]; do
    files+=("$1")
    shift
done
output=()
if [[ ${#files[@]} -gt 1 && ${files[-1]} == *.json ]]; then
    output=("${files[-1]}")
    unset 'files[-1]'
fi
[[ ${#files[@]} -ge 1 && ${files[-1]} != *.json ]] || launcher_usage
launcher_output "$model" risk.json ${output[@]+"${output[@]}"}
mkdir -p "$(dirname "$out")"
exec "$python" -m probface.risk --model "$model" --bin "${files[@]}" --json "$out" "$@"
