#!/usr/bin/env bash
# configs/recipes/adaface.yaml: DATASET=ms1mv2 BACKBONE=r100 NPROC=8 scripts/train_adaface.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" adaface "$@"
