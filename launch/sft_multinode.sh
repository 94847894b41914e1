#!/usr/bin/env bash
# deepspeed --hostfile ${HOSTFILE:-launch/hostfile} --master_port ${MASTER_PORT:-<free port>} --module ds_chunkflow.sft --deepspeed_config ${CONFIG:-ds_configs/zero2_bf16_offload.yaml} --model "$MODEL" --data "$DATA" "$@"
#
# Multi-node: list every node and its GPU count in the hostfile (see launch/hostfile.example):
#     node-1 slots=8
#     node-2 slots=8
# The launcher reaches the nodes over passwordless ssh and starts one rank per slot; the
# same example and config run unchanged. Every rank reads the same JSONL; the global batch
# is identical on all ranks and ChunkFlow splits it into chunks and balances them itself.
#
# Port: MASTER_PORT=29600 bash launch/sft_multinode.sh ...  passes --master_port 29600 to the
# launcher (it must be free on the first host of the hostfile, where rank 0 listens). Without it a
# port free on this machine is picked at start (right when you launch from the first host).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a Hugging Face checkpoint directory}"
: "${DATA:?set DATA to a JSONL file}"
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
exec deepspeed --hostfile "${HOSTFILE:-launch/hostfile}" --master_port "$MASTER_PORT" --module ds_chunkflow.sft \
    --deepspeed_config "${CONFIG:-ds_configs/zero2_bf16_offload.yaml}" --model "$MODEL" --data "$DATA" "$@"
