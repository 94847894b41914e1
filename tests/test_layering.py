"""The layers of ds_chunkflow and the two seams, as rules checked on the source (AST only: no model, no
process group; nothing is imported but the adapters' tables, which import neither DeepSpeed nor transformers).

The architecture, lowest first (a layer imports from the layers below it, never above)::

    constants, config
    plan       pure planning: sequences -> chunks -> per-rank instruction lists   (standard library only)
    ops        torch kernels, K/V state, mixers, sequence-parallel attention      (torch, no DeepSpeed)
    runtime    the chunk runtime, executor, memory meter, public chunked_step     (torch + hf glue, no DeepSpeed)
    hf / deepspeed / pipeline / data   transformers glue, the DeepSpeed engines, the pipeline engine, loaders
    recipes    the training recipe

The rules (each is one test below, stated in its docstring):

1. ``plan/**`` imports only the standard library and ``ds_chunkflow.{plan,constants}``: no torch at all (the
   planning is pure Python today), so no ``torch.distributed``, ``deepspeed`` or ``transformers``, and nothing
   from ``ds_chunkflow.{ops,runtime,hf,deepspeed,pipeline,data,recipes}``.
2. ``ops/**`` imports no ``deepspeed`` (not even lazily) and nothing from
   ``ds_chunkflow.{deepspeed,pipeline,runtime,data,recipes}``; transformers only through
   ``ds_chunkflow.hf.transformers_adapter`` (rule 5). A DeepSpeed need is injected (the sequence-parallel
   all-to-all comes with its group: ``SequenceParallelGroup``).
3. ``runtime/**`` imports no ``deepspeed`` (module level or lazily) and nothing from
   ``ds_chunkflow.{deepspeed,pipeline,data,recipes}``. It does use the transformers glue it runs
   (``hf.model``'s output head, ``hf.guard`` in ``chunked_step``): hf sits beside runtime, not above it.
4. DeepSpeed: outside ``deepspeed/deepspeed_adapter.py`` a file imports DeepSpeed modules (and, from
   ``deepspeed`` / ``deepspeed.utils``, names) of :data:`~ds_chunkflow.deepspeed.deepspeed_adapter.PUBLIC_API`
   only, and reads ``deepspeed.<name>`` of it only; each non-public module or attribute listed in
   :data:`~ds_chunkflow.deepspeed.deepspeed_adapter.INTERNALS` is touched only in the files listed there (the
   adapter; the subclass files ``deepspeed/engine.py`` and ``pipeline/{engine,schedule,model}.py`` for their
   bases); and no file but those reads a private attribute (``._x``) of an object named ``engine``,
   ``optimizer``, ``basic_optimizer``, ``checkpoint_engine`` or ``monitor``.
5. transformers: outside ``hf/transformers_adapter.py`` a file imports ``transformers``' top-level names only
   (no submodule: ``transformers.models.*``, ``modeling_layers``, ``cache_utils``, ``integrations``,
   ``utils.*``), reads no submodule as ``transformers.<submodule>``; each private name of
   :data:`~ds_chunkflow.hf.transformers_adapter.PRIVATE_NAMES` is touched only in its listed files, and no file
   reads another private attribute of a ``config`` (``config._x``). ``ds_chunkflow/testing/`` (tiny models and
   tokenizers for the tests, e.g. ``transformers.convert_slow_tokenizer``) is test support and exempt.

A violation today that is not this change's to fix is in :data:`KNOWN`, with the reason; a known violation
that has gone away from a file that is still there fails too (so the list only shrinks). The checkers are also run on small sources that
break each rule (``test_the_checker_catches_*``), so a new violation of any kind is caught.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ds_chunkflow.deepspeed import deepspeed_adapter as ds_adapter
from ds_chunkflow.hf import transformers_adapter as hf_adapter

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ds_chunkflow"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# (rule, file, imported module or touched name) -> why it is still there
KNOWN: dict[tuple[str, str, str], str] = {}  # none left: plan_batch, which reads tensors, is runtime/batch_plan.py


@dataclass(frozen=True)
class Import:
    module: str  # absolute module
    names: tuple[str, ...]  # for ``from module import names``; () for ``import module``
    line: int


@dataclass(frozen=True)
class Violation:
    rule: str
    file: str
    what: str  # the imported module or touched name
    line: int
    why: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.rule, self.file, self.what

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.rule}] {self.what}: {self.why}"


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, rel: str) -> list[Import]:
    """Every import of the file, module level or inside a function; relative imports made absolute."""
    package = _module_name(rel).rsplit(".", 1)[0] if not rel.endswith("__init__.py") else _module_name(rel)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append(Import(module, tuple(a.name for a in node.names), node.lineno))
    return found


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _touched_names(tree: ast.AST):
    """``(name, line, owner)`` for every attribute read or written (``x.name``; owner: the last name of ``x``),
    every ``getattr / hasattr / setattr / delattr(x, "name")`` and every ``"name" in vars(x)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            value = node.value
            owner = value.id if isinstance(value, ast.Name) else value.attr if isinstance(value, ast.Attribute) else ""
            yield node.attr, node.lineno, owner
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            yield node.args[1].value, node.lineno, ""
        elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant)
              and isinstance(node.left.value, str) and any(isinstance(op, ast.In) for op in node.ops)):
            yield node.left.value, node.lineno, ""


