"""The GPU suite's (and `gemforge bench`'s) Python parts run end to end on CPU with small stand-in
shapes, so that a scarce GPU session never finds a broken script (bench_decode: every format, HF
peer, verify windows; bench_throughput; bench_step_breakdown; bench_prefill; bench_prefix_cache;
summarize: tables, the implied speculative speedup, the plot)."""
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gemforge.engine.config import preset

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
    rows = decode.main(["--models", "codegemma-2b", "codegemma-7b", "--batches", "1", "--steps", "8",
                        "--prompt-len", "8", "--quant", "none", "int4", "--verify", "--bandwidth-GBps", "50",
                        "--dtype", "float32", "--out", str(tmp_path / "decode.json")])
    assert not [r for r in rows if "error" in r], rows
    steps = [r for r in rows if "batch" in r]
    assert len(steps) == 4 and all(r["gemforge_tok_s"] > 0 and 0 < r["roofline_frac"] for r in steps)
    assert len([r for r in rows if "verify_window" in r]) == 16
    (tmp_path / "ceilings.json").write_text(json.dumps({"device": "cpu", "torch": "test", "copy_GBps": 50,
                                                        "bf16_matmul_TFLOPs": 1}))
    (tmp_path / "status.txt").write_text("decode: ok (1s)\n")
    load(BENCH / "engine" / "bench_throughput.py").main([
        "--model", str(BENCH.parent / "models" / "nano-codegemma"), "--concurrency", "2", "--max-tokens", "4",
        "--repeats", "1", "--out", str(tmp_path / "throughput.json")])
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
    load(BENCH / "summarize.py").main(str(tmp_path))
    summary = (tmp_path / "summary.md").read_text()
    assert "codegemma-7b" in summary and "implied_speedup" in summary and (tmp_path / "decode.png").is_file()
    assert "Continuous batching" in summary
