"""Every place ds_chunkflow touches a DeepSpeed name that is not public API.

Each touch point says which DeepSpeed release it was read from (0.19.8, the tested
release; ``setup.cfg`` pins the range and ``tests/deepspeed/test_deepspeed_adapter.py`` fails if
an installed DeepSpeed moves one of them). The pipeline engine's hooks into
``PipelineEngine`` are listed in :data:`PIPELINE_ENGINE_PRIVATE_NAMES` and checked the same
way.

1. ``deepspeed.initialize`` builds ``deepspeed.DeepSpeedEngine`` / ``deepspeed.PipelineEngine``
   by their module-global names (deepspeed/__init__.py, 0.19.8). :func:`engine_classes`
   swaps in ChunkFlow's engines for the duration of one call, so ``ds_chunkflow.initialize``
   is DeepSpeed's own ``initialize`` (``mpu``, ``mesh_param``, ``config_params``,
   ``distributed_port``, ``collate_fn``, ...) with another engine class.
2. On the CPU accelerator, ``deepspeed.comm.torch.TorchBackend`` compiles the shared-memory
   comm op ``deepspeed_shm_comm`` at every first init (``build_shm_op``, deepspeed/comm/torch.py,
   0.19.8): 50-90 s on a cold cache, and a process killed during the build leaves a lock
   that blocks every later build on the machine. gloo does not need it. ds_chunkflow keeps
   DeepSpeed's default (build) and warns once on the CPU accelerator;
   ``DS_CHUNKFLOW_SKIP_SHM_BUILD=1`` skips it (the test harness and the CPU launch scripts
   set it explicitly).
3. ZeRO-3 with several chunk graphs alive (forward A, forward B, backward B, backward A: K > 1,
   activation offload). Read from deepspeed/runtime/zero/stage3.py and parameter_offload.py
   (0.19.8); facts in ../shared/notes/zero3-live-graphs.md. :class:`Zero3LiveGraphs`:

   * gradients: ``partition_grads`` copies into the partition buffer while ``micro_step_id == 0``
     and adds after; ``micro_step_id`` advances only in ``optimizer.clear_backward_seen_flag()``
     (called by ``engine.forward``) after a backward's epilogue ran. Backward B then backward A
     with no forward between would both copy, the second overwriting the first. Calling
     ``clear_backward_seen_flag()`` before every backward advances it exactly once per backward
     (a no-op when no backward ran since the last call);
   * parameter release: every module forward resets ``module.ds_grads_remaining`` (a forward
     pre-hook) and counts its inputs; after forward B the counts describe B only, and during
     backward A no module reaches zero, so every parameter stays gathered. The counts are saved
     after each graph's forward and restored just before its backward, so each backward releases
     its parameters as it goes.

   ``tests/deepspeed/test_deepspeed_adapter.py`` shows on 2 ranks that plain DeepSpeed still gets F,F,B,B
   wrong (so a DeepSpeed that fixes or changes it is noticed) and that these two make it exact.
5. ZeRO-3 and mixture-of-experts blocks: ZeRO-3 records the order of module calls and checks at
   every forward that ranks agree on it (``partitioned_param_coordinator.reset_step``, a
   collective). An MoE block that calls its expert modules a data-dependent number of times
   (Granite MoE) gives ranks different traces, and they hang. DeepSpeed's own remedy,
   ``deepspeed.utils.set_z3_leaf_modules``, makes the block one ZeRO-3 unit (all its parameters
   gathered on entry): :func:`zero3_leaf_moe_blocks` applies it to every module with an
   ``experts`` or ``router`` child before ``deepspeed.initialize``.
6. Sequence parallelism's all-to-all is DeepSpeed's own differentiable one
   (``deepspeed.sequence.layer._dim_zero_all_to_all`` with ``register_all_to_all_group``, the pair
   ``UlyssesSPAttentionHF`` uses, 0.19.8): :func:`all_to_all_dim0`.
7. ZeRO-3 and frozen parameters under ``torch.utils.checkpoint`` (LoRA: a frozen base; the loss's
   head pieces and ``chunkflow.recompute_layers`` are non-reentrant checkpoints). A checkpoint's
   recompute keeps a saved tensor that does not require grad *as itself*, not as a detached alias
   (torch 2.13 ``_recomputation_hook.pack_hook``), and ZeRO-3's post-forward hook has released such a
   parameter (``data`` empty) before torch compares the recomputed tensors' shapes with the forward's:
   a spurious ``CheckpointError``. The backward itself is right: the module's pre-backward hook gathers
   the parameter again before its backward reads it, as for every frozen ZeRO-3 weight saved by a
   plain forward. :func:`checkpoint_determinism` turns torch's shape comparison off for exactly these
   modules (``determinism_check="none"``); the exactness tests (tests/hf/test_lora.py) check the result.
8. The learning rate an optimizer step applies: ``DeepSpeedEngine._take_model_step`` (0.19.8) steps the
   optimizer and then the ``scheduler``; both ChunkFlow engines override it to read ``get_lr()`` first
   (``lr`` in the step metrics).
4. ZeRO-3 parameter all-gathers are counted by wrapping ``partition_parameters._dist_allgather_fn``
   (every coalesced fetch goes through it, 0.19.8): :func:`count_param_gathers`.
9. ZeRO-3 parameter attributes (deepspeed/runtime/zero/partition_parameters.py, 0.19.8): ``ds_id`` (the
   parameter is partitioned), ``ds_tensor`` (this rank's partition), ``ds_numel`` / ``ds_shape`` (the full
   parameter's size): :func:`is_zero3_param`, :func:`held_tensor`, :func:`full_numel`, :func:`full_shape`.
10. The crash-safe save (:mod:`ds_chunkflow.deepspeed.checkpoint`) records every file DeepSpeed writes by
    wrapping ``engine.checkpoint_engine.save`` (every state file of ``DeepSpeedEngine.save_checkpoint`` goes
    through it), and asks ``checkpoint_engine.is_decoupled()`` (deepspeed/runtime/checkpoint_engine/, 0.19.8):
    :func:`recording_checkpoint_saves`, :func:`checkpoint_writes_async`.
11. ``engine.monitor`` (``MonitorMaster``, deepspeed/monitor/monitor.py, 0.19.8) writes one event list to
    every writer at one step; wandb needs another step axis, so :mod:`ds_chunkflow.deepspeed.monitor` writes
    to its ``tb_monitor`` / ``csv_monitor`` / ``comet_monitor`` / ``wandb_monitor`` one by one:
    :func:`monitor_writers`.
12. ``engine.basic_optimizer`` (deepspeed/runtime/engine.py, 0.19.8): the torch optimizer DeepSpeed wraps
    (its type says how much state Adam-like optimizers keep, for ``chunk_size: auto``): :func:`client_optimizer`.
13. The subclass bases, used by design where they are subclassed (not through this module):
    ``deepspeed.runtime.engine.DeepSpeedEngine`` (:mod:`ds_chunkflow.deepspeed.engine`; touch point 8),
    ``deepspeed.runtime.pipe.engine.PipelineEngine`` and :data:`PIPELINE_ENGINE_PRIVATE_NAMES`,
    ``deepspeed.runtime.pipe.schedule`` (its instruction classes; :mod:`ds_chunkflow.pipeline.engine`,
    :mod:`ds_chunkflow.pipeline.schedule`), ``deepspeed.runtime.pipe.module.TiedLayerSpec``
    (:mod:`ds_chunkflow.pipeline.model`), all 0.19.8.

:data:`INTERNALS` is the same list as data: each DeepSpeed name, the release it was read from, the
non-public modules and attribute names it consists of, and the ds_chunkflow modules that touch it (this
one, or a subclass file of touch point 13). ``tests/test_layering.py`` fails if another module imports one
of those modules or touches one of those attributes, or imports any DeepSpeed module outside
:data:`PUBLIC_API`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

SKIP_SHM_ENV = "DS_CHUNKFLOW_SKIP_SHM_BUILD"
READ_FROM = "0.19.8"
ADAPTER = "ds_chunkflow/deepspeed/deepspeed_adapter.py"

# Read from deepspeed/runtime/pipe/engine.py (0.19.8): what ChunkFlowPipelineEngine uses of
# PipelineEngine beyond its public methods.
PIPELINE_ENGINE_PRIVATE_NAMES = ("_INSTRUCTION_MAP", "_exec_schedule", "_exec_backward_pass", "_reserve_pipe_buffers",
                                 "pipe_buffers")
# deepspeed/__init__.py (0.19.8): the names deepspeed.initialize constructs engines by.
ENGINE_GLOBALS = ("DeepSpeedEngine", "PipelineEngine")


@dataclass(frozen=True)
class Internal:
    """One DeepSpeed name that is not public API: where it is read from and who may touch it."""

    point: int  # the touch point above
    name: str  # what it is in DeepSpeed
    read_from: str
    modules: tuple[str, ...] = ()  # non-public DeepSpeed modules it is imported from
    attributes: tuple[str, ...] = ()  # attribute names it is reached by
    touched_in: tuple[str, ...] = (ADAPTER,)  # the ds_chunkflow files that may touch it


_PIPE = ("ds_chunkflow/pipeline/engine.py", "ds_chunkflow/pipeline/schedule.py", "ds_chunkflow/pipeline/model.py")
INTERNALS: tuple[Internal, ...] = (
    Internal(1, "deepspeed.DeepSpeedEngine / deepspeed.PipelineEngine, the globals deepspeed.initialize builds by",
             READ_FROM),
    Internal(2, "deepspeed.comm.torch.build_shm_op", READ_FROM, ("deepspeed.comm.torch", "deepspeed.comm.comm"),
             ("build_shm_op",)),
    Internal(3, "DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag, module.ds_grads_remaining", READ_FROM,
             ("deepspeed.runtime.zero.stage3",), ("clear_backward_seen_flag", "ds_grads_remaining")),
    Internal(4, "deepspeed.runtime.zero.partition_parameters._dist_allgather_fn", READ_FROM,
             ("deepspeed.runtime.zero", "deepspeed.runtime.zero.partition_parameters"), ("_dist_allgather_fn",)),
    Internal(5, "deepspeed.utils.set_z3_leaf_modules", READ_FROM, (), ("set_z3_leaf_modules",)),
    Internal(6, "deepspeed.sequence.layer._dim_zero_all_to_all, register_all_to_all_group", READ_FROM,
             ("deepspeed.sequence", "deepspeed.sequence.layer"), ("_dim_zero_all_to_all", "register_all_to_all_group")),
    Internal(8, "DeepSpeedEngine._take_model_step (overridden by both ChunkFlow engines)", READ_FROM,
             (), ("_take_model_step",), (ADAPTER, "ds_chunkflow/deepspeed/engine.py")),
    Internal(9, "ZeRO-3 parameter attributes ds_id, ds_tensor, ds_numel, ds_shape", READ_FROM,
             (), ("ds_id", "ds_tensor", "ds_numel", "ds_shape")),
    Internal(10, "engine.checkpoint_engine: save (wrapped), is_decoupled", READ_FROM,
             ("deepspeed.runtime.checkpoint_engine",), ("checkpoint_engine", "is_decoupled")),
    Internal(11, "MonitorMaster.tb_monitor / csv_monitor / comet_monitor / wandb_monitor", READ_FROM,
             ("deepspeed.monitor", "deepspeed.monitor.monitor"),
             ("tb_monitor", "csv_monitor", "comet_monitor", "wandb_monitor")),
    Internal(12, "DeepSpeedEngine.basic_optimizer", READ_FROM, (), ("basic_optimizer",)),
    Internal(13, "the engine subclass's base: deepspeed.runtime.engine.DeepSpeedEngine", READ_FROM,
             ("deepspeed.runtime.engine",), (), (ADAPTER, "ds_chunkflow/deepspeed/engine.py")),
    Internal(13, "the pipeline subclass's base: deepspeed.runtime.pipe.engine.PipelineEngine, its schedule "
                 "instructions (deepspeed.runtime.pipe.schedule), TiedLayerSpec", READ_FROM,
             ("deepspeed.runtime.pipe", "deepspeed.runtime.pipe.engine", "deepspeed.runtime.pipe.schedule",
              "deepspeed.runtime.pipe.module"), PIPELINE_ENGINE_PRIVATE_NAMES, (ADAPTER,) + _PIPE),
)
# DeepSpeed modules (and, for deepspeed.utils, names) any ds_chunkflow module may import: the documented API.
PUBLIC_API = {
    "deepspeed": ("initialize", "init_distributed", "comm", "zero", "pipe", "accelerator", "utils", "__version__"),
    "deepspeed.comm": None,  # None: every name
    "deepspeed.accelerator": None,
    "deepspeed.pipe": None,
    "deepspeed.zero": None,
    "deepspeed.utils": ("safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state",
                        "safe_set_full_fp32_param", "safe_get_local_fp32_param", "safe_get_local_grad",
                        "zero_to_fp32"),
    "deepspeed.utils.zero_to_fp32": None,
}

_swap_lock = threading.Lock()


@contextlib.contextmanager
def engine_classes(engine: Callable, pipeline_engine: Callable):
    """Makes ``deepspeed.initialize`` construct ``engine`` / ``pipeline_engine`` inside the block (touch point 1).

    DeepSpeed 0.19.8 has no argument for the engine class: ``initialize`` calls the module globals
    ``DeepSpeedEngine`` / ``PipelineEngine`` by name, after config merging, optimizer flags and the
    ``zero.Init`` context shutdown that would otherwise have to be copied. So they are swapped for the
    block, under a lock (one swap at a time in a process), and put back in ``finally``.
    """
    import deepspeed

    with _swap_lock:
        saved = {name: getattr(deepspeed, name) for name in ENGINE_GLOBALS}
        deepspeed.DeepSpeedEngine, deepspeed.PipelineEngine = engine, pipeline_engine
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(deepspeed, name, value)


def initialize_with_engines(engine: Callable, pipeline_engine: Callable, expected: type, **kwargs):
    """``deepspeed.initialize(**kwargs)`` building ``engine`` / ``pipeline_engine`` (:func:`engine_classes`);
    refuses a result that is not an ``expected`` (a branch of ``initialize`` that builds another class:
    ``hybrid_engine``, a ``DualPipeVModule``), rather than training without ChunkFlow."""
    import deepspeed

    with engine_classes(engine, pipeline_engine):
        result = deepspeed.initialize(**kwargs)
    if not isinstance(result[0], expected):
        raise TypeError(f"deepspeed.initialize built a {type(result[0]).__name__}, not a ChunkFlow engine: this "
                        "DeepSpeed branch (hybrid_engine, DualPipeV) does not build its engine by the swapped names")
    return result


_warned_shm = False


def decide_shm_comm_build() -> None:
    """Before DeepSpeed's first ``init_distributed``: skip the shm op build if asked, else warn on CPU.

    ``deepspeed.comm.torch`` must be taken from ``sys.modules``: ``import deepspeed.comm.torch``
    binds the name ``torch`` inside ``deepspeed.comm`` to PyTorch, not to the module.
    """
    global _warned_shm
    import deepspeed.comm.comm  # noqa: F401  (imports deepspeed.comm.torch)

    module = sys.modules.get("deepspeed.comm.torch")
    if os.environ.get(SKIP_SHM_ENV) == "1":
        if module is not None and hasattr(module, "build_shm_op"):
            module.build_shm_op = lambda: None
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and not _warned_shm:
        _warned_shm = True
        warnings.warn(f"DeepSpeed compiles its shared-memory CPU comm op at init (about a minute the first time); "
                      f"gloo does not need it: set {SKIP_SHM_ENV}=1 to skip the build", stacklevel=3)


class Zero3LiveGraphs:
    """``graph_hooks`` for the executor under ZeRO-3 (touch point 3 above)."""

    def __init__(self, engine):
        self.optimizer = engine.optimizer
        self.modules = list(engine.module.modules())
        self._counts: dict = {}

    def after_forward(self, key) -> None:
        self._counts[key] = [getattr(m, "ds_grads_remaining", 0) for m in self.modules]

    def before_backward(self, key) -> None:
        for module, count in zip(self.modules, self._counts.pop(key)):
            module.ds_grads_remaining = count
        self.optimizer.clear_backward_seen_flag()


def checkpoint_determinism(module) -> str:
    """``determinism_check`` for a non-reentrant checkpoint around ``module`` (touch point 7): ``"none"``
    when it holds a ZeRO-3-partitioned parameter that does not require grad, else torch's ``"default"``."""
    frozen = any(hasattr(p, "ds_id") and not p.requires_grad for p in module.parameters())
    return "none" if frozen else "default"


