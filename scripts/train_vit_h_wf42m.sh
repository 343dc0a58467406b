#!/usr/bin/env bash
# configs/recipes/vit_h_wf42m.yaml: DATASET=webface42m NPROC=8 scripts/train_vit_h_wf42m.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" vit_h_wf42m "$@"
