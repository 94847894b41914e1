"""Pipeline parallelism for ChunkFlow: the state-aware 1F1B plan, its simulator, its schedule.

The plan (:mod:`ds_chunkflow.plan.planner`, the one planner) and its simulator
(:mod:`ds_chunkflow.plan.simulate`) are pure Python;
the DeepSpeed schedule (``ChunkFlowTrainSchedule``, ``StateForwardPass``,
``RecomputeForwardPass``, ``stage_steps``) is imported on first use, so the simulator does not
pay for importing DeepSpeed.
"""

from ds_chunkflow.plan.planner import Op, StagePlan, plan_stages, replay, stage_orders
from ds_chunkflow.plan.simulate import SimResult, simulate

_SCHEDULE_NAMES = ("ChunkFlowTrainSchedule", "RecomputeForwardPass", "StateForwardPass", "stage_steps",
                   "default_costs")

__all__ = [
    "ChunkFlowTrainSchedule", "Op", "RecomputeForwardPass", "SimResult", "StagePlan", "StateForwardPass",
    "default_costs", "plan_stages", "replay", "simulate", "stage_orders", "stage_steps",
]


def __getattr__(name):
    if name in _SCHEDULE_NAMES:
        from ds_chunkflow.pipeline import schedule

        return getattr(schedule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
