"""Train the bundled nano-codegemma pair on CPU, the way CodeGemma was trained, and evaluate it.

Data: the running interpreter's standard library (.py files; tests excluded). A fixed 5% of
files (by CRC32 of their relative path) is held out for evaluation. Files of one package follow
each other, each closed by <|file_separator|>; files are cut at line boundaries into samples that
fit a 256-token row, and 80% of the samples become fill-in-the-middle samples (half PSM, half SPM,
the middle 1-8 whole lines, ending in <|file_separator|>). The target (multi-head attention, like the 7B) is
trained by next-token prediction; the draft (one KV head, like the 2B, several times smaller) is
distilled from the target (half cross-entropy, half KL to the target's distribution).

    python scripts/train_nano.py --out models [--target-steps N --draft-steps N] [--eval-only]

Writes models/nano-codegemma, models/nano-codegemma-draft (HF layout, bf16) and
models/nano-codegemma/training.json (config, loss curve, held-out metrics).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from gemforge.engine.tokenizer import FILE_SEPARATOR, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, Tokenizer, train_tokenizer

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
SEQ_LEN = 256
PAD = 0
VOCAB = 8192
TARGET = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=4, head_dim=64)
DRAFT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=1, head_dim=32)


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not EXCLUDED_DIRS & set(p.relative_to(root).parts))
    return root, files


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 20 == 0


def package_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else "<top>"


def fim_text(lines: list[str], rng: random.Random) -> str:
    """CodeGemma FIM split at line boundaries (a middle of 1-8 lines), half PSM, half SPM."""
    a = rng.randrange(0, len(lines))
    b = min(len(lines), a + rng.choice([1, 1, 1, 2, 3, 5, 8]))
    pre, mid, suf = "".join(lines[:a]), "".join(lines[a:b]), "".join(lines[b:])
    if rng.random() < 0.5:
        return f"{FIM_PREFIX}{pre}{FIM_SUFFIX}{suf}{FIM_MIDDLE}{mid}"
    return f"{FIM_PREFIX}{FIM_SUFFIX}{suf}{FIM_MIDDLE}{pre}{mid}"


def pack_rows(tok: Tokenizer, root: Path, files: list[Path], rng: random.Random, fim_rate: float) -> torch.Tensor:
    """Training rows [N, SEQ_LEN + 1]. Files of one package follow each other; each file is cut at
    line boundaries into samples that fit the row they start in: [BOS] text, closed by
    <|file_separator|> at the file's end. A fraction fim_rate of the samples (of 3+ lines) is
    FIM-transformed, and a FIM middle always ends in <|file_separator|>, so every FIM sample is
    seen whole. A row's unused tail is padding (id 0, no loss)."""
    width, sep, pad = SEQ_LEN + 1, tok.special_ids[FILE_SEPARATOR], tok.pad_id
    rows: list[list[int]] = []
    row: list[int] = []

    def flush():
        nonlocal row
        if row:
            rows.append(row + [pad] * (width - len(row)))
        row = []

    packages: dict[str, list[Path]] = {}
    for f in files:
        packages.setdefault(package_of(f.relative_to(root)), []).append(f)
    for name in sorted(packages):
        group = packages[name][:]
        rng.shuffle(group)
        for f in group:
            lines = f.read_text(encoding="utf-8", errors="ignore").splitlines(keepends=True)
            counts = [len(tok.encode(line, add_bos=False)) for line in lines]
            i = 0
            while i < len(lines):
                room = width - len(row)
                if room < 32:
                    flush()
                    continue
                budget = min(room, rng.randint(64, width)) - 5      # BOS, separator, 3 FIM tokens
                j, used = i, 0
                while j < len(lines) and used + counts[j] <= budget:
                    used += counts[j]
                    j += 1
                sample = None
                while j > i:
                    fim = j - i >= 3 and rng.random() < fim_rate
                    text = fim_text(lines[i:j], rng) if fim else "".join(lines[i:j])
                    sample = [tok.bos_id] + tok.encode(text, add_bos=False) + ([sep] if fim or j == len(lines) else [])
                    if len(sample) <= room:
                        break
                    j, sample = j - 1, None
                if sample is None:          # not even one line fits here
                    if row:
                        flush()
                    else:
                        i += 1              # a line longer than a whole row: skipped
                    continue
                row += sample
                i = j
    flush()
    return torch.tensor(rows, dtype=torch.long)


def batches(rows: torch.Tensor, batch: int, g: torch.Generator):
    while True:
        yield rows[torch.randint(0, len(rows), (batch,), generator=g)]


