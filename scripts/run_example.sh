#!/usr/bin/env bash
# The README's main command: set up (idempotent), then the example fine-tune on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# 5% of the sample chats held out, evaluated every 10 steps and at the end; ends with outputs/sft/final
exec bash launch/sft_cpu.sh --eval_split 0.05 --eval_every 10 "$@"
