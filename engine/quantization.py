"""Weight-only quantization of a Gemma model: which weights, quantize-on-load, saved checkpoints.

All linear layers (qkv, o, gate_up, down) are quantized; the tied embedding / LM head only with
`quantize_lm_head` (the embedding lookup then dequantizes just the looked-up rows). Formats are
those of gemforge.kernels.quant (docs/QUANT_FORMAT.md); per-row quantization makes fusing and
splitting exact, so a saved checkpoint keeps HF names with `.qweight/.scales/.zeros` suffixes and a
`quantization_config` in config.json, and loads without re-quantizing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gemforge.kernels.quant import QuantizedWeight, quantize_int4, quantize_int8
from gemforge.kernels.linear import PackedWeight

from .errors import ConfigError

LINEARS = ("qkv", "o", "gate_up", "down")
METHODS = ("int8", "int4")


@dataclass(frozen=True)
class QuantConfig:
    method: str
    group_size: int = 128
    symmetric: bool = True
    quantize_lm_head: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"quantization must be one of {METHODS}, got {self.method!r}")
        if self.method == "int4" and self.group_size not in (32, 64, 128):
            raise ConfigError(f"int4 group_size must be 32, 64 or 128, got {self.group_size!r}")

    def to_dict(self) -> dict:
        return {"quant_method": "gemforge", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if d.get("quant_method") != "gemforge":
            raise ConfigError(f"quantization_config.quant_method {d.get('quant_method')!r} is not supported "
                              f"(gemforge reads its own 'gemforge' int8/int4 checkpoints)")
        if d.get("method") is None:
            raise ConfigError("quantization_config is missing field 'method'")
        fields = {"group_size": (int, 128), "symmetric": (bool, True), "quantize_lm_head": (bool, False)}
        values = {}
        for name, (kind, default) in fields.items():
            v = d.get(name, default)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise ConfigError(f"quantization_config.{name} must be {'an integer' if kind is int else 'true or false'}, "
                                  f"got {v!r}")
            values[name] = v
        return cls(d["method"], **values)

    def check_shapes(self, shapes: dict[str, tuple]) -> None:
        """Every parameter this quantizes (name -> (out_features, in_features)) fits its format: int4
        groups must tile in_features. ConfigError naming the first that does not, before any weight is read."""
        if self.method != "int4":
            return
        for name, shape in shapes.items():
            if self.applies_to(name) and shape[-1] % self.group_size:
                raise ConfigError(f"int4 quantization of {name}: in_features {shape[-1]} is not a multiple of "
                                  f"group_size {self.group_size} (choose a group size that divides it: 32, 64 or 128)")

    def applies_to(self, param: str) -> bool:
        """Whether fused parameter `param` (e.g. 'layers.3.qkv', 'embed') is quantized."""
        return param.rsplit(".", 1)[-1] in LINEARS or (param == "embed" and self.quantize_lm_head)

    def quantize(self, param: str, w: torch.Tensor) -> QuantizedWeight:
        if self.method == "int8":
            return quantize_int8(w, name=param)
        return quantize_int4(w, self.group_size, self.symmetric, name=param)

    def on_load(self, param: str, w: torch.Tensor):
        """Loader hook: quantize a fully read parameter (freeing its dense copy) or keep it."""
        return self.quantize(param, w) if self.applies_to(param) else w


def _nbytes(p) -> int:
    return p.nbytes if isinstance(p, (QuantizedWeight, PackedWeight)) else p.numel() * p.element_size()


def weight_bytes(weights) -> dict[str, int]:
    """Bytes of the loaded weights by storage format ('dense', 'int8', 'int4') and in total."""
    out = {"dense": 0, "int8": 0, "int4": 0}
    params = [weights.embed, weights.final_norm] + [getattr(l, n) for l in weights.layers
                                                    for n in ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")]
    for p in params + ([weights.lm_head] if weights.lm_head is not None else []):
        out[p.fmt if isinstance(p, QuantizedWeight) else "dense"] += _nbytes(p)
    out["total"] = sum(out.values())
    return out


def step_bytes(weights) -> int:
    """The weight bytes a decode step reads: all but an embedding table that is only looked up (where
    the LM head is a pruned copy of some of its rows, GemmaWeights.lm_head)."""
    return weight_bytes(weights)["total"] - (_nbytes(weights.embed) if weights.lm_head is not None else 0)
