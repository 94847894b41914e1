"""The model guard (:mod:`ds_chunkflow.hf.guard`): refusals happen before training, for the right reason."""

import pytest
import torch

import ds_chunkflow
from ds_chunkflow.hf import guard
from ds_chunkflow.hf.guard import ModelRefused, check_model
from ds_chunkflow.ops import mixers
from ds_chunkflow.testing.families import REFUSED, build, exact_case
from ds_chunkflow.testing.models import build_tiny_model
from tests.helpers.reference import make_sequences


class _CumsumMixer(torch.nn.Module):
    """Wraps an MLP and adds a running mean over the sequence: a token mixer no static check knows."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return self.mlp(x) + 0.5 * x.cumsum(1) / counts


def test_probe_refuses_an_unknown_sequence_mixer():
    """A layer that mixes tokens outside attention, invisible to the static scan, is refused by the probe."""
    model = build_tiny_model("llama", dtype=torch.float32)
    model.model.layers[1].mlp = _CumsumMixer(model.model.layers[1].mlp)
    assert guard.sequence_mixers(model) == []
    with pytest.raises(ModelRefused, match="differs from its own forward"):
        check_model(model)


@pytest.mark.parametrize("family", ["lfm2", "jamba", "bamba", "qwen3_next", "granitemoehybrid", "recurrent_gemma",
                                    "lfm2_moe", "falcon_h1", "zamba", "zamba2"])
def test_probe_alone_catches_every_hybrid(family, monkeypatch):
    """With the static scan and the mixer adapters switched off, the numerical probe still refuses each hybrid
    family (float32): a mixer whose state is not carried is caught even if no static rule names it."""
    monkeypatch.setattr(guard, "sequence_mixers", lambda model: [])
    monkeypatch.setattr(mixers, "SUPPORTED", {})
    model_type, _, overrides = (REFUSED[family] if family in REFUSED else exact_case(family))[:3]
    model = build(model_type, overrides, dtype=torch.float32)
    monkeypatch.setattr(type(model), "_supports_attention_backend", True)  # their attention does use it
    # (RecurrentGemma also soft-caps its logits outside FORWARD_EXTRAS: refused for its head first)
    with pytest.raises(ModelRefused, match="differs from its own forward|differ from lm_head"):
        check_model(model)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba", "rwkv"])
def test_model_without_attention_is_refused_by_its_mixers_not_its_attention(family, monkeypatch):
    """A pure SSM or RWKV (no attention at all) passes the guard with its mixers carried; without their adapters it
    is refused because no layer received the chunk layout, not for an attention it does not have."""
    model_type, _, overrides, _ = exact_case(family)
    assert check_model(build(model_type, overrides, dtype=torch.float32)).max_error < 1e-4
    monkeypatch.setattr(guard, "sequence_mixers", lambda model: [])
    monkeypatch.setattr(mixers, "SUPPORTED", {})
    with pytest.raises(ModelRefused, match="never called"):
        check_model(build(model_type, overrides, dtype=torch.float32))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refusal_names_the_reason_not_an_internal_error(family):
    """Every refused family is refused for its own reason, by the static checks or the probe's own checks: no
    exception from inside the model (a TypeError, an AttributeError) is the message."""
    model_type, _, overrides, reason = REFUSED[family]
    with pytest.raises(ModelRefused, match=reason) as info:
        check_model(build(model_type, overrides, dtype=torch.float32))
    assert "forward failed on a chunked probe batch" not in str(info.value) and info.value.__cause__ is None


def test_static_scan_names_the_mixer(monkeypatch):
    """The refusal of a hybrid without an adapter names the offending module, the mixers that are supported,
    and what the user can do."""
    monkeypatch.delitem(mixers.SUPPORTED, "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer")
    model_type, _, overrides, _ = exact_case("mamba2")
    with pytest.raises(ModelRefused) as info:
        check_model(build(model_type, overrides, dtype=torch.float32))
    msg = str(info.value)
    assert "Mamba2ForCausalLM" in msg and "backbone.layers.0.mixer (Mamba2Mixer)" in msg
    assert "Lfm2ShortConv" in msg and "chunkflow.enabled: false" in msg


def test_unknown_subclass_of_a_supported_mixer_is_refused():
    """Adapters are registered by exact class: a subclass of a supported mixer (its forward may differ) is
    refused by the static scan, the supported ones beside it pass."""
    model_type, _, overrides, _ = exact_case("lfm2")
    model = build(model_type, overrides, dtype=torch.float32)
    assert guard.unsupported_mixers(model) == [] and check_model(model).max_error < 1e-4
    model = build(model_type, overrides, dtype=torch.float32)
    conv = model.model.layers[0].conv
    conv.__class__ = type("MyShortConv", (type(conv),), {})
    with pytest.raises(ModelRefused, match=r"model.layers.0.conv.conv \(Conv1d\)"):
        check_model(model)


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next", "granitemoehybrid", "bamba", "nemotron_h", "jamba",
                                    "lfm2_moe", "falcon_h1", "zamba", "zamba2", "mamba", "mamba2", "falcon_mamba",
                                    "recurrent_gemma", "rwkv"])
def test_supported_hybrid_passes_scan_and_probe(family):
    """Every hybrid family with adapters passes the static scan and the probe (float32) with rounding error."""
    model_type, _, overrides, _ = exact_case(family)
    report = check_model(build(model_type, overrides, dtype=torch.float32))
    assert report.max_error < report.tolerance


def test_hybrid_refused_where_mixer_state_is_not_carried():
    """allow_recurrent_mixers=False (the pipeline engine) refuses a supported hybrid, naming the mixer."""
    model_type, _, overrides, _ = exact_case("granitemoehybrid")
    model = build(model_type, overrides, dtype=torch.float32)
    with pytest.raises(ModelRefused, match="GraniteMoeHybridMambaLayer.*pipeline engine"):
        check_model(model, allow_recurrent_mixers=False)


def test_layer_that_drops_attention_kwargs_is_refused(monkeypatch):
    """A decoder layer that does not pass the model's kwargs to its attention is refused, saying exactly that."""
    model = build_tiny_model("llama", dtype=torch.float32)
    layer = model.model.layers[0]
    original = type(layer).forward

    def forward(self, hidden_states, **kwargs):
        kwargs.pop("chunkflow", None)
        return original(self, hidden_states, **kwargs)

    monkeypatch.setattr(layer, "forward", forward.__get__(layer))
    with pytest.raises(ModelRefused, match="does not pass attention kwargs through"):
        check_model(model)


def test_dynamic_rope_is_refused_before_grad():
    """A RoPE type that depends on the call's length is refused; nothing is written to .grad."""
    model = build_tiny_model("llama", dtype=torch.float32,
                             rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ModelRefused, match="dynamic"):
        ds_chunkflow.chunked_forward_backward(model, make_sequences([30, 4], 128), chunk_size=8)
    assert all(p.grad is None for p in model.parameters())


def test_guard_runs_once_and_reports_its_cost():
    """The verdict is cached on the model, with the probe's error and start-up seconds."""
    model = build_tiny_model("qwen2", dtype=torch.float32)
    report = check_model(model)
    assert report.max_error < report.tolerance and report.seconds > 0
    assert check_model(model) is report


def test_probe_leaves_training_mode_and_rng_alone():
    """The probe restores train mode and does not draw from the global RNG (dropout replay depends on it)."""
    model = build_tiny_model("qwen2", dtype=torch.float32, attention_dropout=0.1)
    model.train()
    before = torch.get_rng_state()
    check_model(model)
    assert model.training and torch.equal(before, torch.get_rng_state())
