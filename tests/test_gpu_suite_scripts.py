"""The GPU suite's (and `gemforge bench`'s) Python parts run end to end on CPU with small stand-in
shapes, so that a scarce GPU session never finds a broken script (bench_decode: every format, HF
peer, verify windows; bench_throughput; bench_step_breakdown; bench_prefill; bench_prefix_cache;
summarize: tables, the implied speculative speedup, the plot); and gpu_suite.sh's own control flow
runs with stand-in tools."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from gemforge.engine.config import preset
from gemforge.engine.weights import random_weights

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(path: Path):
    if str(path.parent) not in sys.path:  # a benchmark imports its siblings (report.py, ...)
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore")
def test_decode_bench_and_summary_run_on_cpu(tmp_path, monkeypatch):
    decode = load(BENCH / "engine" / "bench_decode.py")
    small = {n: dataclasses.replace(preset(n), hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                                    num_kv_heads=1 if n == "codegemma-2b" else 2, head_dim=64, vocab_size=512)
             for n in ("codegemma-2b", "codegemma-7b")}
    monkeypatch.setattr(decode, "preset", small.__getitem__)
    monkeypatch.setattr(decode, "DRAFT_VOCAB", 128)  # (of 512)
    rows = decode.main(["--models", "codegemma-2b", "codegemma-7b", "--batches", "1", "--steps", "8",
                        "--prompt-len", "8", "--quant", "none", "int4", "int4-head", "int4-vocab", "int4-mma",
                        "int8-mma", "none-gemv", "none-dmma", "int4-unfused", "int4-pdl",
                        "--verify", "--bandwidth-GBps", "50",
                        "--dtype", "float32", "--out", str(tmp_path / "decode.json")])
    assert not [r for r in rows if "error" in r], rows
    cfg = small["codegemma-2b"]
    model = decode.GemmaModel(cfg, random_weights(cfg, torch.float32, "cpu", seed=2, std=0.3), torch.float32, "cpu",
                              "torch")
    runs = [decode.bench_gemforge(model, 3, 5, 6, cuda_graphs=False, overlap=o)["tokens"] for o in (False, True)]
    assert runs[0] == runs[1] and len({tuple(t) for t in runs[0]}) > 1  # the overlapped loop decodes the same
    steps = [r for r in rows if "batch" in r]
    assert len(steps) == 19 and all(r["gemforge_tok_s"] > 0 and 0 < r["roofline_frac"] for r in steps)
    mma = {r["model"]: r["weight_GB"] for r in steps if r["weights"] == "int4-mma"}  # the int4 weights, other kernel
    assert mma == {r["model"]: r["weight_GB"] for r in steps if r["weights"] == "int4"}, mma
    assert decode.native.TENSOR_CORE_OPS == set()  # (set for int4-mma and none-dmma only)
    assert decode.native.preference("linear") == ("torch", "cuda")  # (the CUDA kernels first for none-*mma only)
    assert decode.native.FUSE_INTO_LINEARS  # (off for int4-unfused only)
    assert not decode.native.PROGRAMMATIC_LAUNCH  # (on for int4-pdl only)
    for variant in ("none-gemv", "none-dmma"):
        assert {r["model"] for r in steps if r["weights"] == variant} == {"codegemma-2b", "codegemma-7b"}
    vocab = [r for r in steps if r["weights"] == "int4-vocab"]  # the draft only, its head cut to DRAFT_VOCAB rows
    head = [r for r in steps if r["weights"] == "int4-head" and r["model"] == "codegemma-2b"]
    assert [r["model"] for r in vocab] == ["codegemma-2b"] and vocab[0]["roofline_tok_s"] > head[0]["roofline_tok_s"]
    assert all(r["gemforge_async_tok_s"] > 0 and 0 < r["async_roofline_frac"] for r in steps)
    assert all(r["logits_rel_err"] < 1e-4 and r["greedy_agree"] == 1 for r in steps), steps  # (fp32: the same model)
    assert len([r for r in rows if "verify_window" in r]) == 16
    profiled = decode.main(["--models", "codegemma-2b", "--batches", "1", "3", "--prompt-len", "8", "--quant", "none",
                            "int4", "--profile", "--dtype", "float32", "--out", str(tmp_path / "decode_profile.json")])
    assert [(r["weights"], r["profile_batch"]) for r in profiled] == [("none", 1), ("none", 3), ("int4", 1), ("int4", 3)]
    for r in profiled:  # (on a CPU: ops by CPU time)
        shares = [k["share"] for k in r["kernels"]]
        assert r["busy_ms"] > 0 and len(shares) == 10 and shares == sorted(shares, reverse=True) and sum(shares) <= 1
        assert r["kernels_per_step"] >= sum(k["calls"] for k in r["kernels"])
    (tmp_path / "ceilings.json").write_text(json.dumps({"device": "cpu", "torch": "test", "copy_GBps": 50,
                                                        "bf16_matmul_TFLOPs": 1}))
    (tmp_path / "status.txt").write_text("decode: ok (1s)\n")
    rows = load(BENCH / "engine" / "bench_throughput.py").main([
        "--model", str(BENCH.parent / "models" / "nano-codegemma"), "--concurrency", "2", "--max-tokens", "4",
        "--repeats", "1", "--async-ab", "--staggered", "3", "--out", str(tmp_path / "throughput.json")])
    assert rows[0]["gemforge_sync_tok_s"] > 0 and rows[0]["async_speedup"] > 0
    assert rows[-1]["gemforge_tok_s"] > 0 and rows[-1]["eager_mixed_tok_s"] > 0 and not rows[-1]["cuda_graphs"]
    rows = load(BENCH / "engine" / "bench_step_breakdown.py").main([
        "--model", str(BENCH.parent / "models" / "nano-codegemma"), "--concurrency", "2", "--max-tokens", "4"])
    assert rows[0]["decode_steps"] == 3 and 0 < rows[0]["linear_ms"] < rows[0]["forward_ms"] < rows[0]["step_ms"]
    rows = load(BENCH / "engine" / "bench_prefill.py").main([
        "--model", str(BENCH.parent / "models" / "nano-codegemma"), "--lengths", "16", "--repeats", "1"])
    assert rows[0]["prompt_tokens"] == 16 and rows[0]["gemforge_ms"] > 0 and rows[0]["hf_forward_ms"] > 0
    rows = load(BENCH / "engine" / "bench_prefix_cache.py").main([
        "--model", str(BENCH.parent / "models" / "nano-codegemma"), "--prefix", "64", "--requests", "2",
        "--batch", "2", "--samples", "2", "--repeats", "1"])
    assert [r["workload"] for r in rows] == ["completion", "shared", "samples", "burst"]
    assert all(r["hit_rate"] > 0.5 and r["speedup"] > 0 for r in rows)
    log = tmp_path / "kernels-cuda.jsonl"  # a kernel run cut before pytest-benchmark wrote its JSON
    env = {**os.environ, "GEMFORGE_BENCH_LOG": str(log), "GEMFORGE_BENCH_COMPILE": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(BENCH / "kernels" / "bench_rms_norm.py")], env=env, capture_output=True, text=True,
                         cwd=BENCH / "kernels", timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged and all(r["benchmark"].startswith("test_rms_norm") and r["impl"] for r in logged)
    assert len({r["benchmark"] for r in logged}) == len(logged)  # (each case once: a named file was collected twice)
    compiled = [{"model": "codegemma-2b", "dtype": "bfloat16", "gemforge_async_tok_s": 300.0, "gemforge_tok_s": 290.0,
                 "hf_static_tok_s": 60.0, "hf_compiled_tok_s": 150.0, "speedup_vs_hf_compiled": 2.0}]
    (tmp_path / "decode_hf_compiled.json").write_text(json.dumps(compiled))  # (the GPU-only part's rows)
    spec = [{"workload": "code", "k": 4, "lookahead": "fixed", "draft": "dense", "draft_vocab_size": 2048,
             "acceptance_rate": 0.4, "tokens_per_target_forward": 2.6, "tokens_per_s": 900.5,
             "target_alone_tokens_per_s": 600.0, "speedup": 1.5}]  # (bench_speculative's rows: test below)
    (tmp_path / "speculative.json").write_text(json.dumps(spec))
    parts = {"decode_quant": ("int4",), "decode_mma": ("int4-mma", "int8-mma", "none-gemv", "none-dmma"),
             "decode_drafts": ("int4-head", "int4-vocab"), "decode_unfused": ("int4-unfused",)}  # the suite's files
    for r in steps:  # a kernel variant whose logits are not the model's: flagged, not taken for a draft's speed
        if r["weights"] == "int8-mma":
            r["logits_rel_err"] = 0.9
    for name, formats in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps([r for r in steps if r["weights"] in formats]))
    plain = [r for r in json.loads((tmp_path / "decode.json").read_text()) if r.get("weights", "none") == "none"]
    (tmp_path / "decode.json").write_text(json.dumps(plain))
    load(BENCH / "summarize.py").main(str(tmp_path))
    summary = (tmp_path / "summary.md").read_text()
    assert "HF with its decode step compiled" in summary and "| 150.0 | 2.0 |" in summary
    assert "one joining every 2 steps" in summary  # the staggered workload's own table
    assert "Kernel benchmarks (kernels-cuda.jsonl)" in summary and logged[0]["benchmark"] in summary
    assert "codegemma-7b" in summary and "implied_speedup" in summary and (tmp_path / "decode.png").is_file()
    assert "codegemma-2b int4-head" in summary  # the draft as the engine loads it: its LM head quantized too
    assert all(f"| {formats[-1]} |" in summary for formats in parts.values())  # each part's file read
    assert "codegemma-2b int4-vocab" in summary  # and with its head cut (draft_vocab_size)
    assert "WRONG OUTPUT" in summary and "codegemma-2b int8-mma" not in summary and "codegemma-2b int4-mma" in summary
    assert "What these numbers decide" in summary and 'TENSOR_CORE_OPS.add("linear_int4")' in summary
    assert "Continuous batching" in summary
    assert "Speculative decoding on nano-codegemma" in summary and "| 2048 | 0.4 | 2.6 | 900.5 |" in summary
    assert "Where an eager decode step's device time goes" in summary and profiled[0]["kernels"][0]["kernel"] in summary


def test_summary_decides_the_kernel_settings_from_the_decode_rows():
    """summarize.decision_rows: a variant is supported as the default where it is faster than the default's
    rows at every batch its setting serves; slower, half measured, or marked wrong (left out): not."""
    summarize = load(BENCH / "summarize.py")

    def row(weights, batch, tok_s, **kw):
        return {"model": "m", "weights": weights, "batch": batch, "gemforge_tok_s": tok_s, **kw}
    decode = [row("int4", 1, 100.0), row("int4-unfused", 1, 90.0), row("int4", 8, 300.0), row("int4-mma", 1, 120.0),
              row("int4-mma", 8, 400.0), row("int8", 1, 80.0), row("int8", 8, 200.0), row("int8-mma", 1, 90.0),
              row("none", 1, 50.0), row("none-gemv", 1, 60.0, logits_rel_err=0.5), row("int4-pdl", 1, 110.0)]
    got = {(r["variant"], r["speed_ratio"], r["supported"]) for r in summarize.decision_rows(decode)}
    assert got == {("int4-unfused", "b1: 0.9", False), ("int4-mma", "b1: 1.2 b8: 1.333", True),
                   ("int8-mma", "b1: 1.125", False), ("int4-pdl", "b1: 1.1", True)}, got


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_bench_check_catches_a_model_computing_something_else(batch):
    """bench_decode's logits check against the torch backend: a kernel wired wrong (GeGLU's gate and up halves
    swapped here, in one-row steps only or in every step) shows far above the summary's WRONG_REL_ERR, the
    same kernels far below it. (A gate for gross faults: bf16 rounding alone gives ~0.017 at CodeGemma-2B's
    shape on this CPU's kernels; subtle errors are for the kernels' tests.)"""
    decode = load(BENCH / "engine" / "bench_decode.py")
    wrong_rel_err = load(BENCH / "summarize.py").WRONG_REL_ERR
    cfg = dataclasses.replace(preset("codegemma-2b"), hidden_size=128, intermediate_size=256, num_layers=2,
                              num_heads=2, num_kv_heads=1, head_dim=64, vocab_size=512)
    model = decode.GemmaModel(cfg, random_weights(cfg, torch.float32, "cpu", seed=4, std=0.3), torch.float32, "cpu",
                              "auto")
    assert decode.logits_error(model, batch, cuda_graphs=False)["logits_rel_err"] < 1e-4
    gelu = model.ops.gelu_and_mul
    for rows in (1, 2 ** 30):  # (one-row steps: batch 1's decode step only; a batch of 3 has none, nothing wrong)
        model.ops = dataclasses.replace(model.ops, gelu_and_mul=lambda x, rows=rows: gelu(
            x.roll(x.shape[-1] // 2, -1) if len(x) <= rows else x))
        check = decode.logits_error(model, batch, cuda_graphs=False)
        if rows == 1 and batch > 1:
            assert check["logits_rel_err"] < 1e-4, check
        else:
            assert check["logits_rel_err"] > wrong_rel_err, check


def test_host_overhead_bench_times_speculative_steps(tmp_path):
    """bench_host_overhead's speculative rows (do-nothing target and draft): greedy and sampled steps."""
    models = BENCH.parent / "models"
    rows = load(BENCH / "engine" / "bench_host_overhead.py").main([
        "--model", str(models / "nano-codegemma"), "--draft", str(models / "nano-codegemma-draft"), "--batches", "1",
        "--prompt-lens", "4", "--async-batches", "--speculative", "2", "--k", "2", "--repeats", "1",
        "--out", str(tmp_path / "host.json")])
    spec = rows[-1]
    assert spec["k"] == 2 and spec["spec_greedy_step_us"] > 0 and spec["spec_sampled_step_us"] > 0, rows


