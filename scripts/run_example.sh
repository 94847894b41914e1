#!/usr/bin/env bash
# The README's main command: set up (idempotent), then the example fine-tune on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec bash launch/sft_cpu.sh "$@"
