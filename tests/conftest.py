import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the test harness opts out of DeepSpeed's shm comm op build explicitly (see ds_chunkflow.deepspeed.deepspeed_adapter)
os.environ.setdefault("DS_CHUNKFLOW_SKIP_SHM_BUILD", "1")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped, with the reason shown, where there is none; with
    ``DS_CHUNKFLOW_REQUIRE_GPU=1`` (scripts/gpu_check.sh) the run stops instead of skipping them all."""
    import torch

    if torch.cuda.is_available():
        return
    if os.environ.get("DS_CHUNKFLOW_REQUIRE_GPU") == "1" and any("gpu" in item.keywords for item in items):
        raise pytest.UsageError(f"DS_CHUNKFLOW_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device "
                                f"(torch.version.cuda = {torch.version.cuda}): the gpu tier would only skip")
    skip = pytest.mark.skip(reason="needs CUDA (the gpu tier: scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield
