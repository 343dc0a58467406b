#!/usr/bin/env bash
# configs/recipes/vit_b_wf42m_8gpu.yaml: DATASET=webface42m NPROC=8 scripts/train_vit_b_wf42m_8gpu.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" vit_b_wf42m_8gpu "$@"
