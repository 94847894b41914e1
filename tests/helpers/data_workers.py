"""Functions run inside spawned ranks for tests/data/test_hf_data.py (must be importable by name)."""

import json
import os


def load_on_ranks(rank: int, world: int, data: str, cache_dir: str, out: str) -> None:
    """Each rank calls load_sft_data under a gloo group; records whether it tokenised and what it got."""
    import torch.distributed as dist

    from ds_chunkflow.data import hf_data
    from ds_chunkflow.data.jsonl import DataError
    from ds_chunkflow.testing.tokenizer import build_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    built = []
    original = hf_data._build
    hf_data._build = lambda *a, **k: (built.append(rank), original(*a, **k))[1]
    result = {"rank": rank}
    try:
        ds = hf_data.load_sft_data(data, build_tokenizer(), cache_dir=cache_dir)
        result.update(lengths=ds.lengths.tolist(), first=ds[0]["input_ids"].tolist())
    except DataError as e:
        result.update(error=str(e), line=e.line, reason=e.reason)
    except RuntimeError as e:
        result.update(runtime_error=str(e))
    result["built"] = bool(built)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    os.environ.pop("LOCAL_RANK", None)