# ----------------------------------------------------------------------------- the rules
LAYER_RULES = {
    # rule: (files under, forbidden third-party roots (None: all but the standard library), forbidden packages)
    "plan": ("ds_chunkflow/plan/", None, ("ds_chunkflow.ops", "ds_chunkflow.runtime", "ds_chunkflow.hf",
                                          "ds_chunkflow.deepspeed", "ds_chunkflow.pipeline", "ds_chunkflow.data",
                                          "ds_chunkflow.recipes", "ds_chunkflow.testing", "ds_chunkflow.config")),
    "ops": ("ds_chunkflow/ops/", ("deepspeed", "transformers"),
            ("ds_chunkflow.deepspeed", "ds_chunkflow.pipeline", "ds_chunkflow.runtime", "ds_chunkflow.data",
             "ds_chunkflow.recipes")),
    "runtime": ("ds_chunkflow/runtime/", ("deepspeed",),
                ("ds_chunkflow.deepspeed", "ds_chunkflow.pipeline", "ds_chunkflow.data", "ds_chunkflow.recipes")),
}


def check_layer(rule: str, rel: str, tree: ast.AST) -> list[Violation]:
    under, third_party, packages = LAYER_RULES[rule]
    if not rel.startswith(under):
        return []
    out = []
    for imp in imports(tree, rel):
        root = imp.module.split(".")[0]
        if root == "ds_chunkflow":
            if _under(imp.module, *packages):
                out.append(Violation(rule, rel, imp.module, imp.line, f"{under} may not import {imp.module}"))
        elif third_party is None and root not in STDLIB:
            out.append(Violation(rule, rel, imp.module, imp.line, f"{under} is pure Python: standard library only"))
        elif third_party is not None and root in third_party:
            out.append(Violation(rule, rel, imp.module, imp.line, f"{under} may not import {root}"))
    return out


def _ds_public(imp: Import) -> bool:
    if imp.module not in ds_adapter.PUBLIC_API:
        return False
    allowed = ds_adapter.PUBLIC_API[imp.module]
    return allowed is None or all(n in allowed for n in imp.names)


def check_deepspeed(rel: str, tree: ast.AST) -> list[Violation]:
    if rel == ds_adapter.ADAPTER:
        return []
    internals = ds_adapter.INTERNALS
    subclass_files = {f for i in internals for f in i.touched_in if f != ds_adapter.ADAPTER}
    out = []
    for imp in imports(tree, rel):
        if imp.module.split(".")[0] != "deepspeed" or _ds_public(imp):
            continue
        names = [f"{imp.module}.{n}" for n in imp.names] or [imp.module]
        for full in names:
            owners = [i for i in internals
                      if any(_under(full, m) or imp.module == m for m in i.modules) or full.rsplit(".", 1)[-1]
                      in i.attributes and imp.module in ("deepspeed", "deepspeed.utils")]
            if not owners:
                out.append(Violation("deepspeed", rel, full, imp.line,
                                     "not DeepSpeed's public API and not listed in deepspeed_adapter.INTERNALS"))
            elif not any(rel in i.touched_in for i in owners):
                out.append(Violation("deepspeed", rel, full, imp.line,
                                     f"a DeepSpeed internal (touch point {owners[0].point}): only in "
                                     f"{', '.join(owners[0].touched_in)}"))
    public_top = ds_adapter.PUBLIC_API["deepspeed"]
    private_owners = ("engine", "optimizer", "basic_optimizer", "checkpoint_engine", "monitor")
    for name, line, owner in _touched_names(tree):
        owners = [i for i in internals if name in i.attributes]
        if owners and not any(rel in i.touched_in for i in owners):
            out.append(Violation("deepspeed", rel, name, line, f"a DeepSpeed internal (touch point {owners[0].point}):"
                                 f" only in {', '.join(owners[0].touched_in)}"))
        elif owner == "deepspeed" and name not in public_top:
            out.append(Violation("deepspeed", rel, f"deepspeed.{name}", line, "not DeepSpeed's public API"))
        elif (owner in private_owners and name.startswith("_") and not name.startswith("__")
              and rel not in subclass_files):
            out.append(Violation("deepspeed", rel, f"{owner}.{name}", line,
                                 "a private DeepSpeed attribute: through deepspeed_adapter"))
    return out


