"""ctypes side of `decode_stack` (decode_stack_impl.h): the decoder's whole forward for a decode
step of 1-8 sequences in one C call. The structures mirror the C ones field for field; they
hold raw pointers, so `DecodeStackArgs` keeps the tensors they point into alive."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from asyncllm.kernels.cpu import BLOCK_BITS, PANEL_MIN_ROWS, _typed

LAYER_TENSORS = ("input_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "post_norm", "gate_up", "gate_up_bias",
                 "down", "down_bias")
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # each may have blocks ("<name>_quant": uint8) or "<name>_panels"


class DecodeLayer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in LAYER_TENSORS] + [
        (f"{name}_quant", ctypes.c_void_p) for name in PROJECTIONS] + [
        (f"{name}_panels", ctypes.c_void_p) for name in PROJECTIONS] + [
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
        ("lora_a", ctypes.c_void_p * len(PROJECTIONS)), ("lora_b", ctypes.c_void_p * len(PROJECTIONS))]


class DecodeStack(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "block_size", "window",
        "quant_bits", "panel_min_rows")] + [
        ("eps", ctypes.c_double), ("scale", ctypes.c_double), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p), ("layers", ctypes.POINTER(DecodeLayer)),
        ("lora_index", ctypes.c_void_p), ("lora_rank", ctypes.c_int64)]


@dataclass(frozen=True)
class DecodeShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float
    window: int  # 0: no sliding window
    quant_bits: int = 0  # bits of the projections' blocks (4, 8 or FP8_BITS; 0: none)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStackArgs:
    """The C structure for one model and KV cache, with the tensors it points into."""

    def __init__(self, shape: DecodeShape, layers: list[dict[str, torch.Tensor | None]], final_norm: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[torch.Tensor]):
        for tensor in (final_norm, cos, sin, *kv_caches):
            assert tensor.is_contiguous()
        self.dtype = final_norm.dtype
        self._keep = (layers, final_norm, cos, sin, kv_caches)
        self.kv_caches = kv_caches
        self._layers = (DecodeLayer * len(layers))()
        panels_of = torch.float32 if self.dtype == torch.float32 else torch.int32  # pack_panels' layouts
        for entry, tensors, cache in zip(self._layers, layers, kv_caches):
            for name in LAYER_TENSORS:
                tensor = tensors.get(name)
                assert tensor is None or (tensor.is_contiguous() and tensor.dtype == self.dtype), name
                setattr(entry, name, _ptr(tensor))
            for name in PROJECTIONS:
                blocks = tensors.get(f"{name}_quant")
                assert blocks is None or (blocks.is_contiguous() and blocks.dtype == torch.uint8
                                          and shape.quant_bits in BLOCK_BITS), name
                setattr(entry, f"{name}_quant", _ptr(blocks))
                panels = tensors.get(f"{name}_panels")
                assert panels is None or (panels.is_contiguous() and panels.dtype == panels_of), name
                setattr(entry, f"{name}_panels", _ptr(panels))
            entry.k_cache, entry.v_cache = cache[0].data_ptr(), cache[1].data_ptr()
        self.block_size = kv_caches[0].shape[2]
        self.struct = DecodeStack(
            num_layers=len(layers), hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
            head_dim=shape.head_dim, intermediate=shape.intermediate, block_size=self.block_size,
            window=shape.window, quant_bits=shape.quant_bits, panel_min_rows=PANEL_MIN_ROWS, eps=shape.eps,
            scale=shape.scale, cos=cos.data_ptr(), sin=sin.data_ptr(),
            final_norm=final_norm.data_ptr(), layers=self._layers)
        self.scratch_per_row = _typed("decode_stack_scratch", self.dtype)(ctypes.byref(self.struct))
        self._lora_keep: tuple = ()  # the adapter tensors and row index the structure points into
        self._lora_index: torch.Tensor | None = None

    def set_lora(self, layers: list[list[tuple[torch.Tensor, torch.Tensor] | None]], rank: int) -> None:
        """The step's adapters: per layer, per projection (PROJECTIONS order) the (a, b) of
        decode_stack_impl.h's layout in the stack's dtype, or None where no adapter targets it."""
        for entry, projections in zip(self._layers, layers):
            for i, pair in enumerate(projections):
                if pair is not None:
                    assert all(t.is_contiguous() and t.dtype == self.dtype for t in pair)
                entry.lora_a[i], entry.lora_b[i] = (None, None) if pair is None else (pair[0].data_ptr(),
                                                                                      pair[1].data_ptr())
        self.struct.lora_rank = rank
        self._lora_keep = (layers,)

    def set_lora_rows(self, index: torch.Tensor | None) -> None:
        """Each row's adapter (int64, -1: none) for the next run; None: no LoRA."""
        assert index is None or (index.dtype == torch.int64 and index.is_contiguous())
        self.struct.lora_index = None if index is None else index.data_ptr()
        self._lora_index = index

    def run(self, embeddings: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """embeddings [rows, hidden] (overwritten) → the final norm's output [rows, hidden]."""
        rows = embeddings.shape[0]
        assert embeddings.is_contiguous() and embeddings.dtype == self.dtype
        for index in (positions, slot_mapping, seq_lens):
            assert index.dtype == torch.int64 and index.is_contiguous() and index.shape[0] == rows
        assert block_tables.dtype == torch.int64 and block_tables.stride(1) == 1 and block_tables.shape[0] == rows
        scratch = torch.empty(rows * self.scratch_per_row, dtype=self.dtype)
        out = torch.empty_like(embeddings)
        _typed("decode_stack", self.dtype)(
            ctypes.byref(self.struct), embeddings.data_ptr(), rows, positions.data_ptr(), slot_mapping.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), scratch.data_ptr(),
            out.data_ptr(), torch.get_num_threads())
        return out
