#!/usr/bin/env bash
# configs/recipes/webface42m_pfc.yaml: DATASET=ms1mv2 BACKBONE=r100 NPROC=8 scripts/train_webface42m_pfc.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" webface42m_pfc "$@"