TEST_SUPPORT = "ds_chunkflow/testing/"  # tiny models and tokenizers for tests: built as transformers' own tests do


def check_transformers(rel: str, tree: ast.AST) -> list[Violation]:
    if rel == hf_adapter.TRANSFORMERS_ADAPTER or rel.startswith(TEST_SUPPORT):
        return []
    out = []
    for imp in imports(tree, rel):
        if imp.module.split(".")[0] == "transformers" and imp.module not in hf_adapter.PUBLIC_MODULES:
            out.append(Violation("transformers", rel, imp.module, imp.line,
                                 "a transformers submodule: through hf/transformers_adapter.py"))
    for name, line, owner in _touched_names(tree):
        listed = hf_adapter.PRIVATE_NAMES.get(name)
        if listed is not None and rel not in listed[2]:
            out.append(Violation("transformers", rel, name, line,
                                 f"a transformers internal (touch point {listed[0]}): only in {', '.join(listed[2])}"))
        elif owner == "transformers" and name[:1].islower() and name not in ("set_seed", "__version__"):
            out.append(Violation("transformers", rel, f"transformers.{name}", line,
                                 "a transformers submodule: through hf/transformers_adapter.py"))
        elif (listed is None and (owner == "config" or owner.endswith("_config")) and name.startswith("_")
              and not name.startswith("__")):
            out.append(Violation("transformers", rel, f"{owner}.{name}", line,
                                 "a private config attribute: list it in hf/transformers_adapter.PRIVATE_NAMES"))
    return out


def check_file(rel: str, source: str) -> list[Violation]:
    tree = ast.parse(source, filename=rel)
    found = [v for rule in LAYER_RULES for v in check_layer(rule, rel, tree)]
    return found + check_deepspeed(rel, tree) + check_transformers(rel, tree)


def _all_violations() -> list[Violation]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        out += check_file(rel, path.read_text())
    return out


VIOLATIONS = _all_violations()


def _new(rule: str) -> list[str]:
    return [str(v) for v in VIOLATIONS if v.rule == rule and v.key not in KNOWN]


# ----------------------------------------------------------------------------- the package
def test_plan_is_pure_python():
    """Rule 1: plan/** imports the standard library and ds_chunkflow.{plan,constants} only (no torch at all)."""
    assert not _new("plan"), "\n".join(_new("plan"))


def test_ops_imports_no_deepspeed_and_nothing_above_it():
    """Rule 2: ops/** imports no deepspeed, no transformers directly, nothing from deepspeed/pipeline/runtime/
    data/recipes."""
    assert not _new("ops"), "\n".join(_new("ops"))


def test_runtime_imports_no_deepspeed():
    """Rule 3: runtime/** imports no deepspeed (not even lazily), nothing from deepspeed/pipeline/data/recipes."""
    assert not _new("runtime"), "\n".join(_new("runtime"))


def test_deepspeed_internals_only_in_the_adapter_and_the_subclass_files():
    """Rule 4: a non-public DeepSpeed module, name or attribute is touched only where INTERNALS lists it."""
    assert not _new("deepspeed"), "\n".join(_new("deepspeed"))


def test_transformers_internals_only_in_the_adapter():
    """Rule 5: transformers submodules only through the adapter; its private names only where listed."""
    assert not _new("transformers"), "\n".join(_new("transformers"))


def test_known_violations_are_still_there():
    """Every KNOWN exception of a file that still exists still occurs (a fixed one is removed from the list,
    so the list only shrinks; one whose file moved away is moot)."""
    stale = [k for k in KNOWN if (ROOT / k[1]).is_file() and k not in {v.key for v in VIOLATIONS}]
    assert not stale, f"no longer violated, remove from KNOWN: {stale}"


def test_every_internal_names_its_release_and_existing_files():
    """Each INTERNALS / PRIVATE_NAMES entry says the release it was read from and names files that exist."""
    for internal in ds_adapter.INTERNALS:
        assert internal.read_from == ds_adapter.READ_FROM and internal.touched_in, internal
        assert all((ROOT / f).is_file() for f in internal.touched_in), internal
    for name, (point, read_from, files) in hf_adapter.PRIVATE_NAMES.items():
        assert read_from == hf_adapter.READ_FROM and all((ROOT / f).is_file() for f in files), name


