#!/usr/bin/env bash
# Evaluate a model on MegaFace challenge 1 (FaceScrub probes vs the MegaFace distractors, noise lists
# removed): rank-1 identification and TAR@FAR 1e-1..1e-9. Prints the table and writes the JSON to OUT_JSON
# (default: $OUT, else work_dirs/eval/<model file name>_megaface.json in the repository); features are kept
# under work_dirs/megaface/ (or --features DIR) so a second run only scores.
#
#   bash validation_megaface/eval_megaface.sh CKPT_OR_ONNX TESTPACK_ROOT [OUT_JSON] [--backbone r100] [--workers 16]
set -euo pipefail
source "$(dirname "$0")/../scripts/eval_launcher.sh"
[[ $# -ge 2 ]] || launcher_usage
model=$1
testpack=$2
shift 2
launcher_output "$model" megaface.json "$@"
shift "$out_given"
mkdir -p "$(dirname "$out")"
exec "$python" -m validation_megaface.evaluate --model "$model" --root "$testpack" --json "$out" "$@"
