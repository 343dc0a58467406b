#!/usr/bin/env bash
# Launch train.py with torchrun on this node (or one node of several).
#
#   scripts/train.sh CONFIG [--set key=value ...] [--resume auto]
#
# Environment: NPROC (processes on this node; default: the visible GPUs, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR / MASTER_PORT (the rendezvous of node 0 when NNODES > 1), PYTHON (default: .venv/bin/python
# when present, else python3). Extra arguments go to train.py unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
config=$1
shift
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
nnodes=${NNODES:-1}
if [[ $nnodes -eq 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes="$nnodes" --node_rank="${NODE_RANK:-0}" --rdzv_backend=c10d
                --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR to node 0}:${MASTER_PORT:-29500}")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec "$python" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$nproc" \
    train.py --config "$config" "$@"
