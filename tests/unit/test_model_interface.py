"""The model interface, the registry and the layers' parallel context."""
import pytest
import torch

from asyncllm.model.interface import CausalLM, ModelContext
from asyncllm.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from asyncllm.model.layers.ops import Ops
from asyncllm.model.parallel import ParallelContext
from asyncllm.model.registry import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, model_class


def test_every_registered_architecture_builds_a_class_with_the_interface(default_llm):
    for arch in SUPPORTED_ARCHITECTURES:
        cls = model_class(arch)
        assert all(hasattr(cls, m) for m in ("forward", "compute_logits", "load_weights", "pooler"))
    model = default_llm.engine.core.executor.worker.runner.model
    assert isinstance(model, CausalLM) and model.pooler is None
    assert model.ctx.ops == Ops("cpu") or model.ctx.ops == Ops("torch")
    # One op choice for every layer: no layer carries a backend name of its own.
    from asyncllm.model.layers.norm import RMSNorm

    assert {m.ops for m in model.modules() if isinstance(m, RMSNorm)} == {model.ctx.ops}
    with pytest.raises(UnsupportedArchitectureError, match="supported: LlamaForCausalLM"):
        model_class("GPT2LMHeadModel")


def test_unknown_ops_name_is_refused():
    with pytest.raises(ValueError, match="torch, cpu, triton"):
        Ops("cuda-graphs")


def test_column_shards_of_two_ranks_concatenate_to_the_whole_projection():
    torch.manual_seed(0)
    full_weight, full_bias, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
    outs = []
    for rank in range(2):
        parallel = ParallelContext(rank, 2)
        layer = ColumnParallelLinear(6, 8, True, Ops("torch"), parallel)
        assert layer.weight.shape == (4, 6)
        with torch.no_grad():
            layer.weight.copy_(parallel.shard(full_weight, layer.shard_dim))
            layer.bias.copy_(parallel.shard(full_bias, 0))
        outs.append(layer(x))
    # Close, not bitwise: BLAS may block a 4-wide and an 8-wide GEMM differently (it did on CI's CPU).
    torch.testing.assert_close(
        torch.cat(outs, dim=-1), torch.nn.functional.linear(x, full_weight, full_bias), rtol=1e-6, atol=1e-6
    )


def test_parallel_context_checks_its_sizes():
    assert torch.equal(ParallelContext(1, 2).shard(torch.arange(6), 0), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        ParallelContext(0, 4).local_size(6)
    with pytest.raises(ValueError, match="outside a group"):
        ParallelContext(2, 2)
    with pytest.raises(NotImplementedError, match="with a bias over several ranks"):  # refused, not silently wrong
        RowParallelLinear(8, 4, parallel=ParallelContext(0, 2))
    assert ModelContext().parallel.world_size == 1
