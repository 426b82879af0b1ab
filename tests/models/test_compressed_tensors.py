"""compressed-tensors checkpoints, "pack-quantized" (llm-compressor's W4A16 / W8A16) and
"float-quantized" (FP8, FP8_DYNAMIC, FP8_BLOCK): a tiny random model compressed by the
compressed-tensors library itself (its qparams, its quantize and its packer: the format's
reference implementation), loaded by asyncllm and compared with transformers running the
library's own dequantisation of them."""
import json

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams

from asyncllm import LLM
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.block_quant import BlockQuantWeight
from quant_packers import check_checkpoint, write_quantized


def compress(weight: torch.Tensor, args: QuantizationArgs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One projection by the library: scale and zero point per group (fp16 scales, as a 16-bit
    model stores them), packed → (its tensors, the library's dequantisation of them in fp32)."""
    out_f, in_f = weight.shape
    size = in_f if args.strategy == "channel" else args.group_size
    groups = weight.reshape(out_f, in_f // size, size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scale = scale.to(torch.float16)
    zero_point = zero_point.to(torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": weight.to(torch.float16), "weight_scale": scale, "weight_zero_point": zero_point}
    packed = PackedQuantizationCompressor.compress(state, scheme)
    # Dequantised in fp32 (the library computes in its scales' dtype: fp16 would round 8-bit products).
    dense = PackedQuantizationCompressor.decompress({**packed, "weight_scale": scale.float()}, scheme)["weight"]
    return dict(packed), dense.float()


def compress_fp8(weight: torch.Tensor, scheme: QuantizationScheme) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One projection as float8 by the library (per channel or per block) → (its tensors, the
    library's fp32 dequantisation of them)."""
    args = scheme.weights
    out_f, in_f = weight.shape
    if args.strategy == "block":
        bo, bi = args.block_structure
        blocks = weight.reshape(out_f // bo, bo, in_f // bi, bi)
        low, high = blocks.amin((1, 3)), blocks.amax((1, 3))
    else:
        low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    scale, _ = calculate_qparams(low, high, args)
    packed = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale.float()}, scheme)
    dense = FloatQuantizationCompressor.decompress(dict(packed), scheme)["weight"]
    return dict(packed), dense.float()


def write_compressed(dense_dir: str, path, args: QuantizationArgs, scheme: QuantizationScheme | None = None,
                     fmt: str = "pack-quantized") -> dict[str, torch.Tensor]:
    """A copy of `dense_dir` with every projection compressed (by `scheme`, FP8, when given; else
    packed by `args`), config.json's quantization_config the library's own → the dequantised
    weights by name."""
    config = QuantizationConfig(config_groups={"group_0": scheme or QuantizationScheme(targets=["Linear"],
                                                                                        weights=args)},
                                format=fmt, quantization_status="compressed", ignore=["lm_head"])
    return write_quantized(dense_dir, path, config.model_dump(mode="json"),
                           lambda name, w: compress(w, args) if scheme is None else compress_fp8(w, scheme))


@pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels do not build here")
@pytest.mark.parametrize("bits, symmetric, strategy, group_size", [
    (4, True, "group", 32),
    (4, False, "group", 64),
    (8, True, "channel", None),
])
def test_pack_quantized_checkpoint_matches_transformers_on_its_dequantised_weights(tiny_models, tmp_path, bits,
                                                                                   symmetric, strategy, group_size):
    dense = tiny_models("LlamaForCausalLM")
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    weights = write_compressed(dense, tmp_path / "ct", args)

    def runs_from_the_checkpoints_codes(llm):
        assert all(p.dense_dropped and isinstance(p.quantized, BlockQuantWeight) and p.quantized.bits == bits
                   for p in llm.engine.core.executor.worker.runner.model.projections())

    check_checkpoint(tmp_path / "ct", dense, weights, check=runs_from_the_checkpoints_codes)


@pytest.mark.parametrize("preset, block", [("FP8_DYNAMIC", None), ("FP8_BLOCK", [32, 32])])
def test_fp8_checkpoint_loads_dequantised_and_matches_transformers(tiny_models, tmp_path, preset, block):
    """FP8 weights (per channel; per 32 x 32 block) with dynamic FP8 activations in the scheme: the
    weights load dequantised, the activations run unquantised (a warning says so)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    if block:
        scheme.weights.block_structure = block
    dense = tiny_models("LlamaForCausalLM")
    weights = write_compressed(dense, tmp_path / "ct", scheme.weights, scheme, fmt="float-quantized")
    check_checkpoint(tmp_path / "ct", dense, weights, dtype="float32")


@pytest.mark.parametrize("change, message", [
    (lambda q: q.update(format="marlin-24"), "format 'marlin-24' is not supported"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int"}),
     "activation quantization"),
])
def test_unsupported_compressed_tensors_schemes_are_refused(tiny_models, tmp_path, change, message):
    dense = tiny_models("LlamaForCausalLM")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    write_compressed(dense, tmp_path / "ct", args)
    with open(tmp_path / "ct" / "config.json") as f:
        config = json.load(f)
    change(config["quantization_config"])
    with open(tmp_path / "ct" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path / "ct"), kv_cache_memory=16 << 20)
