#!/usr/bin/env bash
# Train a recipe of configs/recipes/ on a dataset with a backbone.
#
#   scripts/train_recipe.sh RECIPE [--set key=value ...] [--resume auto]
#
# Environment: DATASET (ms1mv2 | ms1mv3 | webface4m | webface12m | webface42m; default: the recipe's),
# DATA_ROOT (the folder of train.rec/train.idx and the .bin sets; default datasets/$DATASET), BACKBONE
# (r18 | r34 | r50 | r100 | r200 | mbf; default: the recipe's), OUTPUT (default
# work_dirs/${DATASET}_${BACKBONE}_${RECIPE}), plus the launcher's NPROC, NNODES, NODE_RANK, MASTER_ADDR.
set -euo pipefail
here=$(dirname "$0")
recipe=${1:?usage: scripts/train_recipe.sh RECIPE [--set key=value ...]}
shift
config=configs/recipes/$recipe.yaml
[[ -f $here/../$config ]] || { echo "no recipe $config" >&2; exit 2; }
sets=()
if [[ -n ${DATASET:-} || -n ${DATA_ROOT:-} ]]; then
    root=${DATA_ROOT:-datasets/$DATASET}
    sets+=("data.root=$root" "data.val_root=$root")
fi
[[ -n ${BACKBONE:-} ]] && sets+=("model.backbone=$BACKBONE")
if [[ -n ${OUTPUT:-} || -n ${DATASET:-} || -n ${BACKBONE:-} ]]; then
    sets+=("output_dir=${OUTPUT:-work_dirs/${DATASET:-data}_${BACKBONE:-default}_$recipe}")
fi
exec "$here/train.sh" "$config" ${sets[@]+--set "${sets[@]}"} "$@"
