"""The `gemforge` command line: `gemforge generate ...`, `gemforge serve MODEL ...`."""
from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
from pathlib import Path

from .errors import GemforgeError


def _generate(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, backend=args.backend,
              quantization=args.quantization, draft_model=args.draft_model,
              warmup=False)  # one request: capturing every batch bucket's graphs first would only delay it
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    if args.chat and args.suffix is not None:
        raise GemforgeError("--chat and --suffix (infill) cannot be used together")
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0].outputs[0]
    else:
        out = llm.generate([args.prompt], params, suffixes=[args.suffix] if args.suffix is not None else None,
                           fim_mode=args.fim_mode, use_tqdm=False)[0].outputs[0]
    if args.chat:
        print(out.text)
    elif args.suffix is not None:
        print(f"{args.prompt}\033[1m{out.text}\033[0m{args.suffix}" if sys.stdout.isatty() else out.text)
    else:
        print(args.prompt + out.text)
    spec = ""
    if out.spec:
        spec = (f", speculative: {out.spec['accepted']}/{out.spec['proposed']} drafts accepted, "
                f"{out.spec['tokens_per_step']:.2f} tokens per target forward")
    print(f"[{out.num_tokens} tokens, finish_reason={out.finish_reason}{spec}]", file=sys.stderr)
    return 0


def serve_config(args):
    """The EngineConfig of `gemforge serve`'s arguments."""
    from .engine import EngineConfig

    return EngineConfig(dtype=args.dtype, device=args.device, backend=args.backend, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens,
                        max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                        quantization=args.quantization, draft_model=args.draft_model,
                        draft_quantization=args.draft_quantization, draft_vocab_size=args.draft_vocab_size,
                        draft_vocab_corpus=args.draft_vocab_corpus, num_speculative_tokens=args.num_speculative_tokens,
                        enable_prefix_caching=args.enable_prefix_caching, cuda_graphs=args.cuda_graphs,
                        warmup=args.warmup, async_scheduling=args.async_scheduling)


def _serve(args) -> int:
    import uvicorn

    from .async_engine import AsyncEngine
    from .engine import Engine
    from .server.app import build_app

    logging.getLogger("gemforge").setLevel(logging.INFO)
    engine = AsyncEngine(Engine(args.model, serve_config(args)))
    app = build_app(engine, args.served_model_name or Path(args.model).resolve().name,
                    api_key=args.api_key or os.environ.get("GEMFORGE_API_KEY") or None)
    # The server process lives for the model: what loading left alive moves out of the collector's
    # way (its full collections would walk it on every pass; a step at 64 running sequences: 714 ->
    # 507 us, ad hoc, CPU). A library caller's process is left alone.
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # (so that shutdown still frees it: extensions check for leaks then)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _quantize(args) -> int:
    import torch

    from .config import ModelConfig
    from .loader import load_weights, save_checkpoint, to_dtype
    from .quantization import QuantConfig, weight_bytes

    src = Path(args.model)
    cfg = ModelConfig.from_pretrained(src)
    if cfg.quantization:
        raise GemforgeError(f"{src}: already quantized ({cfg.quantization})")
    if not (src / "tokenizer.model").is_file():
        raise GemforgeError(f"{src / 'tokenizer.model'}: not found (the quantized checkpoint is written with it)")
    quant = QuantConfig(args.method, args.group_size, not args.asymmetric, args.quantize_lm_head)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = to_dtype(cfg.dtype if args.dtype == "auto" else args.dtype)
    weights = load_weights(src, cfg, dtype, device, quant, progress=True)
    save_checkpoint(args.out, cfg.replace(dtype=str(dtype).replace("torch.", "")), weights,
                    tokenizer_model=src / "tokenizer.model", quant=quant, progress=True)
    size = weight_bytes(weights)
    print(f"wrote {args.out}: {quant.method} weights, {size['total'] / 1e6:.1f} MB "
          f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in size.items() if v and k != 'total')})")
    return 0


