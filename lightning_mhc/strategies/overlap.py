"""Overlapped forward/backward for DualPipeV: the function registered for its ``OVERLAP_F_B`` actions.

``ScheduleDualPipeV`` pairs one microbatch's forward with another's backward (on the other stage of the V) in an
``OVERLAP_F_B`` action, but by default runs the two one after the other. Registered with
``register_custom_function`` (torch >= 2.10's ``_PipelineScheduleRuntime``), this function runs the backward in a
second thread while the forward runs in the calling one, so each waits for its own incoming transfer (and computes)
while the other computes: on CPU, torch's kernels release the GIL; on CUDA a second stream would be the next step.

The two halves repeat what the schedule's own FORWARD and FULL_BACKWARD actions do (wait for the received
activation or gradient, compute, hand the result to the neighbouring stage when it is on this rank), which
``torch.distributed.pipelining`` keeps in a local function that a custom function cannot call.
"""

from __future__ import annotations

import threading
from typing import Any

from torch.distributed.pipelining import schedules as _schedules


def register_overlap(schedule: Any) -> None:
    """Run ``schedule``'s overlapped forward/backward pairs concurrently (no-op where torch lacks the hook)."""
    overlap = getattr(_schedules, "OVERLAP_F_B", None)
    if overlap is None or not hasattr(schedule, "register_custom_function"):
        return
    schedule.register_custom_function(overlap, overlap_forward_backward)


def overlap_forward_backward(action: Any, ctx: Any) -> None:
    """Run ``action``'s forward sub-action here and its backward sub-action in a second thread, then join."""
    schedule = ctx.schedule_ref
    forward, backward = action.sub_actions
    errors: list[BaseException] = []

    def run_backward() -> None:
        try:
            _backward(schedule, backward)
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    worker = threading.Thread(target=run_backward, name="mhc-pipeline-backward", daemon=True)
    worker.start()
    # an error in the forward propagates at once: the backward may be waiting for a peer that now never sends
    _forward(schedule, forward, ctx)
    worker.join()
    if errors:
        raise errors[0]


def _stages(schedule: Any) -> dict[int, Any]:
    return {stage.stage_index: stage for stage in schedule._stages}


def _forward(schedule: Any, action: Any, ctx: Any) -> None:
    stages = _stages(schedule)
    index, mb = action.stage_index, action.microbatch_index
    stage = stages[index]
    if not stage.is_first and index - 1 not in stages:
        _schedules._wait_batch_p2p(schedule.fwd_recv_ops.pop((index, mb)))
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=True)
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if index + 1 in stages:
        stages[index + 1].set_local_fwd_input(output, mb)


def _backward(schedule: Any, action: Any) -> None:
    stages = _stages(schedule)
    index, mb = action.stage_index, action.microbatch_index
    stage = stages[index]
    if not stage.is_last and index + 1 not in stages:
        _schedules._wait_batch_p2p(schedule.bwd_recv_ops.pop((index, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[index] += 1
    last = schedule.backward_counter[index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if index - 1 in stages:
        stages[index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
