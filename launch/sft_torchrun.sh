#!/usr/bin/env bash
# torchrun --nproc_per_node ${NUM_RANKS:-2} --master_port ${MASTER_PORT:-<free port>} -m ds_chunkflow.sft --deepspeed_config ${CONFIG:-ds_configs/sft_zero3.yaml} "$@"
#
# Port: MASTER_PORT=29600 bash launch/sft_torchrun.sh ...  passes --master_port 29600 to torchrun;
# without it a free port is picked at start, so two runs started together never collide.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
exec torchrun --nproc_per_node "${NUM_RANKS:-2}" --master_port "$MASTER_PORT" -m ds_chunkflow.sft \
    --deepspeed_config "${CONFIG:-ds_configs/sft_zero3.yaml}" "$@"
