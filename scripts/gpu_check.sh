#!/usr/bin/env bash
# The GPU check, one command, a yes or no: a CUDA build of torch (installed for sure, or the check refuses to
# start), flash-attn from a prebuilt wheel only (never compiled here; without one the verdict says plainly that
# the varlen path is UNTESTED), the gpu test tier (kernels vs math, the family exactness sweep, offload through
# the side stream, the engine on one GPU with ZeRO-2 and ZeRO-3 in bf16) which fails instead of skipping, and
# the memory / speed benchmark. Target: under 10 minutes on one H100 (ceilings: torch install 240 s, project
# 120 s, flash-attn wheel 120 s, tests 330 s, benchmark 150 s; with torch already a CUDA build: about 8 min).
#
#   bash scripts/gpu_check.sh                    # results in benchmarks/results/gpu/
#   OUT=/tmp/gpu PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#
# Writes under $OUT: verdict.txt (the answer, first line), summary.json (every test's outcome, the benchmark
# summary), environment.json, torch/project/flash_attn install logs, pytest_gpu.xml/.log, bench_gpu.json/.log.
# Exit: 0 PASS, 1 FAIL, 2 refused (no CUDA build of torch, or no GPU visible).
#
# Environment: PYTHON (default python3); CU (default cu128) and TORCH_INDEX (default the PyTorch wheels for CU);
# TORCH_VERSION (default: .ci/constraints.txt's pin); WHEELHOUSE: a folder of wheels for a machine without
# network (torch, flash-attn, the project's deps; pip then uses nothing else); FLASH_ATTN_VERSION (default
# 2.8.3), FLASH_ATTN_WHEEL (a wheel path or URL to use first), FLASH_ATTN=0 (skip it: varlen UNTESTED),
# REQUIRE_FLASH_ATTN=1 (an untested varlen path is a FAIL).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
CU=${CU:-cu128}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/$CU}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^torch==//p' .ci/constraints.txt)}
FLASH_ATTN_VERSION=${FLASH_ATTN_VERSION:-2.8.3}
mkdir -p "$OUT"
rm -f "$OUT"/{verdict.txt,summary.json,environment.json,pytest_gpu.xml,pytest_gpu.log,bench_gpu.json,bench_gpu.log}
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
refuse() { log "REFUSED: $*"; echo "gpu_check: REFUSED: $*" > "$OUT/verdict.txt"; exit 2; }
probe() { "$PYTHON" scripts/gpu_verdict.py probe 2>/dev/null | tail -1; }
field() { "$PYTHON" -c "import json, sys; print(json.loads(sys.argv[1]).get(sys.argv[2]))" "$1" "$2"; }
PIP_SOURCE=(--index-url "$TORCH_INDEX")
[ -n "${WHEELHOUSE:-}" ] && PIP_SOURCE=(--no-index --find-links "$WHEELHOUSE")

# ---------------------------------------------------------------- torch: a CUDA build, or no check at all
# "torch==2.13.0" is satisfied by an installed 2.13.0+cpu (PEP 440 ignores the local tag), so pip would do
# nothing; the local tag "+cu128" is what forces the CUDA build.
STATE=$(probe)
if [ "$(field "$STATE" cuda)" = "None" ] || [ "$(field "$STATE" torch)" = "None" ] \
        || [ "$(field "$STATE" torch | cut -d+ -f1)" != "$TORCH_VERSION" ]; then
    TORCH_SPEC="torch==$TORCH_VERSION+$CU"
    log "torch: $(field "$STATE" torch) (CUDA $(field "$STATE" cuda)); installing $TORCH_SPEC"
    timeout 240 "$PYTHON" -m pip install -q "$TORCH_SPEC" "${PIP_SOURCE[@]}" \
        > "$OUT/torch_install.log" 2>&1 || log "torch install failed (see torch_install.log)"
    STATE=$(probe)
fi
[ "$(field "$STATE" cuda)" = "None" ] && refuse "torch $(field "$STATE" torch) in $PYTHON is not a CUDA build: every \
gpu test would skip (install torch==$TORCH_VERSION+$CU, or give WHEELHOUSE / TORCH_INDEX; see torch_install.log)"
[ "$(field "$STATE" cuda_available)" = "True" ] || refuse "torch $(field "$STATE" torch) sees no CUDA device"
log "torch $(field "$STATE" torch), CUDA $(field "$STATE" cuda), $(field "$STATE" device)"

