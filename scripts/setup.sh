#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (from local disk here) and the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# pinned here, not in setup.cfg: GPU users bring their own torch
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c .ci/constraints.txt -e ".[test]"
