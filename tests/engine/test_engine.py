"""Continuous batching: many concurrent requests, preemption, chunked prefill, aborts, seeds.
Invariants (no block owned twice, free + used == total) are checked after every step. Every test
runs twice: with async scheduling (each step launched before the previous one's tokens are read)
and without; on a CPU it only reorders the host's work, and the outputs must not change."""
import os
import random

import pytest
import torch

from gemforge.engine import SamplingParams
from gemforge.engine.engine import Engine, EngineConfig

from test_hf_parity import hf_greedy


SCHEDULING = {"async_scheduling": False}  # what make_engine passes unless told: set per test below


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def scheduling(request):
    SCHEDULING["async_scheduling"] = request.param
    yield request.param
    SCHEDULING["async_scheduling"] = False


def make_engine(d, **kw):
    ec = EngineConfig(dtype="float32", device="cpu", **{**SCHEDULING, **kw})
    return Engine(d, ec, progress=False)


def run_all(eng, requests, abort_at=None, check=True):
    """Add (rid, prompt, params) requests, step until done; abort_at: {rid: step index}."""
    for rid, prompt, p in requests:
        eng.add_request(rid, prompt, p)
    final, step = {}, 0
    while eng.has_unfinished():
        for rid, at in (abort_at or {}).items():
            if at == step and rid in eng.requests:
                final[rid] = eng.abort(rid)
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        if check:
            eng.scheduler.check_invariants()
        step += 1
        assert step < 10_000
    assert eng.cache.blocks.num_used == 0 and not eng.requests and not eng._by_seq
    assert not eng.scheduler.running and not eng.scheduler.waiting
    return final


def prompts_of(n, seed=0):
    rng = random.Random(seed)
    return [[2] + [rng.randrange(10, 1100) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("mqa", seed=4)


def test_32_concurrent_equal_alone_and_hf(ckpt):
    d, hf = ckpt
    prompts = prompts_of(32)
    params = [SamplingParams(max_tokens=4 + i % 13, temperature=0.0) for i in range(32)]
    eng = make_engine(d, max_num_seqs=32, max_num_batched_tokens=256)
    batched = run_all(eng, [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))])
    for i, (p, q) in enumerate(zip(prompts, params)):
        alone = run_all(eng, [("alone", p, q)])["alone"].outputs[0].token_ids
        got = batched[f"r{i}"].outputs[0].token_ids
        assert got == alone, i
        if i % 4 == 0:  # HF on a quarter of them keeps the test quick
            assert got == hf_greedy(hf, p, q.max_tokens), i