def make_model(shape: dict, seed: int):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                      hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
                      tie_word_embeddings=True, attn_implementation="sdpa", **shape)
    return GemmaForCausalLM(cfg)


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train(model, rows, steps: int, peak_lr: float, batch: int, seed: int, teacher=None, log_every: int = 25):
    """AdamW with warmup + cosine decay; next-token cross-entropy over non-padding targets, and with a
    teacher half of it replaced by KL(teacher || model) (distillation)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve, t0 = [], time.time()
    model.train()
    for step, xb in zip(range(steps), batches(rows, batch, g)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        inp, tgt = xb[:, :-1], xb[:, 1:]
        real = tgt != PAD
        logits = model(inp).logits
        loss = ce = F.cross_entropy(logits[real], tgt[real])
        if teacher is not None:
            with torch.no_grad():
                t_logp = teacher(inp).logits[real].log_softmax(-1)
            kl = F.kl_div(logits[real].log_softmax(-1), t_logp, log_target=True, reduction="batchmean")
            loss = 0.5 * ce + 0.5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "loss": round(ce.item(), 4), "minutes": round((time.time() - t0) / 60, 2)})
            print(json.dumps(curve[-1]), flush=True)
    model.eval()
    return curve, (time.time() - t0) / 60


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, n: int = 96) -> float:
    """exp(mean next-token cross-entropy) over the non-padding targets of the first n rows."""
    total, count = 0.0, 0
    for xb in rows[:n].split(16):
        tgt = xb[:, 1:]
        real = tgt != PAD
        logits = model(xb[:, :-1]).logits
        total += F.cross_entropy(logits[real], tgt[real], reduction="sum").item()
        count += real.sum().item()
    return math.exp(total / count)


@torch.no_grad()
def greedy_agreement(target, draft, rows: torch.Tensor, n: int = 96) -> float:
    """Fraction of held-out positions where draft and target predict the same next token."""
    agree = count = 0
    for xb in rows[:n].split(16):
        inp = xb[:, :-1]
        real = xb[:, 1:] != PAD
        agree += (target(inp).logits.argmax(-1) == draft(inp).logits.argmax(-1))[real].sum().item()
        count += real.sum().item()
    return agree / count


def fim_cases(tok: Tokenizer, files: list[Path], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prefix, middle line, suffix): a non-trivial held-out line with up to 12 lines before and 6
    after it, the prefix shortened from the top until the PSM prompt fits in 200 tokens."""
    rng, cases = random.Random(seed), []
    while len(cases) < n:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="ignore").splitlines(keepends=True)
        if len(lines) < 5:
            continue
        i = rng.randrange(1, len(lines) - 1)
        if len(lines[i].strip()) < 8:
            continue
        before, suffix = lines[max(0, i - 12): i], "".join(lines[i + 1: i + 7])
        while before and len(tok.encode(tok.fim_prompt("".join(before), suffix))) > 200:
            before = before[1:]
        if before:
            cases.append(("".join(before), lines[i], suffix))
    return cases


