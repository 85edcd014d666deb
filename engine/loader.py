"""Load HF-layout Gemma checkpoints (safetensors, single or sharded) into GemmaWeights.

Tensors stream one at a time from each shard into the fused parameters, so peak host memory is
about the model plus one tensor. Every problem raises CheckpointError naming the file and tensor;
a model is returned whole or not at all.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import QuantizedWeight

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .quantization import QuantConfig
from .weights import GemmaWeights, assemble, fused_shapes, hf_slots

log = logging.getLogger("gemforge.loader")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Present in some checkpoints, never needed: the tied LM head and HF's rotary buffers.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_IGNORED = ("lm_head.weight",)


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


INDEX = "model.safetensors.index.json"


def shard_index(model_dir: str | Path) -> dict[str, str] | None:
    """The `weight_map` (tensor name -> shard file name) of a sharded checkpoint's index; None if unsharded."""
    d = Path(model_dir)
    index = d / INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed shard index ({e!r})") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file name")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside {d}")
    return weight_map


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded (via its index)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: model directory not found")
    weight_map = shard_index(d)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"{d / INDEX}: lists shard {missing[0]!r}, which is not in {d}")
        return [d / f for f in files]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    bins = sorted(p.name for p in d.glob("*.bin"))
    raise CheckpointError(f"{d}: no model.safetensors or {INDEX} found" + (
        f" ({', '.join(bins)}: PyTorch .bin checkpoints are not read; save the model with "
        f"save_pretrained(..., safe_serialization=True) to get safetensors)" if bins else ""))


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _hf_tensors(files: list[Path], weight_map: dict[str, str] | None = None):
    """Yield (key, read(), file) for every tensor of the safetensors files, one file open at a time;
    with a shard index, each shard must hold exactly the tensors the index assigns it."""
    for path in files:
        with _open(path) as f:
            if weight_map is not None:
                listed = {k for k, shard in weight_map.items() if shard == path.name}
                held = set(f.keys())
                wrong = sorted(listed ^ held)
                if wrong:
                    key = wrong[0]
                    placed = f"in {weight_map[key]}" if key in weight_map else "nowhere"
                    raise CheckpointError(
                        f"{path.parent / INDEX}: says tensor {key!r} is in {path.name}, which does not hold it"
                        if key in listed else f"{path}: holds tensor {key!r}, which {INDEX} places {placed}")
            for key in f.keys():
                def read(f=f, key=key, path=path):
                    try:
                        return f.get_tensor(key)
                    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                        raise CheckpointError(f"{path}: cannot read tensor {key!r}: corrupt or truncated ({e})") from None
                yield key, read, path


def load_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device="cpu",
                 quant: QuantConfig | None = None, progress: bool = True) -> GemmaWeights:
    """Read every tensor of the checkpoint into the fused layout, cast to `dtype` on `device`.

    A checkpoint saved quantized (config.json has a quantization_config) loads as it is. Otherwise
    `quant` quantizes each parameter as soon as all its parts are read, so only one dense
    parameter at a time exists beside the quantized model.
    """
    files = checkpoint_files(model_dir)
    try:
        saved = QuantConfig.from_dict(cfg.quantization) if cfg.quantization else None
    except ConfigError as e:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: {e}") from None
    if saved is not None and quant is not None and quant != saved:
        raise ConfigError(f"{model_dir}: checkpoint is quantized as {saved}, which differs from the requested {quant}")
    return fuse_tensors(_hf_tensors(files, shard_index(model_dir)), cfg, dtype, device, saved,
                        quant if saved is None else None, progress,
                        where=", ".join(p.name for p in files), desc=f"loading {Path(model_dir).name}")


def weights_from_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype,
                            device="cpu", quant: QuantConfig | None = None) -> GemmaWeights:
    """GemmaWeights from an in-memory HF state dict (e.g. a transformers model's)."""
    items = ((k, (lambda v=v: v), "state_dict") for k, v in state_dict.items())
    return fuse_tensors(items, cfg, dtype, device, None, quant, False, where="state_dict", desc="")


_COMPONENTS = ("qweight", "scales", "zeros")


