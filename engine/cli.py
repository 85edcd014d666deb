"""The `gemforge` command line: `gemforge generate ...`."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import GemforgeError


def _generate(args) -> int:
    from .llm import LLM
    from .sampling import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    out = llm.generate([args.prompt], params, suffixes=[args.suffix] if args.suffix is not None else None,
                       fim_mode=args.fim_mode, use_tqdm=False)[0].outputs[0]
    if args.suffix is not None:
        print(f"{args.prompt}\033[1m{out.text}\033[0m{args.suffix}" if sys.stdout.isatty() else out.text)
    else:
        print(args.prompt + out.text)
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemforge", description="CodeGemma inference engine")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete (or, with --suffix, infill) one prompt")
    g.add_argument("--model", required=True, help="HF-layout model directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--suffix", default=None, help="text after the gap: CodeGemma fill-in-the-middle")
    g.add_argument("--fim-mode", default="psm", choices=["psm", "spm"])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "torch"])
    g.set_defaults(func=_generate)
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
