"""FP8 checkpoints: each projection's weight stored as float8_e4m3fn with its scales, loaded dequantised.

  quant_method "fp8" (vLLM's and transformers' FineGrainedFP8):
    weight_block_size [bo, bi]   `P.weight_scale_inv` [ceil(out / bo), ceil(in / bi)]: w = q * s per block
                                 (DeepSeek-V3 / Qwen3-FP8 style)
    no block size                `P.weight_scale`: one scale, or one per output row
  compressed-tensors "float-quantized" (llm-compressor's FP8, FP8_DYNAMIC, FP8_BLOCK): `P.weight_scale`
    per tensor, per output row, or per block (block_structure)

The CPU has no fp8 matmul. A decoder projection whose scales fall on whole groups of 32 inputs
(per tensor, per row, or blocks of a multiple of 32 inputs) comes out as a GroupedWeight of e4m3
codes with a scale per group: on the C kernels those codes become the projection's e4m3 blocks
(layers/block_quant.py, read by the block kernels, no dense copy kept in fp32), on the Triton
kernels blocks read by block_linear, elsewhere (kernels="torch") it is dequantised. Other
weights are widened once at load to the model's dtype (exact in fp32: e4m3 has 4 significant
bits, the scales are fp32 or 16-bit) and run dense.
Activations are not quantised (`activation_scheme` dynamic or static, and any `P.input_scale`,
are read past): the arithmetic is the dense model's on the checkpoint's weights, as
transformers computes them dequantised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from asyncllm.model.interface import is_decoder_projection
from asyncllm.model.layers.int4 import FP8_BITS, GROUP_SIZE, GroupQuantized, int4_shape_supported

FP8_DTYPES = (torch.float8_e4m3fn,)


@dataclass(frozen=True)
class Fp8Layout:
    block_size: tuple[int, int] | None  # weight_block_size; None: per tensor or per output row
    scale_name: str = "weight_scale"  # the scales' tensor (quant_method fp8 with blocks: weight_scale_inv)


def read_fp8_config(config: dict) -> Fp8Layout:
    fmt = str(config.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise ValueError(f"fp8 fmt {fmt!r} is not supported: e4m3")
    block = config.get("weight_block_size")
    return Fp8Layout(None) if block is None else Fp8Layout(_block(block), "weight_scale_inv")


def _block(block) -> tuple[int, int]:
    if len(block) != 2 or min(int(b) for b in block) < 1:
        raise ValueError(f"fp8 block size must be two positive sizes, got {block!r}")
    return int(block[0]), int(block[1])


def compressed_tensors_fp8_layout(weights: dict) -> Fp8Layout:
    """compressed-tensors float-quantized weights: 8-bit float, per tensor / channel / block."""
    strategy = weights.get("strategy")
    if int(weights.get("num_bits", 0)) != 8 or strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors float weights of {weights.get('num_bits')} bits, strategy "
                         f"{strategy!r}, are not supported: 8 bits per tensor, channel or block")
    return Fp8Layout(_block(weights.get("block_structure") or ()) if strategy == "block" else None)


def _check_scales(name: str, weight: torch.Tensor, scale: torch.Tensor, layout: Fp8Layout) -> None:
    """The scales' count / shape against the weight's, refused with why."""
    out_f, in_f = weight.shape
    if layout.block_size is None:
        if scale.numel() not in (1, out_f):
            raise ValueError(f"{name}: weight_scale has {scale.numel()} values for {out_f} rows: one or one per row")
        return
    bo, bi = layout.block_size
    want = (-(-out_f // bo), -(-in_f // bi))
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}: its scales have shape {tuple(scale.shape)}, expected {want} for a "
                         f"{out_f}x{in_f} weight in {bo}x{bi} blocks")


def dequantize_fp8(name: str, weight: torch.Tensor, scale: torch.Tensor, layout: Fp8Layout) -> torch.Tensor:
    """float8 [out, in] and its scales → the fp32 weight."""
    _check_scales(name, weight, scale, layout)
    out_f, in_f = weight.shape
    values, scale = weight.float(), scale.float()
    if layout.block_size is None:
        return values * scale.reshape(-1, 1)
    bo, bi = layout.block_size
    per_element = scale.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return values * per_element


def _per_group_scales(weight: torch.Tensor, scale: torch.Tensor, layout: Fp8Layout) -> torch.Tensor | None:
    """The checkpoint's scales as one per row and group of 32 inputs [out, in / 32], where they fall on
    such groups (None where a block boundary cuts a group, or the shape is not the kernels')."""
    out_f, in_f = weight.shape
    if not int4_shape_supported(out_f, in_f):
        return None
    groups = in_f // GROUP_SIZE
    scale = scale.float()
    if layout.block_size is None:
        return scale.reshape(-1, 1).expand(out_f, groups).contiguous()
    bo, bi = layout.block_size
    if bi % GROUP_SIZE:
        return None
    return scale.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi // GROUP_SIZE, 1)[:, :groups].contiguous()


def _as_groups(name: str, weight: torch.Tensor, scale: torch.Tensor, layout: Fp8Layout):
    """A projection's float8 weight as e4m3 groups (a GroupedWeight the decoder keeps as blocks), else
    its dequantised tensor."""
    from asyncllm.model.checkpoint_quant import GroupedWeight

    _check_scales(name, weight, scale, layout)
    per_group = _per_group_scales(weight, scale, layout) if is_decoder_projection(name) else None
    if per_group is None:
        return dequantize_fp8(name, weight, scale, layout)
    codes = weight.view(torch.uint8).to(torch.int32)
    return GroupedWeight(GroupQuantized(codes, per_group, torch.zeros_like(per_group), bits=FP8_BITS))


def fp8_weights(stream: Iterable[tuple[str, torch.Tensor]], layout: Fp8Layout
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with every float8 weight dequantised by its scale (held until both
    are in); scales and input scales are not passed on."""
    scale_part = layout.scale_name
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in stream:
        prefix, _, part = name.rpartition(".")
        if part == "input_scale" or (part in ("weight_scale", "weight_scale_inv") and part != scale_part):
            continue
        if part == scale_part:
            scales[prefix] = tensor
        elif part == "weight" and tensor.dtype in FP8_DTYPES:
            weights[prefix] = tensor
        else:
            yield name, tensor
            continue
        if prefix in weights and prefix in scales:
            yield f"{prefix}.weight", _as_groups(f"{prefix}.weight", weights.pop(prefix), scales.pop(prefix), layout)
    if weights or scales:
        prefix = next(iter(weights or scales))
        missing = scale_part if prefix in weights else "float8 weight"
        raise ValueError(f"fp8 checkpoint: {prefix!r} has no {missing}")
