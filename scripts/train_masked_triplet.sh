#!/usr/bin/env bash
# configs/recipes/masked_triplet.yaml (triplet loss, batch-hard mining, PK batches, synthetic masks):
#   DATASET=casia BACKBONE=inception_resnet_v1 NPROC=1 scripts/train_masked_triplet.sh [--set k=v] [--resume auto]
exec "$(dirname "$0")/train_recipe.sh" masked_triplet "$@"
