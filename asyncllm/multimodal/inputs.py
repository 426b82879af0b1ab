"""Typed hand-offs of image input: a prompt's preprocessed images to the workers, and a step's
feature rows into the model's forward."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageInput:
    """One image of a prompt, preprocessed: what a worker needs to place its features.

    Plain data (it crosses to worker processes): the pixels as fp32 bytes in C order.
    """

    pixel_values: bytes
    shape: tuple[int, ...]  # (channels, height, width)
    hash: str  # of the pixels: in the prefix-cache key of every block its placeholders touch
    offset: int  # its first placeholder token in the prompt
    length: int  # placeholder tokens (= its feature rows)

    def pixels(self) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.pixel_values, dtype=np.float32).reshape(self.shape).copy())

    def overlaps(self, start: int, end: int) -> bool:
        return self.offset < end and start < self.offset + self.length


@dataclass
class ImageEmbeds:
    """A step's rows that take image features instead of their token's embedding."""

    rows: torch.Tensor  # [R] long: indices into the step's flat tokens
    values: torch.Tensor  # [R, hidden], the model's dtype
