import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the test harness opts out of DeepSpeed's shm comm op build explicitly (see ds_chunkflow.deepspeed_adapter)
os.environ.setdefault("DS_CHUNKFLOW_SKIP_SHM_BUILD", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield
