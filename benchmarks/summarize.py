"""Turn a GPU suite's JSON into summary.md and decode.png.   python benchmarks/summarize.py OUTDIR"""
import json
import sys
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file (a part's rows as they were measured); [] if there is none."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def kernel_rows(bench: dict) -> list[dict]:
    rows = []
    for b in bench.get("benchmarks", []):
        extra = b.get("extra_info", {})
        rows.append({"benchmark": b["name"], "median_us": round(b["stats"]["median"] * 1e6, 1),
                     **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()}})
    return rows


WRONG_REL_ERR = 0.1  # bench_decode's logits_rel_err above which a row's kernels compute something else


def wrong(row: dict) -> bool:
    """A decode row whose logits are not the torch backend's (or could not be checked): its speed means nothing."""
    return "check_error" in row or row.get("logits_rel_err", 0) > WRONG_REL_ERR


def implied_speedup(alpha: float, k: int, draft_ratio: float, verify_ratio: float) -> float:
    """Speculative speedup over target-alone decode: expected tokens per step (1 - alpha^(k+1)) /
    (1 - alpha) over the step's cost in target decode steps (k draft steps + one verify window)."""
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return tokens / (k * draft_ratio + verify_ratio)


def speculative_rows(decode: list[dict], target: str = "codegemma-7b", draft: str = "codegemma-2b") -> list[dict]:
    """Batch-1 speedups that the measured costs imply: a draft step (2B, dense, int8 or int4 on either
    kernel, int4 with its LM head quantized, as the engine loads a quantized draft, and dense or int4 with
    the head cut to 32768 rows, draft_vocab_size) and a k+1 verify window (from a CUDA graph, as the engine runs it),
    both relative to one dense 7B decode step; for each acceptance rate the best k. (A pruned head
    costs some acceptance, which these rows do not count.)"""
    step = {(r["model"], r["weights"]): r["gemforge_step_ms"] for r in decode
            if r.get("batch") == 1 and "gemforge_step_ms" in r and not wrong(r)}
    window = {r["verify_window"] - 1: r["window_over_step"] for r in decode
              if r.get("model") == target and "verify_window" in r}
    if (target, "none") not in step or not window:
        return []
    rows = []
    for weights in ("none", "none-gemv", "none-dmma", "int8", "int8-mma", "int4", "int4-mma", "int4-head",
                    "none-vocab", "int4-vocab"):
        if (draft, weights) not in step:
            continue
        ratio = step[(draft, weights)] / step[(target, "none")]
        for alpha in (0.6, 0.7, 0.8, 0.9):
            k, best = max(((k, implied_speedup(alpha, k, ratio, v)) for k, v in window.items()), key=lambda kv: kv[1])
            rows.append({"draft": f"{draft} {'dense' if weights == 'none' else weights}", "draft_over_target_step":
                         round(ratio, 3), "acceptance": alpha, "best_k": k, "verify_over_step": window[k],
                         "implied_speedup": round(best, 2)})
    return rows


# The kernel choices of kernels/_native.py that the decode rows settle: (setting, the weights it changes, the
# variant's weights, the batches it serves). A variant wins where it is the faster at every such batch measured.
DECISIONS = (
    ("FUSE_INTO_LINEARS = False", "int4", "int4-unfused", (1,)),
    ("FUSE_INTO_LINEARS = False", "int8", "int8-unfused", (1,)),
    ('TENSOR_CORE_OPS.add("linear_int4")', "int4", "int4-mma", (1, 8)),
    ('TENSOR_CORE_OPS.add("linear_int8")', "int8", "int8-mma", (1, 8)),
    ('prefer("linear", "cuda", "torch")', "none", "none-gemv", (1,)),
    ('prefer("linear", "cuda", "torch"); TENSOR_CORE_OPS.add("linear")', "none", "none-dmma", (1, 8)),
    ("PROGRAMMATIC_LAUNCH = True", "int4", "int4-pdl", (1,)),
    ("PROGRAMMATIC_LAUNCH = True", "int8", "int8-pdl", (1,)),
)


