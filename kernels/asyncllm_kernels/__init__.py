"""Triton kernels for asyncllm, each next to the torch reference it must equal.

The engine selects them on CUDA (EngineArgs.attention_backend="auto" or "triton"). On the CPU
they run under Triton's interpreter (TRITON_INTERPRET=1, set before this package is imported),
which is how the tests check them against the references on a machine without a GPU.
"""
from asyncllm_kernels.attention import paged_decode_attention, varlen_prefill_attention
from asyncllm_kernels.cache import reshape_and_cache
from asyncllm_kernels.lora import lora_bgmv
from asyncllm_kernels.moe import fused_moe
from asyncllm_kernels.norm import rms_norm
from asyncllm_kernels.quant import block_linear
from asyncllm_kernels.rotary import rotary_embedding

__all__ = ["paged_decode_attention", "varlen_prefill_attention", "reshape_and_cache", "rms_norm",
           "rotary_embedding", "lora_bgmv", "fused_moe", "block_linear"]
