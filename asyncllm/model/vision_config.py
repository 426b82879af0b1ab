"""VisionConfig: what a LLaVA-style model's vision tower and projector need, from its HF config.

A `LlavaForConditionalGeneration` is a Llama-family decoder (its `text_config`) whose prompt
holds placeholder tokens that take the rows of an image's features: the vision tower's hidden
states at `feature_layers` (CLIP: the CLS row dropped under the "default" strategy), through
a two-layer projector into the decoder's hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The decoders a LLaVA checkpoint's text_config may name, by model_type.
TEXT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass(frozen=True)
class VisionConfig:
    tower: str  # "clip_vision_model" (a CLS token, a pre-norm) or "siglip_vision_model" (neither; a conv bias)
    hidden_size: int
    intermediate_size: int
    num_layers: int  # of the tower's checkpoint; only those up to the deepest feature layer run
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]  # indices into the tower's hidden states (0: the embeddings), concatenated
    select_strategy: str  # "default": CLIP's CLS row dropped; "full": every row kept
    projector_act: str
    projector_bias: bool
    image_token_id: int

    @property
    def has_class_token(self) -> bool:
        return self.tower == "clip_vision_model"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens (= feature rows) of one image."""
        keeps_class = self.has_class_token and self.select_strategy == "full"
        return self.num_patches + (1 if keeps_class else 0)

    @property
    def layers_to_run(self) -> int:
        """Tower layers up to the deepest feature layer (hidden state k is after k layers)."""
        return max(self.feature_layers)

    @classmethod
    def from_hf(cls, config: Any) -> "VisionConfig":
        vision = config.vision_config
        tower = getattr(vision, "model_type", None)
        if tower not in VISION_TOWERS:
            raise ValueError(f"LLaVA with a {tower!r} vision tower is not supported (CLIP or SigLIP)")
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported (default or full)")
        layer = getattr(config, "vision_feature_layer", -2)
        layers = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
        count = vision.num_hidden_layers + 1  # hidden states: the embeddings, then each layer's output
        resolved = tuple(k % count for k in layers if -count <= k < count)
        if len(resolved) != len(layers):
            raise ValueError(f"vision_feature_layer={layer!r} is outside the tower's {count} hidden states")
        for name, act in (("vision_config.hidden_act", vision.hidden_act),
                          ("projector_hidden_act", getattr(config, "projector_hidden_act", "gelu"))):
            if act not in ACTIVATIONS:
                raise ValueError(f"LLaVA with {name}={act!r} is not supported ({', '.join(ACTIVATIONS)})")
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:  # transformers 4's name
            image_token_id = config.image_token_index
        return cls(
            tower=tower,
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_channels=getattr(vision, "num_channels", 3),
            layer_norm_eps=vision.layer_norm_eps,
            hidden_act=vision.hidden_act,
            feature_layers=resolved,
            select_strategy=strategy,
            projector_act=getattr(config, "projector_hidden_act", "gelu"),
            projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
            image_token_id=int(image_token_id),
        )


def text_architecture(config: Any) -> str:
    """The decoder architecture of a LLaVA config's text_config."""
    model_type = getattr(config.text_config, "model_type", None)
    if model_type not in TEXT_ARCHITECTURES:
        raise ValueError(f"LLaVA with a {model_type!r} language model is not supported "
                         f"({', '.join(TEXT_ARCHITECTURES)})")
    return TEXT_ARCHITECTURES[model_type]
