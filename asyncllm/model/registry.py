"""Which HF architectures we run, keyed by the name in config.json's `architectures`."""
from __future__ import annotations

# Every entry is served by the one Llama-family implementation in llama.py; the
# differences (qkv bias, q/k norm, sliding window) are flags of LlamaFamilyConfig.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class UnsupportedArchitectureError(ValueError):
    pass


def resolve_architecture(architectures: list[str]) -> str:
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise UnsupportedArchitectureError(
        f"unsupported model architecture {architectures or '(none given)'}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def build_model(config, dtype, device, kernels: str = "torch"):
    """The model with uninitialised weights of `dtype` on `device` (load_weights fills them);
    `kernels` is "torch" or "triton" (attention, RMSNorm and rotary from asyncllm_kernels)."""
    import torch

    from asyncllm.model.llama import LlamaFamilyForCausalLM

    resolve_architecture([config.architecture])
    # Built on meta: no random init of weights about to be overwritten.
    with torch.device("meta"):
        model = LlamaFamilyForCausalLM(config, kernels).to(dtype)
    model = model.to_empty(device=device)
    # The rotary tables are not in checkpoints: computed on the real device, in fp32.
    model.rotary.build(device)
    return model
