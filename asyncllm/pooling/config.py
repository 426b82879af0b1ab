"""How hidden states become one vector per sequence: vLLM's `PoolerConfig`, and the
sentence-transformers folder layout that sets it for a model.

A sentence-transformers folder says it in `modules.json`: a Transformer module, then a
Pooling module (`1_Pooling/config.json`: CLS, mean or last token) and optionally Normalize;
`sentence_bert_config.json` gives the longest input it was trained on. Without such a folder
(a decoder, a plain HF encoder) the defaults are vLLM's: last token for decoders, CLS for
encoders, normalised.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from asyncllm.json_option import dict_option

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str = "LAST"  # LAST | MEAN | CLS
    normalize: bool = True  # L2-normalise the pooled vector (a request's `normalize` overrides it)

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")

    @property
    def needs_every_position(self) -> bool:
        """MEAN and CLS read positions a prefix-cache hit would skip; LAST only the last one."""
        return self.pooling_type != "LAST"


@dataclass(frozen=True)
class SentenceTransformersLayout:
    pooler: PoolerConfig
    max_seq_length: int | None


def read_sentence_transformers(path: str) -> SentenceTransformersLayout | None:
    """The pooling a sentence-transformers folder declares, or None for other folders."""
    modules_path = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_path):
        return None
    with open(modules_path) as f:
        modules = json.load(f)
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    unsupported = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unsupported:
        raise ValueError(f"{path}: sentence-transformers modules {sorted(unsupported)} are not supported "
                         "(Transformer, Pooling and Normalize are)")
    pooling_type = "CLS"
    if "Pooling" in kinds:
        with open(os.path.join(path, kinds["Pooling"].get("path", "1_Pooling"), "config.json")) as f:
            pooling = json.load(f)
        modes = [name for name, on in (("CLS", pooling.get("pooling_mode_cls_token")),
                                       ("MEAN", pooling.get("pooling_mode_mean_tokens")),
                                       ("LAST", pooling.get("pooling_mode_lasttoken"))) if on]
        others = [k for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                              "pooling_mode_weightedmean_tokens") if pooling.get(k)]
        if len(modes) != 1 or others:
            raise ValueError(f"{path}: the pooling {modes + others} is not supported (exactly one of CLS, mean, "
                             "last token)")
        pooling_type = modes[0]
    max_seq_length = None
    bert_config = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(bert_config):
        with open(bert_config) as f:
            max_seq_length = json.load(f).get("max_seq_length")
    return SentenceTransformersLayout(PoolerConfig(pooling_type, "Normalize" in kinds), max_seq_length)


def parse_pooler_config(value: dict | str | None) -> dict:
    """`pooler_config` as vLLM takes it: a dict or its JSON text (pooling_type, normalize)."""
    value = dict_option(value, "pooler_config") or {}
    unknown = set(value) - {"pooling_type", "normalize"}
    if unknown:
        raise ValueError(f"pooler_config: unknown keys {sorted(unknown)} (pooling_type, normalize)")
    if "pooling_type" in value:
        value = {**value, "pooling_type": str(value["pooling_type"]).upper()}
        PoolerConfig(value["pooling_type"])
    return value


def resolve_pooler(override: dict | str | None, layout: SentenceTransformersLayout | None,
                   encoder: bool) -> PoolerConfig:
    """The model's pooling: its folder's, else vLLM's default for its kind; `override` on top."""
    base = layout.pooler if layout is not None else PoolerConfig("CLS" if encoder else "LAST", True)
    fields = {"pooling_type": base.pooling_type, "normalize": base.normalize, **parse_pooler_config(override)}
    return PoolerConfig(fields["pooling_type"], bool(fields["normalize"]))
