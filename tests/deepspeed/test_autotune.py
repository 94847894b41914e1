"""``chunk_size: auto`` / ``keep_chunks: auto`` (ds_chunkflow/deepspeed/autotune.py): the pure choice, the config
fields, and a real run whose measured memory growth stays under the budget it was tuned for."""

import pytest
import torch

from ds_chunkflow.config import ConfigError, split_config
from ds_chunkflow.deepspeed import autotune as at
from ds_chunkflow.testing.spawn import run_ranks

MIB = 1 << 20


def _profile_7b_like(static_gib: float = 20.0) -> at.MemoryProfile:
    """Shapes of a Qwen2.5-7B-like model in bf16: 28 layers, 4 KV heads of 128, vocab 152K."""
    kv = 2 * 28 * 4 * 128 * 2  # K and V, bf16
    return at.MemoryProfile(static_bytes=int(static_gib * at.GIB), act_coeffs=(1e6, 28 * 40_000.0, 0.0),
                            kv_bytes_per_token=kv * 3, vocab_size=152_064, loss_piece_tokens=1024,
                            prefix_grad_bytes_per_token=2 * 28 * 128 * 4, num_layers=28)


BUDGETS_GIB = [24, 28, 32, 40, 48, 64, 80, 120, 200]
WORKLOADS = [at.Workload(1000), at.Workload(32_768), at.Workload(262_144),
             at.Workload(100_000, offload_in_same_memory=True), at.Workload(262_144, kv_on_device=False)]


def _choice_or_none(profile, work, budget_gib, **fixed):
    try:
        return at.choose(profile, work, int(budget_gib * at.GIB), **fixed)
    except at.AutotuneError:
        return None


@pytest.mark.parametrize("work", WORKLOADS, ids=lambda w: f"L{w.longest}")
@pytest.mark.parametrize("fixed", [{}, {"keep_chunks": 2}, {"chunk_size": 4096}], ids=["auto", "K2", "C4096"])
def test_bigger_budget_never_gives_smaller_chunks(work, fixed):
    """Raising the budget never lowers chunk_size, nor keep_chunks at the same chunk_size, and never turns
    a fitting budget into a refusal."""
    profile = _profile_7b_like()
    previous = None
    for budget in BUDGETS_GIB:
        choice = _choice_or_none(profile, work, budget, **fixed)
        if previous is not None:
            assert choice is not None, f"budget {budget} GiB refused after a smaller one fitted"
            assert (choice.chunk_size, choice.keep_chunks) >= (previous.chunk_size, previous.keep_chunks)
        previous = choice or previous
    assert previous is not None, "even the largest budget was refused"


