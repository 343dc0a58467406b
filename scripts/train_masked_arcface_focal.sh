#!/usr/bin/env bash
# configs/recipes/masked_arcface_focal.yaml: DATA_ROOT=datasets/faces_webface_112x112 BACKBONE=r50 NPROC=1 scripts/train_masked_arcface_focal.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" masked_arcface_focal "$@"
