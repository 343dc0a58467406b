#!/usr/bin/env bash
# configs/recipes/probface.yaml: ProbFace's uncertainty module on the frozen backbone of a checkpoint.
#
#   PRETRAINED=work_dirs/ms1mv2_r100_arcface/last.pt DATA_ROOT=datasets/ms1mv2 scripts/train_probface.sh \
#       [--set key=value ...] [--resume auto]
#
# The architecture, embedding size, network input size and colour order are read from PRETRAINED's
# metadata (so any checkpoint of this framework fits the recipe); DATA_ROOT, OUTPUT, NPROC as for
# scripts/train_recipe.sh. The checkpoint written holds the backbone (unchanged) and the uncertainty module:
# evaluate it with scripts/eval_risk.sh.
set -euo pipefail
here=$(dirname "$0")
pretrained=${PRETRAINED:?set PRETRAINED to the checkpoint whose backbone ProbFace freezes}
cd "$here/.."
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
settings=$("$python" -c '
import sys
from core.checkpoint import CheckpointError, load_checkpoint
try:
    meta = load_checkpoint(sys.argv[1])["meta"]
except CheckpointError as err:
    sys.exit(f"train_probface.sh: PRETRAINED {err}")
print("model.backbone=%(arch)s model.embedding_size=%(embedding_size)s" % meta,
      "model.input_size=%(input_size)s data.color=%(color)s" % meta)
' "$pretrained")
read -r -a model_sets <<< "$settings"
export BACKBONE=${BACKBONE:-${model_sets[0]#model.backbone=}}
exec scripts/train_recipe.sh probface --set "model.pretrained=$pretrained" "${model_sets[@]:1}" "$@"
