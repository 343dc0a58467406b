#!/usr/bin/env bash
# Closeness-diversity, both stages: stage 1 (ArcFace with the fallback margin, difficulty scores tracked),
# then stage 2 resuming it with the mined closeness and diversity terms.
#
#   DATA_ROOT=/data/ms1mv2_images NPROC=4 scripts/train_cd.sh [--set key=value ...]
#
# The recipes' global batch is 512 = data.batch_size 128 x 4 processes, as the method's code; on 8 GPUs keep
# it with `NPROC=8 scripts/train_cd.sh --set data.batch_size=64` (the global batch is batch_size x NPROC).
# Stage 1 writes to ${OUTPUT:-work_dirs/cd}/stage1, stage 2 to .../stage2; a rerun continues either stage.
set -euo pipefail
here=$(dirname "$0")
out=${OUTPUT:-work_dirs/cd}
sets=()
[[ -n ${DATA_ROOT:-} ]] && sets+=("data.root=$DATA_ROOT")
[[ -n ${VAL_ROOT:-} ]] && sets+=("data.val_root=$VAL_ROOT")
[[ -n ${BACKBONE:-} ]] && sets+=("model.backbone=$BACKBONE")
"$here/train.sh" configs/recipes/cd_stage1.yaml --set ${sets[@]+"${sets[@]}"} "output_dir=$out/stage1" "$@" \
    --resume auto
if [[ -f $out/stage2/last.pt ]]; then
    resume=auto
else
    resume=$out/stage1/last.pt
fi
exec "$here/train.sh" configs/recipes/cd_stage2.yaml --set ${sets[@]+"${sets[@]}"} "output_dir=$out/stage2" "$@" \
    --resume "$resume"