def _part_spec(slot, part: str, q: QuantConfig, dtype: torch.dtype):
    """(shape of this HF tensor, stored dtype) of one component of a quantized slot."""
    rows, k = slot.shape
    if part == "qweight":
        return ((rows, k), torch.int8) if q.method == "int8" else ((rows, k // 2), torch.uint8)
    if q.method == "int8":
        return (rows,), dtype
    return (rows, k // q.group_size), dtype


def fuse_tensors(items, cfg: ModelConfig, dtype: torch.dtype, device, saved: QuantConfig | None,
                 quant: QuantConfig | None, progress: bool, where: str, desc: str) -> GemmaWeights:
    """Copy (HF name, read(), source) items into the fused parameters, checking names and shapes.
    `saved`: the checkpoint holds quantized components; `quant`: quantize dense ones on the fly."""
    slots, shapes = hf_slots(cfg), fused_shapes(cfg)
    if quant is not None:
        quant.check_shapes(shapes)
    expected: dict[str, tuple] = {}  # checkpoint key -> (slot, component)
    for key, slot in slots.items():
        if saved is not None and saved.applies_to(slot.target):
            base = key[: -len(".weight")]
            for part in _COMPONENTS:
                if part != "zeros" or (saved.method == "int4" and not saved.symmetric):
                    expected[f"{base}.{part}"] = (slot, part)
        else:
            expected[key] = (slot, "weight")
    parts_left = {name: 0 for name in shapes}
    for slot, _ in expected.values():
        parts_left[slot.target] += 1
    params: dict[str, object] = {}
    seen: dict[str, object] = {}
    bar = tqdm(total=len(expected), desc=desc, unit="tensor", disable=not progress, leave=False)
    for key, read, path in items:
        if key in _IGNORED or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (not part of a "
                                  f"GemmaForCausalLM with this config{' and quantization' if saved else ''})")
        if key in seen:
            raise CheckpointError(f"{path}: tensor {key!r} appears twice (also in {seen[key]})")
        slot, part = expected[key]
        t = read()
        if part == "weight":
            shape, want = slot.shape, None
        else:
            shape, want = _part_spec(slot, part, saved, dtype)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                                  f"{tuple(shape)} from config.json")
        if part == "qweight" and t.dtype != want:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected {want} for "
                                  f"{saved.method} weights")
        if part != "qweight" and not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected floating point")
        seen[key] = path
        if part == "weight":
            if slot.target not in params:
                params[slot.target] = torch.empty(shapes[slot.target], dtype=dtype, device=device)
            dest = params[slot.target]
        else:
            comps = params.setdefault(slot.target, {})
            if part not in comps:
                fused_rows = shapes[slot.target][0]
                comps[part] = torch.empty((fused_rows, *shape[1:]), dtype=want, device=device)
            dest = comps[part]
        dest[slot.start: slot.start + slot.shape[0]].copy_(t)
        del t
        parts_left[slot.target] -= 1
        if parts_left[slot.target] == 0:
            params[slot.target] = _finish(slot.target, params[slot.target], saved, quant, shapes, where)
        bar.update(1)
    bar.close()
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in {where}")
    return assemble(cfg, params)


def _finish(name: str, value, saved: QuantConfig | None, quant: QuantConfig | None, shapes, where: str):
    """A fully read parameter: assemble saved quantized components, or quantize a dense one."""
    try:
        if isinstance(value, dict):
            return QuantizedWeight(saved.method, value["qweight"], value["scales"], value.get("zeros"),
                                   saved.group_size if saved.method == "int4" else None, tuple(shapes[name]))
        return quant.on_load(name, value) if quant is not None else value
    except ValueError as e:  # (malformed saved components; a dense weight with NaN or inf cannot be quantized)
        raise CheckpointError(f"{where}: parameter {name}: {e}") from None


def hf_state_dict(cfg: ModelConfig, weights: GemmaWeights) -> dict[str, torch.Tensor]:
    """Unfuse GemmaWeights back into HF tensor names (contiguous copies); a quantized parameter
    gives `<name>.qweight`, `.scales` (and `.zeros`) rows instead of `<name>.weight`; a CPU-packed
    one (a running model's) is unpacked."""
    params = {"embed": weights.embed, "final_norm": weights.final_norm}
    for i, layer in enumerate(weights.layers):
        for name in ("input_norm", "qkv", "o", "post_norm", "gate_up", "down"):
            params[f"layers.{i}.{name}"] = getattr(layer, name)
    params = {k: p.unpack() if isinstance(p, PackedWeight) else p for k, p in params.items()}
    out = {}
    for key, s in hf_slots(cfg).items():
        p, rows = params[s.target], slice(s.start, s.start + s.shape[0])
        if isinstance(p, QuantizedWeight):
            base = key[: -len(".weight")]
            for part in _COMPONENTS:
                if getattr(p, part) is not None:
                    out[f"{base}.{part}"] = getattr(p, part)[rows].contiguous()
        else:
            out[key] = p[rows].contiguous()
    return out


def save_checkpoint(out_dir: str | Path, cfg: ModelConfig, weights: GemmaWeights,
                    tokenizer_model: str | Path | None = None, max_shard_bytes: int = 4 << 30,
                    quant: QuantConfig | None = None, progress: bool = False) -> Path:
    """Write an HF-layout checkpoint (config.json, safetensors shards + index, tokenizer.model);
    with `quant`, the weights are quantized ones and config.json records how."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # weights of an earlier checkpoint here would shadow these (an index wins over model.safetensors)
    for stale in [out / "model.safetensors", out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    sd = {k: v.cpu() for k, v in hf_state_dict(cfg, weights).items()}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(tqdm(shards, desc="saving", unit="shard", disable=not progress, leave=False)):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = cfg.replace(quantization=quant.to_dict() if quant else None).to_hf_dict()
    hf["torch_dtype"] = str(sd["model.norm.weight"].dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf["eos_token_id"],
         "pad_token_id": cfg.pad_token_id}, indent=2) + "\n")
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
             "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
            indent=2) + "\n")
    return out
