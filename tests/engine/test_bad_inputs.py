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
