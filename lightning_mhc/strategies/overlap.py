"""Overlapped forward/backward for DualPipeV: the function registered for its ``OVERLAP_F_B`` actions.

``ScheduleDualPipeV`` pairs one microbatch's forward with another's backward (on the other stage of the V) in an
``OVERLAP_F_B`` action, but by default runs them one after the other in a fixed order, each first waiting for its
incoming transfer, and sends both results only after both are done. Registered with ``register_custom_function``
(torch >= 2.10's ``_PipelineScheduleRuntime``), this function instead computes the half whose input arrives first
(the forward when both are there) while the other half's transfer is still in flight, and sends each result as soon
as it is computed, so the forward's activation is on the wire while the backward computes. The receives are waited
for in helper threads (which do not compute), so the two halves never share the cores. With NCCL a wait only makes
the compute stream wait for the transfer's stream, so the halves are queued forward first and the gain is the early
sends (not run: no multi-GPU machine has been available).

The two halves repeat what the schedule's own FORWARD and FULL_BACKWARD actions do (compute, hand the result to the
neighbouring stage when it is on this rank), which ``torch.distributed.pipelining`` keeps in a local function that a
custom function cannot call. The schedule's own sends of an overlapped pair are taken out of its action list, since
the pair sends them itself (in the order the peer posts its receives).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Optional

from torch.distributed.pipelining import schedules as _schedules


class _EarlySends:
    """The sends the overlapped pairs issued themselves (from the schedule's thread), waited for at the end of the
    schedule's step, as torch waits for its own."""

    def __init__(self) -> None:
        self.works: list[list[Any]] = []

    def issue(self, ops: list[Any]) -> None:
        if ops:
            self.works.append(_schedules._batch_p2p(ops))

    def wait_all(self) -> None:
        works, self.works = self.works, []
        for work in works:
            _schedules._wait_batch_p2p(work)


def register_overlap(schedule: Any) -> bool:
    """Run ``schedule``'s overlapped forward/backward pairs in the order their inputs arrive, each half sending its
    result as soon as it is computed. ``False`` (and the schedule left as torch built it) where torch lacks the hook
    or lays out the pair's sends otherwise than expected."""
    overlap = getattr(_schedules, "OVERLAP_F_B", None)
    if overlap is None or not hasattr(schedule, "register_custom_function"):
        return False
    actions = schedule.pipeline_order_with_comms.get(schedule.rank)
    trimmed = _without_pair_sends(schedule, actions, overlap) if actions is not None else None
    if trimmed is None:
        return False
    sends = _EarlySends()
    schedule.pipeline_order_with_comms[schedule.rank] = trimmed
    schedule.register_custom_function(overlap, lambda action, ctx: overlap_forward_backward(action, ctx, sends))
    schedule._step_microbatches = _waiting_for(sends, schedule._step_microbatches)
    return True


def _without_pair_sends(schedule: Any, actions: list[Any], overlap: Any) -> Optional[list[Any]]:
    """``actions`` without the SEND_F/SEND_B that follow each overlapped pair for its own sub-actions; ``None`` when
    a pair's sends are not where torch puts them (right after the pair, the forward's first)."""
    rank_of, last = schedule.stage_index_to_group_rank, schedule._num_stages - 1

    def crosses(index: int, neighbour: int) -> bool:
        return 0 <= neighbour <= last and rank_of[neighbour] != rank_of[index]

    kept: list[Any] = []
    expected: list[Any] = []
    for action in actions:
        if expected:
            if action != expected.pop(0):
                return None
            continue
        kept.append(action)
        if action.computation_type == overlap:
            forward, backward = action.sub_actions
            if crosses(forward.stage_index, forward.stage_index + 1):
                expected.append(_schedules._Action(forward.stage_index, _schedules.SEND_F, forward.microbatch_index))
            if crosses(backward.stage_index, backward.stage_index - 1):
                expected.append(_schedules._Action(backward.stage_index, _schedules.SEND_B, backward.microbatch_index))
    return None if expected else kept


def _waiting_for(sends: _EarlySends, step_microbatches: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            result = step_microbatches(*args, **kwargs)
        except BaseException:
            sends.works = []  # a peer that failed may never receive them: do not wait
            raise
        sends.wait_all()
        return result

    return run


def overlap_forward_backward(action: Any, ctx: Any, sends: _EarlySends) -> None:
    """Run ``action``'s forward and backward sub-actions in the order their inputs arrive (the forward first when
    both are there), each sending its result on as soon as it is computed."""
    schedule = ctx.schedule_ref
    stages = _stages(schedule)
    forward, backward = action.sub_actions
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    for half, received in (
        (forward, _take_received(schedule, stages, forward)),
        (backward, _take_received(schedule, stages, backward)),
    ):
        if received is None:
            arrived.put((half, None))
        else:
            threading.Thread(
                target=_await, args=(half, received, arrived), name="mhc-pipeline-recv", daemon=True
            ).start()
    held: list[Any] = []
    forward_done = False
    for _ in range(2):
        half, error = arrived.get()
        if error is not None:
            raise error
        if half is forward:
            sends.issue(_forward(schedule, stages, forward, ctx))
            sends.issue(held)
            forward_done = True
        else:
            ops = _backward(schedule, stages, backward)
            # the peer receives the forward's result first
            if not forward_done and _forward_sends_to(schedule, stages, forward, ops):
                held = ops
            else:
                sends.issue(ops)


def _take_received(schedule: Any, stages: dict[int, Any], action: Any) -> Optional[list[Any]]:
    """The posted receive of ``action``'s input (taken out of the schedule's table); ``None`` when the input is
    local (the first stage's microbatch, the loss, or a neighbouring stage on this rank)."""
    index, mb = action.stage_index, action.microbatch_index
    if action.computation_type == _schedules.FORWARD:
        return None if stages[index].is_first or index - 1 in stages else schedule.fwd_recv_ops.pop((index, mb))
    return None if stages[index].is_last or index + 1 in stages else schedule.bwd_recv_ops.pop((index, mb))


def _await(half: Any, received: list[Any], arrived: queue.SimpleQueue) -> None:
    try:
        _schedules._wait_batch_p2p(received)
        arrived.put((half, None))
    except BaseException as error:  # the peer failed: raised in the calling thread
        arrived.put((half, error))


def _forward_sends_to(schedule: Any, stages: dict[int, Any], forward: Any, ops: list[Any]) -> bool:
    """Whether the forward of ``forward`` sends to a peer of ``ops`` (then ``ops`` must wait for it: sends to one
    peer are matched to its receives in order)."""
    index = forward.stage_index
    if not ops or stages[index].is_last or index + 1 in stages:
        return False
    peer = schedule.stage_index_to_group_rank[index + 1]
    return any(op.group_peer == peer for op in ops)


def _stages(schedule: Any) -> dict[int, Any]:
    return {stage.stage_index: stage for stage in schedule._stages}


def _forward(schedule: Any, stages: dict[int, Any], action: Any, ctx: Any) -> list[Any]:
    """The forward sub-action (its input arrived); returns the send ops of its output when the next stage is on
    another rank."""
    index, mb = action.stage_index, action.microbatch_index
    stage = stages[index]
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=True)
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if index + 1 in stages:
        stages[index + 1].set_local_fwd_input(output, mb)
        return []
    return [] if stage.is_last else stage.get_fwd_send_ops(mb)


def _backward(schedule: Any, stages: dict[int, Any], action: Any) -> list[Any]:
    """The backward sub-action (its gradient arrived); returns the send ops of its input gradient when the previous
    stage is on another rank."""
    index, mb = action.stage_index, action.microbatch_index
    stage = stages[index]
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[index] += 1
    last = schedule.backward_counter[index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if index - 1 in stages:
        stages[index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
        return []
    return [] if stage.is_first else stage.get_bwd_send_ops(mb)
