"""LlavaForConditionalGeneration: a Llama-family decoder whose prompts carry images.

The decoder is the text one (llama.py, every fast path included); an image's placeholder
tokens take the rows of its features (the vision tower's hidden states through the
projector, vision.py) in place of their token embedding, as transformers' LLaVA does. The
worker computes an image's features once per request and hands each step the rows its
tokens cover (`ImageEmbeds`), so a prompt may be chunked anywhere, even inside an image.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from asyncllm.model.arch_config import LlamaFamilyConfig
from asyncllm.model.interface import ModelContext, copy_checked
from asyncllm.model.llama import LlamaFamilyForCausalLM
from asyncllm.model.vision import MultiModalProjector, VisionTower, tower_name

_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


class LlavaForConditionalGeneration(LlamaFamilyForCausalLM):
    def __init__(self, cfg: LlamaFamilyConfig, ctx: ModelContext = ModelContext()):
        super().__init__(cfg, ctx)
        assert cfg.vision is not None
        # Where tokens enter: the first pipeline stage (replicated on its tensor-parallel ranks, which
        # all need the same rows; the tower is small next to the decoder).
        first = ctx.pipeline.is_first
        self.vision_tower = VisionTower(cfg.vision) if first else None
        self.multi_modal_projector = MultiModalProjector(cfg.vision, cfg.hidden_size) if first else None

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, channels, height, width] → [images, tokens_per_image, hidden] in the model's dtype."""
        features = self.vision_tower(pixel_values.to(self.dtype))
        return self.multi_modal_projector(features)

    def _decoder_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith(_VISION_PREFIXES)}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint names of either transformers layout (4: `language_model.model.*`,
        `language_model.lm_head`; 5: `model.language_model.*`, `lm_head`) → the decoder's, and the
        vision tower's and projector's into theirs."""
        vision: dict[str, torch.Tensor] = {}

        def decoder() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.removeprefix("model.")
                if name.startswith(_VISION_PREFIXES):
                    vision[name] = tensor
                    continue
                name = name.removeprefix("language_model.")
                yield name, tensor  # "model.layers..." / "layers..." / "lm_head.weight": llama.py's names

        super().load_weights(decoder())
        if self.vision_tower is not None:
            self._load_vision(vision)

    def _load_vision(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in self.named_parameters() if name.startswith(_VISION_PREFIXES)}
        loaded = set()
        for name, tensor in tensors.items():
            if name.startswith("vision_tower."):
                local = tower_name(name.removeprefix("vision_tower."))
                if local is None:
                    continue
                if local.startswith("layers.") and int(local.split(".")[1]) >= len(self.vision_tower.layers):
                    continue  # past the deepest feature layer: never run
                name = "vision_tower." + local
            copy_checked(params, name, tensor, name, self.config.architecture)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} vision tensors, e.g. {sorted(missing)[:4]}")
