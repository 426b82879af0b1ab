"""One Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat varlen batch.

forward() takes the tokens of many requests in one run ([T] ids and positions) plus the
attention metadata, so prompt chunks and decodes of different requests share one
forward. Q/K/V and gate/up projections are fused at load time (one matmul each).
The op order follows transformers' modeling_llama so fp32 results match it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.model.arch_config import LlamaFamilyConfig
from asyncllm.model.checkpoint_quant import GroupedWeight
from asyncllm.model.cpu_decode import CpuDecodeStack
from asyncllm.model.interface import ModelContext
from asyncllm.model.layers import block_quant
from asyncllm.model.layers.attention import AttentionBackend, AttentionMetadata
from asyncllm.model.layers.block_quant import BlockQuantWeight
from asyncllm.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from asyncllm.model.layers.int4 import int4_shape_supported
from asyncllm.model.layers.linear import ColumnParallelLinear, Linear, PackedLinear, RowParallelLinear
from asyncllm.model.layers.norm import RMSNorm
from asyncllm.model.layers.rotary import RotaryEmbedding
from asyncllm.multimodal.inputs import ImageEmbeds


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaFamilyConfig, rotary: RotaryEmbedding, ctx: ModelContext,
                 sliding_window: int | None = None):
        super().__init__()
        ops, parallel = ctx.ops, ctx.parallel
        # This rank's heads (column-parallel QKV, row-parallel output).
        self.num_heads = parallel.local_size(cfg.num_heads, "number of heads")
        self.num_kv_heads = parallel.local_kv_heads(cfg.num_kv_heads)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                                             cfg.attention_bias, ops, parallel, self.q_size + 2 * self.kv_size)
        self.qkv_proj.part_sizes = (self.q_size, self.kv_size, self.kv_size)  # this rank's q, k, v rows
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, False, ops, parallel)
        # Per head, over [tokens * heads, head_dim] rows; on the C kernel as the other norms
        # (what the whole-stack decode call computes too: cpu_decode.py).
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops.for_head_norms()) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops.for_head_norms()) if cfg.qk_norm else None
        self.rotary = rotary
        scale = cfg.attention_scale if cfg.attention_scale is not None else self.head_dim ** -0.5
        self.backend: AttentionBackend = ops.attention_backend()(
            self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window, cfg.attention_softcapping)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaFamilyConfig, ctx: ModelContext, intermediate_size: int | None = None):
        """intermediate_size: the config's unless given (an MoE expert's or shared expert's)."""
        super().__init__()
        ops, parallel = ctx.ops, ctx.parallel
        intermediate = intermediate_size or cfg.intermediate_size
        self.intermediate_size = parallel.local_size(intermediate, "intermediate size")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * intermediate, cfg.mlp_bias, ops, parallel)
        self.gate_up_proj.part_sizes = (self.intermediate_size, self.intermediate_size)
        self.down_proj = RowParallelLinear(intermediate, cfg.hidden_size, cfg.mlp_bias, ops, parallel)
        self.ops = ops
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"  # Gemma; else SiLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        if self.ops.c_kernels:
            fused = self.gate_up_proj.silu_and_mul(x)  # prompt chunks: one pass over the panels
            if fused is not None:
                return self.down_proj(fused)
        gate_up = self.gate_up_proj(x)
        activated = self.ops.silu_and_mul(gate_up)
        if activated is not None:
            return self.down_proj(activated)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaFamilyConfig, rotary: RotaryEmbedding, ctx: ModelContext, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops)
        self.self_attn = LlamaAttention(cfg, rotary, ctx, cfg.layer_sliding_window(index))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops)
        if cfg.moe is not None and cfg.moe.sparse_layers[index]:
            from asyncllm.model.layers.moe import SparseMoeBlock

            self.mlp = SparseMoeBlock(cfg, ctx)
        else:
            self.mlp = LlamaMLP(cfg, ctx)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous sub-layer's output, residual: the stream it adds to (None at layer 0).
        Each norm adds first, then normalises (one fused kernel on the Triton path)."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, positions, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class MissingLayer(nn.Module):
    """Where another pipeline stage holds the layer: no weights, never called."""


