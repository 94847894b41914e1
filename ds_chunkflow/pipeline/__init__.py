"""Pipeline parallelism for ChunkFlow: the state-aware 1F1B plan, its simulator, its schedule."""

from ds_chunkflow.pipeline.simulate import Op, Plan, SimResult, plan, replay, simulate, stage_orders

__all__ = ["Op", "Plan", "SimResult", "plan", "replay", "simulate", "stage_orders"]