@pytest.mark.parametrize("work", WORKLOADS, ids=lambda w: f"L{w.longest}")
@pytest.mark.parametrize("budget", BUDGETS_GIB)
def test_choice_fits_the_budget_and_is_the_largest_that_does(work, budget):
    """The chosen (C, K) is predicted (with the margin) under the budget; the next larger chunk size with
    K = 1, and K + 1 at the chosen C (when the sample has that many chunks), are predicted over it."""
    profile = _profile_7b_like()
    choice = _choice_or_none(profile, work, budget)
    if choice is None:
        return
    fits = lambda c, k: at.predict(profile, work, c, k).total * (1 + choice.margin) <= choice.budget_bytes  # noqa: E731
    assert choice.prediction.total * (1 + choice.margin) <= budget * at.GIB
    assert choice.prediction == at.predict(profile, work, choice.chunk_size, choice.keep_chunks)
    sizes = at.candidate_chunk_sizes(work.longest)
    assert choice.chunk_size in sizes and choice.chunk_size >= at.FLOOR
    bigger = [c for c in sizes if c > choice.chunk_size]
    if bigger:
        assert not fits(min(bigger), 1)
    if choice.keep_chunks < -(-work.longest // choice.chunk_size):
        assert not fits(choice.chunk_size, choice.keep_chunks + 1)


def test_too_small_a_budget_is_refused_naming_budget_and_need():
    """Below what the smallest choice needs: AutotuneError (a ConfigError) naming the key, the budget and
    the need of chunk_size FLOOR; the boundary is that need itself."""
    profile = _profile_7b_like(static_gib=20.0)
    with pytest.raises(at.AutotuneError, match=r"chunkflow.memory_budget_gib: 16.000 GiB per rank is too small"
                                               r".*chunk_size 256, keep_chunks 1\) needs 36\.\d{3} GiB") as e:
        at.choose(profile, at.Workload(32_768), 16 * at.GIB)
    assert isinstance(e.value, ConfigError)
    need = at.predict(profile, at.Workload(32_768), at.FLOOR, 1).total * (1 + at.MARGIN)
    assert _choice_or_none(profile, at.Workload(32_768), need / at.GIB * 0.999) is None
    assert _choice_or_none(profile, at.Workload(32_768), need / at.GIB * 1.001) is not None


def test_fixed_values_are_kept_and_k_is_bounded_by_the_chunk_count():
    """A fixed chunk_size (keep_chunks) is never changed; K never exceeds the longest sample's chunk count."""
    profile = _profile_7b_like()
    c = at.choose(profile, at.Workload(32_768), 200 * at.GIB, chunk_size=4096)
    assert c.chunk_size == 4096 and c.keep_chunks == 8
    c = at.choose(profile, at.Workload(32_768), 200 * at.GIB, keep_chunks=3)
    assert c.keep_chunks == 3
    assert at.choose(profile, at.Workload(1000), 200 * at.GIB).chunk_size == 1024  # the sample fits one chunk


def test_activation_fit_recovers_a_quadratic_and_never_bends_down():
    """Three probes on an exact quadratic give its coefficients; a negative curvature (noise) falls back to
    the line through the two largest probes, so the prediction at larger C is not below it."""
    coeffs = at.fit_activations([256, 512, 1024], [100 + 7 * t + 0.01 * t * t for t in (256, 512, 1024)])
    assert coeffs == pytest.approx((100, 7, 0.01), rel=1e-6)
    a0, a1, a2 = at.fit_activations([256, 512, 1024], [1000, 2100, 4000])
    assert a2 == 0 and a0 + a1 * 1024 == pytest.approx(4000) and a1 == pytest.approx(1900 / 512)


def test_static_terms_follow_the_zero_stage():
    """Gradients are full below ZeRO-2 and a float32 1/W partition from it; optimizer state (Adam: 8 B per
    parameter, + a float32 master for bf16) is 1/W from ZeRO-1."""
    params = [torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))]
    opt = torch.optim.AdamW(params)
    assert at.static_terms(params, 0, 4, opt, True) == {"parameters": 2000, "gradients": 2000, "optimizer": 12000}
    assert at.static_terms(params, 1, 4, opt, True) == {"parameters": 2000, "gradients": 2000, "optimizer": 3000}
    assert at.static_terms(params, 2, 4, opt, True) == {"parameters": 2000, "gradients": 1000, "optimizer": 3000}
    assert at.static_terms(params, 0, 1, torch.optim.SGD(params, lr=1.0), False)["optimizer"] == 0


def test_auto_needs_a_budget():
    """chunk_size / keep_chunks: auto without memory_budget_gib is a ConfigError naming that key."""
    for section in ({"chunk_size": "auto"}, {"keep_chunks": "auto"}):
        with pytest.raises(ConfigError, match=r"chunkflow.memory_budget_gib: required when"):
            split_config({"chunkflow": section})
    cf, _ = split_config({"chunkflow": {"chunk_size": "auto", "keep_chunks": 2, "memory_budget_gib": 4}})
    assert (cf.chunk_size, cf.keep_chunks, cf.memory_budget_gib) == ("auto", 2, 4.0)
    with pytest.warns(UserWarning, match="memory_budget_gib has no effect"):
        split_config({"chunkflow": {"memory_budget_gib": 4}})


def test_an_engine_config_is_assigned_only_in_the_engine_constructors():
    """``auto`` is resolved before the engine is returned (ChunkFlowEngine's ``chunkflow_resolve``): nothing in
    ds_chunkflow assigns ``<x>.chunkflow_config`` outside the two constructors, so a built engine's config never
    changes. (AST scan of the package.)"""
    import ast
    from pathlib import Path

    root = Path(at.__file__).parents[1]
    allowed = {("deepspeed/engine.py", "__init__")}
    found = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]:
            name = getattr(func, "name", "<module>")
            for node in ast.walk(func):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for t in targets:
                    for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        if isinstance(e, ast.Attribute) and e.attr == "chunkflow_config":
                            found.append((path.relative_to(root).as_posix(), name))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and any(
                        isinstance(a, ast.Constant) and a.value == "chunkflow_config" for a in node.args):
                    found.append((path.relative_to(root).as_posix(), name))
    outside = {f for f in found if f[1] != "<module>"} - allowed
    assert not outside, outside


def test_auto_is_resolved_by_the_engine_constructor():
    """initialize hands the data-parallel engine a resolver only when something is auto; the resolver returns
    the config it was given with both values resolved (never reading or writing an engine's config)."""
    from ds_chunkflow.deepspeed.initialize import _engine_factories

    cf, _ = split_config({"chunkflow": {"chunk_size": "auto", "keep_chunks": 2, "memory_budget_gib": 4}})
    engine, pipeline = _engine_factories(cf, None)
    assert engine.keywords["chunkflow_resolve"].keywords["cf"] is cf and "chunkflow_resolve" not in pipeline.keywords
    fixed, _ = split_config({"chunkflow": {"chunk_size": 64}})
    assert "chunkflow_resolve" not in _engine_factories(fixed, None)[0].keywords


