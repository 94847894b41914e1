"""scripts/gpu_check.sh's decisions (scripts/gpu_verdict.py), on CPU: the check cannot pass by skipping."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("gpu_verdict", ROOT / "scripts" / "gpu_verdict.py")
gpu_verdict = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_verdict)


def _junit(tmp_path, cases):
    body = "".join(f'<testcase classname="tests.test_gpu" name="{name}">{inner}</testcase>' for name, inner in cases)
    path = tmp_path / "pytest_gpu.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return gpu_verdict.test_outcomes(path)


def test_a_gpu_tier_that_only_skipped_fails(tmp_path):
    """The real gpu tier on this CPU machine (pytest without DS_CHUNKFLOW_REQUIRE_GPU, junit xml) skips every test
    and exits 0: the verdict is FAIL, naming the skips; with DS_CHUNKFLOW_REQUIRE_GPU=1 pytest stops (exit 4)."""
    env = {**os.environ, "DS_CHUNKFLOW_REQUIRE_GPU": "0"}
    xml = tmp_path / "pytest_gpu.xml"
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                         "tests/test_gpu.py", f"--junitxml={xml}"], cwd=ROOT, env=env, capture_output=True).returncode
    tests = gpu_verdict.test_outcomes(xml)
    assert rc == 0 and tests and all(t["outcome"] == "skipped" for t in tests.values())
    result = gpu_verdict.decide(tests, "installed 2.8.3", rc, 0)
    assert result["verdict"] == "FAIL" and result["passed"] == 0
    assert any("skipped instead of running" in p for p in result["problems"])
    env["DS_CHUNKFLOW_REQUIRE_GPU"] = "1"
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                         "tests/test_gpu.py"], cwd=ROOT, env=env, capture_output=True).returncode
    assert rc == 4


@pytest.mark.parametrize("flash", ["installed 2.8.3", "UNTESTED: no usable prebuilt flash-attn 2.8.3 wheel"])
def test_flash_attn_skips_are_untested_not_passed(tmp_path, flash):
    """All-passed is PASS with the varlen path 'tested' only when flash-attn is installed; its cases skipped for want
    of a wheel make the varlen path UNTESTED in the verdict (still PASS); the same skips with flash-attn installed,
    or any other skip, a failure, a pytest timeout or a failed benchmark, are a FAIL."""
    skip = f'<skipped message="Skipped: {gpu_verdict.FLASH_SKIP} (or outside the supported range)"/>'
    tests = _junit(tmp_path, [("test_a", ""), ("test_varlen[flash_attn]", skip)])
    result = gpu_verdict.decide(tests, flash, 0, 0)
    if flash.startswith("installed"):
        assert result["verdict"] == "FAIL" and "skipped instead of running" in result["problems"][0]
    else:
        assert result["verdict"] == "PASS" and result["varlen_path"].startswith("UNTESTED")
        assert result["untested"] == ["tests.test_gpu::test_varlen[flash_attn]"]
    assert gpu_verdict.decide(_junit(tmp_path, [("test_a", "")]), flash, 0, 0)["verdict"] == "PASS"
    assert gpu_verdict.decide(_junit(tmp_path, [("test_a", "")]), flash, 0, 0)["varlen_path"] == (
        "tested" if flash.startswith("installed") else gpu_verdict.decide({}, flash, 0, 0)["varlen_path"])
    failing = _junit(tmp_path, [("test_a", ""), ("test_b", '<failure message="boom"/>')])
    assert gpu_verdict.decide(failing, flash, 1, 0)["verdict"] == "FAIL"
    other_skip = _junit(tmp_path, [("test_a", ""), ("test_b", '<skipped message="needs CUDA"/>')])
    assert gpu_verdict.decide(other_skip, flash, 0, 0)["verdict"] == "FAIL"
    assert gpu_verdict.decide(_junit(tmp_path, [("test_a", "")]), flash, 124, 0)["verdict"] == "FAIL"
    assert gpu_verdict.decide(_junit(tmp_path, [("test_a", "")]), flash, 0, 1)["verdict"] == "FAIL"
    assert gpu_verdict.decide({}, flash, 0, 0)["verdict"] == "FAIL"


def test_summary_files(tmp_path):
    """summarize writes summary.json and verdict.txt (first line: the answer and the varlen status), exit 0 / 1."""
    _junit(tmp_path, [("test_a", "")])
    assert gpu_verdict.summarize(tmp_path, "installed 2.8.3", 0, 0, 42) == 0
    assert (tmp_path / "verdict.txt").read_text().startswith("gpu_check: PASS (1 passed, 42s); varlen path: tested")
    assert gpu_verdict.summarize(tmp_path, "installed 2.8.3", 0, 3, 42) == 1
    assert "bench_gpu.py exited 3" in (tmp_path / "summary.json").read_text()


def test_flash_attn_wheel_name():
    """The prebuilt wheel's name as flash-attn's releases spell it (CUDA major, torch major.minor, C++ ABI, CPython)."""
    assert gpu_verdict.wheel_name("2.8.3", "2.8.0+cu128", "12.8", True, (3, 12)) == \
        "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    assert gpu_verdict.wheel_name("2.6.3", "2.13.0", "13.0", False, (3, 11)) == \
        "flash_attn-2.6.3+cu13torch2.13cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"


@pytest.mark.skipif(__import__("torch").version.cuda is not None, reason="a CUDA build of torch: the check would run")
def test_gpu_check_refuses_a_cpu_build_of_torch(tmp_path):
    """gpu_check.sh with this CPU build of torch and nothing to install from (an empty WHEELHOUSE: pip offline)
    refuses to start (exit 2), saying the build is a CPU one, instead of running a gpu tier that would only skip;
    it asked pip for the CUDA build by its local tag (==2.13.0 alone is satisfied by 2.13.0+cpu)."""
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "WHEELHOUSE": str(wheelhouse)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    verdict = (tmp_path / "out" / "verdict.txt").read_text()
    assert verdict.startswith("gpu_check: REFUSED") and "not a CUDA build" in verdict, verdict
    pin = next(line.split("==")[1] for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
               if line.startswith("torch=="))
    assert f"torch=={pin}+cu128" in (tmp_path / "out" / "torch_install.log").read_text()  # what pip was asked for
    assert not (tmp_path / "out" / "pytest_gpu.xml").exists()
