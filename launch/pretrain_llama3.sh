#!/usr/bin/env bash
# Launch tools/pretrain.py under torchrun, single- or multi-node.
#
#   launch/pretrain_llama3.sh examples/llama3_8b_cpt.yaml [more Megatron-LM flags...]
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 launch/pretrain_llama3.sh examples/llama3_70b_cpt.yaml
#
# Environment (torchrun's rendezvous; defaults give a single node):
#   GPUS_PER_NODE  processes per node (default: number of GPUs, or 1 on a CPU machine)
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank (default 0)
#   MASTER_ADDR    rank-0 host (default localhost)
#   MASTER_PORT    rank-0 port (default 6000)
# A first argument ending in .yaml/.yml is passed as --config; flags after it override it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        GPUS_PER_NODE=1
    fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

ARGS=()
if [[ $# -gt 0 && ( "$1" == *.yaml || "$1" == *.yml ) ]]; then
    ARGS+=(--config "$1")
    shift
fi

# Megatron-core's tensor-parallel communication overlap relies on in-order kernel launch.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun \
    --nproc_per_node "$GPUS_PER_NODE" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    "$REPO/tools/pretrain.py" "${ARGS[@]}" "$@"