def _bench(args) -> int:
    """The CPU-capable benchmarks in one go: kernels (small shapes), host overhead, throughput and
    time to first token against HF transformers, prefix caching on against off and, with a draft,
    speculative decoding; a table at the end."""
    import importlib.util
    import subprocess

    from tqdm.auto import tqdm

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (bench_dir / "engine").is_dir():
        raise GemforgeError(f"gemforge bench runs from a source checkout; {bench_dir} not found")
    from .config import ModelConfig

    models = bench_dir.parent / "models"
    model = Path(args.model) if args.model else models / "nano-codegemma"
    draft = Path(args.draft) if args.draft else models / "nano-codegemma-draft"
    for path in (model, draft) if args.draft else (model,):
        ModelConfig.from_pretrained(path)  # (a wrong path fails now, not after the kernel benchmarks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def module(path: Path):
        if str(path.parent) not in sys.path:  # a benchmark imports its siblings (report.py, ...)
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    m = str(model)
    parts = [("kernels", None), ("host_overhead", ["--model", m, "--batches", "1", "64", "256"]),
             ("throughput", ["--model", m, "--concurrency", "1", "8", "64", "--max-tokens", "32"]),
             ("step_breakdown", ["--model", m, "--concurrency", "1", "64", "--max-tokens", "32"]),
             ("prefill", ["--model", m, "--lengths", "128", "512"]),
             ("prefix_cache", ["--model", m, "--prefix", "1000", "--requests", "6", "--batch", "8"])]
    if draft.is_dir():  # (the bundled draft, where it is; one given was checked above)
        parts.append(("speculative", ["--target", m, "--draft", str(draft), "--ks", "2", "4"]))
    results = {}
    for name, argv in tqdm(parts, desc="gemforge bench", unit="part"):
        if name == "kernels":
            safe = {**os.environ, "PYTHONSAFEPATH": "1"}  # (see the Makefile's test target)
            rc = subprocess.call([sys.executable, "-m", "pytest", "-q", str(bench_dir / "kernels"), "--benchmark-only",
                                  f"--benchmark-json={out / 'kernels.json'}", "-p", "no:cacheprovider"],
                                 stdout=subprocess.DEVNULL, env=safe)
            results[name] = "ok" if rc == 0 else f"failed (pytest exit {rc})"
            continue
        results[name] = module(bench_dir / "engine" / f"bench_{name}.py").main(argv + ["--out", str(out / f"{name}.json")])
    table = module(bench_dir / "summarize.py").table
    for name, rows in results.items():
        print(f"\n## {name}")
        print(table(rows, list(dict.fromkeys(k for r in rows for k in r))) if isinstance(rows, list) else rows)
    print(f"\n(JSON in {out})")
    return 0


DRAFT_HELP = "speculative decoding: a small model of the same tokenizer, or [ngram] (prompt lookup)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemforge", description="CodeGemma inference engine")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete (or, with --suffix, infill) one prompt")
    g.add_argument("--model", required=True, help="HF-layout model directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--suffix", default=None, help="text after the gap: CodeGemma fill-in-the-middle")
    g.add_argument("--chat", action="store_true", help="the prompt is a user's message, answered through the "
                   "chat template (an instruction-tuned model such as codegemma-7b-it)")
    g.add_argument("--fim-mode", default="psm", choices=["psm", "spm"])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpu", "torch"])
    g.add_argument("--quantization", default=None, choices=["int8", "int4"], help="quantize weights while loading")
    g.add_argument("--draft-model", default=None, help=DRAFT_HELP)
    g.set_defaults(func=_generate)

    q = sub.add_parser("quantize", help="write an int8/int4 weight-only quantized copy of a checkpoint")
    q.add_argument("model", help="HF-layout model directory")
    q.add_argument("out", help="output directory")
    q.add_argument("--method", required=True, choices=["int8", "int4"])
    q.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="int4 group along K")
    q.add_argument("--asymmetric", action="store_true", help="int4 with zero points")
    q.add_argument("--quantize-lm-head", action="store_true", help="also quantize the tied embedding / LM head")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of scales and unquantized weights (default: the checkpoint's)")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")
    q.set_defaults(func=_quantize)

    b = sub.add_parser("bench", help="CPU-capable benchmarks: kernels, host overhead, throughput vs HF transformers")
    b.add_argument("--model", default=None, help="HF-layout model directory (default: the bundled nano-codegemma)")
    b.add_argument("--draft", default=None, help="draft for the speculative sweep (default: the bundled "
                   "nano-codegemma-draft)")
    b.add_argument("--out", default="bench-results", help="directory for the JSON results")
    b.set_defaults(func=_bench)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (completions, infill, chat)")
    s.add_argument("model", help="HF-layout model directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $GEMFORGE_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the directory name)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpu", "torch"])
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens one step may run (chunked prefill)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of GPU memory for weights, activations and the KV cache (default 0.85)")
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache size (default: from free memory)")
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--quantization", default=None, choices=["int8", "int4"], help="quantize weights while loading")
    s.add_argument("--draft-model", default=None, help=DRAFT_HELP)
    s.add_argument("--draft-quantization", default=None, choices=["int8", "int4"],
                   help="quantize the draft model while loading (its LM head too)")
    s.add_argument("--draft-vocab-size", type=int, default=None,
                   help="the draft proposes only among this many tokens, its LM head cut to them (default: all)")
    s.add_argument("--draft-vocab-corpus", default=None,
                   help="a text file or directory whose most frequent tokens those are (default: the tokenizer's "
                        "scores)")
    s.add_argument("--num-speculative-tokens", type=int, default=4)
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of prompt prefixes seen before (default: on)")
    s.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay decode steps and verify windows from CUDA graphs (default: on; GPU only)")
    s.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the kernels and capture every CUDA graph before serving (default: on; GPU only)")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before reading the previous one's tokens (default: on a GPU)")
    s.set_defaults(func=_serve)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GemforgeError as e:
        print(f"gemforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