def decision_rows(decode: list[dict]) -> list[dict]:
    """For each setting of DECISIONS and model: the variant's end-to-end speed over the default's at the batches
    the setting serves (rows marked wrong left out), and whether the numbers support making the variant the
    default (faster at all of them; unmeasured or wrong: no)."""
    speed = {(r["model"], r["weights"], r["batch"]): r["gemforge_tok_s"] for r in decode
             if "batch" in r and "gemforge_tok_s" in r and not wrong(r)}
    rows = []
    for setting, default, variant, batches in DECISIONS:
        for model in sorted({m for m, _, _ in speed}):
            ratios = {b: round(speed[(model, variant, b)] / speed[(model, default, b)], 3) for b in batches
                      if (model, variant, b) in speed and (model, default, b) in speed}
            if ratios:
                rows.append({"setting": setting, "model": model, "variant": variant, "over": default,
                             "speed_ratio": " ".join(f"b{b}: {x}" for b, x in ratios.items()),
                             "supported": len(ratios) == len(batches) and min(ratios.values()) > 1})
    return rows


def profile_rows(profiled: list[dict], top: int = 5) -> list[dict]:
    """One row per kernel of each profiled step (its `top` ones), the step's wall and busy ms on its first."""
    rows = []
    for r in profiled:
        for i, k in enumerate(r["kernels"][:top]):
            head = {"model": r["model"], "weights": r["weights"], "batch": r["profile_batch"],
                    "wall_ms": r["profile_wall_ms"], "busy_ms": r["busy_ms"],
                    "kernels_per_step": r.get("kernels_per_step")} if i == 0 else {}
            rows.append({**head, **k})
    return rows


def plot(decode: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in decode if "batch" in r})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in decode if r["model"] == m and r.get("weights", "none") == "none" and "batch" in r]
        bs = [r["batch"] for r in rows]
        for key, label in (("gemforge_tok_s", "gemforge"), ("hf_static_tok_s", "HF static cache"),
                           ("roofline_tok_s", "bandwidth roofline")):
            if all(key in r for r in rows):
                ax.plot(bs, [r[key] for r in rows], marker="o", label=label,
                        linestyle="--" if "roofline" in key else "-")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s", title=f"{m} ({rows[0]['dtype']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(outdir: str) -> None:
    d = Path(outdir)
    parts = [f"# gemforge GPU suite\n"]
    ceil = load(d / "ceilings.json")
    if ceil:
        parts.append(f"Device: **{ceil['device']}**, torch {ceil['torch']}. Measured ceilings: copy "
                     f"{ceil['copy_GBps']} GB/s (read + write), bf16 matmul {ceil['bf16_matmul_TFLOPs']} TFLOP/s.\n")
    status = (d / "status.txt").read_text() if (d / "status.txt").exists() else ""
    parts.append("## Parts\n```\n" + status + "```\n")
    # bf16 + HF; the quantized formats; the kernels off by default; the drafts' formats; GeGLU unfused
    decode = [r for name in ("decode", "decode_quant", "decode_mma", "decode_drafts", "decode_unfused")
              for r in load(d / f"{name}.json") or []]
    if decode:
        parts.append("## End-to-end greedy decode (random weights, real shapes, prompt 128)\n")
        steps = [r for r in decode if "batch" in r]
        parts.append(table(steps, ["model", "dtype", "weights", "batch", "gemforge_tok_s", "gemforge_async_tok_s",
                                   "gemforge_eager_tok_s", "roofline_tok_s", "roofline_frac", "async_roofline_frac",
                                   "hf_static_tok_s", "speedup_vs_hf", "logits_rel_err", "greedy_agree"]) + "\n")
        bad = [r for r in steps if wrong(r)]
        if bad:  # (left out of the implied speedups below)
            parts.append(f"**WRONG OUTPUT** (logits_rel_err > {WRONG_REL_ERR} against the torch backend, or the check "
                         "failed): these rows' kernels compute something else; their speeds mean nothing.\n")
            parts.append(table(bad, ["model", "weights", "batch", "logits_rel_err", "greedy_agree", "check_error"])
                         + "\n")
        windows = [r for r in decode if "verify_window" in r]
        if windows:
            parts.append("### Speculative verify window cost (batch 1)\n")
            parts.append(table(windows, ["model", "verify_window", "graph_window_ms", "eager_window_ms", "window_ms",
                                         "decode_step_ms", "window_over_step"]) + "\n")
        spec = speculative_rows(decode)
        if spec:
            parts.append("### Speculative decoding speedup these costs imply (batch 1, 2B drafts for 7B)\n")
            parts.append(table(spec, ["draft", "draft_over_target_step", "acceptance", "best_k", "verify_over_step",
                                      "implied_speedup"]) + "\n")
        decisions = decision_rows(decode)
        if decisions:
            parts.append("### What these numbers decide (kernels/_native.py; apply a setting where every model "
                         "supports it, after tests/gpu passes)\n")
            parts.append(table(decisions, ["setting", "model", "variant", "over", "speed_ratio", "supported"]) + "\n")
        errors = [r for r in decode if "error" in r]
        if errors:
            parts.append(table(errors, ["model", "weights", "error"]) + "\n")
        try:
            plot(decode, d / "decode.png")
            parts.append("![decode](decode.png)\n")
        except Exception as e:  # a plot must not lose the table
            parts.append(f"(plot failed: {e})\n")
    compiled = [r for r in load(d / "decode_hf_compiled.json") or [] if "hf_compiled_tok_s" in r]
    if compiled:
        parts.append("## Batch-1 decode against HF with its decode step compiled (static cache)\n")
        parts.append(table(compiled, ["model", "dtype", "gemforge_async_tok_s", "gemforge_tok_s", "hf_static_tok_s",
                                      "hf_compiled_tok_s", "speedup_vs_hf_compiled", "roofline_frac"]) + "\n")
    profiled = [r for r in load(d / "decode_profile.json") or [] if "kernels" in r]
    if profiled:
        parts.append("## Where an eager decode step's device time goes (top kernels, per step)\n")
        parts.append(table(profile_rows(profiled), ["model", "weights", "batch", "wall_ms", "busy_ms",
                                                    "kernels_per_step", "kernel", "calls", "us", "share"]) + "\n")
    throughput = load(d / "throughput.json")
    if throughput:
        parts.append("## Continuous batching: offline throughput on nano-codegemma vs HF `generate`\n")
        batched = [r for r in throughput if "concurrency" in r]
        parts.append(table(batched, ["concurrency", "gemforge_tok_s", "hf_generate_tok_s", "ratio", "dtype",
                                     "gemforge_sync_tok_s", "async_speedup", "warmup_s", "warmup_graphs",
                                     "graphs_failed"]) + "\n")
        staggered = [r for r in throughput if "workload" in r]
        if staggered:  # requests joining a running batch: steps that mix prompt chunks with decode tokens
            parts.append(table(staggered, ["workload", "gemforge_tok_s", "eager_mixed_tok_s",
                                           "ragged_graph_speedup", "cuda_graphs"]) + "\n")
    spec = load(d / "speculative.json")
    if spec:  # the bundled pair speculating end to end, against the target alone in the same rounds
        parts.append("## Speculative decoding on nano-codegemma (end to end, batch 1, greedy)\n")
        parts.append(table(spec, ["workload", "k", "lookahead", "draft", "draft_vocab_size", "acceptance_rate",
                                  "tokens_per_target_forward", "tokens_per_s", "target_alone_tokens_per_s",
                                  "speedup"]) + "\n")
    sweep = load_lines(d / "sweep_attention.jsonl")
    if sweep:  # per case: the tile table's config against the best of the sweep
        parts.append("## Attention tile sweep (Triton; the table's config vs the sweep's best)\n")
        parts.append(table([r for r in sweep if r.get("summary")],
                           ["model", "seqs", "new_tokens", "context", "table_us", "best_us", "table_over_best", "best",
                            "sdpa_us", "wrong", "failed"]) + "\n")
    for stem in sorted({p.stem for p in d.glob("kernels*.json*")}):  # kernels-cuda, kernels-triton
        kern, name, lines = load(d / f"{stem}.json"), f"{stem}.json", d / f"{stem}.jsonl"
        if kern:
            rows = kernel_rows(kern)
        elif lines.exists():  # the run was cut before pytest-benchmark wrote its JSON: what each case logged
            rows, name = load_lines(lines), lines.name
        else:
            continue
        first = ["benchmark", "median_us"] if kern else ["benchmark"]
        cols = first + sorted({k for r in rows for k in r} - set(first))
        parts.append(f"## Kernel benchmarks ({name})\n")
        parts.append(table(rows, cols) + "\n")
    (d / "summary.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])
