"""Each bad config, checkpoint or tokenizer raises one clear error naming the file and field/tensor."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from gemforge.engine import LLM, CheckpointError, ConfigError, ModelConfig, TokenizerError
from gemforge.engine.config import preset
from gemforge.engine.tokenizer import Tokenizer


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    src, _ = make_checkpoint("mqa")
    d = tmp_path / "model"
    shutil.copytree(src, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=None), "missing field 'hidden_size'"),
    (dict(num_hidden_layers="2"), "'num_hidden_layers' must be an integer"),
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "unsupported architecture"),
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"]), "unsupported architecture"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(head_dim=31), "head_dim must be even"),
    (dict(hidden_activation="relu"), "'hidden_activation' is 'relu'"),
    (dict(torch_dtype="int8", dtype="int8"), "'torch_dtype' is 'int8'"),
    (dict(eos_token_id=99999), "eos_token_id 99999 is outside the vocabulary"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(model_type="gemma2", architectures=["GemmaForCausalLM"]), "unsupported architecture"),
    (dict(architectures="GemmaForCausalLM"), "'architectures' must be a list"),
    (dict(num_attention_heads=0, head_dim=None), "num_attention_heads must be a positive integer"),
    (dict(hidden_activation=["gelu_pytorch_tanh"]), "'hidden_activation' is \\['gelu_pytorch_tanh'\\]"),
    (dict(use_bidirectional_attention=True), "'use_bidirectional_attention' is True"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "'linear' RoPE"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'rope_scaling'"),
    (dict(rope_theta=5.0, rope_parameters={"rope_type": "default", "rope_theta": 6.0}), "disagree"),
    (dict(rope_parameters=None, rope_theta="1e4"), "'rope_theta' must be a number"),
])
def test_bad_config_names_file_and_field(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_pretrained(ckpt)
    assert str(ckpt / "config.json") in str(e.value)


def test_config_missing_or_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LLM(ckpt, device="cpu", progress=False)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        LLM(ckpt, device="cpu", progress=False)


def test_published_codegemma_configs_parse():
    two_b = {"architectures": ["GemmaForCausalLM"], "attention_bias": False, "bos_token_id": 2,
             "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
             "initializer_range": 0.02, "intermediate_size": 16384, "max_position_embeddings": 8192,
             "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18,
             "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None,
             "rope_theta": 10000.0, "torch_dtype": "bfloat16", "vocab_size": 256000}
    assert ModelConfig.from_hf_dict(two_b) == preset("codegemma-2b")
    seven_b = {**two_b, "hidden_size": 3072, "intermediate_size": 24576, "num_attention_heads": 16,
               "num_hidden_layers": 28, "num_key_value_heads": 16,
               "hidden_activation": "gelu_pytorch_tanh"}  # the 1.1 releases name the activation
    cfg = ModelConfig.from_hf_dict(seven_b)
    assert cfg == preset("codegemma-7b") and cfg.q_size == 4096 != cfg.hidden_size


def _rewrite(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        LLM(ckpt, device="cpu", progress=False)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", t["model.norm.weight"].clone()))
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.layers.7"):
        LLM(ckpt, device="cpu", progress=False)


def test_misshaped_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                           t["model.layers.0.self_attn.q_proj.weight"].clone()))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(128, 64\), expected \(32, 64\)"):
        LLM(ckpt, device="cpu", progress=False)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0001])
def test_truncated_safetensors(ckpt, keep):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        LLM(ckpt, device="cpu", progress=False)


def test_no_weights_and_missing_shard(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLM(ckpt, device="cpu", progress=False)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard 'model-00001-of-00002.safetensors'"):
        LLM(ckpt, device="cpu", progress=False)


def test_tokenizer_missing_or_corrupt(ckpt):
    (ckpt / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        LLM(ckpt, device="cpu", progress=False)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.model not found"):
        LLM(ckpt, device="cpu", progress=False)


def test_tokenizer_without_fim_tokens_refuses_infill(tmp_path):
    import glob
    import sysconfig

    import sentencepiece as spm

    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:5]
    spm.SentencePieceTrainer.Train(input=",".join(files), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=300, pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    tok = Tokenizer(tmp_path / "plain.model")
    with pytest.raises(TokenizerError, match="no single token for '<\\|fim_prefix\\|>'"):
        tok.fim_prompt("a", "b")


def test_rope_theta_is_read_where_each_transformers_writes_it(ckpt):
    """transformers 5 writes RoPE's base only inside rope_parameters, 4 at the top level; a null
    num_key_value_heads means one per query head (HF's rule)."""
    edit_config(ckpt, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert ModelConfig.from_pretrained(ckpt).rope_theta == 1e6
    edit_config(ckpt, rope_parameters=None, rope_theta=5e5)
    assert ModelConfig.from_pretrained(ckpt).rope_theta == 5e5
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = None
    (ckpt / "config.json").write_text(json.dumps(cfg))
    c = ModelConfig.from_pretrained(ckpt)
    assert c.num_kv_heads == c.num_heads


def test_generation_config_eos_ids_stop_too(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 107]}))
    assert ModelConfig.from_pretrained(ckpt).eos_token_ids == (1, 107)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 10 ** 9}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id 1000000000 is not a token id"):
        ModelConfig.from_pretrained(ckpt)


