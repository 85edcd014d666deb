"""End-to-end decode speed on random-weight checkpoints of the real CodeGemma shapes.

For each model and batch size: prefill `--prompt-len` tokens per sequence, then time `--steps`
greedy decode steps through gemforge's runner (host work, metadata and sampling included), each
step's tokens read before the next step (`gemforge_tok_s`) and, as the engine's async scheduling
runs them, read while the next step runs (`gemforge_async_tok_s`), and the same with HF
transformers `generate` (static cache; eager, and with `--hf-compile` its decode step compiled, as
transformers does by itself on a GPU) on the same weights; speedups use the loop the engine runs by
default on the device (async on a GPU). Reports tokens/s and the fraction of the bandwidth roofline:
(weight bytes + KV bytes read per step) / copy bandwidth, and whether the kernels timed compute the model:
their logits against the torch backend's on the same weights (`logits_rel_err`; summarize.py marks a row
above 0.1 WRONG OUTPUT and leaves it out of the implied speedups). `--profile`: instead, the kernels an eager
decode step spends its device time in (torch.profiler), the top ones per model, format and batch.

    python benchmarks/engine/bench_decode.py --models codegemma-2b codegemma-7b --batches 1 8 64 \
        --bandwidth-GBps 3000 --out decode.json
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

import gemforge.kernels._native as native
from gemforge.engine.config import ModelConfig, preset
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.loader import weights_from_state_dict
from gemforge.engine.model import GemmaModel
from gemforge.engine.quantization import QuantConfig, step_bytes
from gemforge.engine.runner import ModelRunner, WorkItem
from gemforge.engine.sampling import greedy
from gemforge.engine.transfer import HostCopy
from gemforge.engine.weights import head_rows

from report import emit, save

DRAFT_VOCAB = 32768  # the '-vocab' formats' LM head rows (a draft with draft_vocab_size=32768)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_model(cfg: ModelConfig, dtype, device):
    from transformers import GemmaConfig, GemmaForCausalLM

    hf_cfg = GemmaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type",
                                                                                   "torch_dtype")})
    with torch.device(device):
        model = GemmaForCausalLM(hf_cfg).to(dtype).eval()
    return model


def bench_gemforge(model: GemmaModel, batch: int, prompt_len: int, steps: int, cuda_graphs: bool,
                   block_size: int = 16, overlap: bool = False) -> dict:
    """Greedy decode steps through the runner. overlap: as the engine's async scheduling runs them,
    each step launched with the previous step's tokens from the device before the host reads those
    (from a pinned copy behind an event); else each step's tokens are read before the next."""
    cfg = model.cfg
    runner, cache, logits = prefilled(model, batch, prompt_len, prompt_len + steps + 1, cuda_graphs, block_size)
    last = logits.argmax(-1).tolist()

    def step(pos):
        for i in range(batch):
            cache.blocks.append(i, 1)
        return runner.run([WorkItem(i, [last[i]], pos) for i in range(batch)]).argmax(-1).tolist()

    def launch(pos, ids):  # -> the step's tokens on the device and their copy on the way to the host
        for i in range(batch):
            cache.blocks.append(i, 1)
        nxt = greedy(runner.run([WorkItem(i, [0], pos) for i in range(batch)], ids))
        return nxt, HostCopy(nxt)

    last = step(prompt_len)  # warm-up (compiles Triton kernels)
    first = torch.tensor(last, device=model.device)
    sync()
    t = time.perf_counter()
    decoded = []  # each step's tokens
    if overlap:
        pending = launch(prompt_len + 1, first)
        for s in range(1, steps):
            nxt = launch(prompt_len + 1 + s, pending[0])
            decoded.append(pending[1].read())  # step s - 1's tokens, while step s runs
            pending = nxt
        decoded.append(pending[1].read())
    else:
        for s in range(steps):
            last = step(prompt_len + 1 + s)
            decoded.append(last)
    sync()
    dt = (time.perf_counter() - t) / steps
    kv_bytes = batch * (prompt_len + steps // 2) * KVCache.bytes_per_token(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.tensor([], dtype=model.dtype).element_size())
    return {"step_ms": dt * 1e3, "tokens_per_s": batch / dt, "kv_bytes": kv_bytes, "tokens": decoded}


def prefilled(model: GemmaModel, batch: int, prompt_len: int, total: int, cuda_graphs: bool,
              block_size: int = 16) -> tuple[ModelRunner, KVCache, torch.Tensor]:
    """A runner over a fresh cache for `batch` sequences of up to `total` tokens, their random
    `prompt_len`-token prompts prefilled; and the logits of each sequence's last prompt token."""
    cfg = model.cfg
    cache = KVCache(cfg.num_layers, batch * -(-total // block_size), block_size, cfg.num_kv_heads,
                    cfg.head_dim, model.dtype, model.device)
    runner = ModelRunner(model, cache, cuda_graphs=cuda_graphs, max_graph_batch=batch, max_context=total)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    for i in range(batch):
        cache.blocks.append(i, prompt_len)
    return runner, cache, runner.run([WorkItem(i, prompts[i], 0) for i in range(batch)])


def logits_error(model: GemmaModel, batch: int, cuda_graphs: bool, prompt_len: int = 16) -> dict:
    """Whether the kernels timed compute the model: its logits against the torch backend's (reference ops,
    eager) on the same weights, over a prefill of `batch` random prompts and one decode step fed the
    reference's greedy tokens, run as the timed steps run (from CUDA graphs where those are on).
    logits_rel_err: max |ours - ref| / max |ref| over both steps (rounding of the 16-bit types: ~1e-2; a
    kernel computing something else: ~1); greedy_agree: the share of the decode step's tokens that agree."""
    ref = GemmaModel(model.cfg, model.w, model.dtype, model.device, "torch")
    feed, out = None, []
    for m, graphs in ((ref, False), (model, cuda_graphs)):
        runner, cache, first = prefilled(m, batch, prompt_len, prompt_len + 1, graphs)
        first = first.to(torch.float32, copy=True)  # (the next replay of a CUDA graph overwrites its output)
        feed = first.argmax(-1).tolist() if feed is None else feed
        for i in range(batch):
            cache.blocks.append(i, 1)
        out.append(torch.cat([first, runner.run([WorkItem(i, [feed[i]], prompt_len) for i in range(batch)]).float()]))
    ours, want = out[1], out[0]
    err = (ours - want).abs().max() / want.abs().max()
    agree = (ours[batch:].argmax(-1) == want[batch:].argmax(-1)).float().mean()
    return {"logits_rel_err": round(float(err), 4), "greedy_agree": round(float(agree), 3)}


def profile_decode(model: GemmaModel, batch: int, prompt_len: int, steps: int = 4, top: int = 10) -> dict:
    """Where an eager decode step's time goes: the `top` kernels by device time per step (on a CPU, the
    ops by CPU time), with calls per step and share of the step's busy time, beside the step's wall
    time, busy time and count of kernels. Eager, so that each kernel shows as itself (a graph replays
    the same ones)."""
    from torch.profiler import ProfilerActivity, profile

    runner, cache, logits = prefilled(model, batch, prompt_len, prompt_len + steps + 2, cuda_graphs=False)
    ids = logits.argmax(-1)

    def step(pos, ids):
        for i in range(batch):
            cache.blocks.append(i, 1)
        return greedy(runner.run([WorkItem(i, [0], pos) for i in range(batch)], ids))

    ids = step(prompt_len, ids)  # warm-up (compiles Triton kernels)
    sync()
    cuda = model.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for s in range(steps):
            ids = step(prompt_len + 1 + s, ids)
        sync()
        wall = (time.perf_counter() - t) / steps
    spent = [(e.key, e.count / steps, (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps)
             for e in prof.key_averages()]
    spent = sorted((x for x in spent if x[2] > 0), key=lambda x: -x[2])
    busy = sum(us for _, _, us in spent)
    return {"profile_wall_ms": round(wall * 1e3, 3), "busy_ms": round(busy / 1e3, 3),
            "kernels_per_step": round(sum(n for _, n, _ in spent), 1),  # (each a launch, in a graph too)
            "kernels": [{"kernel": name[:120], "calls": round(n, 2), "us": round(us, 1), "share": round(us / busy, 3)}
                        for name, n, us in spent[:top]]}


def bench_window(model: GemmaModel, window: int, prompt_len: int, cuda_graphs: bool, iters: int = 20,
                 block_size: int = 16) -> float:
    """ms of one batch-1 forward over a verify window of `window` new tokens after `prompt_len`
    (every row's logits), replayed from a CUDA graph or run eagerly."""
    cfg = model.cfg
    cache = KVCache(cfg.num_layers, -(-(prompt_len + window) // block_size), block_size, cfg.num_kv_heads,
                    cfg.head_dim, model.dtype, model.device)
    runner = ModelRunner(model, cache, cuda_graphs=cuda_graphs, max_graph_batch=1, max_context=prompt_len + window,
                         max_graph_width=window)
    cache.blocks.append(0, prompt_len + window)
    runner.run([WorkItem(0, [5] * prompt_len, 0)])
    item = [WorkItem(0, [7] * window, prompt_len, all_logits=window > 1)]
    runner.run(item)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        runner.run(item)
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def bench_hf(model, batch: int, prompt_len: int, steps: int, vocab: int, device, compiled: bool = False) -> dict:
    """HF `generate` with a static cache, eagerly or with the decode step compiled (transformers
    compiles it by itself on a GPU whenever the cache is static; `disable_compile` keeps it eager):
    the seconds a step from the difference of a 4- and a (4 + steps)-token generation."""
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def run(n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           cache_implementation="static", pad_token_id=0, disable_compile=not compiled)
        sync()
        return time.perf_counter() - t

    run(4)  # warm-up (compiling: each cache length is a graph of its own)
    if compiled:
        run(4 + steps)
    short, long = min(run(4) for _ in range(3)), min(run(4 + steps) for _ in range(3))
    dt = (long - short) / steps
    if dt <= 0:
        raise RuntimeError(f"HF timing too noisy: {4 + steps} tokens took no longer than 4 ({long:.4f} s vs {short:.4f} s)")
    return {"step_ms": dt * 1e3, "tokens_per_s": batch / dt}


def bench_model(args, name: str, cfg: ModelConfig, hf, method: str, dtype, device, rows: list[dict],
                label: str | None = None) -> None:
    """Decode rows (and verify-window rows) for one model in one weight format, HF beside it if given,
    appended to `rows` and saved to --out as each is measured (a run cut by its time limit keeps them)."""
    def record(row):
        emit(rows, row)
        save(rows, args.out)

    # "int4-head": the tied LM head quantized too (as drafts are); "-vocab": the head also cut to DRAFT_VOCAB
    # rows (a draft with draft_vocab_size; which rows does not change the time), for --draft-models only;
    # "int4-mma", "int8-mma", "none-gemv", "none-dmma": those weights on kernels off by default; "int4-unfused",
    # "int8-unfused": the norms, GeGLU and RoPE as kernels of their own, not in the linears; "int4-pdl", "int8-pdl":
    # programmatic dependent launches (kernel_variant)
    base, _, head = method.partition("-")
    if head == "vocab" and name not in args.draft_models:
        return
    if head in native.KERNEL_VARIANTS:
        with native.kernel_variant(head):
            return bench_model(args, name, cfg, hf, base, dtype, device, rows, label=method)
    quant = None if base == "none" else QuantConfig(base, quantize_lm_head=head in ("head", "vocab"))
    weights = weights_from_state_dict(hf.state_dict(), cfg, dtype, device, quant)
    if head == "vocab":
        weights.lm_head = head_rows(weights.embed, torch.arange(min(DRAFT_VOCAB, cfg.vocab_size), device=device))
    model = GemmaModel(cfg, weights, dtype, device, args.backend)
    wbytes = step_bytes(model.w)
    dense = method == "none" and label is None  # (the HF peer and the verify windows: once, on the defaults)
    if args.profile:
        for b in args.batches:
            record({"model": name, "dtype": args.dtype, "weights": label or method, "profile_batch": b,
                        **profile_decode(model, b, args.prompt_len)})
        return
    for b in args.batches:
        row = {"model": name, "dtype": args.dtype, "weights": label or method, "batch": b,
               "prompt_len": args.prompt_len,
               "weight_GB": round(wbytes / 1e9, 3),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        graphs = device == "cuda" and not args.no_graphs
        ours = bench_gemforge(model, b, args.prompt_len, args.steps, cuda_graphs=graphs)
        row.update({"gemforge_tok_s": round(ours["tokens_per_s"], 1), "gemforge_step_ms": round(ours["step_ms"], 3),
                    "cuda_graphs": graphs})
        overlapped = bench_gemforge(model, b, args.prompt_len, args.steps, cuda_graphs=graphs, overlap=True)
        row["gemforge_async_tok_s"] = round(overlapped["tokens_per_s"], 1)
        if graphs:
            eager = bench_gemforge(model, b, args.prompt_len, args.steps, cuda_graphs=False)
            row["gemforge_eager_tok_s"] = round(eager["tokens_per_s"], 1)
        if args.bandwidth_GBps:
            roof_s = (wbytes + ours["kv_bytes"]) / (args.bandwidth_GBps * 1e9)
            row["roofline_tok_s"] = round(b / roof_s, 1)
            row["roofline_frac"] = round(row["gemforge_tok_s"] / row["roofline_tok_s"], 3)
            row["async_roofline_frac"] = round(row["gemforge_async_tok_s"] / row["roofline_tok_s"], 3)
        if dense and not args.no_hf:
            default = (overlapped if device == "cuda" else ours)["tokens_per_s"]  # the engine's loop there
            try:
                peer = bench_hf(hf, b, args.prompt_len, args.steps, cfg.vocab_size, device)
                row.update({"hf_static_tok_s": round(peer["tokens_per_s"], 1),
                            "speedup_vs_hf": round(default / peer["tokens_per_s"], 2)})
                if args.hf_compile and device == "cuda":  # (transformers compiles on accelerators only)
                    peer = bench_hf(hf, b, args.prompt_len, args.steps, cfg.vocab_size, device, compiled=True)
                    row.update({"hf_compiled_tok_s": round(peer["tokens_per_s"], 1),
                                "speedup_vs_hf_compiled": round(default / peer["tokens_per_s"], 2)})
            except Exception as e:  # the peer failing must not lose our numbers
                row["hf_error"] = f"{type(e).__name__}: {e}"[:300]
        try:  # (after the timing: a kernel that faults takes the process's CUDA context, not the numbers)
            row.update(logits_error(model, b, graphs))
        except Exception as e:
            row["check_error"] = f"{type(e).__name__}: {e}"[:300]
        record(row)
    if args.verify and dense:  # windows as the engine runs them: from CUDA graphs where it has them
        graphs = device == "cuda" and not args.no_graphs
        one = bench_window(model, 1, args.prompt_len, graphs)
        for k in range(1, 9):
            row = {"model": name, "dtype": args.dtype, "verify_window": k + 1, "decode_step_ms": round(one, 3)}
            ms = bench_window(model, k + 1, args.prompt_len, graphs)
            row.update({"graph_window_ms" if graphs else "window_ms": round(ms, 3), "window_over_step": round(ms / one, 3)})
            if graphs and k in (1, 4, 8):  # what the graphs save: the same window run eagerly
                row["eager_window_ms"] = round(bench_window(model, k + 1, args.prompt_len, False), 3)
            record(row)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["codegemma-2b", "codegemma-7b"],
                    help="presets, or model directories whose config.json gives the shape")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--quant", nargs="+", default=["none"],
                    choices=["none", "int8", "int4", "int8-head", "int4-head", "none-vocab", "int4-vocab", "int4-mma",
                             "int8-mma", "none-gemv", "none-dmma", "int4-unfused", "int8-unfused", "none-pdl", "int4-pdl",
                             "int8-pdl"],
                    help="weight formats to run (the HF peer runs beside 'none'); '-head': the LM head too; '-vocab': "
                         f"the LM head (in the format of the rest) cut to {DRAFT_VOCAB} rows, for --draft-models; "
                         "'int4-mma', 'int8-mma': on the tensor-core kernel; 'none-gemv': dense on the CUDA GEMV at "
                         "one row; "
                         "'none-dmma': dense on the tensor-core kernel up to 16 rows; 'int4-unfused', 'int8-unfused': "
                         "the RMSNorms, GeGLU and RoPE as kernels of their own (made by the linears by default); "
                         "'-pdl': the kernels launched programmatically (PROGRAMMATIC_LAUNCH)")
    ap.add_argument("--draft-models", nargs="*", default=["codegemma-2b"],
                    help="the models the '-vocab' formats run for (drafts)")
    ap.add_argument("--bandwidth-GBps", type=float, default=None, help="measured copy bandwidth")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time HF with its decode step compiled (static cache; minutes of compiling a shape)")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode steps only")
    ap.add_argument("--verify", action="store_true",
                    help="also time batch-1 verify windows of k+1 tokens (k = 1..8) relative to one decode step")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: the kernels an eager decode step spends its device time in")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        cfg = ModelConfig.from_pretrained(Path(name)) if Path(name).is_dir() else preset(name)  # shape only
        hf = hf_model(cfg, dtype, device)
        for method in args.quant:
            try:
                bench_model(args, name, cfg, hf, method, dtype, device, rows)
            except Exception as e:  # one failing format must not lose the others
                emit(rows, {"model": name, "weights": method, "error": f"{type(e).__name__}: {e}"[:300]})
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            save(rows, args.out)  # keep what is measured so far, whatever happens next
        del hf
        gc.collect()
    return rows


if __name__ == "__main__":
    main()