def fim_exact_match(model_dir: Path, cases, mode: str) -> float:
    from gemforge.engine import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", progress=False)
    params = SamplingParams(max_tokens=48, temperature=0.0, stop=["\n"])
    outs = llm.generate([c[0] for c in cases], params, suffixes=[c[2] for c in cases], fim_mode=mode, use_tqdm=False)
    hits = sum(o.outputs[0].text.strip() == c[1].strip() for o, c in zip(outs, cases))
    return hits / len(cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models")
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--draft-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true", help="only (re-)measure the models already in --out")
    args = ap.parse_args()
    if args.eval_only:
        evaluate(Path(args.out))
        return
    torch.set_num_threads(2)
    random.seed(args.seed)
    out = Path(args.out)
    root, files = stdlib_files()
    train_files = [f for f in files if not is_heldout(str(f.relative_to(root)))]
    held_files = [f for f in files if is_heldout(str(f.relative_to(root)))]
    t0 = time.time()
    tok_path = train_tokenizer(train_files, out / "tokenizer", vocab_size=VOCAB)
    tok = Tokenizer(tok_path)
    rng = random.Random(args.seed)
    train_rows = pack_rows(tok, root, train_files, rng, fim_rate=0.8)
    held_rows = pack_rows(tok, root, held_files, random.Random(1), fim_rate=0.0)
    tokens = {"train": int((train_rows != PAD).sum()), "heldout": int((held_rows != PAD).sum())}
    print(f"tokens: {tokens}, rows: train {len(train_rows)}, held-out {len(held_rows)}", flush=True)

    target = make_model(TARGET, args.seed)
    t_curve, t_min = train(target, train_rows, args.target_steps, 3e-3, args.batch, args.seed)
    for p in target.parameters():
        p.requires_grad_(False)
    draft = make_model(DRAFT, args.seed + 1)
    d_curve, d_min = train(draft, train_rows, args.draft_steps, 4e-3, args.batch, args.seed + 1, teacher=target)

    dirs = model_dirs(out)
    for name, model in (("target", target), ("draft", draft)):
        model.to(torch.bfloat16).save_pretrained(dirs[name], safe_serialization=True)
        (dirs[name] / "tokenizer.model").write_bytes(tok_path.read_bytes())
        (dirs[name] / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
             "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
    tok_path.unlink()
    info = {
        "tokens": tokens,
        "heldout_files": [str(f.relative_to(root)) for f in held_files],
        "python": sysconfig.get_python_version(),
        "minutes": {"target": round(t_min, 1), "draft": round(d_min, 1), "total": round((time.time() - t0) / 60, 1)},
        "curve": {"target": t_curve, "draft": d_curve},
        "settings": {"seq_len": SEQ_LEN, "vocab": VOCAB, "batch": args.batch, "target_steps": args.target_steps,
                     "draft_steps": args.draft_steps, "seed": args.seed, "target": TARGET, "draft": DRAFT},
    }
    (dirs["target"] / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    evaluate(out)


def model_dirs(out: Path) -> dict[str, Path]:
    return {"target": out / "nano-codegemma", "draft": out / "nano-codegemma-draft"}


SAMPLE_PROMPTS = ["import os\n\n\ndef read_lines(path):\n", "class Stack:\n    def __init__(self):\n"]
SAMPLE_INFILLS = [("def is_even(n):\n    ", "\n\n\ndef is_odd(n):\n    return not is_even(n)\n")]


def greedy_samples(model_dir: Path, cases) -> list[dict]:
    """A few greedy completions and infills (the demo's prompts and two held-out FIM cases)."""
    from gemforge.engine import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", progress=False)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    out = [{"prompt": p, "completion": llm.generate([p], params, use_tqdm=False)[0].outputs[0].text}
           for p in SAMPLE_PROMPTS]
    for pre, suf in SAMPLE_INFILLS + [(c[0], c[2]) for c in cases[:2]]:
        text = llm.generate([pre], params, suffixes=[suf], use_tqdm=False)[0].outputs[0].text
        out.append({"prefix": pre, "suffix": suf, "middle": text})
    return out


def speculative_stats(dirs: dict[str, Path], prompts: list[str], k: int = 4) -> dict:
    """Greedy speculative decoding of the pair through the engine (fixed lookahead k): acceptance rate
    and tokens per target forward over the prompts, 48 tokens each."""
    from gemforge.engine import LLM, SamplingParams

    llm = LLM(dirs["target"], dtype="float32", device="cpu", progress=False, draft_model=dirs["draft"],
              num_speculative_tokens=k, adaptive_lookahead=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True), use_tqdm=False)
    spec = [o.outputs[0].spec for o in outs]
    proposed, accepted, steps = (sum(x[key] for x in spec) for key in ("proposed", "accepted", "verify_steps"))
    return {"k": k, "prompts": len(prompts), "acceptance_rate": round(accepted / proposed, 3),
            "tokens_per_target_forward": round((accepted + steps) / steps, 2)}


def quantized_quality(model_dir: Path, ids: list[int]) -> dict:
    """Held-out perplexity through the engine (fp32 compute) of the dense weights and of int8 /
    int4-g128 weight-only quantization, and each format's greedy agreement with the dense model."""
    from gemforge.engine import LLM
    from gemforge.engine import evaluate as ev

    dense = LLM(model_dir, dtype="float32", device="cpu", progress=False)
    res = {"tokens": len(ids), "dense": {"perplexity": round(ev.perplexity(dense, ids), 3)}}
    for method in ("int8", "int4"):
        q = LLM(model_dir, dtype="float32", device="cpu", progress=False, quantization=method)
        res[method] = {"perplexity": round(ev.perplexity(q, ids), 3),
                       "greedy_agreement": round(ev.greedy_agreement(dense, q, ids), 4)}
    return res


def evaluate(out: Path) -> dict:
    """Held-out metrics of the shipped (bf16) weights, added to nano-codegemma/training.json."""
    from transformers import GemmaForCausalLM

    dirs = model_dirs(out)
    info_path = dirs["target"] / "training.json"
    info = json.loads(info_path.read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    held_files = [root / f for f in info["heldout_files"]]
    tok = Tokenizer(dirs["target"] / "tokenizer.model")
    held_rows = pack_rows(tok, root, held_files, random.Random(1), fim_rate=0.0)
    target = GemmaForCausalLM.from_pretrained(dirs["target"], dtype=torch.float32).eval()
    draft = GemmaForCausalLM.from_pretrained(dirs["draft"], dtype=torch.float32).eval()
    cases = fim_cases(tok, held_files, 100, seed=7)
    info.update({
        "params": {"target": sum(p.numel() for p in target.parameters()),
                   "draft": sum(p.numel() for p in draft.parameters())},
        "heldout_perplexity": {"target": round(perplexity(target, held_rows), 2),
                               "draft": round(perplexity(draft, held_rows), 2)},
        "greedy_agreement": round(greedy_agreement(target, draft, held_rows), 3),
        "fim_exact_match": {m: {"target": fim_exact_match(dirs["target"], cases, m),
                                "draft": fim_exact_match(dirs["draft"], cases, m)} for m in ("psm", "spm")},
        "speculative": speculative_stats(dirs, [c[0] for c in cases[:16]]),
        "quantization": quantized_quality(dirs["target"], held_rows[:32][held_rows[:32] != PAD].tolist()),
        "samples": greedy_samples(dirs["target"], cases),
    })
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    (out / "README.md").write_text(model_card(info))
    print(json.dumps({k: v for k, v in info.items() if k not in ("curve", "heldout_files")}, indent=1))
    return info


def model_card(info: dict) -> str:
    """models/README.md, every number in it read from training.json."""
    st, ppl, fim, sp = info["settings"], info["heldout_perplexity"], info["fim_exact_match"], info["speculative"]
    qz = info["quantization"]
    shape = lambda m: (f"hidden {st[m]['hidden_size']}, {st[m]['num_hidden_layers']} layers, "
                       f"{st[m]['num_attention_heads']} heads / {st[m]['num_key_value_heads']} KV heads, "
                       f"head_dim {st[m]['head_dim']}, GeGLU {st[m]['intermediate_size']}")
    curve = info["curve"]["target"]
    marks = [c for c in curve if c["step"] % 100 == 0 or c is curve[-1]]
    dcurve = {c["step"]: c["loss"] for c in info["curve"]["draft"]}
    lines = [
        "# nano-codegemma: a bundled, trained draft/target pair",
        "",
        "Two miniature CodeGemma models (Gemma-1 architecture, HF `GemmaForCausalLM` layout, bf16 safetensors)",
        "so that completion, infill, speculative decoding and quantization quality can be shown and measured",
        "on a CPU. They write Python-shaped code; they are not useful code models. Every number below",
        "is read from `nano-codegemma/training.json`, written by the run that made the weights:",
        "",
        "    python scripts/train_nano.py --out models            # train + evaluate (about an hour on 2 cores)",
        "    python scripts/train_nano.py --out models --eval-only  # re-measure the shipped weights",
        "",
        "| model | shape | parameters | like |",
        "|---|---|---|---|",
        f"| `nano-codegemma` (target) | {shape('target')} | {info['params']['target'] / 1e6:.2f} M | codegemma-7b (MHA) |",
        f"| `nano-codegemma-draft` | {shape('draft')} | {info['params']['draft'] / 1e6:.2f} M | codegemma-2b (MQA) |",
        "",
        f"Both: vocabulary {st['vocab']} (shared tokenizer), RoPE theta 10000, RMSNorm (1 + w), tied LM head.",
        "",
        "## Data",
        f"The standard library of Python {info['python']} (`.py` files, test folders excluded): "
        f"{info['tokens']['train']:,} training tokens. Held out: the {len(info['heldout_files'])} files whose "
        f"CRC32 of the relative path is 0 mod 20 ({info['tokens']['heldout']:,} tokens; the list is in "
        "training.json). The files of one package follow each other, each closed by `<|file_separator|>`. "
        f"Files are cut at line boundaries into samples that fit a {st['seq_len']}-token row, and 80% of the "
        "samples become fill-in-the-middle samples as the CodeGemma card describes: half PSM "
        "(`<|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>mid`), half SPM "
        "(`<|fim_prefix|><|fim_suffix|>suf<|fim_middle|>pre mid`), the middle 1-8 whole lines, ending in "
        "`<|file_separator|>`.",
        "",
        "**Tokenizer:** sentencepiece BPE with byte fallback, Gemma's ids for `<pad>`=0 `<eos>`=1 `<bos>`=2 "
        "`<unk>`=3, and `<|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|file_separator|> <start_of_turn> "
        "<end_of_turn>` as single pieces; it round-trips source exactly (tested on the held-out files).",
        "",
        "## Training",
        f"Seed {st['seed']}, batch {st['batch']} x {st['seq_len']} tokens, AdamW (0.9, 0.95, wd 0.1), "
        "50 warm-up steps then cosine decay to 10%, gradient clip 1.0, fp32 on CPU (2 threads). "
        f"Target: {st['target_steps']} steps of next-token prediction, peak lr 3e-3, "
        f"{info['minutes']['target']} min. Draft: {st['draft_steps']} steps distilled from the target "
        f"(half cross-entropy, half KL to the target's distribution), peak lr 4e-3, {info['minutes']['draft']} min. "
        f"Whole run (tokenizer and data included, evaluation not): {info['minutes'].get('total', '?')} min.",
        "",
        "| step | target loss | draft loss |",
        "|---:|---:|---:|",
        *[f"| {c['step']} | {c['loss']:.2f} | {dcurve[c['step']]:.2f} |" if c["step"] in dcurve
          else f"| {c['step']} | {c['loss']:.2f} | |" for c in marks],
        "",
        "(single-batch training losses, noisy.)",
        "",
        "## Results on the held-out files (shipped bf16 weights, computed in fp32)",
        "| metric | target | draft |",
        "|---|---:|---:|",
        f"| perplexity (next token, plain code) | {ppl['target']} | {ppl['draft']} |",
        f"| FIM exact match of the middle line, PSM (100 cases) | {fim['psm']['target']:.0%} | {fim['psm']['draft']:.0%} |",
        f"| FIM exact match of the middle line, SPM | {fim['spm']['target']:.0%} | {fim['spm']['draft']:.0%} |",
        "",
        f"- **Greedy agreement** (draft argmax == target argmax, every held-out position): "
        f"**{info['greedy_agreement']:.1%}** - the number that predicts speculative acceptance.",
        f"- **Speculative decoding** through the engine (greedy, k = {sp['k']}, {sp['prompts']} held-out prompts, "
        f"48 tokens each): acceptance rate {sp['acceptance_rate']:.1%}, "
        f"{sp['tokens_per_target_forward']} tokens per target forward.",
        "- FIM cases: a held-out line of 8+ characters, up to 12 lines before it and 6 after, greedy, "
        "the generation cut at the first newline and compared stripped.",
        "",
        f"**Limits.** With {info['params']['target'] / 1e6:.1f}M parameters trained for {st['target_steps']} steps on "
        f"{info['tokens']['train'] / 1e6:.1f}M tokens (about "
        f"{st['target_steps'] * st['batch'] * st['seq_len'] / info['tokens']['train']:.1f} epochs), the target "
        "has learned Python's surface: indentation, docstrings, common identifiers and call shapes. It "
        f"rarely reproduces a held-out line exactly (the FIM numbers above: {fim['psm']['target']:.0%} PSM, "
        f"{fim['spm']['target']:.0%} SPM) and greedy decoding falls into repetition loops (see the samples). "
        "That is enough for what the pair is for here: speculative acceptance, quantization error and the "
        "demo are measured on a model with a real, peaked next-token distribution rather than random weights.",
        "",
        "## Weight-only quantization of the target (through the engine, fp32 compute)",
        f"Held-out perplexity over {qz['tokens']:,} tokens, and greedy agreement with the unquantized model "
        "at every position:",
        "",
        "| weights | perplexity | change | greedy agreement |",
        "|---|---:|---:|---:|",
        f"| dense | {qz['dense']['perplexity']} | | |",
        *[f"| {m} | {qz[m]['perplexity']} | {qz[m]['perplexity'] / qz['dense']['perplexity'] - 1:+.2%} | "
          f"{qz[m]['greedy_agreement']:.1%} |" for m in ("int8", "int4")],
        "",
        "(int8: symmetric per output channel; int4: group 128 along the input, symmetric; LM head unquantized.)",
        "",
        "## Greedy samples (target)",
    ]
    for smp in info["samples"]:
        if "completion" in smp:
            lines += ["", "Completion:", "```python", smp["prompt"] + smp["completion"], "```"]
        else:
            lines += ["", "Infill (the model's middle between the `<<<` `>>>` marks):", "```python",
                      smp["prefix"] + "<<<" + smp["middle"] + ">>>" + smp["suffix"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
