"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Counters: requests by outcome (ok | aborted | failed | rejected), prompt and generation tokens.
Gauges read from the engine when scraped: requests running and waiting, KV-cache blocks in use,
the prefix cache's hit rate (prompt tokens found cached / prompt tokens admitted).
Histograms: time to first token, and inter-token latency (the gap between a request's outputs,
shared by the tokens that output brought: speculative decoding may bring several).
With a drafter, gauges of the speculative acceptance rate (accepted / proposed) and of the tokens a
verify window brings (accepted drafts + the target's own token, per window).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..async_engine import AsyncEngine

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class Metrics:
    def __init__(self, engine: AsyncEngine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gemforge_requests", "Generation requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("gemforge_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("gemforge_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gemforge_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gemforge_inter_token_latency_seconds", "Gap between a request's outputs",
                             buckets=_LATENCY_BUCKETS, registry=r)
        core = engine.engine
        Gauge("gemforge_requests_running", "Sequences being generated", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("gemforge_requests_waiting", "Sequences waiting to be scheduled", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("gemforge_kv_cache_blocks_used", "KV-cache blocks in use", registry=r).set_function(
            lambda: core.cache.blocks.num_used)
        Gauge("gemforge_kv_cache_blocks_total", "KV-cache blocks in all", registry=r).set_function(
            lambda: core.cache.blocks.num_blocks)
        Gauge("gemforge_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens admitted",
              registry=r).set_function(lambda: core.scheduler.prefix_hits / max(1, core.scheduler.prefix_queries))
        if core.drafter is not None:
            st = core.stats
            Gauge("gemforge_spec_acceptance_rate", "Draft tokens accepted / proposed", registry=r).set_function(
                lambda: st.get("spec_accepted", 0) / max(1, st.get("spec_proposed", 0)))
            Gauge("gemforge_spec_tokens_per_window", "Tokens a verify window brings (accepted drafts + the "
                  "target's own) per window verified", registry=r).set_function(
                lambda: (st.get("spec_accepted", 0) + st.get("spec_windows", 0)) / max(1, st.get("spec_windows", 0)))

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