# ----------------------------------------------------------------------------- the checker catches each kind
@pytest.mark.parametrize("rel, source, rule, what", [
    ("ds_chunkflow/plan/chunking.py", "import torch\n", "plan", "torch"),
    ("ds_chunkflow/plan/chunking.py", "def f():\n    import torch.distributed as dist\n", "plan", "torch.distributed"),
    ("ds_chunkflow/plan/schedule.py", "from ds_chunkflow.ops.state import GroupState\n", "plan",
     "ds_chunkflow.ops.state"),
    ("ds_chunkflow/plan/schedule.py", "from ..runtime import batch\n", "plan", "ds_chunkflow.runtime"),
    ("ds_chunkflow/ops/attention.py", "def f():\n    import deepspeed.comm as dist\n", "ops", "deepspeed.comm"),
    ("ds_chunkflow/ops/state.py", "from ds_chunkflow.deepspeed.deepspeed_adapter import all_to_all_dim0\n", "ops",
     "ds_chunkflow.deepspeed.deepspeed_adapter"),
    ("ds_chunkflow/ops/state.py", "from transformers import PreTrainedModel\n", "ops", "transformers"),
    ("ds_chunkflow/runtime/chunk.py", "def f():\n    import deepspeed\n", "runtime", "deepspeed"),
    ("ds_chunkflow/runtime/chunk.py", "from ds_chunkflow.data.jsonl import SFTDataset\n", "runtime",
     "ds_chunkflow.data.jsonl"),
    ("ds_chunkflow/deepspeed/monitor.py", "from deepspeed.runtime.zero import stage3\n", "deepspeed",
     "deepspeed.runtime.zero.stage3"),
    ("ds_chunkflow/deepspeed/monitor.py", "from deepspeed.runtime.foo import Bar\n", "deepspeed",
     "deepspeed.runtime.foo.Bar"),
    ("ds_chunkflow/hf/export.py", "from deepspeed.utils import set_z3_leaf_modules\n", "deepspeed",
     "deepspeed.utils.set_z3_leaf_modules"),
    ("ds_chunkflow/deepspeed/autotune.py", "x = engine.basic_optimizer\n", "deepspeed", "basic_optimizer"),
    ("ds_chunkflow/deepspeed/autotune.py", "n = getattr(p, 'ds_numel', 0)\n", "deepspeed", "ds_numel"),
    ("ds_chunkflow/deepspeed/checkpoint.py", "own = 'is_decoupled' in vars(e)\n", "deepspeed", "is_decoupled"),
    ("ds_chunkflow/deepspeed/autotune.py", "engine._configure_optimizer(None)\n", "deepspeed",
     "engine._configure_optimizer"),
    ("ds_chunkflow/deepspeed/autotune.py", "self.optimizer._some_flag = 1\n", "deepspeed", "optimizer._some_flag"),
    ("ds_chunkflow/recipes/sft.py", "import deepspeed\ndeepspeed.runtime.engine\n", "deepspeed",
     "deepspeed.runtime"),
    ("ds_chunkflow/pipeline/engine.py", "x = engine.checkpoint_engine\n", "deepspeed", "checkpoint_engine"),
    ("ds_chunkflow/hf/lora.py", "from transformers.modeling_layers import GradientCheckpointingLayer\n",
     "transformers", "transformers.modeling_layers"),
    ("ds_chunkflow/data/jsonl.py", "import transformers\ntransformers.models.llama\n", "transformers",
     "transformers.models"),
    ("ds_chunkflow/hf/guard.py", "config._attn_implementation = 'x'\n", "transformers", "_attn_implementation"),
    ("ds_chunkflow/hf/model.py", "v = model.config._experts_implementation\n", "transformers",
     "config._experts_implementation"),
])
def test_the_checker_catches_each_kind_of_violation(rel, source, rule, what):
    """A new violation of each rule, in a file where it is not allowed, is found and named."""
    found = [v for v in check_file(rel, source) if v.rule == rule]
    assert any(v.what == what for v in found), (what, [str(v) for v in check_file(rel, source)])


@pytest.mark.parametrize("rel, source", [
    ("ds_chunkflow/ops/attention.py", "import torch\nfrom ds_chunkflow.hf.transformers_adapter import x\n"),
    ("ds_chunkflow/hf/export.py", "from deepspeed.utils import safe_get_full_fp32_param\n"
                                  "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint\n"
                                  "import deepspeed\nwith deepspeed.zero.GatheredParameters([]): pass\n"),
    ("ds_chunkflow/pipeline/engine.py", "from deepspeed.runtime.pipe.engine import PipelineEngine\n"
                                        "PipelineEngine._INSTRUCTION_MAP\n"),
    ("ds_chunkflow/deepspeed/engine.py", "from deepspeed.runtime.engine import DeepSpeedEngine\n"
                                         "super()._take_model_step()\n"),
    ("ds_chunkflow/ops/attention.py", "config._attn_implementation = 'chunkflow'\n"),
    ("ds_chunkflow/data/jsonl.py", "from transformers import PreTrainedTokenizerBase\n"),
])
def test_the_checker_allows_public_api_and_listed_touches(rel, source):
    """Public DeepSpeed / transformers API and the listed touches are not violations."""
    assert not check_file(rel, source), [str(v) for v in check_file(rel, source)]
