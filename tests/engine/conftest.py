"""Fixtures for engine tests: a sentencepiece tokenizer trained on the standard library, and tiny
random GemmaForCausalLM checkpoints written by HF transformers itself (our oracle)."""
import glob
import shutil
import sysconfig

import pytest
import torch

VOCAB = 1200


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    from gemforge.engine.tokenizer import train_tokenizer

    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:60]
    return train_tokenizer(files, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=VOCAB,
                           max_chars=600_000)


def hf_config(**kw):
    from transformers import GemmaConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                rms_norm_eps=1e-6, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh",
                bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    base.update(kw)
    return GemmaConfig(**base)


SHAPES = {
    "mqa": {},                                                            # 1 KV head, like the 2B
    "mha": dict(num_key_value_heads=4, head_dim=16),                      # like the 7B
    "gqa_wide_heads": dict(hidden_size=48, num_key_value_heads=2, head_dim=32),  # heads*head_dim != hidden
    "rope_theta_1e6": dict(rope_theta=1e6),  # (transformers 5 writes it inside rope_parameters only)
}


def make_hf_model(seed: int, dtype=torch.float32, noise: float = 0.0, noise_seed: int = 0, **kw):
    """A random HF Gemma whose greedy continuations vary (small embeddings, strong layers: with
    large tied embeddings a random model just repeats its input token), with random norm weights.
    `noise` adds N(0, noise^2) relative perturbations from `noise_seed`: a draft that mostly agrees."""
    from transformers import GemmaForCausalLM

    torch.manual_seed(seed)
    model = GemmaForCausalLM(hf_config(**kw)).eval()
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0.0, 0.05 if "embed" in name else 0.25)
            if noise:
                p.mul_(1 + noise * torch.randn(p.shape, generator=g))
    return model.to(dtype)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_model):
    """make_checkpoint(shape, seed, dtype) -> (directory, HF model); cached per arguments."""
    cache = {}

    def make(shape="mqa", seed=0, dtype=torch.float32, noise=0.0, **save_kw):
        key = (shape, seed, dtype, noise, tuple(sorted(save_kw.items())))
        if key not in cache:
            model = make_hf_model(seed, dtype, noise=noise, **SHAPES[shape])
            d = tmp_path_factory.mktemp(f"ckpt-{shape}")
            model.save_pretrained(d, safe_serialization=True, **save_kw)
            shutil.copyfile(tokenizer_model, d / "tokenizer.model")
            cache[key] = (d, model)
        return cache[key]

    return make
