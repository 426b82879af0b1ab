"""Property tests: after any sequence of add / step / abort, no block leaks or is freed twice."""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncllm.core.kv_cache_manager import KVCacheManager
from asyncllm.core.sched_output import ModelRunnerOutput
from asyncllm.core.scheduler import Scheduler, SchedulerConfig
from asyncllm.request import Request, RequestStatus
from asyncllm.sampling_params import SamplingParams

EOS = 0


def _fake_execute(sched, rng):
    """Stands in for the model: a random token for every request that samples this step."""
    ids = [s.req_id for s in sched.scheduled if s.samples]
    return ModelRunnerOutput(ids, [[rng.randrange(0, 6)] for _ in ids])


def _check(scheduler: Scheduler, kv: KVCacheManager):
    kv.pool.check_invariants()
    live = scheduler.running
    owned = sum(len(kv.req_blocks.get(r.request_id, [])) for r in live)
    refs = sum(b.ref_cnt for b in kv.pool.blocks)
    assert refs == owned  # every reference belongs to a running request
    for _, r in scheduler.waiting:
        assert r.request_id not in kv.req_blocks
    assert len(scheduler.running) <= scheduler.config.max_num_seqs


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3), st.integers(-1, 1)),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(1, 32), caching=st.booleans(), seed=st.integers(0, 1000))
def test_no_block_leaked_or_double_freed(ops, num_blocks, block_size, budget, caching, seed):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, block_size, caching)
    max_len = num_blocks * block_size
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=max_len), kv)
    n = 0
    for op in ops:
        if op[0] == "add":
            _, plen, max_tokens, vocab_shift, prio = op
            plen = min(plen, max_len - 1)
            # Few distinct prompts so prefixes are shared and the cache is hit.
            prompt = [(i % 3) + vocab_shift for i in range(plen)]
            req = Request(f"r{n}", prompt, SamplingParams(max_tokens=max_tokens), frozenset({EOS}),
                          max_tokens=max_tokens, priority=prio)
            n += 1
            sched.add_request(req)
        elif op[0] == "step":
            out = sched.schedule()
            if not out.is_empty:
                assert out.num_batched_tokens <= budget
                sched.update_from_output(out, _fake_execute(out, rng))
        else:
            rid = f"r{op[1]}"
            sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        _check(sched, kv)
    # Drain: everything finishes (nothing waits forever) and every block comes back.
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        assert not out.is_empty, "requests left that can never be scheduled"
        sched.update_from_output(out, _fake_execute(out, rng))
        _check(sched, kv)
    assert not sched.has_unfinished_requests()
    assert kv.num_free_blocks == num_blocks
    kv.pool.check_invariants()


def test_prefix_cache_reuses_blocks_and_evicts_lru_only_when_free():
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_caching=True)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(), frozenset(), 4)
    assert kv.allocate_slots(a, 5)
    b = Request("b", [1, 2, 3, 4, 9], SamplingParams(), frozenset(), 4)
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and [h.block_id for h in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, 1, hits)
    assert kv.req_blocks["b"][0].ref_cnt == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6
    # Cached-but-free blocks are still found...
    c = Request("c", [1, 2, 3, 4, 7], SamplingParams(), frozenset(), 4)
    assert kv.get_computed_blocks(c)[1] == 4
    # ...until allocation pressure evicts them (least recently freed first).
    d = Request("d", list(range(100, 112)), SamplingParams(), frozenset(), 1)
    assert kv.allocate_slots(d, 12)
    assert kv.get_computed_blocks(c)[1] == 0
    assert kv.pool.num_evictions > 0


def test_extra_keys_separate_cache_entries():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=True)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(), frozenset(), 4, cache_salt="lora-1")
    assert kv.allocate_slots(a, 5)
    same = Request("b", [1, 2, 3, 4, 5], SamplingParams(), frozenset(), 4, cache_salt="lora-1")
    other = Request("c", [1, 2, 3, 4, 5], SamplingParams(), frozenset(), 4, cache_salt="lora-2")
    assert kv.get_computed_blocks(same)[1] == 4
    assert kv.get_computed_blocks(other)[1] == 0


def test_empty_freed_blocks_are_reused_before_never_used_and_cached_ones():
    from asyncllm.core.block_pool import BlockPool

    pool = BlockPool(num_blocks=6, enable_caching=True)
    a, b, c = pool.get_new_blocks(3)
    assert [x.block_id for x in (a, b, c)] == [0, 1, 2]  # never-used blocks go out in id order
    pool.cache_block(a, b"prefix")
    pool.free_blocks([c, b, a])
    # b and c hold nothing: reused first (their memory is committed); then never-used 3, 4, 5;
    # the cached block a last, so its prefix stays findable as long as possible.
    assert [x.block_id for x in pool.get_new_blocks(5)] == [1, 2, 3, 4, 5]
    assert pool.get_cached_block(b"prefix") is a
    assert pool.get_new_blocks(1)[0] is a and pool.get_cached_block(b"prefix") is None
    pool.check_invariants()
