"""Tiny random configs of transformers causal-LM families, and what ChunkFlow should do with each.

``EXACT``: chunked training must match the full-sequence reference. ``REFUSED``: the guard
must refuse before training, with a message that names ``reason`` (a substring).
Shapes are tiny (hidden 64, 2-4 layers, vocab 128) so the whole matrix runs in seconds.
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (model_type, kind, overrides[, tolerance]); default tolerance float64 1e-8.
# Gemma 1-3 and Cohere compute norms / rotary in float32 even in a float64 model (``x.float()``),
# so their reference is only float32-exact: tolerance 1e-5.
FP32_INSIDE = 1e-5
EXACT = {
    "llama3_rope": ("llama", "dense", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                            "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 64})),
    "llama_yarn": ("llama", "dense", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                           "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_tied": ("qwen2", "dense, tied, biased qkv", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", "dense, qk-norm", dict(head_dim=16)),
    "mistral_window": ("mistral", "sliding window", dict(sliding_window=12)),
    "gemma": ("gemma", "dense, embedding scale", dict(head_dim=16), FP32_INSIDE),
    "gemma2_no_softcap": ("gemma2", "sliding / full hybrid", dict(head_dim=16, sliding_window=12,
                                                                  attn_logit_softcapping=None,
                                                                  final_logit_softcapping=30.0), FP32_INSIDE),
    # query_pre_attn_scalar 1 (scaling 1, not 1/16): scores up to ~0.4 at this init, and a softcap of 0.25
    # bends them (at Gemma 2's defaults, scores ~0.02 under a cap of 50, a lost softcap would be ~1e-6 noise)
    "gemma2_softcap": ("gemma2", "sliding / full, attention softcap", dict(head_dim=16, sliding_window=12,
                                                                          query_pre_attn_scalar=1,
                                                                          attn_logit_softcapping=0.25,
                                                                          final_logit_softcapping=30.0),
                       FP32_INSIDE),
    "gpt_oss": ("gpt_oss", "attention sinks, sliding / full, MoE",
                dict(head_dim=16, sliding_window=12, layer_types=["sliding_attention", "full_attention"],
                     num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager",
                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64})),
    "gemma3_text": ("gemma3_text", "sliding / full, rope per layer type", dict(head_dim=16, sliding_window=12,
                                                                              num_hidden_layers=3,
                                                                              layer_types=["sliding_attention",
                                                                                           "sliding_attention",
                                                                                           "full_attention"]),
                    FP32_INSIDE),
    "cohere": ("cohere", "parallel block, logit scale", dict(logit_scale=0.5), FP32_INSIDE),
    "smollm3_nope": ("smollm3", "NoPE layers", dict(no_rope_layer_interval=2)),
    "starcoder2": ("starcoder2", "biased attention, sliding", dict(sliding_window=12, use_bias=True)),
    "gpt_neox": ("gpt_neox", "partial rotary", dict(rotary_pct=0.5, use_parallel_residual=True)),
    "phi": ("phi", "partial rotary, biased", dict(partial_rotary_factor=0.5)),
    "glm": ("glm", "partial rotary", dict(head_dim=16)),
    "granite": ("granite", "multipliers", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                               attention_multiplier=0.2, logits_scaling=4.0)),
    "mixtral": ("mixtral", "MoE", dict(num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")),
    "qwen2_moe": ("qwen2_moe", "MoE + shared expert", dict(num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32,
                                                           shared_expert_intermediate_size=64,
                                                           experts_implementation="eager")),
    "deepseek_v3_mla": ("deepseek_v3", "MLA, qk 24 / v 16 head dims", dict(num_key_value_heads=4, q_lora_rank=32,
                                                                  kv_lora_rank=16,
                                                                  qk_rope_head_dim=8, qk_nope_head_dim=16,
                                                                  v_head_dim=16, n_routed_experts=4,
                                                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                                                  n_shared_experts=1, first_k_dense_replace=2,
                                                                  n_group=1, topk_group=1,
                                                                  experts_implementation="eager")),
    "olmo2": ("olmo2", "dense, post-norm", dict()),
    # hybrids: recurrent mixers carried by ds_chunkflow.ops.mixers (Mamba2 scans / delta nets run in float32 inside)
    "lfm2": ("lfm2", "short convolution", dict(layer_types=["conv", "full_attention"], num_heads=4)),
    "qwen3_next": ("qwen3_next", "gated delta net", dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                                                         linear_key_head_dim=16, linear_value_head_dim=16,
                                                         num_experts=2, num_experts_per_tok=2,
                                                         moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                         experts_implementation="eager",
                                                         layer_types=["linear_attention", "full_attention"]),
                   FP32_INSIDE),
    "granitemoehybrid": ("granitemoehybrid", "Mamba2 hybrid (Granite-4)",
                         dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8,
                              mamba_n_groups=1, mamba_chunk_size=4, num_local_experts=2, num_experts_per_tok=1,
                              experts_implementation="eager"), FP32_INSIDE),
    "bamba": ("bamba", "Mamba2 hybrid", dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32,
                                             mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4), FP32_INSIDE),
    "nemotron_h": ("nemotron_h", "Mamba2 hybrid (NemotronH)",
                   dict(layers_block_type=["linear_attention", "full_attention", "mlp"], num_hidden_layers=3,
                        head_dim=16, mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=8, n_groups=1,
                        chunk_size=4), FP32_INSIDE),
    # Mamba1: its scan casts B and the inputs to float32 (``.float()``) even in a float64 model
    "jamba": ("jamba", "Mamba1 hybrid", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                             expert_layer_offset=1, num_experts=2, mamba_d_state=8,
                                             mamba_dt_rank=8, use_mamba_kernels=False,
                                             experts_implementation="eager"), FP32_INSIDE),
    "lfm2_moe": ("lfm2_moe", "short convolution, MoE (LFM2-MoE)",
                 dict(layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, experts_implementation="eager")),
    "falcon_h1": ("falcon_h1", "Mamba2 beside attention in every layer (Falcon-H1)",
                  dict(head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                       mamba_n_groups=1, mamba_chunk_size=4), FP32_INSIDE),
    # Zamba / Zamba2: two hybrid layers, so the shared attention block runs twice per forward (its K/V state per
    # hybrid layer, not per module: transformers_adapter.SHARED_ATTENTION_LAYERS)
    "zamba": ("zamba", "Mamba1 per head + shared attention (Zamba)",
              dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], n_mamba_heads=2,
                   mamba_d_state=8, mamba_dt_rank=8, num_key_value_heads=4), FP32_INSIDE),
    "zamba2": ("zamba2", "Mamba2 + shared attention, RoPE (Zamba2)",
               dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], n_mamba_heads=4,
                    mamba_d_state=8, mamba_ngroups=1, chunk_size=4, num_key_value_heads=4, use_mem_rope=True,
                    use_shared_attention_adapter=True, adapter_rank=8), FP32_INSIDE),
    # RG-LRU + short conv blocks and local attention; the RG-LRU accumulates in float32 (acc_dtype) in any model
    "recurrent_gemma": ("recurrent_gemma", "RG-LRU + local attention, logit softcap",
                        dict(num_hidden_layers=3, lru_width=64, head_dim=16, attention_window_size=12,
                             block_types=["recurrent", "recurrent", "attention"]), FP32_INSIDE),
    # no attention at all: the mixers' state is the model's only state
    "mamba": ("mamba", "pure SSM, Mamba1", dict(state_size=8, time_step_rank=8), FP32_INSIDE),
    "mamba2": ("mamba2", "pure SSM, Mamba2", dict(num_heads=4, head_dim=32, state_size=8, n_groups=1, chunk_size=4),
               FP32_INSIDE),
    "falcon_mamba": ("falcon_mamba", "pure SSM, Mamba1 + B/C/dt norms", dict(state_size=8, time_step_rank=8),
                     FP32_INSIDE),
    "rwkv": ("rwkv", "RWKV: WKV recurrence + token shifts", dict(attention_hidden_size=64, context_length=512)),
}

# family -> (model_type, kind, overrides, reason substring)
REFUSED = {
    "opt": ("opt", "LM head calls the decoder directly", dict(ffn_dim=128, word_embed_proj_dim=64),
            "never runs its base model OPTModel"),
    "falcon": ("falcon", "attention outside the interface", dict(num_kv_heads=2, new_decoder_architecture=True),
               "AttentionInterface"),
    "stablelm": ("stablelm", "attention outside the interface", dict(), "AttentionInterface"),
    "mpt": ("mpt", "attention outside the interface", dict(d_model=64, n_heads=4, n_layers=2), "AttentionInterface"),
}


def _long_memory_delta_net(model) -> None:
    """Qwen3-Next's init decays the delta-net state by ~e^-10 a token, which would hide a lost state (and leave
    A_log / dt_bias gradients at float32 noise): decay rates drawn so the state lives across chunks instead."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Qwen3NextGatedDeltaNet":
                m.A_log.copy_(torch.empty(m.A_log.shape).uniform_(0.01, 0.3, generator=g).log())
                m.dt_bias.fill_(-2.0)


def _strong_sinks(model) -> None:
    """GPT-OSS initialises its attention sinks at ~N(0, 0.02): next to the keys' logits so small a sink that
    entered a softmax twice would hardly move a gradient. Drawn in [-1, 2] instead, so it carries real weight."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.empty(p.shape).uniform_(-1.0, 2.0, generator=g))


# model_type -> what build() does after the random init
PREPARE = {"qwen3_next": _long_memory_delta_net, "gpt_oss": _strong_sinks}


def build(model_type: str, overrides: dict, dtype=torch.float64, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model_type in PREPARE:
        PREPARE[model_type](model)
    return model


def exact_case(family: str):
    """(model_type, kind, overrides, float64 tolerance) of an EXACT family."""
    entry = EXACT[family]
    return (*entry[:3], entry[3] if len(entry) > 3 else 1e-8)
