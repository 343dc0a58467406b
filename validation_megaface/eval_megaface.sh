#!/usr/bin/env bash
# Evaluate a model on MegaFace challenge 1 (FaceScrub probes vs the MegaFace distractors, noise lists
# removed): rank-1 identification and TAR@FAR 1e-1..1e-9. Prints the table and writes the JSON to $OUT
# (default work_dirs/eval/<model file name>_megaface.json in the repository); features are kept under
# work_dirs/megaface/ (or --features DIR) so a second run only scores.
#
#   bash validation_megaface/eval_megaface.sh CKPT_OR_ONNX TESTPACK_ROOT [--backbone r100] [--workers 16]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,7p' "$0" >&2
    exit 2
fi
model=$1
testpack=$2
shift 2
source "$(dirname "$0")/../scripts/eval_launcher.sh"
out=${OUT:-$root/work_dirs/eval/$(basename "${model%.*}")_megaface.json}
mkdir -p "$(dirname "$out")"
exec "$python" -m validation_megaface.evaluate --model "$model" --root "$testpack" --json "$out" "$@"