FAKE_PYTHON = r"""#!/usr/bin/env bash
# python3 stand-in: logs its arguments, answers the suite's -c snippets, writes the summary
echo "python $*" >> "$STUB_LOG"
case "$1" in
  -c) case "$2" in *pybind11*) echo /nonexistent ;; *copy_GBps*) echo 3000 ;; *) echo ok ;; esac ;;
esac
case "$*" in *summarize.py*) echo "# summary" > "${@: -1}/summary.md" ;; esac
case "$*" in *bench_decode.py*) exit 3 ;; esac
exit 0
"""


def test_gpu_suite_script_runs_every_part_and_summarises(tmp_path):
    """gpu_suite.sh's own control flow, with stand-ins for python3, cmake, nvcc and nvidia-smi: every
    part runs (the build, a shell function, through `timeout`), a failing part is reported and the
    rest still run, and the status and summary are written. (Its first GPU runs would otherwise be
    where a shell mistake shows: the build part never ran before this test.)"""
    stubs, out, log = tmp_path / "bin", tmp_path / "out", tmp_path / "calls.log"
    stubs.mkdir()
    (stubs / "python").write_text(FAKE_PYTHON)
    for tool in ("cmake", "nvcc", "nvidia-smi"):
        (stubs / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> "$STUB_LOG"\n')
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(stubs / "python"),
           "STUB_LOG": str(log), "SUITE_BUDGET": "120"}
    pack = tmp_path / "pack"  # (the device tool's $OUT: at most 8 files come back)
    run = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(out), str(pack)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    status = (out / "status.txt").read_text()
    parts = ["build", "ceilings", "tests", "kernel_cuda", "decode", "decode_quant", "decode_mma", "decode_drafts",
             "decode_unfused", "decode_profile", "kernel_triton", "throughput", "prefill", "sweep_attention", "speculative",
             "decode_hf_compiled", "summary"]
    assert [line.split(":")[0] for line in status.splitlines() if ":" in line] == parts, status
    failing = ("decode", "decode_quant", "decode_mma", "decode_drafts", "decode_unfused", "decode_profile",
               "decode_hf_compiled")
    assert all(f"{p}: FAILED rc=3" in status for p in failing), status
    assert status.count(": ok") == len(parts) - len(failing), status
    calls = log.read_text()
    assert "cmake -S" in calls and "cmake --build" in calls and "assert c.WITH_CUDA" in calls
    assert (out / "summary.md").read_text() == "# summary\n" and "# summary" in run.stdout
    assert sorted(p.name for p in pack.iterdir()) == ["status.txt", "suite.log", "suite.tgz", "summary.md"]
    with tarfile.open(pack / "suite.tgz") as tar:
        assert {"./status.txt", "./summary.md", "./suite.log"} <= set(tar.getnames())

    log.write_text("")  # a rerun of chosen parts only
    run = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(out)], env={**env, "SUITE_ONLY": "build kernel_cuda"},
                         capture_output=True, text=True, timeout=120)
    status = (out / "status.txt").read_text()
    ran = [line.split(":")[0] for line in status.splitlines() if ": ok" in line]
    assert run.returncode == 0 and ran == ["build", "kernel_cuda", "summary"], status
    assert status.count("not run (SUITE_ONLY)") == len(parts) - 3 and "bench_decode" not in log.read_text()