class LlamaFamilyForCausalLM(nn.Module):
    # transformers names of the projections we fuse: fused name → [(part name, index)]
    _FUSED = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    pooler = None  # a decoder: no pooling (embedding models set one)

    def __init__(self, cfg: LlamaFamilyConfig, ctx: ModelContext = ModelContext()):
        super().__init__()
        self.config = cfg
        self.ctx = ctx
        ops, parallel = ctx.ops, ctx.parallel
        # One cos/sin table shared by every layer.
        rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, ops)
        self.rotary = rotary
        # A pipeline stage holds its layers only (the others are empty placeholders, so names keep
        # their indices); the embedding where tokens enter (and the last stage, whose logits read a
        # tied one), the norm and the logits projection where they leave.
        pipeline = ctx.pipeline
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
                             if pipeline.is_first or (pipeline.is_last and cfg.tie_word_embeddings) else None)
        self.layers = nn.ModuleList(self._make_layer(cfg, i) if pipeline.owns(i) else MissingLayer()
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops) if pipeline.is_last else None
        self.lm_head = (ParallelLMHead(cfg.hidden_size, cfg.vocab_size, parallel)
                        if pipeline.is_last and not cfg.tie_word_embeddings else None)
        self.logits_linear = PackedLinear(ops)
        # quantization with the C kernels: an 8-bit copy of the logits weight for decode steps of
        # up to logits_quant_max_rows rows (quantize).
        self.logits_quant: BlockQuantWeight | None = None
        self.logits_quant_max_rows = 0
        # Decode steps of a few sequences in one C call (cpu_decode.py); built by the first
        # forward, once load-time changes (4-bit copies) are done.
        self.decode_stack: CpuDecodeStack | None = None
        # The C decoder's layers are dense and whole (no all-reduce inside its one call).
        self.use_decode_stack = ops.c_kernels and cfg.moe is None and parallel.is_single and pipeline.is_single
        self.lora_batch = None  # the step's adapters once the worker enables LoRA (asyncllm/lora/layers.py)

    def _make_layer(self, cfg: LlamaFamilyConfig, index: int) -> nn.Module:
        return LlamaDecoderLayer(cfg, self.rotary, self.ctx, index)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, image_embeds: ImageEmbeds | None = None) -> torch.Tensor | None:
        """→ final hidden states [T, hidden] (None on a pipeline stage before the last: it sends its
        layers' output on). `kv_caches` are this stage's layers'. `image_embeds`: rows whose input is
        an image's features rather than their (placeholder) token's embedding (LLaVA)."""
        # The one-call decoder adds the step's LoRA products too (decode_stack_impl.h, lora_for).
        if self.use_decode_stack and image_embeds is None:
            if self.decode_stack is None:
                self.decode_stack = CpuDecodeStack(self)
            if self.decode_stack.takes(input_ids.shape[0], meta, kv_caches):
                return self.decode_stack.forward(input_ids, positions, kv_caches, meta)
        pipeline = self.ctx.pipeline
        if pipeline.is_first:
            h, residual = self.embed_tokens(input_ids), None
            if self.config.embedding_multiplier is not None:  # Gemma: rounded to the weights' dtype, as transformers
                h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype)
            if image_embeds is not None:
                h[image_embeds.rows] = image_embeds.values
        else:
            h, residual = pipeline.recv(input_ids.shape[0], self.config.hidden_size, self.dtype, input_ids.device)
        layers = self.layers if pipeline.is_single else self.layers[pipeline.first_layer:pipeline.end_layer]
        for layer, kv_cache in zip(layers, kv_caches):
            h, residual = layer(h, residual, positions, kv_cache, meta)
        if not pipeline.is_last:
            pipeline.send(h, residual)  # a stage holds at least one layer: residual is set
            return None
        return self.norm(h, residual)[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def logits_only_blocks(self) -> bool:
        """quantized_weights_only freed the dense logits weight: logits_quant serves every step."""
        return self.logits_quant is not None and self.logits_weight.numel() == 0 and not self.logits_linear.is_packed

    @property
    def logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits_quant is not None and hidden.shape[0] <= self.logits_quant_max_rows:
            logits = self.logits_quant.linear(hidden).float()
        elif self.logits_only_blocks:  # more rows (prompt logprobs, many samplers): the panel GEMM on its blocks
            logits = self.logits_quant.linear_many_rows(hidden).float()
        else:
            logits = self.logits_linear.linear(hidden, self.logits_weight).float()
        logits = self.ctx.parallel.all_gather_last(logits)  # every rank gets the whole vocabulary's logits
        cap = self.config.final_logit_softcapping
        if cap is not None:  # as transformers: divide, tanh, multiply
            logits = torch.tanh(logits / cap) * cap
        return logits

    def lora_parts(self) -> dict[str, list[tuple[str, int, int]]]:
        """Projections adapters may target: module name → its parts as (PEFT module name, first
        and last + 1 output column); a fused QKV / gate-up has one part per original projection."""
        offsets = self._fused_offsets()
        parts: dict[str, list[tuple[str, int, int]]] = {}
        for name, module in self.named_modules():
            if not isinstance(module, Linear):
                continue
            parent, _, leaf = name.rpartition(".")
            if leaf in self._FUSED:
                parts[name] = [(f"{parent}.{part}", *offsets[(f"{name}.weight", part)]) for part in self._FUSED[leaf]]
            else:
                parts[name] = [(name, 0, module.out_features)]
        return parts

    def projections(self) -> list[Linear]:
        return [module for module in self.modules() if isinstance(module, Linear)]

    def prepack_weights(self) -> None:
        """Packed copies of every projection and of the logits weight (see layers/linear.py)."""
        for projection in self.projections():
            projection.pack()
        if self.ctx.pipeline.is_last and not self.logits_only_blocks:  # the stage that computes logits
            self.logits_linear.pack(self.logits_weight)
            if self.logits_linear.serves_every_step:
                self._logits_weight_in_panels()

    def _logits_weight_in_panels(self) -> None:
        """The logits' panel copy serves every step, so the plain logits weight is freed: an untied
        lm_head's, or a tied embedding's, whose lookups then read their rows from those panels (one
        rank and stage: the embedding is not split there)."""
        if self.lm_head is not None:
            self.lm_head.free_weight()
        elif self.ctx.parallel.is_single and self.ctx.pipeline.is_single and self.embed_tokens.blocks is None:
            self.embed_tokens.read_rows_from_panels(self.logits_linear.panels)

    def quantize(self, bits: int, int4_rows: int) -> tuple[int, int]:
        """`bits`-bit copies of the projections whose shape the layouts take (whole groups of 32
        inputs, 16-row tiles; layers/linear.py: C blocks where they serve, else torch's int4 layout
        for steps of at most `int4_rows` rows). Where the projections get C blocks, the logits
        weight gets an 8-bit copy too (Q8_0, as llama.cpp's 4-bit files keep the output weight;
        block_quant.logits_block_rows). → (projections quantised, projections left dense)."""
        projections = self.projections()
        fitting = [p for p in projections if int4_shape_supported(p.out_features, p.in_features)]
        for projection in fitting:
            projection.quantize(bits, int4_rows)
        if not self.ctx.pipeline.is_last or self.logits_only_blocks:  # no logits here, or the file's blocks already
            return len(fitting), len(projections) - len(fitting)
        logits = self.logits_weight
        rows = block_quant.logits_block_rows(logits, self.ctx.ops, bits)
        if rows:
            self.logits_quant = BlockQuantWeight.quantize(logits, bits=8)
            self.logits_quant_max_rows = rows
        return len(fitting), len(projections) - len(fitting)

    def checkpoint_block_counts(self) -> tuple[int, int]:
        """After loading a checkpoint whose projections came as exact groups (a GGUF under
        quantization, GPTQ / AWQ / compressed-tensors / FP8) → (projections on its codes, projections dense)."""
        projections = self.projections()
        on_blocks = sum(p.on_checkpoint_blocks for p in projections)
        return on_blocks, len(projections) - on_blocks

    def drop_dense_projections(self) -> int:
        """After quantize(): every projection keeps only its C blocks (Linear.drop_dense), and the
        embedding / logits weight its Q8_0 blocks (_keep_only_embedding_blocks). → bytes freed."""
        projections = self.projections()
        missing = [p for p in projections if not p.can_drop_dense]
        if missing:  # checked for all first: no model left half dropped
            raise ValueError(f"quantized_weights_only needs C blocks for every projection (an fp32 model on the C "
                             f"kernels, whole groups of 32 inputs and 16-row tiles); {len(missing)} of "
                             f"{len(projections)} have none")
        return sum(p.drop_dense() for p in projections) + self._keep_only_embedding_blocks()

    def _keep_only_embedding_blocks(self) -> int:
        """With the projections, where the blocks hold these weights exactly (a Q8_0 embedding and
        output weight, as llama.cpp's 4-bit files store them): the embedding and the logits weight
        as Q8_0 blocks only (tied, the logits' 8-bit copy serves both; untied, the embedding gets its
        own), their dense weights and the packed logits copy freed, so the weights' memory is about
        the file's. Other weights stay dense (lookups would otherwise change). → bytes freed."""
        if self.logits_quant is None or self.embed_tokens is None or not self.logits_quant.exact:
            return 0
        embedding = self.logits_quant
        if self.lm_head is not None:
            embedding = BlockQuantWeight.quantize(self.embed_tokens.weight, bits=8)
            if not embedding.exact:
                return 0
        packed = [t for t in (self.logits_linear.packed, self.logits_linear.panels) if t is not None]
        freed = sum(t.numel() * t.element_size() for t in packed)
        self.logits_linear = PackedLinear(self.ctx.ops)
        freed += self.embed_tokens.keep_only_blocks(embedding)
        if self.lm_head is not None:
            freed += self.lm_head.free_weight()
        return freed

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies transformers-named tensors in, fusing q/k/v and gate/up; checks nothing is missing."""
        params = self._decoder_parameters()
        shard_dims = self._shard_dims()
        part_offsets = self._fused_offsets()
        loaded: set[str] = set()
        for name, tensor in self._split_fused_checkpoint_tensors(weights):
            name = name.removeprefix("model.")
            if not self._on_this_stage(name):
                continue  # another pipeline stage's layer, embedding or head
            name = self._model_name(name)
            if name is None:
                continue  # an expert of another rank
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still store the copy
            if "rotary_emb.inv_freq" in name:
                continue
            target_name, rows = name, None
            for fused, parts in self._FUSED.items():
                for part in parts:
                    if f".{part}." in name:
                        target_name = name.replace(part, fused)
                        rows = part_offsets[(target_name, part)]
            if target_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[target_name]
            if target_name in shard_dims:  # this rank's slice (the whole tensor at world size 1)
                if ".k_proj." in name or ".v_proj." in name:  # KV heads: split, or replicated
                    tensor = self.ctx.parallel.shard_kv_heads(tensor, self.config.num_kv_heads)
                else:
                    tensor = self.ctx.parallel.shard(tensor, shard_dims[target_name])
            dest = param if rows is None else param[rows[0]:rows[1]]
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            if isinstance(tensor, GroupedWeight) and target_name == "embed_tokens.weight":
                self._take_embedding_groups(tensor.groups, dest)
            elif isinstance(tensor, GroupedWeight):  # a packed checkpoint's projection: its groups become its blocks
                self.get_submodule(target_name.removesuffix(".weight")).take_checkpoint_groups(
                    0 if rows is None else rows[0], tensor.groups, keep_dense=not self.ctx.blocks_only)
            else:
                dest.copy_(tensor)
            loaded.add(name if rows is None else f"{target_name}:{rows[0]}")
        for projection in self.projections():  # rows of projections that did not come all as groups
            projection.finish_checkpoint_groups()
        expected = {n for n in params if not any(f".{f}." in n for f in self._FUSED)}
        expected |= {f"{n}:{rows[0]}" for (n, _), rows in part_offsets.items()}
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:4]}")

    def _take_embedding_groups(self, groups, dest: torch.Tensor) -> None:
        """A GGUF's embedding as exact 8-bit groups: with blocks_only (one rank, tied logits, fp32 on
        the C kernels) they become the logits' 8-bit copy and the lookup table, and no dense copy is
        made (113 MB in fp32 for the default model); otherwise the dense weight is written from them."""
        rows = block_quant.block_rows(dest, self.ctx.ops, 8)
        if not (self.ctx.blocks_only and self.lm_head is None and groups.bits == 8 and rows
                and self.ctx.parallel.is_single and self.ctx.pipeline.is_single and dest.dtype == torch.float32):
            dest.copy_(groups.rounded_once())
            return
        blocks = BlockQuantWeight.from_groups(groups)
        blocks.exact = True
        self.logits_quant, self.logits_quant_max_rows = blocks, rows
        self.embed_tokens.keep_only_blocks(blocks)

    def _decoder_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters load_weights fills (LLaVA's vision tower loads on its own)."""
        return dict(self.named_parameters())

    def _on_this_stage(self, name: str) -> bool:
        """Does a checkpoint tensor belong to this pipeline stage's part of the model?"""
        if name.startswith("layers."):
            return self.ctx.pipeline.owns(int(name.split(".", 2)[1]))
        module = name.split(".", 1)[0]
        if module == "lm_head":  # the last stage's (a tied copy is skipped later)
            return self.ctx.pipeline.is_last
        return module not in ("embed_tokens", "norm") or getattr(self, module) is not None

    _MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def _model_name(self, name: str) -> str | None:
        """A checkpoint name → ours: Mixtral's `block_sparse_moe.experts.E.w1/w3/w2` are the MoE
        block's `mlp.experts.E.gate_proj/up_proj/down_proj`, and an expert index is local to this
        rank's range (None: another rank's expert)."""
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if ".mlp.experts." not in name:
            return name
        head, rest = name.split(".mlp.experts.", 1)
        expert, _, tail = rest.partition(".")
        proj, _, kind = tail.partition(".")
        block = self.get_submodule(f"{head}.mlp")
        local = int(expert) - block.first_expert
        if not 0 <= local < block.local_experts:
            return None
        return f"{head}.mlp.experts.{local}.{self._MIXTRAL_EXPERT_NAMES.get(proj, proj)}.{kind}"

    def _split_fused_checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]
                                        ) -> Iterator[tuple[str, torch.Tensor]]:
        """Phi-3 checkpoints store qkv_proj and gate_up_proj fused: split into transformers' Llama
        parts (q/k/v, gate/up, by the unsharded sizes) so that sharding and fusing treat every
        checkpoint alike."""
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        sizes = {"qkv_proj": (q, kv, kv), "gate_up_proj": (cfg.intermediate_size, cfg.intermediate_size)}
        for name, tensor in weights:
            fused = next((f for f in self._FUSED if f".{f}." in name), None)
            if fused is None:
                yield name, tensor
                continue
            if tensor.shape[0] != sum(sizes[fused]):
                raise ValueError(f"checkpoint tensor {name!r} has {tensor.shape[0]} rows, expected "
                                 f"{sum(sizes[fused])} ({' + '.join(map(str, sizes[fused]))})")
            for part, rows in zip(self._FUSED[fused], tensor.split(sizes[fused])):
                yield name.replace(fused, part), rows

    def _shard_dims(self) -> dict[str, int]:
        """Parameter name → the dimension tensor parallelism splits (absent: replicated)."""
        dims = {}
        for name, module in self.named_modules():
            dim = getattr(module, "shard_dim", None)
            if dim is None or module.parallel.is_single:  # whole on this rank (e.g. an MoE expert)
                continue
            dims[f"{name}.weight"] = dim
            if getattr(module, "bias", None) is not None and dim == 0:
                dims[f"{name}.bias"] = 0
        return dims

    def _fused_offsets(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(fused parameter name, part) → its rows: every fused projection (attention, MLPs, MoE
        experts) says its parts' local sizes (`part_sizes`)."""
        offsets = {}
        for name, module in self.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf not in self._FUSED or not isinstance(module, Linear):
                continue
            kinds = ("weight", "bias") if module.bias is not None else ("weight",)
            for kind in kinds:
                start = 0
                for part, size in zip(self._FUSED[leaf], module.part_sizes):
                    offsets[(f"{name}.{kind}", part)] = (start, start + size)
                    start += size
        return offsets
