#!/usr/bin/env bash
# configs/recipes/arcface.yaml: DATASET=ms1mv2 BACKBONE=r100 NPROC=8 scripts/train_arcface.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" arcface "$@"
