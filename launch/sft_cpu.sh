#!/usr/bin/env bash
# deepspeed --num_gpus ${NUM_RANKS:-2} --master_port ${MASTER_PORT:-<free port>} --module ds_chunkflow.sft --deepspeed_config ${CONFIG:-ds_configs/sft_zero3.yaml} "$@"
#
# The main example on this machine: 2 ranks on DeepSpeed's CPU accelerator (gloo).
# On a GPU node the same command uses one rank per GPU (set NUM_RANKS to the GPU count).
#
# Port: MASTER_PORT=29600 bash launch/sft_cpu.sh ...  passes --master_port 29600 to the launcher.
# Without MASTER_PORT a free port is picked at start, so two runs started together never
# cross-connect (the launcher's own default, 29500, is shared by every run on the machine).
# Give each run its own --output_dir too (default outputs/sft): the example refuses a directory
# holding another run's checkpoints unless --resume or --overwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # the launcher does not set it; 2.8x slower without on 2 cores
export WANDB_MODE=${WANDB_MODE:-offline}
# DeepSpeed compiles a shared-memory comm op on CPU at first init (about a minute); gloo does not
# need it, so the CPU example skips it. Set DS_CHUNKFLOW_SKIP_SHM_BUILD=0 to build it.
export DS_CHUNKFLOW_SKIP_SHM_BUILD=${DS_CHUNKFLOW_SKIP_SHM_BUILD:-1}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
exec deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$MASTER_PORT" --module ds_chunkflow.sft \
    --deepspeed_config "${CONFIG:-ds_configs/sft_zero3.yaml}" "$@"
