"""The model's parameters, in gemforge's fused layout, and the map from HF tensor names to it.

Fused layout (what the kernels want): per layer `qkv` = [q_proj; k_proj; v_proj] ([(Hq + 2 Hk) D, H])
and `gate_up` = [gate_proj; up_proj] ([2 I, H]); the LM head is the embedding table (tied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gemforge.kernels.quant import QuantizedWeight

from .config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: object          # torch.Tensor or gemforge.kernels.quant.QuantizedWeight
    o: object
    post_norm: torch.Tensor
    gate_up: object
    down: object


@dataclass
class GemmaWeights:
    embed: object        # [V, H]; also the LM head, unless lm_head is set
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: object = None  # [V', H]: rows of embed (a draft's pruned vocabulary, see head_rows), or None: tied

    @property
    def head(self):
        """The LM head's weight: lm_head, or the tied embedding."""
        return self.embed if self.lm_head is None else self.lm_head


def head_rows(w, ids: torch.Tensor):
    """Rows `ids` of a dense or quantized [N, K] weight, in its format (a pruned LM head)."""
    return w.select_rows(ids) if isinstance(w, QuantizedWeight) else w[ids].contiguous()


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor lands: rows [start, start + shape[0]) of fused parameter `target`."""
    target: str
    start: int
    shape: tuple[int, ...]


def fused_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> full shape."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embed": (cfg.vocab_size, H), "final_norm": (H,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_norm": (H,), p + "qkv": (cfg.q_size + 2 * cfg.kv_size, H),
                       p + "o": (H, cfg.q_size), p + "post_norm": (H,), p + "gate_up": (2 * I, H),
                       p + "down": (H, I)})
    return shapes


def hf_slots(cfg: ModelConfig) -> dict[str, Slot]:
    """HF tensor name -> Slot, for every tensor a GemmaForCausalLM checkpoint must hold."""
    H, I, qs, ks = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    slots = {"model.embed_tokens.weight": Slot("embed", 0, (cfg.vocab_size, H)),
             "model.norm.weight": Slot("final_norm", 0, (H,))}
    for i in range(cfg.num_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        slots.update({
            hf + "input_layernorm.weight": Slot(p + "input_norm", 0, (H,)),
            hf + "self_attn.q_proj.weight": Slot(p + "qkv", 0, (qs, H)),
            hf + "self_attn.k_proj.weight": Slot(p + "qkv", qs, (ks, H)),
            hf + "self_attn.v_proj.weight": Slot(p + "qkv", qs + ks, (ks, H)),
            hf + "self_attn.o_proj.weight": Slot(p + "o", 0, (H, qs)),
            hf + "post_attention_layernorm.weight": Slot(p + "post_norm", 0, (H,)),
            hf + "mlp.gate_proj.weight": Slot(p + "gate_up", 0, (I, H)),
            hf + "mlp.up_proj.weight": Slot(p + "gate_up", I, (I, H)),
            hf + "mlp.down_proj.weight": Slot(p + "down", 0, (H, I)),
        })
    return slots


def assemble(cfg: ModelConfig, params: dict[str, object]) -> GemmaWeights:
    """Group a flat {our name: tensor} dict into GemmaWeights."""
    layers = [LayerWeights(*(params[f"layers.{i}.{n}"] for n in
                             ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")))
              for i in range(cfg.num_layers)]
    return GemmaWeights(embed=params["embed"], layers=layers, final_norm=params["final_norm"])


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device="cpu", seed: int = 0,
                   std: float = 0.02) -> GemmaWeights:
    """Random Gaussian weights of the config's shape (for benchmarks and tests)."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = {name: (torch.randn(shape, generator=g, device=device, dtype=dtype) * std)
              for name, shape in fused_shapes(cfg).items()}
    return assemble(cfg, params)
