"""ImagePromptProcessor: a prompt's image placeholders and its images → expanded token ids and
the preprocessed images the workers embed (the engine front, in the caller's thread).

The model folder's own image processor (transformers' `AutoImageProcessor`, offline) resizes,
crops and normalises, as transformers' LlavaProcessor does; each image token of the prompt
then becomes `tokens_per_image` placeholder tokens, whose rows take the image's features.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from asyncllm.errors import InvalidRequestError
from asyncllm.json_option import dict_option
from asyncllm.multimodal.image_loading import load_image
from asyncllm.multimodal.inputs import ImageInput

DEFAULT_IMAGES_PER_PROMPT = 4


def parse_limit_mm_per_prompt(value: Any) -> int:
    """vLLM's `limit_mm_per_prompt` ({"image": N}, or its JSON text) → the most images per prompt."""
    limits = dict_option(value, "limit_mm_per_prompt")
    if limits is None:
        return DEFAULT_IMAGES_PER_PROMPT
    unknown = set(limits) - {"image"}
    if unknown:
        raise ValueError(f"limit_mm_per_prompt: only 'image' is supported, not {sorted(unknown)}")
    count = limits.get("image", DEFAULT_IMAGES_PER_PROMPT)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError("limit_mm_per_prompt['image'] must be an integer >= 0")
    return count


def image_sources(multi_modal_data: Any) -> list[Any]:
    """A prompt's `multi_modal_data` (vLLM's: {"image": one image or a list}) → the images."""
    if multi_modal_data is None:
        return []
    if not isinstance(multi_modal_data, dict) or set(multi_modal_data) - {"image"}:
        raise InvalidRequestError("multi_modal_data takes only {'image': an image or a list of images}",
                                  param="multi_modal_data")
    images = multi_modal_data.get("image", [])
    return list(images) if isinstance(images, (list, tuple)) else [images]


class ImagePromptProcessor:
    def __init__(self, path: str, image_token_id: int, tokens_per_image: int, image_size: int,
                 max_images: int = DEFAULT_IMAGES_PER_PROMPT):
        from transformers import AutoImageProcessor

        try:
            self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: no image processor config (processor_config.json or "
                             f"preprocessor_config.json) to prepare images with: {exc}") from None
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.image_size = image_size
        self.max_images = max_images

    def process(self, token_ids: list[int], sources: list[Any]) -> tuple[list[int], list[ImageInput]]:
        placeholders = token_ids.count(self.image_token_id)
        if placeholders != len(sources):
            raise InvalidRequestError(
                f"the prompt has {placeholders} image placeholder tokens but {len(sources)} images were given "
                "(one image token per image, where the chat template or the prompt puts it)", param="messages")
        if len(sources) > self.max_images:
            raise InvalidRequestError(f"at most {self.max_images} images per prompt (limit_mm_per_prompt), got "
                                      f"{len(sources)}", param="messages")
        if not sources:
            return token_ids, []
        images = [load_image(source, f"image {i}") for i, source in enumerate(sources)]
        pixels = np.ascontiguousarray(self.image_processor(images, return_tensors="np")["pixel_values"],
                                      dtype=np.float32)
        if pixels.shape[1:] != (pixels.shape[1], self.image_size, self.image_size):
            raise ValueError(f"the image processor made {pixels.shape[2:]} images; the vision tower takes "
                             f"{self.image_size}x{self.image_size}")
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        start = 0
        for image in pixels:
            at = token_ids.index(self.image_token_id, start)
            expanded += token_ids[start:at]
            data = image.tobytes()
            digest = hashlib.blake2b(data, digest_size=16)
            digest.update(repr(image.shape).encode())
            inputs.append(ImageInput(data, tuple(image.shape), digest.hexdigest(), len(expanded),
                                     self.tokens_per_image))
            expanded += [self.image_token_id] * self.tokens_per_image
            start = at + 1
        return expanded + token_ids[start:], inputs
