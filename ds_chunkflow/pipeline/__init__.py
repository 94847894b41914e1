"""Pipeline parallelism for ChunkFlow: the state-aware 1F1B plan, its simulator, its schedule.

``simulate`` and the plan are pure Python; the DeepSpeed schedule (``ChunkFlowTrainSchedule``,
``StateForward``, ``RecomputeForward``, ``stage_steps``) is imported on first use, so the
simulator does not pay for importing DeepSpeed.
"""

from ds_chunkflow.pipeline.simulate import (
    Op,
    Plan,
    SimResult,
    plan,
    replay,
    simulate,
    stage_orders,
)

_SCHEDULE_NAMES = ("ChunkFlowTrainSchedule", "RecomputeForward", "StateForward", "stage_steps", "default_costs")

__all__ = [
    "ChunkFlowTrainSchedule", "Op", "Plan", "RecomputeForward", "SimResult", "StateForward", "default_costs", "plan",
    "replay", "simulate", "stage_orders", "stage_steps",
]


def __getattr__(name):
    if name in _SCHEDULE_NAMES:
        from ds_chunkflow.pipeline import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