@dataclass
class GatherCount:
    calls: int = 0
    bytes: int = 0


@contextlib.contextmanager
def count_param_gathers():
    """Counts ZeRO-3 parameter all-gathers (calls, bytes received) inside the block (touch point 4)."""
    from deepspeed.runtime.zero import partition_parameters as pp

    count, original = GatherCount(), pp._dist_allgather_fn

    def counted(input_tensor, output_tensor, group=None):
        count.calls += 1
        count.bytes += output_tensor.numel() * output_tensor.element_size()
        return original(input_tensor, output_tensor, group=group)

    pp._dist_allgather_fn = counted
    try:
        yield count
    finally:
        pp._dist_allgather_fn = original


def zero3_leaf_moe_blocks(model) -> list[str]:
    """Marks the model's MoE blocks (modules with an ``experts`` or ``router`` child) as ZeRO-3 leaves
    (touch point 5); returns their class names. Call before ``deepspeed.initialize``."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules()
                      if any(name in ("experts", "router") for name, _ in m.named_children())},
                     key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


_registered_groups: set = set()


def all_to_all_dim0(group, x):
    """Differentiable all-to-all over dim 0 (part j goes to rank j of ``group``; touch point 6)."""
    from deepspeed.sequence.layer import _dim_zero_all_to_all, register_all_to_all_group

    if id(group) not in _registered_groups:
        register_all_to_all_group(group)
        _registered_groups.add(id(group))
    return _dim_zero_all_to_all(group, x.contiguous())


def is_zero3_param(p) -> bool:
    """``p`` is partitioned by ZeRO-3 (touch point 9)."""
    return hasattr(p, "ds_id")


def held_tensor(p):
    """What of ``p`` this rank allocates: its ZeRO-3 partition, else ``p`` (touch point 9)."""
    held = getattr(p, "ds_tensor", None)
    return held if held is not None else p


def full_numel(p) -> int:
    """The full parameter's element count, also when ZeRO-3 has partitioned it (touch point 9)."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p):
    """The full parameter's shape, also when ZeRO-3 has partitioned it (touch point 9)."""
    return getattr(p, "ds_shape", None) or p.shape


