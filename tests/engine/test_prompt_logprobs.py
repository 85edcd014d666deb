"""Prompt logprobs (SamplingParams.prompt_logprobs; max_tokens=0 scores a prompt without generating):
each prompt token's log-probability given the tokens before it equals HF transformers', whole or in
chunks, after preemption, and whatever the prefix cache holds."""
import pytest
import torch

from gemforge.engine import SamplingParams

from test_engine import make_engine, prompts_of, run_all
from test_hf_parity import hf_logits

TOP = 3


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("mqa", seed=4)


def expected(hf, prompt):
    """HF's log-probabilities of prompt tokens 1.. and the top-TOP ids at each position before them."""
    lp = hf_logits(hf, prompt)[:-1].log_softmax(-1)
    nxt = torch.tensor(prompt[1:])
    return lp.gather(-1, nxt[:, None])[:, 0], lp.topk(TOP, dim=-1).indices


def check(entries, hf, prompt):
    assert len(entries) == len(prompt) and entries[0] == {"token": prompt[0], "logprob": None, "top": None}
    chosen, top_ids = expected(hf, prompt)
    assert [e["token"] for e in entries[1:]] == prompt[1:]
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in entries[1:]]), chosen, rtol=1e-4, atol=1e-4)
    for e, ids in zip(entries[1:], top_ids.tolist()):
        assert list(e["top"]) == ids and all(v <= 0 for v in e["top"].values())


@pytest.mark.parametrize("chunk", [2048, 7], ids=["whole", "chunked"])
def test_prompt_logprobs_match_hf(ckpt, chunk):
    d, hf = ckpt
    prompts = [p + list(range(300, 340)) for p in prompts_of(3, seed=8)]
    score = SamplingParams(max_tokens=0, prompt_logprobs=TOP)
    eng = make_engine(d, max_num_batched_tokens=chunk)
    outs = run_all(eng, [(f"r{i}", p, score) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        out = outs[f"r{i}"]
        check(out.prompt_logprobs, hf, p)
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"


def test_generation_alongside_is_unchanged(ckpt):
    """prompt_logprobs with tokens to generate: the same tokens as without; with n > 1 the request's
    first sequence scores the prompt (in full, though it is cached) and the others reuse the cache."""
    d, hf = ckpt
    prompt = prompts_of(1, seed=9)[0] + list(range(500, 530))
    plain = SamplingParams(max_tokens=6, temperature=0.0, n=2)
    scored = SamplingParams(max_tokens=6, temperature=0.0, n=2, prompt_logprobs=0)
    eng = make_engine(d)
    want = run_all(eng, [("a", prompt, plain)])["a"]
    got = run_all(eng, [("b", prompt, scored)])["b"]  # the prompt is cached by now
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
    # the first sample, which scores the prompt, computes it; the second reuses the cached blocks
    assert got.num_cached_tokens == (len(prompt) - 1) // 16 * 16 > 0 and want.prompt_logprobs is None
    assert all(e["top"] == {} for e in got.prompt_logprobs[1:])
    chosen, _ = expected(hf, prompt)
    torch.testing.assert_close(torch.tensor([e["logprob"] for e in got.prompt_logprobs[1:]]), chosen,
                               rtol=1e-4, atol=1e-4)


def test_preempted_prompt_is_scored_once(ckpt):
    d, hf = ckpt
    prompts = [p + list(range(600, 650)) for p in prompts_of(6, seed=10)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    eng = make_engine(d, kv_cache_tokens=160, block_size=16, max_num_batched_tokens=48)
    outs = run_all(eng, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert eng.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        entries = outs[f"r{i}"].prompt_logprobs
        assert len(entries) == len(p) and [e["token"] for e in entries] == p
        chosen, _ = expected(hf, p)
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in entries[1:]]), chosen, rtol=1e-4, atol=1e-4)


def test_max_tokens_zero_needs_prompt_logprobs():
    from gemforge.engine.errors import RequestError
    with pytest.raises(RequestError, match="prompt_logprobs") as e:
        SamplingParams(max_tokens=0)
    assert e.value.field == "max_tokens"


@pytest.mark.parametrize("draft", [None, "self"], ids=["plain", "speculative"])
def test_generated_logprobs_are_the_models_own_like_the_prompts(ckpt, draft):
    """A logit_bias that forces a token, a repetition penalty, or a temperature changes what is picked,
    not the logprobs reported: generated tokens' logprobs are the model's own, as HF scores them and as
    the same tokens get when scored as a prompt (one scale in one response). Speculating (the target
    drafting for itself, so windows verify) reports the same."""
    d, hf = ckpt
    prompt = prompts_of(1, seed=30)[0]
    forced = 777
    kw = {} if draft is None else dict(draft_model=str(d), num_speculative_tokens=3, adaptive_lookahead=False)
    for params in (SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=TOP,
                                  logit_bias={forced: 100.0}),
                   SamplingParams(max_tokens=4, temperature=0.7, seed=1, ignore_eos=True, logprobs=TOP,
                                  repetition_penalty=1.5)):
        eng = make_engine(d, **kw)
        out = run_all(eng, [("g", prompt, params)])["g"].outputs[0]
        if params.logit_bias:
            assert out.token_ids == [forced] * 4 and (draft is None or out.spec["accepted"] > 0)
        full = prompt + out.token_ids
        lp = hf_logits(hf, full)[len(prompt) - 1: -1].log_softmax(-1)
        want = lp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        got = torch.tensor([e["logprob"] for e in out.logprobs])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert [list(e["top"]) for e in out.logprobs] == lp.topk(TOP, dim=-1).indices.tolist()
