"""ds_chunkflow._moved: the paths from before the sub-package layout still import, with a DeprecationWarning."""

import importlib
import subprocess
import sys

import pytest

from ds_chunkflow._moved import MOVED


@pytest.mark.parametrize("old", ["chunking", "scheduler", "executor", "engine", "hf_data", "pipeline.planner"])
def test_an_old_path_is_the_new_module_with_a_warning(old):
    sys.modules.pop(f"ds_chunkflow.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"ds_chunkflow.{old} moved to ds_chunkflow.{MOVED[old]}"):
        module = importlib.import_module(f"ds_chunkflow.{old}")
    assert module is importlib.import_module(f"ds_chunkflow.{MOVED[old]}")


def test_every_moved_module_exists():
    for new in MOVED.values():
        importlib.import_module(f"ds_chunkflow.{new}")


def test_the_old_export_command_still_runs():
    out = subprocess.run([sys.executable, "-m", "ds_chunkflow.export", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "ds_chunkflow.hf.export" in out.stdout