def checkpoint_writes_async(engine) -> bool:
    """The engine's checkpoint writer returns before its files are written (touch point 10)."""
    return bool(engine.checkpoint_engine.is_decoupled())


@contextlib.contextmanager
def recording_checkpoint_saves(engine):
    """Records the path of every file ``engine``'s checkpoint writer saves inside the block (this rank's
    files; touch point 10): ``checkpoint_engine.save`` wrapped, put back in ``finally``."""
    checkpoint_engine = engine.checkpoint_engine
    paths: list[str] = []
    original = checkpoint_engine.save
    own = "save" in vars(checkpoint_engine)  # an instance attribute to put back, or the class's method

    def save(state_dict, path, *args, **kwargs):
        result = original(state_dict, path, *args, **kwargs)
        paths.append(os.fspath(path))
        return result

    checkpoint_engine.save = save
    try:
        yield paths
    finally:
        if own:
            checkpoint_engine.save = original
        else:
            del checkpoint_engine.save


MONITOR_WRITERS = ("tb_monitor", "csv_monitor", "comet_monitor")


def monitor_writers(monitor) -> tuple[list, object | None]:
    """``(writers on the optimizer-step axis, the wandb writer or None)`` of DeepSpeed's ``MonitorMaster``
    (touch point 11): the enabled ones, each with ``write_events(list of (name, value, step))``."""
    writers = [w for w in (getattr(monitor, name, None) for name in MONITOR_WRITERS) if w is not None]
    return writers, getattr(monitor, "wandb_monitor", None)


