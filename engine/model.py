"""Gemma-1 forward over one flat variable-length batch, calling gemforge.kernels only.

    h = embed[ids] * sqrt(H)   (the scale rounded to the model dtype, as HF does)
    per layer:  x, r = rms_norm(h, w_in, residual=r)
                q, k, v = split(x @ Wqkv^T);  rotary(q, k, positions);  write_kv(k, v)
                h = attention(q, cache) @ Wo^T
                x, r = rms_norm(h, w_post, residual=r);  h = gelu_and_mul(x @ Wgu^T) @ Wd^T
    logits = rms_norm(h, w_final, residual=r)[selected rows] @ embed^T, in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gemforge.kernels import AttnMetadata, select
from gemforge.kernels.linear import PackedWeight

from .config import ModelConfig
from .kv_cache import KVCache
from .weights import GemmaWeights

OPS = ("rms_norm", "gelu_and_mul", "rotary", "write_kv", "attention", "linear")


@dataclass(frozen=True)
class Ops:
    """The op implementations a model uses, resolved once (fixed path for CUDA graphs)."""
    rms_norm: Callable
    gelu_and_mul: Callable
    rotary: Callable
    write_kv: Callable
    attention: Callable
    linear: Callable
    packs_weights: bool = False  # dense bf16 weights go to linear as PackedWeight

    @classmethod
    def resolve(cls, backend: str, device) -> "Ops":
        """Each op from `backend`; an op that has no such implementation at all (dense linear has
        only torch's, i.e. cuBLAS) takes "auto". An existing but unavailable backend raises."""
        from gemforge.kernels import backends
        from gemforge.kernels._native import cpu_packs_linear, linear_packed_cpu

        def pick(op):
            return backend if backend == "auto" or backend in backends(op) else "auto"

        impls = {op: select(op, pick(op), device) for op in OPS}
        # One implementation per weight kind, called directly: dense tensors, PackedWeight, and each
        # QuantizedWeight format (x is the model's [T, K] activations).
        dense, packed = impls["linear"], select("linear_packed", pick("linear_packed"), device)
        quant = {fmt: select(f"linear_{fmt}", pick(f"linear_{fmt}"), device) for fmt in ("int8", "int4")}

        def linear_op(x, w, b=None):
            if isinstance(w, torch.Tensor):
                return dense(x, w, b)
            if isinstance(w, PackedWeight):
                return packed(x, w, b)
            return quant[w.fmt](x, w.qweight, w.scales, w.zeros, w.group_size, b)
        impls["linear"] = linear_op
        packs = packed is linear_packed_cpu and cpu_packs_linear()
        return cls(**impls, packs_weights=packs)


def pack_weights(w: GemmaWeights) -> None:
    """In place (so each plain matrix is freed as soon as it is packed): every dense bf16 matrix, the
    linears and the tied embedding / LM head, becomes a PackedWeight; norms and quantized weights stay."""
    def pack(t):
        return PackedWeight.pack(t) if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t
    w.embed = pack(w.embed)
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
        self.scale = cfg.head_dim ** -0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.w.embed
        if isinstance(table, torch.Tensor):
            rows = table[input_ids]
        elif isinstance(table, PackedWeight):
            rows = table.rows(input_ids)
        else:  # quantized table: dequantize only the looked-up rows
            from gemforge.kernels.quant import embedding_rows
            rows = embedding_rows(table, input_ids).to(self.dtype)
        return rows * self.normalizer

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, cache: KVCache,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [len(logits_indices) or T, V] for the flat batch `input_ids` [T]."""
        cfg, ops, T = self.cfg, self.ops, input_ids.shape[0]
        qs, ks = cfg.q_size, cfg.kv_size
        h, residual = self.embed(input_ids), None
        for i, layer in enumerate(self.w.layers):
            if residual is None:
                residual, x = h, ops.rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            else:
                x, residual = ops.rms_norm(h, layer.input_norm, cfg.rms_norm_eps, residual)
            qkv = ops.linear(x, layer.qkv)
            q = qkv[:, :qs].view(T, cfg.num_heads, cfg.head_dim)
            k = qkv[:, qs: qs + ks].view(T, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, qs + ks:].view(T, cfg.num_kv_heads, cfg.head_dim)
            ops.rotary(q, k, meta.positions, cfg.rope_theta)
            ops.write_kv(k, v, cache.k[i], cache.v[i], meta.slot_mapping)
            attn = ops.attention(q, cache.k[i], cache.v[i], meta, self.scale)
            h = ops.linear(attn.view(T, qs), layer.o)
            x, residual = ops.rms_norm(h, layer.post_norm, cfg.rms_norm_eps, residual)
            h = ops.linear(ops.gelu_and_mul(ops.linear(x, layer.gate_up)), layer.down)
        x, _ = ops.rms_norm(h, self.w.final_norm, cfg.rms_norm_eps, residual)
        if logits_indices is not None:
            x = x[logits_indices]
        return ops.linear(x, self.w.embed).float()
