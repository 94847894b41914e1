"""SFT data: JSONL and Hugging Face ``datasets`` sources, chat labels, mixtures, the global-batch sampler.

    jsonl        one JSON object per line -> token ids + label masks (errors name the file and line)
    hf_data      the same through ``datasets``: tokenised once per node, cached, memory-mapped
    chat_labels  assistant-only labels for any chat template, checked per sample
    mix          several datasets as one, with sampling weights, resumable
    sampler      global batches of indices, shuffled per epoch, resumable
"""

from ds_chunkflow.data.hf_data import load_sft_data
from ds_chunkflow.data.jsonl import DataError, load_jsonl
from ds_chunkflow.data.mix import load_sft_mix
from ds_chunkflow.data.sampler import GlobalBatchSampler

__all__ = ["DataError", "GlobalBatchSampler", "load_jsonl", "load_sft_data", "load_sft_mix"]
