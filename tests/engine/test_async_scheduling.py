"""Async scheduling: each step is launched before the previous step's tokens are read (they reach
the next step from the device), so outputs come one engine call after their step. On a CPU
nothing overlaps, but every line of the GPU's path runs: the outputs must equal the synchronous
engine's. (test_engine.py runs all its continuous-batching tests both ways too.)"""
import dataclasses
import random

import pytest

from gemforge.engine import SamplingParams
from gemforge.engine.engine import Engine, EngineConfig

from test_engine import prompts_of, random_params, run_all
from test_step_graphs import RerunGraphs


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("mqa", seed=4)[0]


def engine(d, async_scheduling=True, **kw):
    return Engine(d, EngineConfig(dtype="float32", device="cpu", async_scheduling=async_scheduling, **kw),
                  progress=False)


def drive(eng, requests, late=(), at_call=3):
    """Step until done, adding `late` requests at call `at_call`; per call, (request id, tokens,
    finished) of each output, and the final outputs."""
    for rid, prompt, p in requests:
        eng.add_request(rid, prompt, p)
    calls, final = [], {}
    while eng.has_unfinished() or (late and len(calls) < at_call):
        if len(calls) == at_call:
            for rid, prompt, p in late:
                eng.add_request(rid, prompt, p)
        outs = eng.step()
        calls.append([(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in outs])
        final.update({o.request_id: o for o in outs if o.finished})
        eng.scheduler.check_invariants()
    assert eng.cache.blocks.num_used == 0 and not eng.requests
    return calls, final


def test_each_step_is_read_after_the_next_is_launched(ckpt):
    """The prefill's call returns nothing (its token is on the device), every later call returns the
    step before's token while the next one is in flight; a request ending at max_tokens is not
    stepped past it (as many launches as without), one ending on a stop token costs one launch in
    vain, whose token never shows."""
    d = ckpt
    p = prompts_of(1, seed=3)[0]
    sync = engine(d, async_scheduling=False)
    want = run_all(sync, [("a", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))])
    eng = engine(d)
    calls, final = drive(eng, [("a", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))])
    assert calls == [[]] + [[("a", i, i == 6)] for i in range(1, 7)]
    assert final["a"].outputs[0].token_ids == want["a"].outputs[0].token_ids
    assert eng.stats["steps"] == sync.stats["steps"] == 6
    stop = want["a"].outputs[0].token_ids[2]  # its third token, made a stop token
    eng = engine(d)
    calls, final = drive(eng, [("a", p, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[stop]))])
    assert final["a"].outputs[0].token_ids == want["a"].outputs[0].token_ids[:3]
    assert final["a"].outputs[0].finish_reason == "stop" and eng.stats["steps"] == 4  # 3 + the one in vain
    # min_tokens bans the stop token up to the right token although the one before is still in flight
    for banned in (2, 3):
        q = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[stop], min_tokens=banned)
        want = run_all(engine(d, async_scheduling=False), [("a", p, q)])["a"].outputs[0].token_ids
        assert drive(engine(d), [("a", p, q)])[1]["a"].outputs[0].token_ids == want


def test_sequences_that_need_their_tokens_switch_steps_to_reading_first(ckpt):
    """Requests with logprobs or penalties join mid-run (their steps read the previous tokens before
    launching), leave again, and requests are aborted with a token in flight: every output equals the
    synchronous engine's, and nothing is left behind."""
    d = ckpt
    prompts = prompts_of(8, seed=8)
    base = [(f"r{i}", prompts[i], SamplingParams(max_tokens=5 + 3 * i, temperature=0.0 if i % 2 else 0.8,
                                                 seed=i, ignore_eos=i % 3 == 0)) for i in range(6)]
    late = [("lp", prompts[6], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2)),
            ("pen", prompts[7], SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3))]
    outs = {}
    for a in (False, True):
        eng = engine(d, async_scheduling=a, max_num_seqs=4, max_num_batched_tokens=64)
        outs[a] = drive(eng, base, late)[1]
    for rid in outs[False]:
        got, want = outs[True][rid].outputs[0], outs[False][rid].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), rid
    assert [e["token"] for e in outs[True]["lp"].outputs[0].logprobs] == outs[True]["lp"].outputs[0].token_ids

    eng = engine(d)
    for rid, prompt, p in base:
        eng.add_request(rid, prompt, p)
    eng.step()
    eng.step()  # r* have one token read, one in flight
    cut = eng.abort("r5")
    assert cut.outputs[0].finish_reason == "abort" and len(cut.outputs[0].token_ids) == 1
    rest = run_all(eng, [])
    assert set(rest) == {f"r{i}" for i in range(5)}


