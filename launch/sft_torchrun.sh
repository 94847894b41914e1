#!/usr/bin/env bash
# torchrun --nproc_per_node ${NUM_RANKS:-2} examples/sft.py --deepspeed_config ${CONFIG:-ds_configs/sft_zero3.yaml} "$@"
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
exec torchrun --nproc_per_node "${NUM_RANKS:-2}" examples/sft.py --deepspeed_config "${CONFIG:-ds_configs/sft_zero3.yaml}" "$@"