def test_tiny_pool_forces_preemption_and_keeps_tokens(ckpt):
    d, _ = ckpt
    prompts = prompts_of(12, seed=1)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = run_all(make_engine(d, kv_cache_tokens=4096), [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    eng = make_engine(d, kv_cache_tokens=96, block_size=16, max_num_batched_tokens=64)
    tight = run_all(eng, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert eng.scheduler.num_preemptions > 0
    for rid in roomy:
        assert tight[rid].outputs[0].token_ids == roomy[rid].outputs[0].token_ids, rid


def test_chunked_prefill_equals_whole_prefill(ckpt):
    d, _ = ckpt
    prompt = prompts_of(1, seed=2)[0] + list(range(100, 180))
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    whole = run_all(make_engine(d), [("a", prompt, p)])["a"].outputs[0].token_ids
    chunked = run_all(make_engine(d, max_num_batched_tokens=7), [("a", prompt, p)])["a"].outputs[0].token_ids
    assert whole == chunked


def test_random_aborts_leave_nothing_behind(ckpt):
    d, _ = ckpt
    rng = random.Random(3)
    prompts = prompts_of(16, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    eng = make_engine(d, max_num_batched_tokens=48, kv_cache_tokens=512)
    abort_at = {f"r{i}": rng.choice([0, 1, 3, 6, 10]) for i in range(0, 16, 2)}  # prefill .. last token
    final = run_all(eng, [(f"r{i}", p, params) for i, p in enumerate(prompts)], abort_at)
    for i in range(16):
        out = final[f"r{i}"].outputs[0]
        assert out.finish_reason == ("abort" if f"r{i}" in abort_at and len(out.token_ids) < 10 else "length")
    assert eng.abort("r0") is None  # unknown now: no-op


def test_same_seed_same_sample_alone_or_batched(ckpt):
    d, _ = ckpt
    eng = make_engine(d)
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run_all(eng, [("x", prompts_of(1, 9)[0], p)])["x"].outputs[0].token_ids
    others = [(f"o{i}", q, SamplingParams(max_tokens=5 + i, temperature=1.0)) for i, q in enumerate(prompts_of(6, 10))]
    batched = run_all(eng, others + [("x", prompts_of(1, 9)[0], p)])["x"].outputs[0].token_ids
    assert alone == batched


def test_streamed_deltas_concatenate_to_text(ckpt):
    d, _ = ckpt
    eng = make_engine(d)
    eng.add_request("s", "def f(x):", SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True))
    pieces, last = [], None
    while eng.has_unfinished():
        for out in eng.step():
            pieces.append(out.outputs[0].delta)
            last = out
    assert "".join(pieces) == last.outputs[0].text


def test_streamed_outputs_are_snapshots(ckpt):
    """Each intermediate output keeps the tokens it had when it was made, while generation goes on."""
    d, _ = ckpt
    eng = make_engine(d)
    eng.add_request("s", "def f(x):", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    seen = []
    while eng.has_unfinished():
        for out in eng.step():
            seen.append((out.outputs[0], list(out.outputs[0].token_ids)))
    final = seen[-1][1]
    assert len(final) == 12 and [len(ids) for _, ids in seen] == list(range(1, 13))
    for out, ids_then in seen:
        assert out.token_ids == ids_then == final[: out.num_tokens]


@pytest.mark.parametrize("ckpt_dtype,native_bf16,expected", [
    ("bfloat16", True, torch.bfloat16), ("bfloat16", False, torch.float32),
    ("float16", True, torch.float32), ("float32", True, torch.float32)])
def test_auto_dtype_on_cpu(monkeypatch, ckpt_dtype, native_bf16, expected):
    """"auto" on a CPU: a bf16 checkpoint runs in bf16 only where the CPU has bf16 hardware."""
    from gemforge.engine import options
    from gemforge.engine.config import ModelConfig

    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=8, dtype=ckpt_dtype)
    assert options.resolve_dtype("auto", cfg, "cpu") == expected
    assert options.resolve_dtype("auto", cfg, "cuda") == getattr(torch, ckpt_dtype)
    assert options.resolve_dtype("float16", cfg, "cpu") == torch.float16


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    """Any mix of what a request may ask for, each field set or left at its default at random."""
    kw = {"max_tokens": rng.randrange(1, 14), "seed": rng.randrange(1 << 20)}
    pick = {"temperature": lambda: rng.choice([0.0, 0.5, 1.0, 1.7]), "top_k": lambda: rng.choice([1, 5, 50]),
            "top_p": lambda: rng.choice([0.3, 0.9]), "min_p": lambda: rng.choice([0.05, 0.3]),
            "repetition_penalty": lambda: rng.choice([0.8, 1.3]), "presence_penalty": lambda: rng.uniform(-2, 2),
            "frequency_penalty": lambda: rng.uniform(-2, 2), "logprobs": lambda: rng.randrange(0, 4),
            "n": lambda: rng.randrange(1, 4), "ignore_eos": lambda: True, "stop": lambda: ["e", "(\n"],
            "stop_token_ids": lambda: [rng.randrange(vocab)], "prompt_logprobs": lambda: rng.randrange(0, 3),
            "logit_bias": lambda: {rng.randrange(vocab): rng.choice([-100.0, 100.0, rng.uniform(-5, 5)])
                                   for _ in range(rng.randrange(1, 9))}}
    for name in rng.sample(sorted(pick), rng.randrange(len(pick) + 1)):
        kw[name] = pick[name]()
    kw["min_tokens"] = rng.randrange(kw["max_tokens"] + 1) if rng.random() < 0.3 else 0
    return SamplingParams(**kw)


@pytest.mark.parametrize("draft", [None, "[ngram]", "self"])
def test_any_mix_of_sampling_params_in_one_batch(ckpt, draft):
    """40 requests with random combinations of every sampling field, batched together (prefix
    caching on; plain, prompt-lookup and draft-model speculation): each finishes with a well-formed
    output, and the seeded ones equal the same request run alone. GEMFORGE_MIX_SEED picks others."""
    d, _ = ckpt
    draft = d if draft == "self" else draft
    rng = random.Random(int(os.environ.get("GEMFORGE_MIX_SEED", 99)))
    eng = make_engine(d, max_num_seqs=16, max_num_batched_tokens=128, draft_model=draft,
                      num_speculative_tokens=3, adaptive_lookahead=False)
    V = eng.cfg.vocab_size
    prompts = prompts_of(40, seed=5)
    reqs = [(f"r{i}", prompts[i % 7 if i % 3 else i], random_params(rng, V)) for i in range(40)]
    outs = run_all(eng, reqs)
    for rid, prompt, p in reqs:
        out = outs[rid]
        assert len(out.outputs) == p.n and out.finished
        for c in out.outputs:
            ids = c.token_ids
            assert 1 <= len(ids) <= p.max_tokens and all(0 <= t < V for t in ids)
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(ids) == p.max_tokens and c.stop_reason is None)
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else {1})
            assert not stop_ids & set(ids[: p.min_tokens]), (rid, p)  # banned until min_tokens
            assert not stop_ids & set(ids[:-1])
            if p.logprobs is not None:
                assert len(c.logprobs) == len(ids) and all(len(e["top"]) == p.logprobs for e in c.logprobs)
            for t, b in (p.logit_bias or {}).items():
                if b == -100 and p.min_tokens == 0:
                    assert t not in ids
        if p.prompt_logprobs is not None:
            assert len(out.prompt_logprobs) == len(prompt)
    for rid, prompt, p in reqs[::5]:
        alone = run_all(eng, [("alone", prompt, p)])["alone"]
        assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in outs[rid].outputs], (rid, p)