# ----------------------------------------------------------------------------- a real run, one CPU rank
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def train_under_budget(rank, world, budget_mib, longest, recompute, out_path):
    """Builds a tiny Qwen2, resolves auto under ``budget_mib`` and trains one step on the whole dataset,
    recording the peak RSS growth over the resident size at the end of start-up (the high-water mark is
    reset there); then the same step on a fresh engine given the chosen numbers, for the parameters."""
    import ds_chunkflow
    from ds_chunkflow.data.jsonl import SFTDataset
    from ds_chunkflow.testing.models import build_tiny_model
    from tests.helpers.reference import make_sequences

    dataset = SFTDataset(make_sequences([40, 100, 300, 1000, longest], 128, seed=0))
    batch = [dataset[i] for i in range(len(dataset))]
    section = {"chunk_size": "auto", "keep_chunks": "auto", "memory_budget_gib": budget_mib / 1024,
               "recompute_layers": recompute, "data": {"global_batch_size": 5}}

    def engine_for(chunkflow):
        model = build_tiny_model("qwen2", seed=0)
        return ds_chunkflow.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                       config={"gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
                                               "chunkflow": chunkflow}, training_data=dataset)[0]

    from ds_chunkflow.deepspeed.engine import ChunkFlowEngine

    built = []
    init = ChunkFlowEngine.__init__

    def record(self, *args, **kwargs):  # the config as the constructor leaves it
        init(self, *args, **kwargs)
        built.append(self.chunkflow_config)

    ChunkFlowEngine.__init__ = record
    try:
        engine = engine_for(section)
    finally:
        ChunkFlowEngine.__init__ = init
    resolved_at_build = built == [engine.chunkflow_config] and isinstance(built[0].chunk_size, int)
    baseline = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size (Linux >= 4.0)
        f.write("5")
    engine.train_batch(batch)
    growth = _status_bytes("VmHWM") - baseline
    choice = engine.chunkflow_autotune
    fixed = engine_for({**section, "chunk_size": choice.chunk_size, "keep_chunks": choice.keep_chunks,
                        "memory_budget_gib": None})
    fixed.train_batch(batch)
    same = all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), fixed.module.parameters()))
    torch.save({"growth": growth, "chunk_size": engine.chunkflow_config.chunk_size, "choice": choice,
                "resolved_at_build": resolved_at_build,
                "params": choice.prediction.terms["parameters"], "same_as_fixed": same}, out_path)


@pytest.mark.parametrize("recompute", ["none", "all"])
def test_training_under_auto_stays_within_the_budget(tmp_path, monkeypatch, recompute):
    """A tiny Qwen2 with a 3000-token sample, auto under a 42 MiB budget: the choice splits the sample
    (chunk_size < 3000, so K/V state is in play) and the process's peak RSS growth during a training step,
    plus the parameters allocated before it, stays under the prediction (+ margin) and so under the budget; the step's parameters equal bitwise
    those of an engine given the chosen numbers (the probe leaves no trace). With ``recompute_layers: all``
    the saved activations are small, but a layer's backward recomputes its full activations: the
    ``backward`` term must cover that.

    Baseline: RSS at the end of ``ds_chunkflow.initialize`` (Python, torch, DeepSpeed and the probe's
    imports are not the run's memory; the budget covers what training adds plus the parameters). glibc's
    mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave RSS as they leave an
    accelerator's allocated memory; with the default dynamic threshold RSS also counts freed heap memory."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # read at process start: the spawned rank sees it
    budget_mib, longest = 42, 3000
    out = tmp_path / "r.pt"
    run_ranks(train_under_budget, budget_mib, longest, recompute, str(out), world=1, timeout=120)
    r = torch.load(out, weights_only=False)
    assert r["growth"] + r["params"] <= budget_mib * MIB, (r["growth"] / MIB, r["choice"].summary())
    predicted = r["choice"].prediction.total * (1 + r["choice"].margin)  # the prediction bounds what was measured
    assert r["growth"] + r["params"] <= predicted, (r["growth"] / MIB, r["choice"].summary())
    assert r["chunk_size"] < longest and r["chunk_size"] == r["choice"].chunk_size, r["choice"].summary()
    assert r["resolved_at_build"]  # the engine's config was final when its constructor returned
    assert r["same_as_fixed"]  # the start-up probe touched neither the parameters nor their gradients
    assert r["choice"].prediction.total * (1 + r["choice"].margin) <= budget_mib * MIB
