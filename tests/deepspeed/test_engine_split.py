"""ChunkFlowEngine on 2 gloo ranks when ``plan_layout`` cuts a *short* sample into a dependent group
(sequence parallelism, a sample heavier than a rank's share; see ``plan/chunking.py``), against the
plain single-process reference of ``test_engine.py``."""

import pytest

from tests.deepspeed.test_engine import _train, assert_matches_reference

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage", [2, 3])
def test_split_short_sample_spread_over_ranks_matches_reference(tmp_path, stage):
    """chunk_size 256: the 200-token sample fits one chunk, but holds most of the batch's cost; it is
    cut into 64-token pieces spread over both ranks (one sequence-parallel group on each rank), and
    3 SGD-momentum steps still match the reference (losses to 1e-5, updates to 2e-5)."""
    chunkflow = {"chunk_size": 256, "keep_chunks": 1, "sequence_parallel": {"max_size": 2}}
    results = _train(tmp_path, stage, 3, chunkflow, long_len=200)
    assert all(r["metrics"]["sequence_parallel_groups"] == 1 for r in results), results[0]["metrics"]
    assert_matches_reference(results, long_len=200)
