#!/usr/bin/env bash
# deepspeed --hostfile ${HOSTFILE:-launch/hostfile} examples/sft.py --deepspeed_config ${CONFIG:-ds_configs/zero2_bf16_offload.yaml} --model "$MODEL" --data "$DATA" "$@"
#
# Multi-node: list every node and its GPU count in the hostfile (see launch/hostfile.example):
#     node-1 slots=8
#     node-2 slots=8
# The launcher reaches the nodes over passwordless ssh and starts one rank per slot; the
# same example and config run unchanged. Every rank reads the same JSONL; the global batch
# is identical on all ranks and ChunkFlow splits it into chunks and balances them itself.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a Hugging Face checkpoint directory}"
: "${DATA:?set DATA to a JSONL file}"
exec deepspeed --hostfile "${HOSTFILE:-launch/hostfile}" examples/sft.py \
    --deepspeed_config "${CONFIG:-ds_configs/zero2_bf16_offload.yaml}" --model "$MODEL" --data "$DATA" "$@"