@pytest.mark.parametrize("seed", range(8))
def test_random_engines_with_aborts_preemption_and_speculation(make_checkpoint, seed):
    """Engines of random shape (KV pool from tight to roomy, token budget, batch width, drafter: the
    model, prompt lookup or none, fixed or adaptive k) serving requests with random sampling fields,
    some aborted at random steps: block invariants hold after every step and both pools end empty.
    (80 seeds passed when this was written.)"""
    target, _ = make_checkpoint("mha", seed=11)
    draft, _ = make_checkpoint("mha", seed=11, noise=0.1)
    rng = random.Random(1000 + seed)
    eng = Engine(target, EngineConfig(
        dtype="float32", device="cpu", draft_model=rng.choice([draft, "[ngram]", None]),
        num_speculative_tokens=rng.randrange(1, 5), adaptive_lookahead=rng.random() < 0.5,
        kv_cache_tokens=rng.choice([256, 512, 4096]), max_num_batched_tokens=rng.choice([32, 64, 2048]),
        max_num_seqs=rng.choice([4, 16]), **SCHEDULING), progress=False)
    prompts = prompts_of(20, seed=seed)
    reqs = [(f"r{i}", prompts[i % 6] if i % 2 else prompts[i], random_params(rng, eng.cfg.vocab_size))
            for i in range(20)]
    reqs = [(rid, p, q) for rid, p, q in reqs if len(p) + q.max_tokens < 200]
    aborts = {rid: rng.randrange(30) for rid, _, _ in reqs if rng.random() < 0.3}
    outs = run_all(eng, reqs, abort_at=aborts)
    assert set(outs) == {rid for rid, _, _ in reqs}  # every request, aborted or not, ends with an output
    assert {o.outputs[0].finish_reason for o in outs.values()} <= {"stop", "length", "abort"}
    if eng.drafter is not None and eng.drafter.cache is not None:
        assert eng.drafter.cache.blocks.num_used == 0
