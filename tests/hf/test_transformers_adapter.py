"""The transformers seam: every internal name ds_chunkflow touches exists in the installed release, and the
mixers' cache and function swaps fit what that release's mixers call."""

import pytest

from ds_chunkflow.hf import transformers_adapter
from ds_chunkflow.ops import mixers


def test_installed_transformers_has_every_touched_name():
    """Fails when a transformers release moves one of the internals listed in ds_chunkflow.hf.transformers_adapter,
    or its mixers call a cache method ds_chunkflow's mixer cache does not override."""
    assert transformers_adapter.missing_names() == []


def test_installed_release_is_one_the_adapter_was_read_from():
    """The installed transformers is a release the touch points were read from (a new one needs a new reading)."""
    assert "%d.%d" % transformers_adapter.installed_version() in {v.rsplit(".", 1)[0]
                                                                   for v in transformers_adapter.READ_FROM}


def test_a_missing_touch_point_is_reported(monkeypatch):
    """missing_names is sensitive: a swapped function gone from a model module, and a cache method the mixers
    call that the mixer cache lacks, are both named."""
    module = "transformers.models.bamba.modeling_bamba"
    monkeypatch.setitem(transformers_adapter.SWAPPED_FUNCTIONS, module, ("causal_conv1d_fn", "no_such_scan"))
    monkeypatch.setattr(transformers_adapter, "mixer_cache_calls", lambda name: {"get_conv_state", "new_method"})
    gone = "transformers.models.zamba.modeling_zamba.NoSuchHybridLayer"
    monkeypatch.setitem(transformers_adapter.SHARED_ATTENTION_LAYERS, gone, ("shared_transf", "mamba_decoder"))
    missing = transformers_adapter.missing_names()
    assert f"{module}.no_such_scan" in missing
    assert f"_StateCache.new_method (called in {module})" in missing
    assert gone in missing


@pytest.mark.parametrize("family", ["zamba", "zamba2"])
def test_shared_attention_blocks_are_found_per_hybrid_layer(family):
    """Zamba / Zamba2: one attention module per hybrid layer, each paired with that layer's index (distinct), and
    every attention module of the model is among them (none left on the shared layer_idx)."""
    import torch

    from ds_chunkflow.testing.families import build, exact_case

    model_type, _, overrides, _ = exact_case(family)
    model = build(model_type, overrides, dtype=torch.float32)
    found = transformers_adapter.shared_attention_indices(model)
    hybrid = [i for i, t in enumerate(model.config.layers_block_type) if t == "hybrid"]
    assert sorted(i for _, i in found) == hybrid
    attentions = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    assert {id(a) for a, _ in found} == {id(a) for a in attentions}


def test_mixer_cache_is_a_transformers_cache_with_every_method_the_mixers_call():
    """_StateCache is a real Cache subclass and overrides (not inherits) each method the release's mixers call."""
    from transformers.cache_utils import Cache

    assert issubclass(mixers._StateCache, Cache)
    for name in transformers_adapter.mixer_cache_methods():
        assert name in vars(mixers._StateCache), name
    assert mixers._StateCache({}).get_recurrent_states_to_keep(0) == 0


@pytest.mark.parametrize("module_name", sorted(transformers_adapter.SWAPPED_FUNCTIONS))
def test_swapped_functions_bind_by_their_own_parameter_names(module_name):
    """Each swapped function's signature names the tensors ds_chunkflow.ops.mixers slices (a kernels Func module's
    own signature is (*args, **kwargs), which would bind nothing)."""
    import importlib

    module = importlib.import_module(module_name)
    for name in transformers_adapter.SWAPPED_FUNCTIONS[module_name]:
        params = transformers_adapter.signature(getattr(module, name)).parameters
        assert set(mixers._SEGMENTED_FUNCTIONS[name]) <= set(params), (name, list(params))
