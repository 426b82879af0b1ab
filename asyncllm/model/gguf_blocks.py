"""GGUF tensors whose quantisation the C kernels' blocks hold exactly, repacked from the file's bytes.

Under `quantization="int4"` / `"int8"` a projection stored in one of these types becomes blocks of
the file's own codes (the weights themselves, so the tokens are those of the dequantised model)
instead of a re-quantisation of its dequantised values (lossy whenever the requested rule would
round them differently, e.g. Q8_0's max / 127 scale over Q5_0's 5-bit values). Every 32 inputs:

  Q4_0 (fp16 d, 4-bit q):              w = d (q - 8)       → 4-bit: scale d, min -8 d
  Q4_1 (fp16 d, fp16 m, 4-bit q):       w = d q + m         → 4-bit: scale d, min m
  Q4_K (256 per super-block: fp16 d, dmin, 6-bit sc, m per 32; 4-bit q):
                                        w = (d sc) q - dmin m → 4-bit: scale d sc, min -dmin m
  Q5_0 (fp16 d, 5-bit q):              w = d (q - 16)      → 8-bit: scale d, codes q - 16
  Q8_0 (fp16 d, int8 q):               w = d q             → 8-bit: scale d, codes q

Each product (an fp16 times a small integer) is exact in fp32 and the one addition rounds once,
as the block kernels' fused multiply-add does, so the blocks give back the values gguf's own
dequantisation computes, bit for bit (tests/models/test_gguf_blocks.py checks every such tensor of
the real files). Q5_1, Q5_K, Q6_K and the others have no exact block form here: under
`quantization` they are re-quantised from their values, as before.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from asyncllm.model.layers.int4 import GROUP_SIZE, GroupQuantized

# GGML type → the bits of the blocks that hold it exactly
EXACT_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q5_0: 8, Q.Q8_0: 8}


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def gguf_groups(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> GroupQuantized | None:
    """A 2-D tensor's bytes [rows, row bytes] in `qtype` → its exact groups (None: not such a type)."""
    if qtype not in EXACT_BITS or len(shape) != 2:
        return None
    out_f, in_f = shape
    block_size, type_size = quants.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)  # every block of the tensor, row by row
    if qtype == Q.Q4_K:
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:16])  # [blocks, 8] each
        scale = (d * sc.astype(np.float32)).reshape(-1)
        low = -(dmin * m.astype(np.float32)).reshape(-1)
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 runs of 32 bytes: low nibbles one sub-block, high the next
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, GROUP_SIZE)
        bits = 4
    else:
        d = _f16(blocks[:, 0:2])
        if qtype == Q.Q4_0:
            qs = blocks[:, 2:18]
            codes, scale, low = np.concatenate([qs & 0x0F, qs >> 4], axis=1), d[:, 0], -8 * d[:, 0]
        elif qtype == Q.Q4_1:
            qs = blocks[:, 4:20]
            codes, scale, low = np.concatenate([qs & 0x0F, qs >> 4], axis=1), d[:, 0], _f16(blocks[:, 2:4])[:, 0]
        elif qtype == Q.Q5_0:
            qh = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32)
            high = (qh >> np.arange(32, dtype=np.uint32)) & 1
            qs = blocks[:, 6:22]
            codes = (np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (high.astype(np.uint8) << 4)).astype(np.int32) - 16
            scale, low = d[:, 0], np.zeros_like(d[:, 0])
        else:  # Q8_0
            codes, scale, low = blocks[:, 2:34].view(np.int8), d[:, 0], np.zeros_like(d[:, 0])
        bits = EXACT_BITS[qtype]
    groups = in_f // GROUP_SIZE
    # One byte per code (not GroupQuantized's usual int32): a Q8_0 embedding's codes are then 28 MB,
    # not 113, while the load turns them into blocks.
    code_type = np.uint8 if bits == 4 else np.int8
    return GroupQuantized(torch.from_numpy(np.ascontiguousarray(codes, dtype=code_type)).reshape(out_f, in_f),
                          torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(out_f, groups),
                          torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32)).reshape(out_f, groups), bits)


def permute_rows(groups: GroupQuantized, order: torch.Tensor) -> GroupQuantized:
    """The same groups with their rows in `order` (llama.cpp's Q/K row interleaving undone)."""
    return GroupQuantized(groups.codes[order], groups.scale[order], groups.low[order], groups.bits)
