#!/usr/bin/env bash
# One command for whoever has a GPU: install, run the gpu test tier and a short memory/speed benchmark,
# write everything as JSON under one folder. Target: under 8 minutes on one GPU (hard ceilings: flash-attn
# install 120 s, tests 240 s, benchmark 180 s).
#
#   bash scripts/gpu_check.sh                       # results in benchmarks/results/gpu/
#   OUT=/tmp/gpu PYTHON=python3 bash scripts/gpu_check.sh
#
# Environment: PYTHON (default: python3, a CUDA build of torch 2.13 already in it is kept; otherwise torch
# 2.13.0 is installed from TORCH_INDEX, default the cu128 wheels), FLASH_ATTN=0 to skip flash-attn,
# FLASH_TIMEOUT (s, default 120: flash-attn compiles from source when no wheel matches, which takes far
# longer; then the run continues without it and says so in summary.json).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
mkdir -p "$OUT"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# ---------------------------------------------------------------- install
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13') and torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "installing torch 2.13.0 from $TORCH_INDEX"
    "$PYTHON" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX" || { log "torch install failed"; exit 1; }
fi
# the project with its test extras, pinned as CI pins them (minus torch: keep the CUDA build)
grep -v '^torch==' .ci/constraints.txt > "$OUT/constraints_no_torch.txt"
log "installing ds_chunkflow[test]"
"$PYTHON" -m pip install -q -c "$OUT/constraints_no_torch.txt" -e ".[test]" || { log "project install failed"; exit 1; }
FLASH_STATUS="skipped (FLASH_ATTN=0)"
if [ "${FLASH_ATTN:-1}" != "0" ]; then
    log "installing flash-attn (ds_chunkflow[flash], at most ${FLASH_TIMEOUT:-120}s)"
    # flash-attn's setup.py (no build isolation) needs these; it fetches a prebuilt wheel when one matches
    "$PYTHON" -m pip install -q packaging psutil ninja wheel > "$OUT/flash_attn_install.log" 2>&1
    if timeout "${FLASH_TIMEOUT:-120}" "$PYTHON" -m pip install -q --no-build-isolation "flash-attn>=2.6,<2.9" \
            >> "$OUT/flash_attn_install.log" 2>&1; then
        FLASH_STATUS="installed"
    else
        FLASH_STATUS="install failed or timed out (see flash_attn_install.log): the flash-attn cases are skipped"
    fi
fi
log "flash-attn: $FLASH_STATUS"
"$PYTHON" - "$OUT/environment.json" <<'PY'
import json, subprocess, sys, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
       "flash_sdp_compiled": torch.backends.cuda.is_flash_attention_available()}
try:
    import flash_attn
    env["flash_attn"] = flash_attn.__version__
except Exception as e:  # noqa: BLE001
    env["flash_attn"] = f"not importable: {e}"
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    env["nvidia_smi"] = None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
PY

# ---------------------------------------------------------------- gpu tier
export OMP_NUM_THREADS=4 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false DS_CHUNKFLOW_SKIP_SHM_BUILD=1
log "pytest -m gpu"
timeout 240 "$PYTHON" -m pytest -m gpu -q -rs --timeout 120 tests/test_gpu.py --junitxml="$OUT/pytest_gpu.xml" \
    > "$OUT/pytest_gpu.log" 2>&1
PYTEST_RC=$?
tail -5 "$OUT/pytest_gpu.log"

# ---------------------------------------------------------------- benchmark
log "benchmarks/bench_gpu.py"
timeout 180 "$PYTHON" benchmarks/bench_gpu.py --out "$OUT" > "$OUT/bench_gpu.log" 2>&1
BENCH_RC=$?
tail -12 "$OUT/bench_gpu.log"

# ---------------------------------------------------------------- summary
"$PYTHON" - "$OUT" "$PYTEST_RC" "$BENCH_RC" "$FLASH_STATUS" "$(( $(date +%s) - START ))" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, pytest_rc, bench_rc, flash, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
tests = {}
try:
    for case in ET.parse(out / "pytest_gpu.xml").getroot().iter("testcase"):
        kids = {c.tag: (c.get("message") or "")[:500] for c in case}
        outcome = "failed" if {"failure", "error"} & kids.keys() else "skipped" if "skipped" in kids else "passed"
        entry = {"outcome": outcome}
        if kids:
            entry["message"] = next(iter(kids.values()))
        tests[f"{case.get('classname')}::{case.get('name')}"] = entry
except (OSError, ET.ParseError) as e:
    tests = {"error": f"no junit xml: {e}"}
counts = {}
for t in tests.values():
    if isinstance(t, dict):
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
bench = json.loads((out / "bench_gpu.json").read_text()) if (out / "bench_gpu.json").exists() else None
summary = {"seconds": seconds, "flash_attn": flash, "pytest_rc": pytest_rc, "test_counts": counts, "tests": tests,
           "bench_rc": bench_rc, "bench_summary": bench and bench["summary"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: summary[k] for k in ("seconds", "flash_attn", "pytest_rc", "test_counts", "bench_rc")}))
PY
log "results in $OUT (summary.json, environment.json, pytest_gpu.xml/.log, bench_gpu.json/.log)"
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
