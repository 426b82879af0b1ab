"""Dict-valued engine options (speculative_config, pooler_config): a dict, or its JSON text as
the CLI passes it."""
from __future__ import annotations

import json
from typing import Any


def dict_option(value: Any, name: str) -> dict | None:
    """→ the dict (None stays None); ValueError naming the option otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (or its JSON text)")
    return value