def test_decode_steps_take_device_tokens_through_the_step_graphs(ckpt):
    """With StepGraphs (rerun on CPU), decode steps copy the tokens in flight into the graph's input
    buffer, and mixed steps (prompts joining decodes: ragged graphs) put them among the host's: the
    outputs equal the synchronous engine's."""
    d = ckpt
    prompts = prompts_of(6, seed=12)
    reqs = [(f"r{i}", prompts[i], SamplingParams(max_tokens=4 + 2 * i, temperature=0.0, ignore_eos=True))
            for i in range(6)]
    want = run_all(engine(d, async_scheduling=False), reqs)
    eng = engine(d, max_num_seqs=8)
    eng.runner.graphs = RerunGraphs(eng.model, eng.cache, 8, eng.max_model_len, 1)
    calls, got = drive(eng, reqs[:3], reqs[3:])
    assert {k: v.outputs[0].token_ids for k, v in got.items()} == {k: v.outputs[0].token_ids for k, v in want.items()}
    assert eng.runner.graphs.graphs and eng.runner.graphs.ragged  # decode and mixed steps replayed graphs


@pytest.mark.parametrize("seed", range(4))
def test_random_engines_give_the_same_tokens_both_ways(ckpt, seed):
    """Engines of random shape (KV pool from tight to roomy: preemption; token budget: chunked
    prefill; batch width) serving requests with random sampling fields (seeded samples, n, logit
    bias, min_tokens, and requests that switch steps to reading first: penalties, logprobs, prompt
    logprobs), some aborted at a random call: every request not aborted gets the same tokens with
    async scheduling as without. (No stops: a stop costs an async engine one step in vain, which
    changes that step's batch, and a batch of another size may round differently.)"""
    rng = random.Random(2000 + seed)
    kw = dict(kv_cache_tokens=rng.choice([256, 512, 4096]), max_num_batched_tokens=rng.choice([32, 64, 2048]),
              max_num_seqs=rng.choice([4, 16]))
    prompts = prompts_of(16, seed=seed)
    plain = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logprobs=None,
                 prompt_logprobs=None)  # all but two requests leave the engine free to launch first
    reqs = [(f"r{i}", prompts[i], dataclasses.replace(random_params(rng, 1100), stop=[], stop_token_ids=[],
                                                      ignore_eos=True, **({} if i < 2 else plain)))
            for i in range(16)]
    reqs = [(rid, p, q) for rid, p, q in reqs if len(p) + q.max_tokens < 200]
    aborts = {rid: rng.randrange(20) for rid, _, _ in reqs if rng.random() < 0.25}
    engines = {a: engine(ckpt, async_scheduling=a, **kw) for a in (False, True)}
    outs = {a: run_all(eng, reqs, abort_at=aborts) for a, eng in engines.items()}
    overlapped = engines[True].stats["async_steps"]  # steps launched before their predecessor was read
    assert overlapped > engines[True].stats["steps"] // 3 and "async_steps" not in engines[False].stats
    for rid, _, _ in reqs:
        if rid not in aborts:
            got, want = outs[True][rid].outputs, outs[False][rid].outputs
            assert [c.token_ids for c in got] == [c.token_ids for c in want], rid
