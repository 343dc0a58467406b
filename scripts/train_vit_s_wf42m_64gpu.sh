#!/usr/bin/env bash
# configs/recipes/vit_s_wf42m_64gpu.yaml: DATASET=webface42m NPROC=8 NNODES=8 NODE_RANK=0 MASTER_ADDR=host0 scripts/train_vit_s_wf42m_64gpu.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" vit_s_wf42m_64gpu "$@"
