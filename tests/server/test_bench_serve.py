"""benchmarks/serve.py end to end against the test server, at a tiny size."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_benchmark_writes_json_and_plot(bench, server, tmp_path):
    out = tmp_path / "serve"
    report = bench.main(["--url", server.url, "--rates", "20", "40", "--num-requests", "6", "--max-tokens", "4",
                         "--max-seconds", "20", "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text()) == report
    assert out.with_suffix(".png").stat().st_size > 1000
    for row in report["results"]:
        assert row["completed"] == 6 and row["failed"] == 0 and row["timed_out"] == 0
        assert row["output_token_throughput"] > 0
        assert row["ttft"]["p50_ms"] > 0 and row["tpot"]["p50_ms"] > 0
    server.wait_idle()


def test_serve_benchmark_refuses_remote_servers(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--url", "http://example.com:8000"])
