"""The fused MoE op against a per-token loop, and its expert-parallel range."""
import torch
from torch import nn

from asyncllm.model.layers.moe import fused_moe, route


def _experts(count: int, hidden: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
                         for _ in range(count))


def _per_token(x, weights, ids, experts, first=0):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot]) - first
            if 0 <= e < len(experts):
                out[t] += weights[t, slot] * experts[e](x[t:t + 1])[0]
    return out


def test_fused_moe_equals_a_per_token_loop():
    torch.manual_seed(0)
    experts = _experts(6, 16)
    x, logits = torch.randn(37, 16), torch.randn(37, 6)
    for normalize in (True, False):
        weights, ids = route(logits, 2, normalize)
        if normalize:
            torch.testing.assert_close(weights.sum(-1), torch.ones(37))
        with torch.no_grad():
            torch.testing.assert_close(fused_moe(x, weights, ids, experts), _per_token(x, weights, ids, experts))


def test_a_rank_adds_only_its_experts_and_the_ranks_sum_to_the_whole():
    torch.manual_seed(1)
    experts = _experts(6, 8)
    x = torch.randn(20, 8)
    weights, ids = route(torch.randn(20, 6), 3, True)
    with torch.no_grad():
        whole = fused_moe(x, weights, ids, experts)
        parts = [fused_moe(x, weights, ids, experts[r * 2:(r + 1) * 2], first_expert=r * 2) for r in range(3)]
        torch.testing.assert_close(parts[1], _per_token(x, weights, ids, experts[2:4], first=2))
        torch.testing.assert_close(sum(parts), whole)
