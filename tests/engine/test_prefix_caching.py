"""Prefix caching end to end: prompts that share a prefix compute it once, and the outputs are
those of an engine without prefix caching: alone, batched, after preemption, with n > 1, in a
multi-turn continuation, and with a draft model (whose pool shares prefixes too). Block
invariants are checked after every step (run_all)."""
import pytest

from gemforge.engine import LLM, SamplingParams
from gemforge.engine.engine import Engine, EngineConfig

from test_engine import make_engine, prompts_of, run_all

BLOCK = 16


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("mqa", seed=4)


def shared_prefix_requests(n, prefix_len=53, seed=5):
    """n greedy requests: one shared prefix of prefix_len tokens, then tails of 1..n tokens."""
    base = [2] + prompts_of(1, seed)[0][1:] * 4
    assert len(base) >= prefix_len
    tails = prompts_of(n, seed + 1)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    return [(f"r{i}", base[:prefix_len] + tails[i][1: 2 + i], params) for i in range(n)]


def tokens_and_logprobs(outs):
    return {rid: [(o.token_ids, [(d["token"], round(d["logprob"], 4)) for d in o.logprobs]) for o in out.outputs]
            for rid, out in outs.items()}


def test_shared_prefix_computed_once_and_outputs_unchanged(ckpt):
    d, _ = ckpt
    reqs = shared_prefix_requests(6)
    plain = make_engine(d, enable_prefix_caching=False)
    want = {**run_all(plain, reqs[:1]), **run_all(plain, reqs[1:])}
    eng = make_engine(d)
    first = run_all(eng, reqs[:1])  # computes the prefix, registers its blocks when it finishes
    rest = run_all(eng, reqs[1:])   # five concurrent requests find it cached
    got = {**first, **rest}
    assert tokens_and_logprobs(got) == tokens_and_logprobs(want)
    assert first["r0"].num_cached_tokens == 0 and plain.scheduler.prefix_hits == 0
    assert {out.num_cached_tokens for out in rest.values()} == {53 // BLOCK * BLOCK}
    assert eng.scheduler.prefix_hits == 5 * 48
    assert eng.stats["prompt_tokens"] == sum(len(p) for _, p, _ in reqs) - 5 * 48  # the rest was computed


def test_multi_turn_continuation_reuses_prompt_and_answer(ckpt):
    """The next turn's prompt is the last prompt + answer + more: the answer's full blocks are cached
    too (registered when the first request finished)."""
    d, _ = ckpt
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = prompts_of(1, 9)[0] + list(range(100, 140))
    eng, plain = make_engine(d), make_engine(d, enable_prefix_caching=False)
    answer = run_all(eng, [("t1", prompt, params)])["t1"].outputs[0].token_ids
    turn2 = prompt + answer + [5, 6, 7]
    out = run_all(eng, [("t2", turn2, params)])["t2"]
    assert out.outputs[0].token_ids == run_all(plain, [("t2", turn2, params)])["t2"].outputs[0].token_ids
    assert out.num_cached_tokens == (len(prompt) + len(answer) - 1) // BLOCK * BLOCK


def test_samples_and_requests_arriving_together_compute_a_shared_prompt_once(ckpt):
    """n = 3 of one prompt and two more requests with the same prompt, added at once: the first
    sequence computes the prompt while the others wait (they would compute it too), then they match
    its full blocks and compute only the rest. Likewise five requests that share a new 53-token
    prefix. Outputs and logprobs are unchanged; each shared block is computed once."""
    d, _ = ckpt
    prompt = prompts_of(1, 11)[0] + list(range(200, 240))
    reqs = [("a", prompt, SamplingParams(n=3, max_tokens=6, temperature=0.0, logprobs=1)),
            ("b", prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=1)),
            ("c", list(prompt), SamplingParams(max_tokens=6, temperature=0.0, logprobs=1))]
    eng = make_engine(d)
    got = run_all(eng, reqs)
    want = run_all(make_engine(d, enable_prefix_caching=False), reqs)
    assert tokens_and_logprobs(got) == tokens_and_logprobs(want)
    cached = (len(prompt) - 1) // BLOCK * BLOCK
    assert eng.stats["prompt_tokens"] == len(prompt) + 4 * (len(prompt) - cached)
    assert [o.num_cached_tokens for o in got.values()] == [cached] * 3  # a: its 2nd and 3rd sequences

    reqs = shared_prefix_requests(5)
    eng = make_engine(d)
    got = run_all(eng, reqs)
    assert tokens_and_logprobs(got) == tokens_and_logprobs(run_all(make_engine(d, enable_prefix_caching=False), reqs))
    assert eng.stats["prompt_tokens"] == sum(len(p) for _, p, _ in reqs) - 4 * (53 // BLOCK * BLOCK)


def test_preemption_and_eviction_keep_outputs(ckpt):
    """A pool too small for the batch: sequences are preempted (their blocks registered, then freed)
    and cached blocks are evicted for new ones, yet every output equals the roomy uncached run."""
    d, _ = ckpt
    reqs = shared_prefix_requests(10, prefix_len=40, seed=13)
    roomy = run_all(make_engine(d, enable_prefix_caching=False, kv_cache_tokens=4096), reqs)
    eng = make_engine(d, kv_cache_tokens=160, block_size=BLOCK, max_num_batched_tokens=64)
    tight = run_all(eng, reqs)
    assert eng.scheduler.num_preemptions > 0 and eng.scheduler.prefix_hits > 0
    assert tokens_and_logprobs(tight) == tokens_and_logprobs(roomy)


def test_speculative_with_prefix_caching_equals_target_alone(make_checkpoint):
    target, _ = make_checkpoint("mha", seed=11)
    draft, _ = make_checkpoint("mha", seed=11, noise=0.1)
    reqs = shared_prefix_requests(5, prefix_len=37, seed=17)
    reqs = [(rid, p, SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)) for rid, p, _ in reqs]
    alone = Engine(target, EngineConfig(dtype="float32", device="cpu", enable_prefix_caching=False), progress=False)
    want = {**run_all(alone, reqs[:1]), **run_all(alone, reqs[1:])}
    spec = Engine(target, EngineConfig(dtype="float32", device="cpu", draft_model=draft, num_speculative_tokens=3,
                                       adaptive_lookahead=False), progress=False)
    got = {**run_all(spec, reqs[:1]), **run_all(spec, reqs[1:])}
    assert {rid: o.outputs[0].token_ids for rid, o in got.items()} == {
        rid: o.outputs[0].token_ids for rid, o in want.items()}
    assert spec.scheduler.prefix_hits == 4 * 32 and 0 < spec.stats["spec_accepted"]
    draft_blocks = spec.drafter.cache.blocks
    assert draft_blocks.num_used == 0 and draft_blocks.num_cached >= 2  # the draft's prefix blocks stay cached


def test_llm_reports_cached_tokens(ckpt):
    d, _ = ckpt
    llm = LLM(d, dtype="float32", device="cpu")
    prompt = list(range(300, 300 + 3 * BLOCK))  # all cached the second time, but the last token is computed
    params = SamplingParams(max_tokens=3, temperature=0.0)
    first, second = llm.generate([prompt], params)[0], llm.generate([prompt], params)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 2 * BLOCK
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