# ---------------------------------------------------------------- the project and its test deps (torch kept)
if ! "$PYTHON" -c "import ds_chunkflow, deepspeed, transformers, pytest, pytest_timeout, hypothesis" 2>/dev/null; then
    log "installing ds_chunkflow[test] (constraints of CI, torch kept)"
    grep -v '^torch==' .ci/constraints.txt > "$OUT/constraints_no_torch.txt"
    SRC=(); [ -n "${WHEELHOUSE:-}" ] && SRC=(--no-index --find-links "$WHEELHOUSE")
    timeout 120 "$PYTHON" -m pip install -q "${SRC[@]}" -c "$OUT/constraints_no_torch.txt" -e ".[test]" \
        > "$OUT/project_install.log" 2>&1 || { log "project install failed (project_install.log)"; exit 1; }
fi

# ---------------------------------------------------------------- flash-attn: a prebuilt wheel or UNTESTED
FLASH_STATUS="UNTESTED: FLASH_ATTN=0"
if [ "${FLASH_ATTN:-1}" != "0" ]; then
    if [ "$(field "$(probe)" flash_attn_usable)" != "True" ]; then
        WHEEL=$("$PYTHON" scripts/gpu_verdict.py wheel-name "$FLASH_ATTN_VERSION" 2>/dev/null | tail -1)
        URL="https://github.com/Dao-AILab/flash-attention/releases/download/v$FLASH_ATTN_VERSION/$WHEEL"
        for CANDIDATE in ${FLASH_ATTN_WHEEL:-} ${WHEELHOUSE:+$WHEELHOUSE/$WHEEL} "$URL"; do
            log "flash-attn: trying $CANDIDATE"
            # a wheel file or URL: pip cannot fall back to compiling the sdist (which takes far longer than this check)
            timeout 120 "$PYTHON" -m pip install -q "$CANDIDATE" >> "$OUT/flash_attn_install.log" 2>&1 && break
        done
    fi
    STATE=$(probe)
    if [ "$(field "$STATE" flash_attn_usable)" = "True" ]; then
        FLASH_STATUS="installed $(field "$STATE" flash_attn)"
    else
        FLASH_STATUS="UNTESTED: no usable prebuilt flash-attn $FLASH_ATTN_VERSION wheel for torch $(field "$STATE" torch) \
(wanted ${WHEEL:-?}; flash_attn_install.log) $(field "$STATE" flash_attn_warnings)"
    fi
fi
log "flash-attn: $FLASH_STATUS"
echo "$STATE" | "$PYTHON" -c "import json, sys; json.dump(json.load(sys.stdin), open(sys.argv[1], 'w'), indent=2)" \
    "$OUT/environment.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia_smi.txt" 2>&1 || true

# ---------------------------------------------------------------- gpu tier: runs, or fails (never all skips)
export OMP_NUM_THREADS=4 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false DS_CHUNKFLOW_SKIP_SHM_BUILD=1
export DS_CHUNKFLOW_REQUIRE_GPU=1
log "pytest -m gpu tests/test_gpu.py"
timeout 330 "$PYTHON" -m pytest -m gpu -q -rsP --timeout 200 tests/test_gpu.py --junitxml="$OUT/pytest_gpu.xml" \
    > "$OUT/pytest_gpu.log" 2>&1
PYTEST_RC=$?
tail -5 "$OUT/pytest_gpu.log"

# ---------------------------------------------------------------- memory / speed benchmark
log "benchmarks/bench_gpu.py"
timeout 150 "$PYTHON" benchmarks/bench_gpu.py --out "$OUT" > "$OUT/bench_gpu.log" 2>&1
BENCH_RC=$?
tail -12 "$OUT/bench_gpu.log"

# ---------------------------------------------------------------- verdict
"$PYTHON" scripts/gpu_verdict.py summarize "$OUT" "$FLASH_STATUS" "$PYTEST_RC" "$BENCH_RC" "$(( $(date +%s) - START ))"
RC=$?
if [ "$RC" -eq 0 ] && [ "${REQUIRE_FLASH_ATTN:-0}" = "1" ] && [ "${FLASH_STATUS#installed}" = "$FLASH_STATUS" ]; then
    log "REQUIRE_FLASH_ATTN=1 and the varlen path is untested: FAIL"
    echo "gpu_check: FAIL (REQUIRE_FLASH_ATTN=1, varlen path untested)" >> "$OUT/verdict.txt"
    RC=1
fi
log "results in $OUT (verdict.txt, summary.json, environment.json, pytest_gpu.*, bench_gpu.*)"
exit "$RC"
