"""Quantized models: quantize-on-load, saved checkpoints that load without re-quantizing, clear
errors when metadata and tensors disagree, and the memory report's arithmetic."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemforge.engine import LLM, CheckpointError, ConfigError, SamplingParams
from gemforge.engine.cli import main
from gemforge.engine.runner import WorkItem
from gemforge.kernels.quant import QuantizedWeight, dequantize

IDS = [2, 17, 300, 45, 999, 8, 120, 7, 64, 500]


def logits(llm, ids=IDS):
    llm.cache.blocks.append("q", len(ids))
    try:
        return llm.engine.runner.run([WorkItem("q", ids, 0, all_logits=True)])
    finally:
        llm.cache.blocks.free("q")


def dequantized_twin(llm_q, ckpt):
    """A dense model whose weights are exactly the dequantized weights of llm_q."""
    dense = LLM(ckpt, dtype="float32", device="cpu", progress=False)
    for lq, ld in zip(llm_q.model.w.layers, dense.model.w.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(ld, name, dequantize(getattr(lq, name)).float())
    if isinstance(llm_q.model.w.embed, QuantizedWeight):
        dense.model.w.embed = dequantize(llm_q.model.w.embed).float()
    return dense


@pytest.mark.parametrize("method, lm_head", [("int8", False), ("int4", False), ("int4", True)])
def test_quantized_model_computes_with_its_dequantized_weights(make_checkpoint, method, lm_head):
    d, _ = make_checkpoint("mqa", seed=21)
    llm = LLM(d, dtype="float32", device="cpu", progress=False, quantization=method, group_size=32,
              quantize_lm_head=lm_head)
    assert isinstance(llm.model.w.layers[0].qkv, QuantizedWeight)
    assert isinstance(llm.model.w.embed, QuantizedWeight) == lm_head
    ref = logits(dequantized_twin(llm, d))
    torch.testing.assert_close(logits(llm), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    out = llm.generate("def f(x):", SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 1


def test_saved_quantized_checkpoint_loads_without_requantizing(make_checkpoint, tmp_path, capsys):
    d, _ = make_checkpoint("mha", seed=22)
    out = tmp_path / "q4"
    assert main(["quantize", str(d), str(out), "--method", "int4", "--group-size", "32", "--asymmetric",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    assert "int4 weights" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "gemforge", "method": "int4", "group_size": 32,
                                          "symmetric": False, "quantize_lm_head": False}
    on_load = LLM(d, dtype="float32", device="cpu", progress=False, quantization="int4", group_size=32)
    # the on-load config is symmetric; the saved one asymmetric: compare the saved one with itself
    saved = LLM(out, dtype="float32", device="cpu", progress=False)
    w = saved.model.w.layers[1].gate_up
    assert w.fmt == "int4" and w.zeros is not None and w.group_size == 32
    tensors = load_file(out / "model.safetensors")
    qw = tensors["model.layers.1.mlp.up_proj.qweight"]
    assert qw.dtype == torch.uint8 and torch.equal(w.qweight[w.shape[0] // 2:], qw)
    torch.testing.assert_close(logits(saved), logits(dequantized_twin(saved, d)), rtol=1e-4, atol=1e-3)
    with pytest.raises(ConfigError, match="differs from the requested"):
        LLM(out, dtype="float32", device="cpu", progress=False, quantization="int8")
    assert on_load.memory_report()["weights"]["int4"] > 0


def test_quantized_metadata_and_tensors_disagree(make_checkpoint, tmp_path):
    d, _ = make_checkpoint("mqa", seed=23)
    out = tmp_path / "q8"
    assert main(["quantize", str(d), str(out), "--method", "int8", "--device", "cpu", "--dtype", "float32"]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["method"] = "int4"
    cfg["quantization_config"]["group_size"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"qweight' has shape \(\d+, (64|96)\), expected \(\d+, (32|48)\) from config.json"):
        LLM(bad, dtype="float32", device="cpu", progress=False)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.0.mlp.down_proj.qweight"] = t["model.layers.0.mlp.down_proj.qweight"].to(torch.int16)
    del t["model.layers.1.mlp.up_proj.scales"]
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="down_proj.qweight' has dtype torch.int16, expected torch.int8"):
        LLM(bad, dtype="float32", device="cpu", progress=False)
    t["model.layers.0.mlp.down_proj.qweight"] = t["model.layers.0.mlp.down_proj.qweight"].to(torch.int8)
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.scales'"):
        LLM(bad, dtype="float32", device="cpu", progress=False)


def test_memory_report_matches_format_arithmetic(make_checkpoint):
    d, _ = make_checkpoint("mqa", seed=24)
    V, H, I, L, Q, KV = 1200, 64, 96, 2, 4 * 32, 32
    linear = L * ((Q + 2 * KV) * H + H * Q + 2 * I * H + H * I)
    rows = L * ((Q + 2 * KV) + H + 2 * I + H)
    dense_rest = (V * H + (2 * L + 1) * H) * 4
    r8 = LLM(d, dtype="float32", device="cpu", progress=False, quantization="int8").memory_report()["weights"]
    assert r8 == {"dense": dense_rest, "int8": linear + rows * 4, "int4": 0, "total": dense_rest + linear + rows * 4}
    r4 = LLM(d, dtype="float32", device="cpu", progress=False, quantization="int4", group_size=32).memory_report()["weights"]
    assert r4["int4"] == linear // 2 + (linear // 32) * 4
    dense = LLM(d, dtype="float32", device="cpu", progress=False).memory_report()["weights"]
    assert dense["total"] == dense_rest + linear * 4


def test_quantize_replaces_an_older_checkpoint_in_its_output_folder(make_checkpoint, tmp_path, capsys):
    """An index left from an earlier sharded checkpoint would win over the new model.safetensors: saving
    removes the old weight files first. Without a tokenizer, or onto a file, `gemforge quantize` refuses
    before writing anything."""
    from gemforge.engine.loader import save_checkpoint

    d, _ = make_checkpoint("mha", seed=22)
    out = tmp_path / "q8"
    old = LLM(d, dtype="float32", device="cpu", progress=False)
    save_checkpoint(out, old.model.cfg, old.model.w, d / "tokenizer.model", max_shard_bytes=4096)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*-of-*"))) > 2
    assert main(["quantize", str(d), str(out), "--method", "int8", "--device", "cpu", "--dtype", "float32"]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert LLM(out, dtype="float32", device="cpu", progress=False).model.w.layers[0].qkv.fmt == "int8"
    capsys.readouterr()
    src = tmp_path / "no_tokenizer"
    shutil.copytree(d, src)
    (src / "tokenizer.model").unlink()
    assert main(["quantize", str(src), str(tmp_path / "never"), "--method", "int8", "--device", "cpu"]) == 2
    assert "tokenizer.model: not found" in capsys.readouterr().err and not (tmp_path / "never").exists()
    (tmp_path / "a_file").write_text("x")
    assert main(["quantize", str(d), str(tmp_path / "a_file"), "--method", "int8", "--device", "cpu"]) == 2
    assert "a_file: exists and is not a directory" in capsys.readouterr().err
