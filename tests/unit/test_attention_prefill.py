"""Prompt chunks in the torch attention backend (also the CPU backend's prefill path): whole
prompts of one length share one SDPA call, and every request's output equals what it gets alone."""
import pytest
import torch

from asyncllm.model.layers.attention import AttentionMetadata, TorchAttentionBackend

pytestmark = pytest.mark.timeout(60)
HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 8, 4


def _meta(requests, tables, first_decodes):
    """requests: [(new tokens, seq_len)], in step order; tables: their block ids."""
    starts, slots = [0], []
    for (new, seq_len), table in zip(requests, tables):
        starts.append(starts[-1] + new)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len - new, seq_len)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        num_decodes=first_decodes, query_start_loc=starts, seq_lens=[s for _, s in requests],
        seq_lens_tensor=torch.tensor([s for _, s in requests]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        slot_mapping=torch.tensor(slots))


@pytest.mark.parametrize("window", [None, 3])
def test_equal_length_prompts_share_a_call_and_match_each_alone(window, monkeypatch):
    torch.manual_seed(0)
    # A decode, three whole 5-token prompts, a 3-token one, a chunk with 6 cached tokens, another 5.
    requests = [(1, 9), (5, 5), (5, 5), (5, 5), (3, 3), (4, 10), (5, 5)]
    tables, next_block = [], 1
    for _, seq_len in requests:
        blocks = (seq_len + BLOCK - 1) // BLOCK
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    cache = torch.randn(2, next_block, BLOCK, KV_HEADS, DIM)  # random "cached context" everywhere
    tokens = sum(new for new, _ in requests)
    q, k, v = torch.randn(tokens, HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM)
    backend = TorchAttentionBackend(HEADS, KV_HEADS, DIM, 0.3, window)
    calls = []
    real = backend._prefill_fresh
    monkeypatch.setattr(backend, "_prefill_fresh", lambda *a: calls.append(a[-1]) or real(*a))

    together = backend.forward(q, k, v, cache.clone(), _meta(requests, tables, first_decodes=1))
    assert calls == [3, 1, 1]  # the three 5-token prompts in one call; the chunk with context apart
    start = 0
    for i, (new, _) in enumerate(requests):
        rows = slice(start, start + new)
        alone = backend.forward(q[rows], k[rows], v[rows], cache.clone(),
                                _meta([requests[i]], [tables[i]], first_decodes=int(i == 0)))
        assert torch.equal(together[rows], alone), f"request {i}"
        start += new
