"""The ds_config ``scheduler`` section under ChunkFlow: checked before DeepSpeed builds it.

DeepSpeed builds the schedule (``deepspeed.runtime.lr_schedules``) and its engine steps it once per
optimizer step, in ``_take_model_step``; a ChunkFlow ``train_batch`` is one optimizer step over a
whole global batch, however many chunk backwards it runs, so the schedule advances once per global
batch. Its position (``last_batch_iteration``) is in DeepSpeed's checkpoint, and the optimizer's
learning rate in the optimizer state: a resumed run continues the schedule where it stopped.

What DeepSpeed 0.19.8 does not refuse, and this module does (``ConfigError`` naming the key):

* a ``type`` that is neither a DeepSpeed schedule nor a ``torch.optim.lr_scheduler`` class;
* unknown ``params`` of the warm-up schedules (DeepSpeed fails later with a ``TypeError``);
* ``WarmupDecayLR`` / ``WarmupCosineLR`` without ``total_num_steps``, or with ``total_num_steps``
  below the warm-up: DeepSpeed only logs a warning, and the schedule never reaches its end::

      warmup_num_steps 1000 (DeepSpeed's default), total_num_steps 500
      lr  0 .. rising ........ step 500: still warming up, the decay never starts

  DeepSpeed uses ``max(2, warmup_num_steps)`` warm-up steps; the check uses the same.
"""

from __future__ import annotations

from typing import Any

# DeepSpeed 0.19.8 deepspeed/runtime/lr_schedules.py: the constructor parameters of each warm-up schedule
# (tests/deepspeed/test_lr_schedule.py compares them with the installed DeepSpeed's signatures).
WARMUP_PARAMS = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"),
    "WarmupDecayLR": ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                      "last_batch_iteration"),
    "WarmupCosineLR": ("total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"),
}
OTHER_DEEPSPEED_SCHEDULES = ("OneCycle", "LRRangeTest")
DEFAULT_WARMUP_NUM_STEPS = 1000  # DeepSpeed's default in all three warm-up schedules
WARMUP_TYPES = ("log", "linear")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_scheduler(section: Any) -> None:
    """Raises :class:`~ds_chunkflow.config.ConfigError` for a ``scheduler`` section DeepSpeed would build
    wrongly or fail on late (see the module docstring); ``None`` (no section) passes."""
    from ds_chunkflow.config import ConfigError

    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"scheduler: must be a mapping with type and params, got {type(section).__name__}")
    kind = section.get("type")
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"scheduler.params: must be a mapping, got {type(params).__name__}")
    if kind not in WARMUP_PARAMS:
        import torch.optim.lr_scheduler as torch_schedules

        if kind in OTHER_DEEPSPEED_SCHEDULES or (isinstance(kind, str) and hasattr(torch_schedules, kind)):
            return
        raise ConfigError(f"scheduler.type: unknown schedule {kind!r}; DeepSpeed's are "
                          f"{', '.join([*WARMUP_PARAMS, *OTHER_DEEPSPEED_SCHEDULES])} (or a torch.optim.lr_scheduler "
                          "class name)")
    unknown = sorted(set(params) - set(WARMUP_PARAMS[kind]))
    if unknown:
        raise ConfigError(f"scheduler.params.{unknown[0]}: unknown key for {kind} (its keys: "
                          f"{', '.join(WARMUP_PARAMS[kind])})")
    warmup = params.get("warmup_num_steps", DEFAULT_WARMUP_NUM_STEPS)
    if not _positive_int(warmup):
        raise ConfigError(f"scheduler.params.warmup_num_steps: must be a positive integer, got {warmup!r}")
    if params.get("warmup_type", "log") not in WARMUP_TYPES:
        raise ConfigError(f"scheduler.params.warmup_type: one of {', '.join(WARMUP_TYPES)}, "
                          f"got {params['warmup_type']!r}")
    if "total_num_steps" not in WARMUP_PARAMS[kind]:
        return
    total = params.get("total_num_steps")
    if not _positive_int(total):
        raise ConfigError(f"scheduler.params.total_num_steps: {kind} needs a positive integer (the optimizer steps "
                          f"of the whole run: one per train_batch), got {total!r}")
    effective = max(2, warmup)  # DeepSpeed's own floor
    if total < effective:
        source = "" if "warmup_num_steps" in params else " (DeepSpeed's default)"
        raise ConfigError(f"scheduler.params.total_num_steps: {total} is less than the warm-up, warmup_num_steps "
                          f"{effective}{source}: {kind} would never reach its end; set total_num_steps >= "
                          "warmup_num_steps")


__all__ = ["check_scheduler"]
