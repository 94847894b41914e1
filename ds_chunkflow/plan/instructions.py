"""The one instruction vocabulary of a chunk plan, data-parallel and pipeline alike.

Every planner in :mod:`ds_chunkflow.plan` emits these; the runtime (:mod:`ds_chunkflow.runtime`) maps each
type to one handler and refuses unknown ones. A compute instruction names its chunk (a
:class:`~ds_chunkflow.plan.chunking.Chunk`); the pipeline's sends and receives are DeepSpeed's own
instructions, generated from a planned timeline in :mod:`ds_chunkflow.pipeline.schedule` (only there).

    letter  instruction      model call                              graph kept
    S       StateForward     forward, fills the chunk's K/V state    no
    F       Forward          forward + chunk loss                    yes (on the CPU with offload=True)
    R       Recompute        forward again from the first one's RNG  yes
    B       Backward         backward of the chunk's loss            -
    J       JointBackward    one backward of standalone chunks' losses -
    E       EvalForward      forward + loss sum, fills K/V state     no
    p/P/e   PadForward, PadBackward, PadEvalForward: one-token calls that keep ranks in lock-step
    -       ReleaseState     frees a dependent group's state         (no call)

Frozen dataclasses: equal when their fields are, hashable, printed as ``Forward(chunk=..., offload=False)``;
:func:`letter` gives the diagrams' one-letter names.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_chunkflow.plan.chunking import Chunk


@dataclass(frozen=True)
class StateForward:
    """Forward a dependent chunk with no graph, writing its K/V into the group state.

    Roughly: ``with no_grad(): model(chunk)``; keep only the state.
    """

    chunk: Chunk


@dataclass(frozen=True)
class Forward:
    """Forward a chunk keeping its activations (moved to the CPU with ``offload``).

    Roughly: ``loss[chunk] = CE(model(chunk)) / num_loss_tokens``.
    """

    chunk: Chunk
    offload: bool = False


@dataclass(frozen=True)
class Recompute:
    """Forward a dependent chunk again, from the RNG state of its first forward.

    Roughly: ``set_rng(saved[chunk]); loss[chunk] = CE(model(chunk)) / n``.
    """

    chunk: Chunk


@dataclass(frozen=True)
class Backward:
    """Backward of a chunk's loss; the K/V gradients flow through the group state.

    Roughly: ``backward(loss.pop(chunk))``.
    """

    chunk: Chunk


@dataclass(frozen=True)
class JointBackward:
    """One backward of the summed losses of standalone chunks (independent graphs, so the sum's gradient
    is each chunk's): one gradient reduction under ZeRO-2 for all of them instead of one per chunk.

    Roughly: ``backward(loss.pop(c1) + ... + loss.pop(ck))``.
    """

    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class EvalForward:
    """Forward a chunk with no graph and add its summed loss (evaluation: no backward follows).

    Roughly: ``with no_grad(): loss_sum += CE(model(chunk))``; a dependent chunk also fills the
    K/V state for the next one, as a :class:`StateForward` does.
    """

    chunk: Chunk


@dataclass(frozen=True)
class PadForward:
    """A one-token forward that contributes nothing, so ranks issue equal collectives.

    Roughly: ``pad_loss = 0 * model([token 0]).sum()`` (kept for a :class:`PadBackward` only if ``keep``).
    """

    keep: bool


@dataclass(frozen=True)
class PadBackward:
    """Backward of the oldest pending pad loss (a zero gradient).

    Roughly: ``backward(pad_losses.popleft())``.
    """


@dataclass(frozen=True)
class PadEvalForward:
    """A one-token evaluation forward with the loss head's calls and no loss, so ranks issue
    equal collectives (ZeRO-3 gathers per module call).

    Roughly: ``with no_grad(): 0 * CE(model([token 0]))``.
    """


@dataclass(frozen=True)
class ReleaseState:
    """Free a dependent group's K/V state after its last backward (local: no model call).

    Roughly: ``del state[group]``.
    """

    group: int


Instruction = (StateForward | Forward | Recompute | Backward | JointBackward | EvalForward | PadForward
               | PadBackward | PadEvalForward | ReleaseState)
COMPUTE = (StateForward, Forward, Recompute, Backward)
"""The instructions of a chunk that a pipeline stage runs (each between its sends and receives)."""
BACKWARDS = (Backward, JointBackward, PadBackward)
"""The instructions that are one backward call (under ZeRO-2, one gradient reduction each)."""

_LETTERS = {StateForward: "S", Forward: "F", Recompute: "R", Backward: "B", JointBackward: "J", EvalForward: "E",
            PadForward: "p", PadBackward: "P", PadEvalForward: "e", ReleaseState: "-"}


def letter(ins: Instruction) -> str:
    """The one-letter name of the diagrams (``F``, ``S``, ``R``, ``B``, ...)."""
    return _LETTERS[type(ins)]


def holds_activations(ins: Instruction) -> bool:
    """A forward whose graph stays alive until the chunk's backward."""
    return isinstance(ins, (Forward, Recompute))
