"""ModelConfig: the Gemma-1 shape, read from an HF `config.json`, plus presets of the real models."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import ConfigError

_DTYPES = ("float32", "float16", "bfloat16")
_GELU_TANH = {"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Gemma-1 decoder (GemmaForCausalLM)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    dtype: str = "bfloat16"
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    quantization: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name, ids in (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", self.eos_token_ids),
                          ("pad_token_id", (self.pad_token_id,))):
            for i in ids:
                if not 0 <= i < self.vocab_size:
                    raise ConfigError(f"{name} {i} is outside the vocabulary (size {self.vocab_size})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_hf_dict(self) -> dict:
        """The HF `config.json` contents for this shape (used to write checkpoints)."""
        d = {
            "architectures": ["GemmaForCausalLM"], "model_type": "gemma",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False, "tie_word_embeddings": True, "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
        }
        if self.quantization:
            d["quantization_config"] = dict(self.quantization)
        return d

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `model_dir/config.json` (GemmaForCausalLM, as published for CodeGemma)."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found (is {model_dir} an HF model directory?)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        try:
            cfg = cls.from_hf_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        extra = [i for i in _generation_eos(Path(model_dir) / "generation_config.json", cfg.vocab_size)
                 if i not in cfg.eos_token_ids]
        return cfg.replace(eos_token_ids=cfg.eos_token_ids + tuple(extra)) if extra else cfg

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if not isinstance(archs, list):
            raise ConfigError(f"field 'architectures' must be a list, got {archs!r}")
        if model_type not in ("gemma", None) or (model_type is None and "GemmaForCausalLM" not in archs):
            raise ConfigError(f"unsupported architecture {model_type or archs!r}: gemforge serves Gemma-1 "
                              f"(GemmaForCausalLM, model_type 'gemma') such as CodeGemma")
        for key in ("attention_bias", "use_bidirectional_attention"):
            if raw.get(key) not in (None, False):
                raise ConfigError(f"field {key!r} is {raw[key]!r}; Gemma-1 CodeGemma has it false")
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if not isinstance(act, str) or act not in _GELU_TANH:
            raise ConfigError(f"field 'hidden_activation' is {act!r}; Gemma uses tanh-approximate GELU")

        def req(key):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"missing field {key!r}")
            return raw[key]

        def as_int(key, default=None):
            v = (default if raw.get(key) is None else raw[key]) if default is not None else req(key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"field {key!r} must be an integer, got {v!r}")
            return v

        def as_float(key, default):
            v = raw.get(key, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"field {key!r} must be a number, got {v!r}")
            return float(v)

        hidden, heads = as_int("hidden_size"), as_int("num_attention_heads")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if heads <= 0:
                raise ConfigError(f"num_attention_heads must be a positive integer, got {heads}")
            if hidden % heads:
                raise ConfigError(f"missing field 'head_dim' and hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {heads}")
            head_dim = hidden // heads
        raw = {**raw, "head_dim": head_dim}
        eos = raw.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        if not eos_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise ConfigError(f"field 'eos_token_id' must be an integer or a list of them, got {eos!r}")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        if dtype not in _DTYPES:
            raise ConfigError(f"field 'torch_dtype' is {dtype!r}; expected one of {_DTYPES}")
        if raw.get("tie_word_embeddings", True) is not True:
            raise ConfigError(f"field 'tie_word_embeddings' is {raw['tie_word_embeddings']!r}; Gemma ties the LM "
                              f"head to the embeddings (true)")
        quant = raw.get("quantization_config")
        if quant is not None and not isinstance(quant, dict):
            raise ConfigError(f"field 'quantization_config' must be an object, got {quant!r}")
        return cls(
            vocab_size=as_int("vocab_size"), hidden_size=hidden,
            intermediate_size=as_int("intermediate_size"), num_layers=as_int("num_hidden_layers"),
            num_heads=heads, num_kv_heads=as_int("num_key_value_heads", heads),  # (null: one per query head)
            head_dim=as_int("head_dim"), rms_norm_eps=as_float("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=as_int("max_position_embeddings", 8192), dtype=dtype,
            bos_token_id=as_int("bos_token_id", 2), eos_token_ids=eos_ids,
            pad_token_id=as_int("pad_token_id", 0), quantization=quant,
        )

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def _generation_eos(path: Path, vocab_size: int) -> list[int]:
    """The eos_token_id(s) of a generation_config.json (HF's generate stops on these too); [] without one."""
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise ConfigError(f"{path}: eos_token_id {i!r} is not a token id of the vocabulary (size {vocab_size})")
    return ids


def _rope_theta(raw: dict) -> float:
    """RoPE's base from `rope_theta` (transformers 4) or `rope_parameters.rope_theta` (transformers 5);
    a scaled RoPE (any rope_type but "default", or a legacy `rope_scaling`) is refused, not ignored."""
    params = raw.get("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_parameters' must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"field 'rope_parameters' asks for {kind!r} RoPE; Gemma-1 uses plain RoPE "
                          f"(rope_type 'default')")
    if raw.get("rope_scaling") is not None:
        raise ConfigError(f"field 'rope_scaling' is {raw['rope_scaling']!r}; Gemma-1 uses plain RoPE "
                          f"(rope_scaling null)")
    top, nested = raw.get("rope_theta"), params.get("rope_theta")
    if top is not None and nested is not None and top != nested:
        raise ConfigError(f"fields 'rope_theta' ({top!r}) and 'rope_parameters.rope_theta' ({nested!r}) disagree")
    theta = top if top is not None else nested if nested is not None else 10000.0
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ConfigError(f"field 'rope_theta' must be a number, got {theta!r}")
    return float(theta)


_GEMMA_VOCAB = 256000
PRESETS: dict[str, ModelConfig] = {
    "codegemma-2b": ModelConfig(vocab_size=_GEMMA_VOCAB, hidden_size=2048, intermediate_size=16384,
                                num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256),
    "codegemma-7b": ModelConfig(vocab_size=_GEMMA_VOCAB, hidden_size=3072, intermediate_size=24576,
                                num_layers=28, num_heads=16, num_kv_heads=16, head_dim=256),
}
PRESETS["codegemma-7b-it"] = PRESETS["codegemma-7b"]


def preset(name: str) -> ModelConfig:
    """The real shape of a named CodeGemma model (weights are not included)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