def test_quantization_config_values_are_checked(ckpt):
    for bad, message in (({"quant_method": "gemforge", "method": "int4", "group_size": "abc"},
                          "quantization_config.group_size must be an integer, got 'abc'"),
                         ({"quant_method": "gemforge", "method": "int8", "symmetric": "false"},
                          "quantization_config.symmetric must be true or false")):
        edit_config(ckpt, quantization_config=bad)
        with pytest.raises(ConfigError, match=message) as e:
            LLM(ckpt, device="cpu", progress=False)
        assert str(ckpt / "config.json") in str(e.value)


def test_quantizing_while_loading_checks_shapes_and_values_first(ckpt):
    with pytest.raises(ConfigError, match="int4 quantization of layers.0.down: in_features 96 is not a multiple "
                                          "of group_size 64"):
        LLM(ckpt, device="cpu", progress=False, quantization="int4", group_size=64)
    _rewrite(ckpt, lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(CheckpointError, match="model.safetensors: parameter layers.1.down: .*1 non-finite"):
        LLM(ckpt, device="cpu", progress=False, quantization="int8")


def _shard(d, weight_map_edit=None):
    """Split d's model.safetensors into two shards with an index (optionally edited)."""
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    if weight_map_edit:
        weight_map_edit(weight_map)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_shard_index_must_agree_with_its_shards(ckpt, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(ckpt, good)
    _shard(good)
    LLM(good, device="cpu", progress=False)  # (a consistent sharded checkpoint loads)
    first = "model-00001-of-00002.safetensors"
    cases = [
        (lambda m: m.__setitem__("model.norm.weight", first if m["model.norm.weight"] != first else
                                 "model-00002-of-00002.safetensors"), "tensor .model.norm.weight. is in model-0000.-of-00002.safetensors, which does not hold it"),
        (lambda m: m.__setitem__("model.layers.0.extra.weight", first), "says tensor 'model.layers.0.extra.weight' is in"),
        (lambda m: m.__setitem__("model.norm.weight", "../elsewhere.safetensors"), "is not a file name inside"),
        (lambda m: m.clear(), "'weight_map' must be a non-empty object"),
    ]
    for i, (edit, message) in enumerate(cases):
        d = tmp_path / f"case{i}"
        shutil.copytree(ckpt, d)
        _shard(d, edit)
        with pytest.raises(CheckpointError, match=message):
            LLM(d, device="cpu", progress=False)
    (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="malformed shard index"):
        LLM(d, device="cpu", progress=False)


def test_pytorch_bin_checkpoint_is_named_as_unsupported(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: PyTorch .bin checkpoints are not read"):
        LLM(ckpt, device="cpu", progress=False)
