"""Pre-quantised HF checkpoints (GPTQ, AWQ, compressed-tensors): packed int32 tensors read into exact groups.

A GPTQ, AWQ or compressed-tensors folder says so in config.json's `quantization_config`. Each quantised projection
`P` is stored as `P.qweight` (4- or 8-bit codes packed into int32), `P.qzeros` (the zero points,
packed alike), `P.scales` (fp16, one per group of `group_size` inputs and output) and, for GPTQ,
`P.g_idx` (each input's group: act-order checkpoints permute them). The weight they stand for is
w[o, i] = scale[g(i), o] * (q[i, o] - zero[g(i), o]).

The two formats (as AutoGPTQ / GPTQModel and AutoAWQ write them):
  GPTQ  qweight [in / p, out], p = 32 / bits codes per int32 along the *input*, code j at bits * j;
        qzeros [groups, out / p] along the output, stored as zero - 1 (checkpoint_format "gptq";
        "gptq_v2" stores zero itself); g_idx [in].
  AWQ   qweight [in, out / 8] along the *output*, the 8 codes of an int32 in the order
        0, 2, 4, 6, 1, 3, 5, 7; qzeros [groups, out / 8] alike; 4 bits only.
  compressed-tensors "pack-quantized" (llm-compressor's W4A16 / W8A16): weight_packed [out, in / p]
        along the input, each code stored as q + 2^(bits-1); weight_scale [out, groups];
        weight_zero_point [out / p, groups] along the output, offset alike (absent: symmetric,
        zero 0); weight_shape; weight_g_idx for act order.

Where the groups are whole runs of 32 inputs (group_size a multiple of 32 or the whole row, no
act-order permutation) the weight is handed to the model as `GroupedWeight`: codes, scale and
min (= -scale * zero, exact in fp32 since the scales are 16-bit) per 32 inputs, which the C
kernels' blocks hold as they are (layers/block_quant.py): the model runs from the checkpoint's
own codes, no dense copy kept. Other layouts (act order, groups of 16, asymmetric 8 bits) are
handed over dequantised: the same weights, in dense form. FP8 checkpoints (quant_method "fp8",
compressed-tensors "float-quantized") are read by checkpoint_fp8.py and load dequantised.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from asyncllm.model.checkpoint_fp8 import Fp8Layout, compressed_tensors_fp8_layout, fp8_weights, read_fp8_config
from asyncllm.model.layers.int4 import GROUP_SIZE, GroupQuantized

logger = logging.getLogger(__name__)

SUPPORTED_METHODS = ("gptq", "awq", "compressed-tensors", "fp8")
# each format's tensor names for: codes, zero points, scales, each input's group (and the shape)
_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales", "g_idx"),
          "compressed-tensors": ("weight_packed", "weight_zero_point", "weight_scale", "weight_g_idx")}
_ALL_PARTS = {part for parts in _PARTS.values() for part in parts} | {"weight_shape"}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column of the code at each nibble of an int32


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's quantization_config, validated."""
    method: str       # "gptq" | "awq" | "compressed-tensors" | "fp8"
    bits: int
    group_size: int   # inputs per group; -1: one group per row
    desc_act: bool    # act order: g_idx permutes the groups
    zero_offset: int  # added to the stored zero points (GPTQ v1 stores zero - 1)
    symmetric: bool = False  # compressed-tensors: no zero points stored (zero 0)
    fp8: Fp8Layout | None = None  # method "fp8": float8 weights, loaded dequantised (checkpoint_fp8.py)

    @property
    def packed(self) -> bool:
        """Integer codes packed in int32 (GPTQ, AWQ, compressed-tensors), which can become C blocks."""
        return self.method != "fp8"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return _PARTS[self.method]


