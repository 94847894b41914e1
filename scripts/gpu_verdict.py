"""The decisions of scripts/gpu_check.sh, in Python so they are tested on CPU (tests/test_gpu_verdict.py).

    python scripts/gpu_verdict.py probe                      # one JSON line: torch build, CUDA, flash-attn
    python scripts/gpu_verdict.py wheel-name 2.8.3           # flash-attn's prebuilt wheel for this torch / Python
    python scripts/gpu_verdict.py summarize OUT FLASH_STATUS PYTEST_RC BENCH_RC SECONDS

The verdict is PASS only if the gpu tier ran: at least one test passed, none failed or errored,
and nothing skipped except the flash-attn cases when flash-attn could not be installed from a
prebuilt wheel -- then the varlen path is reported UNTESTED, in the verdict line itself.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FLASH_SKIP = "flash-attn not installed"  # tests/test_gpu.py's skip reason for the varlen cases


def wheel_name(flash_version: str, torch_version: str, cuda_version: str, cxx11abi: bool, python: tuple[int, int],
               platform: str = "linux_x86_64") -> str:
    """The file name flash-attn's release assets use (its setup.py looks the same name up):
    ``flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl``."""
    torch_mm = ".".join(torch_version.split("+")[0].split(".")[:2])
    cp = f"cp{python[0]}{python[1]}"
    return (f"flash_attn-{flash_version}+cu{cuda_version.split('.')[0]}torch{torch_mm}"
            f"cxx11abi{str(cxx11abi).upper()}-{cp}-{cp}-{platform}.whl")


def probe() -> dict:
    """What this Python has: torch build and version, whether CUDA is usable, flash-attn as ds_chunkflow sees it."""
    out: dict = {}
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return {"torch": None, "error": f"{type(e).__name__}: {e}"}
    out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cxx11abi=bool(torch.compiled_with_cxx11_abi()), python=list(sys.version_info[:2]))
    if out["cuda_available"]:
        out.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   flash_sdp_compiled=torch.backends.cuda.is_flash_attention_available())
    try:
        import warnings

        from ds_chunkflow.ops import varlen

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = varlen.flash_attn_varlen_func()
        out["flash_attn_usable"] = fn is not None
        out["flash_attn_warnings"] = [str(w.message) for w in caught]
        if fn is not None:
            import flash_attn

            out["flash_attn"] = flash_attn.__version__
    except Exception as e:  # noqa: BLE001  ds_chunkflow not installed yet
        out["flash_attn_usable"] = False
        out["flash_attn_warnings"] = [f"{type(e).__name__}: {e}"]
    return out


def test_outcomes(junit: Path) -> dict[str, dict]:
    """``{test id: {"outcome": passed|failed|skipped, "message": ...}}`` from pytest's junit xml."""
    tests = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kids = {c.tag: (c.get("message") or "")[:500] for c in case if c.tag in ("failure", "error", "skipped")}
        outcome = "failed" if {"failure", "error"} & kids.keys() else "skipped" if "skipped" in kids else "passed"
        entry = {"outcome": outcome}
        if kids:
            entry["message"] = next(iter(kids.values()))
        tests[f"{case.get('classname')}::{case.get('name')}"] = entry
    return tests


def decide(tests: dict[str, dict], flash_status: str, pytest_rc: int, bench_rc: int) -> dict:
    """The verdict from the test outcomes, the flash-attn install status and the exit codes."""
    flash_ok = flash_status.startswith("installed")
    problems, untested = [], []
    for name, t in tests.items():
        if t["outcome"] == "failed":
            problems.append(f"failed: {name}")
        elif t["outcome"] == "skipped":
            if not flash_ok and FLASH_SKIP in t.get("message", ""):
                untested.append(name)
            else:
                problems.append(f"skipped instead of running: {name} ({t.get('message', '')[:120]})")
    passed = sum(t["outcome"] == "passed" for t in tests.values())
    if passed == 0:
        problems.append("no gpu test passed (none ran?)")
    if pytest_rc not in (0, 1) or (pytest_rc == 1 and not any(p.startswith("failed") for p in problems)):
        problems.append(f"pytest exited {pytest_rc} (timeout 124, usage error 4, interrupted 2)")
    if bench_rc != 0:
        problems.append(f"benchmarks/bench_gpu.py exited {bench_rc}")
    varlen = "tested" if flash_ok and not untested else f"UNTESTED ({flash_status}; {len(untested)} cases skipped)"
    return {"verdict": "FAIL" if problems else "PASS", "varlen_path": varlen, "passed": passed,
            "problems": problems, "untested": untested}


def summarize(out: Path, flash_status: str, pytest_rc: int, bench_rc: int, seconds: int) -> int:
    try:
        tests = test_outcomes(out / "pytest_gpu.xml")
    except (OSError, ET.ParseError) as e:
        tests = {}
        print(f"no junit xml: {e}")
    result = decide(tests, flash_status, pytest_rc, bench_rc)
    bench = out / "bench_gpu.json"
    summary = {**result, "seconds": seconds, "flash_attn": flash_status, "pytest_rc": pytest_rc, "bench_rc": bench_rc,
               "bench_summary": json.loads(bench.read_text())["summary"] if bench.exists() else None,
               "tests": tests}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    line = (f"gpu_check: {result['verdict']} ({result['passed']} passed, {seconds}s); "
            f"varlen path: {result['varlen_path']}")
    (out / "verdict.txt").write_text(line + "\n" + "".join(f"  {p}\n" for p in result["problems"]))
    print(line)
    for p in result["problems"]:
        print("  " + p)
    return 0 if result["verdict"] == "PASS" else 1


def main(argv: list[str]) -> int:
    if argv[0] == "probe":
        print(json.dumps(probe()))
        return 0
    if argv[0] == "wheel-name":
        import torch

        print(wheel_name(argv[1], torch.__version__, torch.version.cuda or "none", torch.compiled_with_cxx11_abi(),
                         sys.version_info[:2]))
        return 0
    if argv[0] == "summarize":
        return summarize(Path(argv[1]), argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
