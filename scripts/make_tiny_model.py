"""Write a tiny random-weight CodeGemma-shaped checkpoint (HF layout) with a sentencepiece
tokenizer trained on this interpreter's standard library. A stand-in default model until the
trained nano-codegemma pair is bundled; its completions are random text.

    python scripts/make_tiny_model.py OUT_DIR
"""
import glob
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from gemforge.engine.config import ModelConfig
from gemforge.engine.loader import save_checkpoint
from gemforge.engine.tokenizer import train_tokenizer
from gemforge.engine.weights import random_weights


def main(out: str) -> None:
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(files, Path(tmp) / "tokenizer", vocab_size=4000, max_chars=3_000_000)
        cfg = ModelConfig(vocab_size=4000, hidden_size=128, intermediate_size=512, num_layers=4,
                          num_heads=4, num_kv_heads=1, head_dim=64, max_position_embeddings=2048,
                          dtype="bfloat16")
        weights = random_weights(cfg, torch.bfloat16, seed=0, std=0.05)
        save_checkpoint(out, cfg, weights, tokenizer_model=tok)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-random-codegemma")