def read_quantization_config(config: dict | None) -> CheckpointQuantization | None:
    """config.json's quantization_config → CheckpointQuantization (None: not quantised);
    a method or layout this engine does not run raises ValueError saying which."""
    if not config:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _read_compressed_tensors(config)
    if method == "fp8":
        if str(config.get("activation_scheme", "dynamic")).lower() == "static":
            logger.warning("fp8 static activation scales are not applied: activations run in the model's dtype "
                           "on the dequantised weights")
        return CheckpointQuantization("fp8", 8, -1, False, 0, fp8=read_fp8_config(config))
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported: this engine loads "
                         f"{', '.join(SUPPORTED_METHODS)} checkpoints (or quantises a dense one with "
                         "quantization='int4' / 'int8')")
    bits = int(config.get("bits", config.get("w_bit", 0)))
    group_size = int(config.get("group_size", config.get("q_group_size", -1)))
    if group_size == 0 or group_size < -1:
        raise ValueError(f"{method} group_size must be -1 or > 0, got {group_size}")
    if method == "gptq":
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with {bits} bits is not supported: 4 or 8")
        fmt = str(config.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported: gptq or gptq_v2")
        return CheckpointQuantization("gptq", bits, group_size, bool(config.get("desc_act", False)),
                                      1 if fmt == "gptq" else 0)
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported: gemm (AutoAWQ's default packing)")
    if bits != 4:
        raise ValueError(f"AWQ with {bits} bits is not supported: 4")
    if not config.get("zero_point", True):
        raise ValueError("AWQ without zero points is not supported")
    return CheckpointQuantization("awq", 4, group_size, False, 0)


def _read_compressed_tensors(config: dict) -> CheckpointQuantization:
    """compressed-tensors: one config group of int weights (4 or 8 bits, per group or per channel),
    activations left alone (W4A16 / W8A16), pack-quantized."""
    fmt = str(config.get("format", "")).lower()
    if fmt not in ("pack-quantized", "float-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported: pack-quantized (int4 / int8 "
                         "weights, 16-bit activations) or float-quantized (FP8 weights)")
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors with {len(groups)} config groups is not supported: one")
    scheme = groups[0]
    if fmt == "float-quantized":  # FP8 weights, loaded dequantised; activations run unquantised
        if scheme.get("input_activations"):
            logger.warning("compressed-tensors FP8 activation quantisation is not applied: activations run in "
                           "the model's dtype on the dequantised weights")
        return CheckpointQuantization("fp8", 8, -1, False, 0,
                                      fp8=compressed_tensors_fp8_layout(scheme.get("weights") or {}))
    if scheme.get("input_activations") or scheme.get("output_activations"):
        raise ValueError("compressed-tensors activation quantization (W8A8, FP8 activations) is not supported: "
                         "weight-only schemes (W4A16, W8A16)")
    weights = scheme.get("weights") or {}
    bits, kind, strategy = int(weights.get("num_bits", 0)), weights.get("type", "int"), weights.get("strategy")
    if kind != "int" or bits not in (4, 8):
        raise ValueError(f"compressed-tensors {kind} weights of {bits} bits are not supported: int, 4 or 8 bits")
    if strategy not in ("group", "channel"):
        raise ValueError(f"compressed-tensors strategy {strategy!r} is not supported: group or channel")
    group_size = int(weights.get("group_size") or -1) if strategy == "group" else -1
    actorder = weights.get("actorder") == "group"  # "weight" / "static" orders are folded into the weights
    return CheckpointQuantization("compressed-tensors", bits, group_size, actorder, 0,
                                  bool(weights.get("symmetric", True)))


@dataclass
class GroupedWeight:
    """A projection weight [out, in] as codes with a scale and a min per 32 inputs, standing for its
    dense tensor in the weight stream (shape, narrow and split as the loaders use them)."""
    groups: GroupQuantized

    @property
    def shape(self) -> torch.Size:
        return self.groups.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight, exactly what the blocks compute with."""
        return self.groups.rounded_once()

    def narrow(self, dim: int, start: int, length: int) -> "GroupedWeight | torch.Tensor":
        """Rows, or whole groups of columns, stay groups; a cut through a group is dense."""
        g = self.groups
        if dim == 0:
            return GroupedWeight(GroupQuantized(g.codes.narrow(0, start, length), g.scale.narrow(0, start, length),
                                                g.low.narrow(0, start, length), g.bits))
        if start % GROUP_SIZE or length % GROUP_SIZE:
            return self.dequantize().narrow(dim, start, length)
        first, count = start // GROUP_SIZE, length // GROUP_SIZE
        return GroupedWeight(GroupQuantized(g.codes.narrow(1, start, length), g.scale.narrow(1, first, count),
                                            g.low.narrow(1, first, count), g.bits))

    def split(self, sizes: Iterable[int]) -> list["GroupedWeight"]:
        """Along the rows (Phi-3's fused QKV and gate/up)."""
        parts, start = [], 0
        for size in sizes:
            parts.append(self.narrow(0, start, size))
            start += size
        return parts


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words → their codes (code j of a word at bits * j), spread along `dim` (0 or 1)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    if dim == 0:  # [r, c] → [r * 32 / bits, c]
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, words.shape[1])
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)


def _awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """AWQ's interleaved nibbles [r, out] → output order."""
    r, n = codes.shape
    order = torch.tensor(AWQ_ORDER)
    out = torch.empty_like(codes)
    out.view(r, n // 8, 8)[:, :, order] = codes.view(r, n // 8, 8)
    return out


def unpack_projection(name: str, parts: dict[str, torch.Tensor], quant: CheckpointQuantization
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One projection's packed tensors → codes [in, out], zeros [groups, out], scales [groups, out]
    (fp32) and each input's group [in] (int64)."""
    codes_name, zeros_name, scales_name, groups_name = quant.parts
    required = (codes_name, scales_name) + (() if quant.symmetric else (zeros_name,))
    for part in required:
        if part not in parts:
            raise ValueError(f"quantised projection {name!r} has no {part} tensor")
    if quant.method == "compressed-tensors":
        scales = parts[scales_name].float().T  # [groups, out]
        groups, out_features = scales.shape
        codes = _unpack(parts[codes_name], quant.bits, dim=1).T  # [in (padded), out]
        if "weight_shape" in parts:
            codes = codes[:int(parts["weight_shape"][1])]
        offset = 1 << (quant.bits - 1)  # codes and zero points are stored as q + offset
        zeros = (torch.full_like(scales, offset, dtype=torch.int64) if quant.symmetric
                 else _unpack(parts[zeros_name], quant.bits, dim=0)[:out_features].T)
    else:
        scales = parts[scales_name].float()
        groups, out_features = scales.shape
        if quant.method == "gptq":
            codes = _unpack(parts[codes_name], quant.bits, dim=0)
            zeros = _unpack(parts[zeros_name], quant.bits, dim=1)[:, :out_features] + quant.zero_offset
        else:
            codes = _awq_columns(_unpack(parts[codes_name], quant.bits, dim=1))
            zeros = _awq_columns(_unpack(parts[zeros_name], quant.bits, dim=1))
    in_features = codes.shape[0]
    if codes.shape[1] != out_features or zeros.shape != scales.shape:
        raise ValueError(f"quantised projection {name!r}: its codes, zero points and scales disagree "
                         f"({tuple(codes.shape)}, {tuple(zeros.shape)}, {tuple(scales.shape)})")
    size = in_features if quant.group_size == -1 else quant.group_size
    if groups_name in parts:
        group_of = parts[groups_name].to(torch.int64)
    else:
        group_of = torch.arange(in_features) // size
    if group_of.shape != (in_features,) or int(group_of.min()) < 0 or int(group_of.max()) >= groups:
        raise ValueError(f"quantised projection {name!r}: {groups_name} does not name a group per input "
                         f"({in_features} inputs, {groups} groups)")
    return codes, zeros, scales, group_of


def to_weight(name: str, parts: dict[str, torch.Tensor], quant: CheckpointQuantization
              ) -> GroupedWeight | torch.Tensor:
    """A projection's packed tensors → GroupedWeight where 32-input blocks hold it as it is, else
    the dense fp32 weight [out, in] (the same values)."""
    codes, zeros, scales, group_of = unpack_projection(name, parts, quant)
    in_features = codes.shape[0]
    block_group = group_of[::GROUP_SIZE] if in_features % GROUP_SIZE == 0 else None
    contiguous = block_group is not None and torch.equal(group_of, block_group.repeat_interleave(GROUP_SIZE))
    scale32 = scales[block_group].T.contiguous() if contiguous else None  # [out, in / 32]
    zero32 = zeros[block_group].T if contiguous else None
    if contiguous and quant.bits == 4:
        return GroupedWeight(GroupQuantized(codes.T.to(torch.int32).contiguous(), scale32,
                                            (-(scale32.double() * zero32)).float().contiguous(), 4))
    if contiguous and quant.bits == 8 and bool((zero32 == 128).all()):  # symmetric: Q8_0 blocks
        return GroupedWeight(GroupQuantized((codes.T - 128).to(torch.int32).contiguous(), scale32,
                                            torch.zeros_like(scale32), 8))
    dense = scales[group_of].double() * (codes - zeros[group_of]).double()  # [in, out]
    return dense.float().T.contiguous()


def grouped_weights(stream: Iterable[tuple[str, torch.Tensor]], quant: CheckpointQuantization
                    ) -> Iterator[tuple[str, GroupedWeight | torch.Tensor]]:
    """A checkpoint's tensors with every packed projection's parts replaced by one `P.weight`
    (GroupedWeight or dense); other tensors pass through. A projection is complete once its codes,
    scales and zero points are in (and its groups, for act order; its shape, for compressed-tensors)."""
    codes_name, zeros_name, scales_name, groups_name = quant.parts
    needed = {codes_name, scales_name} | (set() if quant.symmetric else {zeros_name})
    needed |= {groups_name} if quant.desc_act else set()
    needed |= {"weight_shape"} if quant.method == "compressed-tensors" else set()
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    for name, tensor in stream:
        prefix, _, part = name.rpartition(".")
        if part not in _ALL_PARTS:
            yield name, tensor
            continue
        if prefix in done:
            if part == groups_name and not torch.equal(tensor.to(torch.int64), _default_groups(tensor, quant)):
                raise ValueError(f"{name} permutes the groups but quantization_config has no act order")
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if needed <= parts.keys():
            done.add(prefix)
            yield f"{prefix}.weight", to_weight(prefix, pending.pop(prefix), quant)
    for prefix, parts in pending.items():
        yield f"{prefix}.weight", to_weight(prefix, parts, quant)


def _default_groups(g_idx: torch.Tensor, quant: CheckpointQuantization) -> torch.Tensor:
    size = g_idx.numel() if quant.group_size == -1 else quant.group_size
    return torch.arange(g_idx.numel()) // size


def checkpoint_weights(stream: Iterable[tuple[str, torch.Tensor]], quant: CheckpointQuantization
                       ) -> Iterator[tuple[str, GroupedWeight | torch.Tensor]]:
    """A quantised checkpoint's tensors as the model loads them (packed → groups, fp8 → dense)."""
    return grouped_weights(stream, quant) if quant.packed else fp8_weights(stream, quant.fp8)
