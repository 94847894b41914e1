#!/usr/bin/env bash
# CI's second environment: the newest releases ds_chunkflow supports (.ci/constraints-newest.txt: transformers,
# accelerate, datasets, DeepSpeed, PEFT; torch 2.13.0, the newest CPU build reachable here) in .venv-newest.
# Runs the fast tier (no process groups, no GPU), which holds the family matrix and the hybrid tests
# (tests/hf/test_families.py, tests/ops/test_mixers.py, tests/hf/test_transformers_adapter.py). A failure names the
# releases it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-newest/bin/python ]; then
    python3 -m venv .venv-newest
fi
. .venv-newest/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q --upgrade -c .ci/constraints-newest.txt -e ".[test]"
VERSIONS=$(python - <<'PY'
import re, sys
from importlib.metadata import version
bad, got = [], []
for line in open(".ci/constraints-newest.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, want = re.split("==", line)
        have = version(name).split("+")[0]
        got.append(f"{name}=={have}")
        if have != want:
            bad.append(f"{name}: {have} installed, {want} wanted")
if bad:
    sys.exit("newest environment not as .ci/constraints-newest.txt says: " + "; ".join(bad))
print(" ".join(got))
PY
)
echo "newest environment: $VERSIONS"
export OMP_NUM_THREADS=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if ! python -m pytest -q --timeout 900 -m "not distributed and not gpu" "$@"; then
    echo "FAILED on the newest releases: $VERSIONS (the pinned set is .ci/constraints.txt)" >&2
    exit 1
fi