def client_optimizer(engine):
    """The torch optimizer DeepSpeed wraps (``engine.basic_optimizer``; touch point 12), or None."""
    return getattr(engine, "basic_optimizer", None)


def missing_names() -> list[str]:
    """The touch points above that the installed DeepSpeed does not have (empty when all are there)."""
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine

    missing = [f"deepspeed.{n}" for n in ENGINE_GLOBALS if not hasattr(deepspeed, n)]
    missing += [f"PipelineEngine.{n}" for n in PIPELINE_ENGINE_PRIVATE_NAMES
                if n != "pipe_buffers" and not hasattr(PipelineEngine, n)]
    import deepspeed.comm.comm  # noqa: F401

    if not hasattr(sys.modules.get("deepspeed.comm.torch"), "build_shm_op"):
        missing.append("deepspeed.comm.torch.build_shm_op")
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not hasattr(partition_parameters, "_dist_allgather_fn"):
        missing.append("deepspeed.runtime.zero.partition_parameters._dist_allgather_fn")
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not hasattr(DeepSpeedEngine, "_take_model_step"):
        missing.append("DeepSpeedEngine._take_model_step")
    if not hasattr(DeepSpeedZeroOptimizer_Stage3, "clear_backward_seen_flag"):
        missing.append("DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag")
    from deepspeed.sequence import layer

    missing += [f"deepspeed.sequence.layer.{n}" for n in ("_dim_zero_all_to_all", "register_all_to_all_group")
                if not hasattr(layer, n)]
    import inspect

    from deepspeed.monitor.monitor import MonitorMaster
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    missing += [f"CheckpointEngine.{n}" for n in ("save", "is_decoupled") if not hasattr(CheckpointEngine, n)]
    engine_init = inspect.getsource(DeepSpeedEngine.__init__) + inspect.getsource(DeepSpeedEngine)
    missing += [f"DeepSpeedEngine.{n}" for n in ("checkpoint_engine", "basic_optimizer")
                if f"self.{n} =" not in engine_init]
    monitor_init = inspect.getsource(MonitorMaster.__init__)
    missing += [f"MonitorMaster.{n}" for n in MONITOR_WRITERS + ("wandb_monitor",) if f"self.{n} =" not in monitor_init]
    init_source = inspect.getsource(partition_parameters)
    missing += [f"partition_parameters: param.{n}" for n in ("ds_id", "ds_tensor", "ds_numel", "ds_shape")
                if f".{n} =" not in init_source]
    return missing
