"""LoRARegistry: the engine front's view of adapters (vLLM's add_lora / remove_lora / list_loras).

Every LoRARequest is checked here before its request is queued (the folder, its config and
its tensor shapes against the model; the weights are read by the workers), so a bad adapter
is a 400 at once. An id names one folder while it is registered: the same id with another
path is refused until `remove` (which does not touch requests already running with it).
"""
from __future__ import annotations

import threading

from asyncllm.errors import InvalidRequestError
from asyncllm.lora.adapter import AdapterConfig, check_adapter
from asyncllm.lora.request import LoRARequest
from asyncllm.model.arch_config import LlamaFamilyConfig


class LoRARegistry:
    def __init__(self, model_config, enabled: bool, max_lora_rank: int):
        self.model_config = model_config
        self.enabled = enabled
        self.max_lora_rank = max_lora_rank
        self._adapters: dict[int, tuple[LoRARequest, AdapterConfig]] = {}
        self._lock = threading.Lock()  # requests are prepared on the event loop and on callers' threads

    def check(self, lora: LoRARequest) -> AdapterConfig:
        """Validates (and registers) `lora`; raises InvalidRequestError (400) with why."""
        if not self.enabled:
            raise InvalidRequestError("LoRA adapters are not enabled on this engine: start it with enable_lora=True "
                                      "(--enable-lora)", param="lora_request")
        if not isinstance(lora, LoRARequest):
            raise InvalidRequestError(f"lora_request must be a LoRARequest, got {type(lora).__name__}",
                                      param="lora_request")
        if not isinstance(lora.lora_int_id, int) or isinstance(lora.lora_int_id, bool) or lora.lora_int_id < 1:
            raise InvalidRequestError(f"lora_int_id must be an integer >= 1, got {lora.lora_int_id!r}",
                                      param="lora_request")
        if not isinstance(self.model_config, LlamaFamilyConfig):
            raise InvalidRequestError(f"LoRA adapters are not supported for {self.model_config.architecture}",
                                      param="lora_request")
        with self._lock:
            known = self._adapters.get(lora.lora_int_id)
        if known is not None:
            if known[0].lora_path != lora.lora_path:
                raise InvalidRequestError(f"lora_int_id {lora.lora_int_id} already names {known[0].lora_path!r} "
                                          f"(not {lora.lora_path!r}); remove it first or use another id",
                                          param="lora_request")
            return known[1]
        config = check_adapter(lora.lora_path, self.model_config, self.max_lora_rank)
        with self._lock:
            self._adapters.setdefault(lora.lora_int_id, (lora, config))
        return config

    def add(self, lora: LoRARequest) -> bool:
        """Registers an adapter ahead of its requests. → False if that id was already there."""
        with self._lock:
            present = lora.lora_int_id in self._adapters
        self.check(lora)
        return not present

    def remove(self, lora_int_id: int) -> bool:
        with self._lock:
            return self._adapters.pop(lora_int_id, None) is not None

    def list(self) -> list[LoRARequest]:
        with self._lock:
            return [lora for lora, _ in self._adapters.values()]
