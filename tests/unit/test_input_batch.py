"""The worker's InputBatch: its tensors give the same flat inputs and penalty inputs as the
request lists they mirror, across diffs, preemption, resumption and proposed tokens."""
import torch

from asyncllm.core.sched_output import CachedRequestData, NewRequestData, ScheduledRequest, SchedulerOutput
from asyncllm.sampling.metadata import PenaltyInputs, SamplingRow
from asyncllm.worker.input_batch import InputBatch, StepRows

BS = 4


def _sched(new=(), cached=(), scheduled=(), finished=(), preempted=()):
    return SchedulerOutput(scheduled=list(scheduled), num_batched_tokens=0, new_requests=list(new),
                           cached_requests=list(cached), finished_req_ids=list(finished),
                           preempted_ids=list(preempted))


def _naive_flat(batch, items):
    ids, positions, slots = [], [], []
    for state, item in items:
        tokens = state.token_ids + item.spec_token_ids
        for pos in range(item.start, item.start + item.num_new_tokens):
            ids.append(tokens[pos])
            positions.append(pos)
            slots.append(state.block_ids[pos // BS] * BS + pos % BS)
    return ids, positions, slots


def test_flat_inputs_and_penalties_match_the_request_lists():
    batch = InputBatch(max_rows=2, max_blocks_per_request=8, block_size=BS, device=torch.device("cpu"))
    plain = SamplingRow(temperature=0.0)
    penal = SamplingRow(temperature=0.0, presence_penalty=0.5, repetition_penalty=1.3)
    batch.update(_sched(new=[
        NewRequestData("a", [5, 6, 7, 8, 9], [], plain, [3, 1]),
        NewRequestData("b", [11, 12], [13], penal, [0, 10]),
        NewRequestData("c", list(range(20, 30)), [], penal, [4, 5, 6]),  # a third row: the tensors grow
    ]))
    a, b, c = (batch.requests[r] for r in "abc")
    items = [(b, ScheduledRequest("b", 2, 1 + 2, spec_token_ids=[14, 15])),
             (a, ScheduledRequest("a", 0, 5)), (c, ScheduledRequest("c", 4, 6))]
    flat = batch.flat_inputs(items)
    ids, positions, slots = _naive_flat(batch, items)
    assert flat.input_ids.tolist() == ids and flat.positions.tolist() == positions
    assert flat.slot_mapping.tolist() == slots
    assert flat.query_start == [0, 3, 8, 14] and flat.seq_lens == [5, 5, 10] and flat.num_decodes == 0

    # Logits rows of b's verification (0, 1 and 2 proposals before them), then c's last row.
    step = StepRows([b, b, b, c], [[], [14], [14, 15], []])
    meta = batch.sampling_metadata(step)
    want = PenaltyInputs.of([penal] * 4, [[11, 12]] * 3 + [list(range(20, 30))],
                            [[13], [13, 14], [13, 14, 15], []])
    width = meta.penalties.output_token_ids.shape[1]
    assert meta.penalties.prompt_token_ids[:, :want.prompt_token_ids.shape[1]].tolist() == \
        want.prompt_token_ids.tolist()
    assert (meta.penalties.prompt_token_ids[:, want.prompt_token_ids.shape[1]:] == -1).all()
    got_out = [[t for t in row if t >= 0] for row in meta.penalties.output_token_ids.tolist()]
    assert got_out == [[13], [13, 14], [13, 14, 15], []] and width >= 3
    assert torch.equal(meta.penalties.repetition, want.repetition)

    # Commit b's accepted tokens, preempt a, resume it on another row: its tokens come back.
    batch.append_tokens(b, [14, 99])
    assert b.token_ids == [11, 12, 13, 14, 99] and int(batch.num_tokens[b.row]) == 5
    batch.update(_sched(preempted=["a"]))
    assert a.row == -1
    batch.update(_sched(new=[NewRequestData("d", [1, 2, 3], [], plain, [7])]))
    batch.update(_sched(cached=[CachedRequestData("a", [2, 9], resumed=True),
                                CachedRequestData("b", [8])]))
    items = [(b, ScheduledRequest("b", 4, 1)), (a, ScheduledRequest("a", 0, 5)),
             (batch.requests["d"], ScheduledRequest("d", 0, 3))]
    flat = batch.flat_inputs(items)
    ids, positions, slots = _naive_flat(batch, items)
    assert (flat.input_ids.tolist(), flat.positions.tolist(), flat.slot_mapping.tolist()) == (ids, positions, slots)
    assert flat.num_decodes == 1
    batch.update(_sched(finished=["a", "b", "c", "d"]))
    assert batch.requests == {}
