"""Multi-LoRA: per-request PEFT adapters over one base model (see docs/ARCHITECTURE.md)."""
from asyncllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
