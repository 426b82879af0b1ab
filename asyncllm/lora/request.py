"""LoRARequest: which adapter a request runs with (vLLM's name and fields)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """`lora_int_id` identifies the adapter everywhere (worker slots, prefix-cache keys): two
    requests with the same id share its weights and cached KV; it must be >= 1 and name one
    folder for the engine's lifetime. `lora_path` is a PEFT folder (adapter_config.json +
    adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    @property
    def cache_key(self) -> str:
        """Prefix-cache extra key: KV computed with this adapter is never served to another (the
        path too: an id removed and registered again with another folder is another adapter)."""
        return f"lora:{self.lora_int_id}:{self.lora_path}"

    @property
    def key(self) -> tuple[int, str]:
        """What a worker caches its weights under."""
        return self.lora_int_id, self.lora_path
