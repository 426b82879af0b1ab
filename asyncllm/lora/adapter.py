"""PEFT LoRA folders → validated adapter weights.

A folder is `adapter_config.json` + `adapter_model.safetensors` (a pickled `adapter_model.bin`
is refused: loading it could run code). Its tensors are named as PEFT saves them,
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). `check_adapter` reads only the config and the safetensors header (the engine's
front, before a request is queued); `load_adapter` reads the tensors (the worker), folding
the scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) into B once.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from asyncllm.errors import InvalidRequestError
from asyncllm.model.arch_config import LlamaFamilyConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections a LoRA may target, by PEFT's module name.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAError(InvalidRequestError):
    """An adapter that cannot be used with this model; the request naming it gets a 400."""

    def __init__(self, message: str):
        super().__init__(message, param="lora_request")


def target_shapes(cfg: LlamaFamilyConfig) -> dict[str, tuple[int, int]]:
    """PEFT target name → (in_features, out_features) of that projection in every layer."""
    h, hd = cfg.hidden_size, cfg.head_dim
    return {
        "q_proj": (h, cfg.num_heads * hd), "k_proj": (h, cfg.num_kv_heads * hd),
        "v_proj": (h, cfg.num_kv_heads * hd), "o_proj": (cfg.num_heads * hd, h),
        "gate_proj": (h, cfg.intermediate_size), "up_proj": (h, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, h),
    }


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    use_rslora: bool
    modules: tuple[str, ...]  # the PEFT module names it holds, e.g. "layers.3.self_attn.q_proj"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class AdapterWeights:
    """One adapter in memory: module name → (A [r, in], B * scaling [out, r])."""

    lora_int_id: int
    rank: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())

    def to(self, device: torch.device) -> "AdapterWeights":
        if all(a.device == device for a, _ in self.tensors.values()):
            return self
        return AdapterWeights(self.lora_int_id, self.rank,
                              {k: (a.to(device), b.to(device)) for k, (a, b) in self.tensors.items()})


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise LoRAError(f"LoRA adapter folder {path!r} does not exist")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise LoRAError(f"LoRA adapter {path!r} has no {WEIGHTS_FILE}"
                        + (" (adapter_model.bin is a pickle, which is never loaded: save it with "
                           "safe_serialization=True)" if pickled else ""))
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise LoRAError(f"LoRA adapter {path!r}: cannot read {CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"LoRA adapter {path!r}: {CONFIG_FILE} is not a JSON object")
    return config


def _check_config(path: str, config: dict, max_rank: int) -> tuple[int, float, bool]:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRAError(f"adapter {path!r} is a {peft_type} adapter; only LoRA is supported")
    refused = [key for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern")
               if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise LoRAError(f"LoRA adapter {path!r} uses {', '.join(refused)}, which is not supported (plain LoRA "
                        "with one rank and alpha for every module)")
    targets = config.get("target_modules")
    if isinstance(targets, list):  # (a string is a regex: the tensor names are checked instead)
        unsupported = [t for t in targets if str(t).rsplit(".", 1)[-1] not in TARGETS]
        if unsupported:
            raise LoRAError(f"LoRA adapter {path!r} targets {', '.join(map(repr, unsupported))}; supported targets "
                            f"are {', '.join(TARGETS)} (embedding and lm_head adapters are not)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA adapter {path!r}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {path!r} has rank {rank}, more than this engine's max_lora_rank {max_rank}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)):
        raise LoRAError(f"LoRA adapter {path!r}: lora_alpha must be a number, got {alpha!r}")
    return rank, float(alpha), bool(config.get("use_rslora", False))


def _module_of(key: str) -> tuple[str, str]:
    """PEFT tensor name → (module name without the model prefixes, "lora_A" | "lora_B")."""
    name = key.removeprefix("base_model.model.").removeprefix("model.")
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker in name:
            module, rest = name.split(marker, 1)
            if rest == "weight":
                return module, kind
    raise LoRAError(f"tensor {key!r} is not a LoRA A or B weight (embedding and lm_head adapters, DoRA "
                    "magnitudes and saved modules are not supported)")


def check_adapter(path: str, cfg: LlamaFamilyConfig, max_rank: int) -> AdapterConfig:
    """Validates a folder against the model without reading its weights (header only)."""
    config = _read_config(path)
    rank, alpha, use_rslora = _check_config(path, config, max_rank)
    shapes = target_shapes(cfg)
    seen: dict[str, set[str]] = {}
    try:
        with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():
                module, kind = _module_of(key)
                parts = module.split(".")
                target = parts[-1]
                if target not in shapes:
                    raise LoRAError(f"LoRA adapter {path!r} targets {module!r}; supported targets are "
                                    f"{', '.join(TARGETS)}")
                if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() \
                        or int(parts[1]) >= cfg.num_layers:
                    raise LoRAError(f"LoRA adapter {path!r}: {module!r} is not a layer of this "
                                    f"{cfg.num_layers}-layer model")
                in_f, out_f = shapes[target]
                expected = (rank, in_f) if kind == "lora_A" else (out_f, rank)
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected:
                    raise LoRAError(f"LoRA adapter {path!r}: {key} has shape {shape}, expected {expected} "
                                    "(an adapter for another model?)")
                seen.setdefault(module, set()).add(kind)
    except LoRAError:
        raise
    except Exception as exc:  # a corrupt or truncated safetensors file
        raise LoRAError(f"LoRA adapter {path!r}: cannot read {WEIGHTS_FILE}: {exc}") from None
    incomplete = [m for m, kinds in seen.items() if kinds != {"lora_A", "lora_B"}]
    if incomplete:
        raise LoRAError(f"LoRA adapter {path!r}: {incomplete[0]!r} lacks its lora_A or lora_B weight")
    if not seen:
        raise LoRAError(f"LoRA adapter {path!r} holds no LoRA weights")
    return AdapterConfig(rank, alpha, use_rslora, tuple(sorted(seen)))


def load_adapter(path: str, lora_int_id: int, cfg: LlamaFamilyConfig, max_rank: int,
                 dtype: torch.dtype) -> AdapterWeights:
    """Reads and checks an adapter; B is scaled in fp32, then both are cast to `dtype`."""
    config = check_adapter(path, cfg, max_rank)
    weights = AdapterWeights(lora_int_id, config.rank)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            module, kind = _module_of(key)
            halves.setdefault(module, {})[kind] = f.get_tensor(key)
    for module, pair in halves.items():
        a = pair["lora_A"].to(torch.float32)
        b = pair["lora_B"].to(torch.float32) * config.scaling
        weights.tensors[module] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return weights


def write_random_adapter(folder: str, cfg: LlamaFamilyConfig, rank: int, seed: int,
                         targets: tuple[str, ...] = TARGETS, alpha: float | None = None) -> None:
    """A PEFT-format LoRA folder of random weights (A ~ N(0, 1/in), B ~ N(0, 0.02²)) on `targets`
    of every layer: what benchmarks and demos load when no trained adapter is at hand."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shapes = target_shapes(cfg)
    tensors = {}
    for layer in range(cfg.num_layers):
        for target in targets:
            in_f, out_f = shapes[target]
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) / in_f ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 0.02
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": list(targets),
                   "bias": "none", "use_rslora": False}, f)
