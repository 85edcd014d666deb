"""Gemma-1 forward over one flat variable-length batch, calling gemforge.kernels only.

    h = embed[ids] * sqrt(H)   (the scale rounded to the model dtype, as HF does)
    per layer:  x, r = rms_norm(h, w_in, residual=r)
                q, k, v = split(x @ Wqkv^T);  rotary(q, k, positions);  write_kv(k, v)
                h = attention(q, cache) @ Wo^T
                x, r = rms_norm(h, w_post, residual=r);  h = gelu_and_mul(x @ Wgu^T) @ Wd^T
                (each norm and GeGLU in the adjacent linear's launch where its CUDA kernel makes them:
                Ops.rms_norm_linear)
    logits = rms_norm(h, w_final, residual=r)[selected rows] @ head^T, in fp32 (head: the tied embed,
             or rows of it where a draft's vocabulary is pruned: GemmaWeights.lm_head; the norm, like the
             layers' two, in the head's launch where its CUDA kernel makes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from gemforge.kernels import AttnMetadata, RotaryWrite, rope_inv_freq, select
from gemforge.kernels._native import _ext, embed_packed_cpu
from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import QuantizedWeight

from .config import ModelConfig
from .kv_cache import KVCache
from .weights import GemmaWeights

OPS = ("rms_norm", "gelu_and_mul", "rotary_write_kv", "attention", "linear")


@dataclass(frozen=True)
class Ops:
    """The op implementations a model uses, resolved once (fixed path for CUDA graphs)."""
    rms_norm: Callable
    gelu_and_mul: Callable
    rotary_write_kv: Callable
    attention: Callable
    linear: Callable
    fuses: Callable = lambda w: False  # whether linear(x, w, ...) takes norm= and geglu= (makes them where it can)
    packs_weights: bool = False  # dense bf16 weights go to linear as PackedWeight
    quant: dict = field(default_factory=dict)  # "int8" / "int4" -> the quantized linear linear() calls

    @classmethod
    def resolve(cls, backend: str, device) -> "Ops":
        """Each op from `backend`; an op that has no such implementation at all (dense linear has
        only torch's, i.e. cuBLAS) takes "auto". An existing but unavailable backend raises."""
        from gemforge.kernels import _native, backends
        from gemforge.kernels._native import cpu_packs_linear, linear_packed_cpu

        def pick(op):
            return backend if backend == "auto" or backend in backends(op) else "auto"

        impls = {op: select(op, pick(op), device) for op in OPS}
        # One implementation per weight kind, called directly: dense tensors, PackedWeight, and each
        # QuantizedWeight format (x is the model's [T, K] activations).
        dense, packed = impls["linear"], select("linear_packed", pick("linear_packed"), device)
        quant = {fmt: select(f"linear_{fmt}", pick(f"linear_{fmt}"), device) for fmt in ("int8", "int4")}

        def impl_for(w):
            return dense if isinstance(w, torch.Tensor) else packed if isinstance(w, PackedWeight) else quant[w.fmt]

        def linear_op(x, w, b=None, **kernel_args):
            if isinstance(w, (torch.Tensor, PackedWeight)):
                return impl_for(w)(x, w, b, **kernel_args)
            return quant[w.fmt](x, w.qweight, w.scales, w.zeros, w.group_size, b, **kernel_args)

        fusing = _native.FUSING_LINEARS if _native.FUSE_INTO_LINEARS else ()  # (read once, as the rest)
        impls["linear"] = linear_op
        packs = packed is linear_packed_cpu and cpu_packs_linear()
        return cls(**impls, fuses=lambda w: impl_for(w) in fusing, packs_weights=packs, quant=quant)

    def rms_norm_linear(self, h: torch.Tensor, norm_weight: torch.Tensor, eps: float, w, residual=None,
                        geglu: bool = False, rope: RotaryWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, the residual stream h + residual, or h) with y = rms_norm(h (+ residual)) @ w^T, or with geglu
        gelu_and_mul of it (w's rows [gate; up]); with rope (y the QKV projection) its q and k heads rotated and
        its k and v heads written to the cache: the norm, GeGLU and RoPE in the linear's own launch where its
        CUDA kernel makes them (csrc/common/linear.cuh), else by their ops."""
        if self.fuses(w):
            return self.linear(h, w, norm=(norm_weight, eps, residual), geglu=geglu, rope=rope)
        if residual is None:
            x, residual = self.rms_norm(h, norm_weight, eps), h
        else:
            x, residual = self.rms_norm(h, norm_weight, eps, residual)
        y = self.linear(x, w)
        if rope is not None:
            rope.apply(y, self.rotary_write_kv)
        return (self.gelu_and_mul(y) if geglu else y), residual


def pack_weights(w: GemmaWeights) -> None:
    """In place (so each plain matrix is freed as soon as it is packed): every dense bf16 matrix, the
    linears and the tied embedding / LM head, becomes a PackedWeight; norms and quantized weights stay."""
    def pack(t):
        return PackedWeight.pack(t) if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t
    w.embed = pack(w.embed)
    if w.lm_head is not None:
        w.lm_head = pack(w.lm_head)
    for layer in w.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, pack(getattr(layer, name)))


class GemmaModel:
    def __init__(self, cfg: ModelConfig, weights: GemmaWeights, dtype: torch.dtype,
                 device="cpu", backend: str = "auto"):
        """Takes `weights` over: where the backend has a packed-weight linear, repacks them in place."""
        self.cfg, self.w, self.dtype, self.device = cfg, weights, dtype, torch.device(device)
        self.backend = backend
        self.ops = Ops.resolve(backend, self.device)
        if self.ops.packs_weights:
            pack_weights(self.w)
        self.normalizer = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype, device=self.device)
        self.normalizer_value = float(self.normalizer)  # the same number, as a Python float
        self.scale = cfg.head_dim ** -0.5
        self.native_layers = NativeLayers.build(self)  # None: op by op from Python

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.w.embed
        if isinstance(table, torch.Tensor):
            rows = table[input_ids]
        elif isinstance(table, PackedWeight):
            if self.ops.packs_weights:  # the C++ gather, the scale applied as torch would
                return embed_packed_cpu(table, input_ids, self.normalizer_value)
            rows = table.rows(input_ids)
        else:  # quantized table: dequantize only the looked-up rows
            from gemforge.kernels.quant import embedding_rows
            rows = embedding_rows(table, input_ids).to(self.dtype)
        return rows * self.normalizer

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, cache: KVCache,
                logits_indices: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [len(logits_indices) or T, V] for the flat batch `input_ids` [T]; written into
        `out` when given (the CUDA graphs of a runner share one such buffer)."""
        if self.native_layers is not None:
            h, residual = self.native_layers(self.embed(input_ids), meta, cache)
            logits = self.native_layers.logits(h, residual, logits_indices)
            return logits if out is None else out.copy_(logits)
        h, residual = self.layers(self.embed(input_ids), meta, cache)
        if logits_indices is not None:  # (the norm is row by row: only the selected rows need it)
            h, residual = h[logits_indices], residual[logits_indices]
        logits, _ = self.ops.rms_norm_linear(h, self.w.final_norm, self.cfg.rms_norm_eps, self.w.head, residual)
        return logits.float() if out is None else out.copy_(logits)  # (the same one conversion)

    def layers(self, h: torch.Tensor, meta: AttnMetadata, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers op by op: (the last layer's output, the residual stream)."""
        cfg, ops, T = self.cfg, self.ops, h.shape[0]
        residual = None
        for i, layer in enumerate(self.w.layers):
            rope = RotaryWrite(meta.positions, cfg.rope_theta, cache.k[i], cache.v[i], meta.slot_mapping)
            qkv, residual = ops.rms_norm_linear(h, layer.input_norm, cfg.rms_norm_eps, layer.qkv, residual, rope=rope)
            q, _, _ = rope.split(qkv)
            attn = ops.attention(q, cache.k[i], cache.v[i], meta, self.scale)
            h = ops.linear(attn.view(T, cfg.q_size), layer.o)
            act, residual = ops.rms_norm_linear(h, layer.post_norm, cfg.rms_norm_eps, layer.gate_up, residual, geglu=True)
            h = ops.linear(act, layer.down)
        return h, residual


LINEAR_FORMATS = {"packed": 0, "int8": 1, "int4": 2}  # csrc/cpu/decoder.cpp's LinearFormat


class NativeLayers:
    """Every decoder layer in one C++ call (csrc/cpu/decoder.cpp) where forward's ops would all be the
    C++ CPU kernels over packed bf16 or weight-only int8 / int4 weights: the same kernels in the same
    order, so bit-identical logits, without the ~70 Python op calls (argument checks, output
    allocations) of a step."""

    def __init__(self, model: GemmaModel):
        cfg, w = model.cfg, model.w
        self.cfg, self.scale = cfg, model.scale
        # the tensors themselves are held, so the pointers stay valid (the weights are fixed once built)
        self.tensors, self.weights = [], []
        for l in w.layers:
            self.tensors += [l.input_norm, l.post_norm]
            self.weights += [l.input_norm.data_ptr(), l.post_norm.data_ptr()]
            for lin in (l.qkv, l.o, l.gate_up, l.down):
                self.weights += self._descriptor(lin)
        self.final_norm, self.table = w.final_norm, w.head
        self.table_descriptor = self._descriptor(w.head)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, "cpu")

    def _descriptor(self, w) -> list[int]:
        """{format, data, scales, zeros, group} of one linear, its tensors held."""
        if isinstance(w, PackedWeight):
            self.tensors.append(w.data)
            return [LINEAR_FORMATS["packed"], w.data.data_ptr(), 0, 0, 0]
        self.tensors += [t for t in (w.qweight, w.scales, w.zeros) if t is not None]
        return [LINEAR_FORMATS[w.fmt], w.qweight.data_ptr(), w.scales.data_ptr(),
                0 if w.zeros is None else w.zeros.data_ptr(), w.group_size or 0]

    @staticmethod
    def _native_linear(w) -> bool:
        """Whether the C++ decoder runs this linear as the op-by-op forward does (the same kernel)."""
        if isinstance(w, PackedWeight):
            return True
        if not isinstance(w, QuantizedWeight) or w.shape[1] % 32 or (w.fmt == "int4" and w.group_size % 32):
            return False  # (quantized linears the C++ kernel does not take run in torch, op by op)
        parts = [w.qweight, w.scales] + ([w.zeros] if w.zeros is not None else [])
        return w.scales.dtype == torch.bfloat16 and all(t.is_contiguous() and t.device.type == "cpu" for t in parts)

    @classmethod
    def build(cls, model: GemmaModel) -> "NativeLayers | None":
        from gemforge.kernels import _native
        ops, cfg = model.ops, model.cfg
        native_ops = (ops.rms_norm is _native.rms_norm_cpu and ops.rotary_write_kv is _native.rotary_write_kv_cpu
                      and ops.attention is _native.attention_cpu
                      and ops.gelu_and_mul is _native.gelu_and_mul_cpu
                      and ops.quant["int8"] is _native.linear_int8_cpu and ops.quant["int4"] is _native.linear_int4_cpu)
        linears = cls._native_linear(model.w.head) and all(  # the LM head and every linear
            cls._native_linear(getattr(l, n)) for l in model.w.layers for n in ("qkv", "o", "gate_up", "down"))
        norms = all(t.dtype == torch.bfloat16 and t.is_contiguous() for l in model.w.layers
                    for t in (l.input_norm, l.post_norm, model.w.final_norm))
        fast_attention = _native._cpu_bf16_attention(torch.empty(0, 1, cfg.head_dim, dtype=model.dtype))
        if not (ops.packs_weights and model.dtype == torch.bfloat16 and native_ops and linears and norms and fast_attention):
            return None
        return cls(model)

    def __call__(self, h: torch.Tensor, meta: AttnMetadata, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last layer's output, the residual stream) for embeddings h [T, hidden] (overwritten)."""
        cfg, T = self.cfg, h.shape[0]
        i64, i32 = torch.int64, torch.int32
        for name, t, dtype in (("positions", meta.positions, i64), ("slot_mapping", meta.slot_mapping, i64),
                               ("cu_seqlens_q", meta.cu_seqlens_q, i32), ("context_lens", meta.context_lens, i32)):
            if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"decoder_layers: meta.{name} must be a contiguous CPU {dtype} tensor, got "
                                 f"{t.dtype} on {t.device}")
        tables = meta.block_tables
        if tables.dtype != i32 or tables.dim() != 2 or tables.stride(1) != 1 or tables.shape[0] != meta.num_seqs:
            raise ValueError(f"decoder_layers: meta.block_tables must be int32 [{meta.num_seqs}, max_blocks] with unit "
                             f"column stride, got {tables.dtype} {tuple(tables.shape)} strides {tables.stride()}")
        if meta.positions.shape[0] != T or meta.slot_mapping.shape[0] != T:
            raise ValueError(f"decoder_layers: {T} tokens but {meta.positions.shape[0]} positions and "
                             f"{meta.slot_mapping.shape[0]} slots")
        width = cfg.q_size + 2 * cfg.kv_size
        scratch = torch.empty(T * (cfg.hidden_size + width + cfg.q_size + 3 * cfg.intermediate_size), dtype=h.dtype)
        h = h.contiguous()
        residual = torch.empty_like(h)
        k0 = cache.k[0]
        _ext().cpu.decoder_layers(
            h.data_ptr(), residual.data_ptr(), scratch.data_ptr(), T, self.weights, [k.data_ptr() for k in cache.k],
            [v.data_ptr() for v in cache.v], meta.positions.data_ptr(), self.inv_freq.data_ptr(),
            meta.slot_mapping.data_ptr(), meta.cu_seqlens_q.data_ptr(), meta.context_lens.data_ptr(),
            tables.data_ptr(), meta.num_seqs, tables.stride(0), tables.shape[1], k0.shape[0], k0.shape[1],
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.rms_norm_eps, self.scale)
        return h, residual

    def logits(self, h: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits of `rows` of the layers' output (all when None): the final norm and the tied LM
        head in one C++ call, as the op-by-op forward computes them."""
        cfg, T = self.cfg, h.shape[0]
        rows = torch.arange(T) if rows is None else rows.to(torch.int64).contiguous()
        n, vocab = rows.shape[0], self.table.shape[0]
        out = torch.empty(n, vocab)
        scratch = torch.empty((n + 1) * cfg.hidden_size + n * vocab, dtype=torch.bfloat16)
        _ext().cpu.decoder_logits(out.data_ptr(), h.data_ptr(), residual.data_ptr(), T, rows.data_ptr(), n,
                                  self.final_norm.data_ptr(), self.table_descriptor, scratch.data_ptr(),
                                  cfg.hidden_size, vocab, cfg.rms_norm_eps)
        return out