def test_attention_sweep_runs_on_cpu(tmp_path, monkeypatch):
    """sweep_attention.py on the nano shapes (the interpreter): every config's output checked against
    the tile table's, a wrong or failing one reported as such and never picked as the best; the summary's table."""
    sweep = load(BENCH / "kernels" / "sweep_attention.py")
    attn = sweep.select("attention", "triton", "cpu")

    def off_when_32(q, k, v, meta, scale, config=None):  # a config that computes the wrong thing, one that fails
        if config and config.get("parts") == 4:
            raise RuntimeError("out of resources")
        out = attn(q, k, v, meta, scale, config=config)
        return out + 1 if config and config.get("BLOCK_N") == 32 else out
    monkeypatch.setattr(sweep, "select", lambda *a: off_when_32)
    out = tmp_path / "sweep_attention.jsonl"
    summaries = sweep.main([str(out)])
    assert [(s["model"], s["new_tokens"]) for s in summaries] == [("nano-draft", 1), ("nano", 40)]
    assert [c["parts"] for c in summaries[0]["failed"]] == [4] and not summaries[1]["failed"]
    for s in summaries:
        assert s["best_us"] > 0 and s["best"] not in s["wrong"] + s["failed"], s
        assert [c for c in s["wrong"] if c.get("BLOCK_N") == 32] and all(c.get("BLOCK_N") == 32 for c in s["wrong"]), s
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    decode_parts = [r["config"]["parts"] for r in rows if isinstance(r.get("config"), dict) and "parts" in r["config"]]
    assert decode_parts == list(sweep.PARTS)
    assert all(r["us"] > 0 for r in rows if not r.get("summary") and "error" not in r)
    assert [r["error"] for r in rows if "error" in r] == ["RuntimeError: out of resources"]
    load(BENCH / "summarize.py").main(str(tmp_path))  # the suite's summary has a row per case
    section = (tmp_path / "summary.md").read_text().split("## Attention tile sweep")[1]
    assert section.count("| nano-draft |") == 1 and section.count("| nano |") == 1, section


def test_speculative_bench_runs_on_cpu(tmp_path):
    """bench_speculative.py (the GPU suite's `speculative` part) on the bundled pair with tiny settings:
    every variant, the pruned draft vocabulary's included, gives a row with its speedup."""
    models = BENCH.parent / "models"
    rows = load(BENCH / "engine" / "bench_speculative.py").main([
        "--target", str(models / "nano-codegemma"), "--draft", str(models / "nano-codegemma-draft"), "--ks", "2",
        "--prompts", "1", "--max-tokens", "6", "--repeats", "1", "--draft-vocab-sizes", "1024",
        "--out", str(tmp_path / "speculative.json")])
    drafts = [(r["workload"], r["draft"], r["draft_vocab_size"]) for r in rows]
    assert ("code", "dense", 1024) in drafts and ("fim", "ngram", None) in drafts and len(rows) == 14, drafts
    assert all(r["speedup"] > 0 and r["tokens"] > 0 for r in rows)
    assert json.loads((tmp_path / "speculative.json").read_text()) == rows
