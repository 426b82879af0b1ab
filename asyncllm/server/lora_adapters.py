"""The server's LoRA adapters by name (vLLM's `--lora-modules`, `model` = an adapter name,
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

Adapters given at start are the operator's: any path. Adapters loaded at run time (only with
`allow_runtime_lora_updating`, behind the API key like every route) must lie under `lora_root`:
a relative path is taken inside it, `..` is refused outright, and the folder and its two files
must resolve (symlinks followed) inside the root, so a link cannot reach the rest of the disk.
Each name gets a fresh lora_int_id, so a name unloaded and loaded again from another folder
never meets the old weights in a worker's cache. Unloading refuses new requests naming the
adapter (404); requests already running finish with it.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import anyio

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.errors import InvalidRequestError
from asyncllm.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from asyncllm.lora.request import LoRARequest
from asyncllm.server.errors import APIError


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` entry: `name=path`."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "LoRAModule":
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules takes name=path entries, got {text!r}")
        return cls(name.strip(), path.strip())


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ServedAdapters:
    def __init__(self, engine: AsyncEngine, base_name: str, modules: list[LoRAModule] = (),
                 allow_runtime_updating: bool = False, lora_root: str | None = None):
        self.engine = engine
        self.base_name = base_name
        self.allow_runtime_updating = allow_runtime_updating
        if allow_runtime_updating and not lora_root:
            raise ValueError("--allow-runtime-lora-updating needs --lora-root: the folder adapters may be loaded from")
        self.root = os.path.realpath(lora_root) if lora_root else None
        if self.root is not None and not os.path.isdir(self.root):
            raise ValueError(f"--lora-root {lora_root!r} is not a folder")
        if (modules or allow_runtime_updating) and not engine.engine.loras.enabled:
            raise ValueError("LoRA adapters need the engine started with enable_lora=True (--enable-lora)")
        self._by_name: dict[str, LoRARequest] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        for module in modules:
            if module.name == base_name or module.name in self._by_name:
                raise ValueError(f"--lora-modules: the name {module.name!r} is taken")
            self._register(module.name, module.path)  # a bad folder stops the server at start, with why

    def _register(self, name: str, path: str) -> LoRARequest:
        with self._lock:
            lora = LoRARequest(name, self._next_id, path, base_model_name=self.base_name)
            self._next_id += 1
        self.engine.add_lora(lora)  # checks the folder against the model (InvalidRequestError: 400)
        with self._lock:
            if name in self._by_name:  # a concurrent load of the same name won
                self.engine.remove_lora(lora.lora_int_id)
                raise InvalidRequestError(f"the LoRA adapter {name!r} is already loaded", param="lora_name")
            self._by_name[name] = lora
        return lora

    def get(self, name: str | None) -> LoRARequest | None:
        with self._lock:
            return self._by_name.get(name) if name is not None else None

    def served(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._by_name.values())

    def confined_path(self, path: str) -> str:
        """`path` resolved inside the root, or a 400 saying why not."""
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("lora_path must be a non-empty string", param="lora_path")
        if ".." in path.replace("\\", "/").split("/"):
            raise InvalidRequestError("lora_path must not contain '..'", param="lora_path")
        assert self.root is not None
        folder = os.path.realpath(os.path.join(self.root, path))
        for resolved in (folder, os.path.realpath(os.path.join(folder, CONFIG_FILE)),
                         os.path.realpath(os.path.join(folder, WEIGHTS_FILE))):
            if not _inside(resolved, self.root):
                raise InvalidRequestError(f"lora_path {path!r} is outside the server's LoRA root (a symlink "
                                          "cannot leave it either)", param="lora_path")
        return folder

    async def load(self, name: str, path: str) -> LoRARequest:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("lora_name must be a non-empty string", param="lora_name")
        if name == self.base_name or self.get(name) is not None:
            raise InvalidRequestError(f"the LoRA adapter {name!r} is already loaded", param="lora_name")
        folder = self.confined_path(path)
        return await anyio.to_thread.run_sync(self._register, name, folder)  # reads the folder off the loop

    def unload(self, name: str) -> LoRARequest:
        with self._lock:
            lora = self._by_name.pop(name, None) if isinstance(name, str) else None
        if lora is None:
            raise APIError(404, f"the LoRA adapter {name!r} is not loaded", param="lora_name",
                           code="lora_not_found")
        self.engine.remove_lora(lora.lora_int_id)
        return lora
