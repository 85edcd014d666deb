"""Speculative decoding: greedy output identical to the target alone, the rejection sampler's
output distribution equal to the target's, and caches after rollback equal to never drafting."""
from collections import Counter

import pytest
import torch

from gemforge.engine import SamplingParams
from gemforge.engine.engine import Engine, EngineConfig
from gemforge.engine.errors import RequestError
from gemforge.engine.quantization import step_bytes, weight_bytes
from gemforge.engine.runner import WorkItem
from gemforge.engine.sampling import draw, probs
from gemforge.engine import drafters
from gemforge.engine.drafters import NGRAM, NgramDrafter, corpus_counts, draft_vocabulary
from gemforge.engine.lookahead import CALIBRATE_EVERY, PROBE_EVERY, StepCosts, best_lookahead, updated_rate
from gemforge.engine.speculative import Window, accept, verdicts

from test_engine import prompts_of, run_all


@pytest.fixture(scope="module")
def pair(make_checkpoint):
    """The target and a draft that is a perturbed copy of it: it agrees often, not always."""
    target, _ = make_checkpoint("mha", seed=11)
    draft, _ = make_checkpoint("mha", seed=11, noise=0.1)
    return target, draft


def engine(target, draft=None, k=4, **kw):
    """The pair's draft is as big as the target, so the cost-aware lookahead would rightly never
    draft: these tests fix k unless they say otherwise."""
    kw.setdefault("adaptive_lookahead", False)
    return Engine(target, EngineConfig(dtype="float32", device="cpu", draft_model=draft, num_speculative_tokens=k,
                                       **kw), progress=False)


def test_best_lookahead_weighs_acceptance_against_draft_cost():
    assert best_lookahead(0.0, 8, 0.1) == 0                      # nothing accepted: do not draft
    assert best_lookahead(1.0, 8, 1.0) == 0                      # a draft as costly as the target never pays
    assert best_lookahead(0.9, 8, 0.05) >= 6                     # cheap, good draft: look far ahead
    assert best_lookahead(0.5, 8, 0.33) == 1 and best_lookahead(0.2, 8, 0.29) == 0
    ks = [best_lookahead(a / 10, 8, 0.29) for a in range(11)]
    assert ks == sorted(ks) and ks[-1] == 8                      # more acceptance, longer windows


def test_best_lookahead_counts_what_window_tokens_add_to_the_verify_step():
    """Where each window token makes the target's forward dearer (a CPU, a large batch), drafting can
    lose even when drafts are free and sometimes right (prompt lookup on a CPU)."""
    assert best_lookahead(0.6, 4, 0.3) == 1
    assert best_lookahead(0.6, 4, 0.3, verify_slope=0.3) == 0
    assert best_lookahead(0.9, 8, 0.05, verify_slope=0.05) >= 6
    assert best_lookahead(0.05, 4, 0.005) == 1 and best_lookahead(0.05, 4, 0.005, verify_slope=0.1) == 0


def test_best_lookahead_weighs_a_dear_first_draft_step():
    """When the first draft step costs most (it catches the draft up), longer windows share that cost."""
    assert best_lookahead(0.8, 8, 0.6) <= 2 < 6 <= best_lookahead(0.8, 8, 0.05, first_draft_cost=0.6)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_acceptance_rate_estimate_is_the_per_token_rate_at_any_lookahead(k):
    """Windows of k drafts, each accepted with probability 0.6 until the first rejection: the estimate
    settles near 0.6 whatever k (accepted / proposed would read 0.60, 0.33, 0.19)."""
    g = torch.Generator().manual_seed(k)
    rate, seen = 1.0, []
    for _ in range(3000):
        accepted = 0
        while accepted < k and torch.rand(1, generator=g).item() < 0.6:
            accepted += 1
        rate = updated_rate(rate, accepted, k, 0.98)
        seen.append(rate)
    assert abs(sum(seen[500:]) / len(seen[500:]) - 0.6) < 0.03


def test_timed_windows_replace_the_cost_model():
    """At acceptance 0.6 the model (draft steps 0.2, windows free) rates k = 2 best of 0..2; once
    windows of 1 and 2 are timed at 1.25 and 1.9 plain steps, k = 1 is (1.6 / 1.25 > 1.96 / 1.9).
    StepCosts reports a k's window cost after WINDOW_SAMPLES of them, relative to the plain step."""
    assert best_lookahead(0.6, 2, 0.2, 0.0, 0.2) == 2
    assert best_lookahead(0.6, 2, 0.2, 0.0, 0.2, ((1, 1.25), (2, 1.9))) == 1
    costs = StepCosts(draft_prior=0.3)
    for _ in range(8):
        costs.record("plain", 0.010)
    for i in range(StepCosts.WINDOW_SAMPLES):
        assert costs.window_costs == ()
        costs.record_window(2, 0.019)
        costs.record_window(1, 0.0125)
    assert dict(costs.window_costs) == pytest.approx({1: 1.25, 2: 1.9})


def test_step_costs_time_the_first_draft_step_apart():
    c = StepCosts(draft_prior=0.29)
    c.record("plain", 1.0)
    c.record("first", 0.6)
    assert c.first_draft_cost == pytest.approx(0.6) and c.draft_cost == pytest.approx(0.6)  # no later step yet
    c.record("draft", 0.2)
    assert c.first_draft_cost == pytest.approx(0.6) and c.draft_cost == pytest.approx(0.2)


def test_a_plain_step_after_a_long_speculative_run(pair):
    """Always drafting would leave the plain baseline (and the verify slope) unmeasured: after
    CALIBRATE_EVERY speculative steps in a row one step decodes plainly."""
    target, draft = pair
    eng = engine(target, draft, k=3, adaptive_lookahead=True)
    eng.add_request("a", prompts_of(1, 3)[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    eng.step()  # the prompt
    seq = eng.requests["a"].seqs[0]
    eng.lookahead.since_plain = CALIBRATE_EVERY
    eng.lookahead.assign(eng.scheduler.running, eng.max_model_len)
    assert seq.lookahead == 0 and seq.spec_idle == 0  # not counted as declining to draft
    eng.step()
    assert eng.lookahead.since_plain == 0 and eng.lookahead.costs.median["plain"] is not None
    eng.lookahead.costs.draft_prior = 0.01  # cheap drafts: it speculates again
    eng.lookahead.assign(eng.scheduler.running, eng.max_model_len)
    assert seq.lookahead == 3


def test_step_costs_are_ratios_to_a_plain_step():
    c = StepCosts(draft_prior=0.29)
    assert (c.draft_cost, c.verify_slope) == (0.29, 0.0)    # nothing measured: the prior, free windows
    c.record("draft", 0.4)
    c.record("verify", 1.2, window_tokens=4)
    assert c.draft_cost == pytest.approx(0.4 / 1.2) and c.verify_slope == 0.0   # no plain step yet
    c.record("plain", 1.0)
    assert c.draft_cost == pytest.approx(0.4) and c.verify_slope == pytest.approx(0.2 / 4)
    c.record("verify", 1.6, window_tokens=2)                # slopes 0.05 and 0.3: their median
    assert c.verify_slope == pytest.approx(0.175)
    for t in (1.1, 9.0, 1.2):                                # the median of recent samples: a stall
        c.record("plain", t)                                 # does not move it far
    assert c.median["plain"] == pytest.approx(1.15)
    assert c.verify_slope == pytest.approx(((1.2 / 1.15 - 1) / 4 + (1.6 / 1.15 - 1) / 2) / 2)


@pytest.mark.parametrize("draft_cost, drafts", [(None, False), (0.05, True)], ids=["bytes-ratio", "cheap"])
def test_adaptive_lookahead_drafts_only_when_it_pays(pair, draft_cost, drafts):
    """The pair's draft costs as much as the target: by its weight bytes drafting never pays, and the
    sequence only probes every PROBE_EVERY steps; told the draft is cheap, it drafts. Output is the
    target's either way."""
    target, draft = pair
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = run_all(engine(target), [("a", "def f(x):", p)])
    eng = engine(target, draft, k=4, adaptive_lookahead=True, draft_cost=draft_cost)
    assert eng.lookahead.draft_cost == (0.05 if drafts else 1.0)
    out = run_all(eng, [("a", "def f(x):", p)])
    assert out["a"].outputs[0].token_ids == plain["a"].outputs[0].token_ids
    steps = out["a"].outputs[0].spec["verify_steps"] if out["a"].outputs[0].spec else 0
    if drafts:
        assert steps >= 8
    else:  # the first step's optimistic prior says k = 0 already (ties go to 0): only probes, the
        assert steps <= 40 // PROBE_EVERY  # second one 2 * PROBE_EVERY idle steps after the first


def test_draft_cost_is_measured_unless_given(pair):
    """draft_cost=None starts from the weight-bytes ratio (1.0 for this equal-size pair) and then follows
    the measured time of a draft step over the rest of a decode step; a given cost stays fixed."""
    target, draft = pair
    p = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    measured = engine(target, draft, k=2)
    assert measured.lookahead.draft_cost == 1.0
    run_all(measured, [("a", "def f(x):", p)])
    assert measured.lookahead.draft_cost != 1.0 and 0 < measured.lookahead.draft_cost <= 16
    fixed = engine(target, draft, k=2, draft_cost=0.3)
    run_all(fixed, [("a", "def f(x):", p)])
    assert fixed.lookahead.draft_cost == 0.3


def test_bad_draft_cost_is_rejected(pair):
    target, draft = pair
    with pytest.raises(RequestError, match="draft_cost"):
        engine(target, draft, draft_cost=-1.0)


@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_speculative_equals_target_alone(pair, batch):
    target, draft = pair
    prompts = prompts_of(batch, seed=batch)
    params = [SamplingParams(max_tokens=9 + 4 * (i % 5), temperature=0.0, ignore_eos=True) for i in range(batch)]
    reqs = [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
    plain = run_all(engine(target), reqs)
    spec_engine = engine(target, draft, k=3)
    spec = run_all(spec_engine, reqs)
    for rid in plain:
        assert spec[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids, rid
        assert len(spec[rid].outputs[0].token_ids) == params[int(rid[1:])].max_tokens  # max_tokens mid-window
    st = spec_engine.stats
    assert 0 < st["spec_accepted"] < st["spec_proposed"], st  # both accepted and rejected drafts
    assert spec_engine.drafter.cache.blocks.num_used == 0


def test_a_speculative_step_reads_the_device_once(pair, monkeypatch):
    """Drafts stay on the device: the verify windows take them from there, and the host reads every
    window's drafts and verdict in one copy per step (greedy and sampled requests in one batch; on a
    GPU each read waits for the device, and the host could not queue the verify forward behind the
    draft steps)."""
    target, draft = pair
    eng = engine(target, draft, k=3)
    for i, p in enumerate(prompts_of(4, seed=21)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.8 * (i % 2), seed=i, ignore_eos=True))
    eng.step()  # the prompts
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name, **kw:
                            reads.append(_name) or _real(t, *a, **kw))
    for _ in range(4):
        before = eng.stats["spec_windows"] if "spec_windows" in eng.stats else 0
        reads.clear()
        eng.step()
        assert eng.stats["spec_windows"] == before + 4 and reads == ["tolist"], reads


def test_self_drafting_accepts_everything(pair):
    """The target drafting for itself proposes its own greedy tokens: every draft is accepted, also
    when the sequences of a batch draft different k (each capped by its max_tokens near the end, so
    later draft steps carry fewer sequences and take their tokens from a subset of the last step's)."""
    target, _ = pair
    eng = engine(target, target, k=4, adaptive_lookahead=False)
    out = run_all(eng, [("a", prompts_of(1, 5)[0], SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True))])
    stats = out["a"].outputs[0].spec
    assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_step"] == 5.0
    eng = engine(target, target, k=4, adaptive_lookahead=False)
    out = run_all(eng, [(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                        for i, (p, n) in enumerate(zip(prompts_of(4, 6), (23, 18, 9, 12)))])
    assert all(o.outputs[0].spec["acceptance_rate"] == 1.0 for o in out.values()), out


def test_logit_bias_and_min_tokens_inside_windows(pair):
    """The verify window applies the request's logit_bias and min_tokens' stop-id ban at each of its
    positions (greedy output equals the target alone's, eos ending it right after min_tokens), and
    the draft applies them too: drafting with the target itself still accepts everything."""
    target, draft = pair
    alone = engine(target)
    g = torch.Generator().manual_seed(7)
    ids = torch.randperm(alone.cfg.vocab_size, generator=g)[:300].tolist()
    bias = dict(zip(ids, (torch.rand(300, generator=g) * 6 - 3).tolist()))
    bias[1] = 15.0  # eos: banned for the first min_tokens, then it wins
    params = [SamplingParams(max_tokens=20, min_tokens=m, temperature=0.0, logit_bias=bias) for m in (3, 9, 14)]
    reqs = [(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts_of(3, seed=4), params))]
    plain = run_all(alone, reqs)
    for (rid, _, q), out in zip(reqs, plain.values()):
        assert len(out.outputs[0].token_ids) == q.min_tokens + 1 and out.outputs[0].token_ids[-1] == 1, rid
    for d, k in ((draft, 5), (target, 5), (NGRAM, 3)):
        eng = engine(target, d, k=k)
        spec = run_all(eng, reqs)
        for rid in plain:
            assert spec[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids, (d, rid)
        assert eng.stats.get("spec_proposed", 0) > 0 or d == NGRAM
        if d == target:
            assert eng.stats["spec_accepted"] == eng.stats["spec_proposed"], eng.stats


def test_logprobs_requests_speculate(pair):
    """A request that wants logprobs speculates too: each accepted token's entry comes from the verify
    window row that scored it. Greedy tokens equal the target alone's, and their logprobs agree to
    fp32 rounding (the window scores its tokens in one forward, the target alone one at a time);
    a sampled request's entries name the tokens it emitted."""
    target, draft = pair
    reqs = [(f"r{i}", p, SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=1 + i))
            for i, p in enumerate(prompts_of(4, seed=8))]  # (a step's windows are scored in one read)
    plain = run_all(engine(target), reqs)
    eng = engine(target, draft, k=3)
    spec = run_all(eng, reqs)
    assert eng.stats["spec_accepted"] > 0
    for rid in plain:
        a, b = spec[rid].outputs[0], plain[rid].outputs[0]
        assert a.token_ids == b.token_ids and [e["token"] for e in a.logprobs] == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert len(x["top"]) == 1 + int(rid[1:]) and x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
            assert list(x["top"]) == list(y["top"]) and list(x["top"].values()) == pytest.approx(
                list(y["top"].values()), abs=1e-4)
    sampled = SamplingParams(max_tokens=14, temperature=0.9, seed=3, ignore_eos=True, logprobs=1)
    out = run_all(eng, [("s", prompts_of(1, seed=9)[0], sampled)])["s"].outputs[0]
    assert out.spec["verify_steps"] > 0 and [e["token"] for e in out.logprobs] == out.token_ids
    assert all(e["logprob"] <= 0 and len(e["top"]) == 1 for e in out.logprobs)


def test_stop_string_mid_window(pair):
    target, draft = pair
    p = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    text = run_all(engine(target), [("a", "def f(x):", p)])["a"].outputs[0].text
    if len(text) < 6:
        pytest.skip("random model produced too little text")
    stop = text[len(text) // 2: len(text) // 2 + 3]
    ps = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    plain = run_all(engine(target), [("a", "def f(x):", ps)])["a"].outputs[0]
    spec = run_all(engine(target, draft, k=5), [("a", "def f(x):", ps)])["a"].outputs[0]
    assert spec.text == plain.text == text[: text.find(stop)] and spec.finish_reason == "stop"
    assert spec.token_ids == plain.token_ids


def test_sampled_seeded_run_is_reproducible(pair):
    target, draft = pair
    p = SamplingParams(max_tokens=16, temperature=0.8, top_k=50, seed=3, ignore_eos=True)
    a = run_all(engine(target, draft), [("a", "import os", p)])["a"].outputs[0].token_ids
    b = run_all(engine(target, draft), [("a", "import os", p)])["a"].outputs[0].token_ids
    assert a == b


def test_seed_replays_under_the_adaptive_lookahead_whatever_runs_beside_it(pair):
    """How many draws a seeded request's windows take must not depend on measured step times, on the
    acceptance of requests before it, or on the batch's token budget cutting its window: alone on a
    fresh engine, again after other requests, and beside others in a batch of 24 tokens, the same
    seed gives the same tokens (and it drafts all along)."""
    target, draft = pair
    p = SamplingParams(max_tokens=24, temperature=0.9, seed=11, ignore_eos=True)
    prompt = prompts_of(1, seed=21)[0]

    def fresh(**kw):
        eng = engine(target, draft, k=4, adaptive_lookahead=True, **kw)
        eng.lookahead.costs.draft_prior = 0.05  # (a cheap draft's prior: seeded requests draft by it)
        return eng

    eng = fresh()
    alone = run_all(eng, [("s", prompt, p)])["s"].outputs[0]
    assert alone.spec["verify_steps"] > 0
    others = [(f"o{i}", q, SamplingParams(max_tokens=20, temperature=0.7 * (i % 2), ignore_eos=True))
              for i, q in enumerate(prompts_of(4, seed=22))]
    run_all(eng, others)  # (measured costs and the overall acceptance move)
    assert run_all(eng, [("s", prompt, p)])["s"].outputs[0].token_ids == alone.token_ids
    crowded = fresh(max_num_batched_tokens=24)
    out = run_all(crowded, others[:2] + [("s", prompt, p)] + others[2:])
    assert out["s"].outputs[0].token_ids == alone.token_ids
    # a budget that chunks the prompt leaving its last token alone: the first token is still a plain step's
    chunked = fresh(max_num_batched_tokens=len(prompt) - 1)
    assert run_all(chunked, [("s", prompt, p)])["s"].outputs[0].token_ids == alone.token_ids


def test_windows_fit_the_step_budget(pair):
    """A lookahead wider than max_num_batched_tokens allows is cut to fit (a seeded request, whose
    window is never cut by the batch, would otherwise wait for ever)."""
    target, draft = pair
    p = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    eng = engine(target, draft, k=4, max_num_batched_tokens=4)
    out = run_all(eng, [("s", prompts_of(1, seed=5)[0], p)])["s"].outputs[0]
    assert eng.lookahead.k_max == 3 and out.finish_reason == "length" and out.spec["verify_steps"] > 0


def test_draft_pool_that_cannot_hold_a_window_drafts_less(pair):
    """The draft's pool has the target's block count but shares prompts less (samples of one request
    drafting for the first time in the same step each compute their own copy): a sequence whose
    slots it cannot hold drafts nothing that step, instead of the step failing. Output equals the
    target alone's, and both pools end empty."""
    target, draft = pair
    prompt = [2] + [(7 * i) % 1000 + 10 for i in range(400)]
    reqs = [("n3", prompt, SamplingParams(n=3, max_tokens=20, temperature=0.0, ignore_eos=True))]
    plain = run_all(engine(target, kv_cache_tokens=512), reqs)["n3"].outputs
    eng = engine(target, draft, k=4, kv_cache_tokens=512)
    run_all(eng, [("warm", prompt, SamplingParams(max_tokens=1, temperature=0.0))])  # (only the target caches it)
    spec = run_all(eng, reqs)["n3"].outputs
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.cache.blocks.num_used == 0 and eng.drafter.cache.blocks.num_used == 0 and not eng.drafter.cached


@pytest.mark.parametrize("q", [[0.05, 0.40, 0.05, 0.30, 0.10, 0.10], [0.0, 0.6, 0.0, 0.4, 0.0, 0.0]],
                         ids=["poor-draft", "pruned-draft-vocabulary"])
def test_rejection_sampler_output_distribution_is_the_targets(q):
    """Chi-square goodness of fit of the first emitted token against p, over 6 tokens (df = 5):
    20.52 is the 0.999 quantile, so a correct sampler fails each case with probability 0.001. The
    second draft never proposes four of the tokens (a pruned draft vocabulary): they come only from
    the residual."""
    g = torch.Generator().manual_seed(2024)
    p = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    q = torch.tensor(q)
    params = SamplingParams(temperature=1.0)
    logits = p.log()[None].repeat(2, 1)
    trials = 12000
    counts = torch.zeros(6)
    for _ in range(trials):
        d = int(torch.multinomial(q, 1, generator=g))
        first = accept(params, g, [d], logits, q[None])[0]
        counts[first] += 1
    expected = p * trials
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.52, (chi2, counts.tolist())


def rule(params, generator, drafts: list[int], logits: torch.Tensor, q: torch.Tensor | None) -> list[int]:
    """The acceptance rule written out window by window, token by token, on the host: greedy keeps d_i
    while it is row i's argmax; sampled accepts d_i when u_i q(d_i) < p(d_i) (the k uniforms drawn
    first), and at the first rejection draws from norm(max(0, p_i - q_i)) (draw normalises), after k
    acceptances from p_k (q = None: q_i is the point mass on d_i)."""
    k = len(drafts)
    if params.greedy:
        best = logits.argmax(-1).tolist()
        i = next((i for i in range(k) if drafts[i] != best[i]), k)
        return drafts[:i] + [best[i]]
    p = probs(logits, [params] * (k + 1))
    u = torch.rand(k, generator=generator).tolist()
    for i, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[i, d])
        if not u[i] * qd < float(p[i, d]):
            residual = (p[i] - (torch.nn.functional.one_hot(torch.tensor(d), p.shape[1]).float() if q is None
                                else q[i])).clamp(min=0)
            if residual.sum() > 0:
                return drafts[:i] + draw(residual[None], [generator]).tolist()
            return drafts[:i] + draw(p[i][None], [generator]).tolist()
    return drafts + draw(p[k][None], [generator]).tolist()


def test_verdicts_of_many_windows_follow_the_rule_in_one_read(monkeypatch):
    """verdicts over many windows at once (greedy, draft distributions and certain proposals; 0..5
    drafts; temperatures, top-k; windows' rows and drafts out of order among other rows and tokens)
    gives each window what the rule gives it from the same generator state, rejections and full
    acceptances both among them, in one device read."""
    g = torch.Generator().manual_seed(31)
    V, windows = 40, []
    for i in range(40):
        k = i % 6
        params = SamplingParams(temperature=0.0 if i % 7 == 3 else 0.5 + (i % 3) * 0.4, top_k=0 if i % 4 else 9)
        target = torch.randn(k + 1, V, generator=g) * (6 if i % 5 == 0 else 2)  # (sharp: certain drafts pass)
        q = None if i % 5 == 0 or params.greedy else torch.softmax(target[:k] + torch.randn(k, V, generator=g), -1)
        drafts = ([int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)] if q is not None
                  else [int(target[j].argmax()) if j % 3 or i % 2 else int(torch.randint(V, (), generator=g))
                        for j in range(k)])
        windows.append((params, i, drafts, target, q))
    want = [rule(p, torch.Generator().manual_seed(100 + i), d, t, q) for p, i, d, t, q in windows]
    order = torch.randperm(len(windows), generator=g).tolist()  # rows and drafts laid out in this order
    rows, tokens, spans, r = [], [], {}, 0
    for w in order:
        p, i, d, t, q = windows[w]
        rows += [torch.randn(2, V, generator=g), t]  # two rows of something else first
        tokens += [7] + d
        spans[w] = (slice(r + 2, r + 3 + len(d)), slice(len(tokens) - len(d), len(tokens)))
        r += 3 + len(d)
    # the draft distributions as the draft steps leave them: all windows' rows in one tensor, interleaved
    # (here shuffled), with other rows among them
    q_list = [(w, j) for w, (_, _, _, _, q) in enumerate(windows) if q is not None for j in range(len(q))]
    q_list += [None] * 5
    q_order = torch.randperm(len(q_list), generator=g).tolist()
    q_all = torch.stack([torch.rand(V, generator=g) if q_list[o] is None else windows[q_list[o][0]][4][q_list[o][1]]
                         for o in q_order])
    q_rows = {q_list[o]: row for row, o in enumerate(q_order) if q_list[o] is not None}
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    got = verdicts(torch.cat(rows), torch.tensor(tokens), [
        Window(p, torch.Generator().manual_seed(100 + i), *spans[w],
               None if q is None else [q_rows[(w, j)] for j in range(len(d))])
        for w, (p, i, d, t, q) in enumerate(windows)], q_all)
    assert len(reads) == 1
    assert got == want
    cut = [len(t) - 1 for t in got]
    for kind in (lambda w: w[0].greedy, lambda w: w[4] is not None, lambda w: w[4] is None and not w[0].greedy):
        mine = [(c, len(w[2])) for c, w in zip(cut, windows) if kind(w) and w[2]]
        assert any(c < k for c, k in mine) and any(c == k for c, k in mine), mine
    assert verdicts(torch.cat(rows), torch.tensor(tokens), []) == []


class _Seq:
    def __init__(self, tokens, seq_id=0):
        self.token_ids, self.seq_id = tokens, seq_id

    num_tokens = property(lambda self: len(self.token_ids))

    def tokens(self, start, n):
        return self.token_ids[start: start + n]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_n=3, min_n=2)
    s = _Seq([1, 2, 3, 4, 5, 9, 2, 3, 8, 6, 1, 2, 3])
    assert d.propose([s], [3]).lists() == [[4, 5, 9]]          # the longest match wins: (1, 2, 3) ended at 2
    # ((2, 3) ended later, at 7)
    s.token_ids += [7]
    assert d.propose([s], [3]).lists() == [[]]               # (3, 7) never seen before; 1-grams are not used
    s.token_ids += [1, 2, 3]                              # incremental: only the new tokens are indexed
    assert d.propose([s], [9]).lists() == [[7, 1, 2, 3]]  # (1, 2, 3) latest earlier at 12: 4 tokens follow
    other = _Seq([5, 5, 5, 5], seq_id=1)
    assert d.propose([other, s], [2, 1]).lists() == [[5], [7]]   # (5, 5, 5) ended at 2: one token after it
    d.free(0)
    assert 0 not in d.chains and 1 in d.chains
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(max_n=2, min_n=3)


def test_certain_drafts_keep_the_targets_distribution():
    """Prompt lookup's drafts are a point mass (q = None): accepted with probability p(d), else a draw
    from p without d. Chi-square over 6 tokens as above (false-failure rate 0.001), the draft always
    the same likely token."""
    g = torch.Generator().manual_seed(7)
    p = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    logits = p.log()[None].repeat(2, 1)
    trials = 12000
    counts = torch.zeros(6)
    for _ in range(trials):
        counts[accept(SamplingParams(temperature=1.0), g, [0], logits, None)[0]] += 1
    expected = p * trials
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.52, (chi2, counts.tolist())


@pytest.mark.parametrize("batch", [1, 5])
def test_prompt_lookup_speculation_equals_target_alone(batch):
    """The bundled nano model continuing held-out source (code repeats itself, so lookups find
    matches, right and wrong): the output is the target's, greedy and seeded-sampled alike."""
    from test_nano import TARGET, heldout_texts
    prompts = [text[: 700] for text in heldout_texts(batch)]
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    reqs = [(f"r{i}", p, greedy) for i, p in enumerate(prompts)]
    plain = run_all(engine(TARGET), reqs)
    eng = engine(TARGET, NGRAM, k=4)
    spec = run_all(eng, reqs)
    for rid in plain:
        assert spec[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids, rid
    assert 0 < eng.stats["spec_accepted"] < eng.stats["spec_proposed"], eng.stats
    assert eng.memory_report().keys() == {"weights", "kv_cache", "kv_cache_tokens"}
    sampled = SamplingParams(max_tokens=24, temperature=0.7, seed=5, ignore_eos=True)
    a = run_all(engine(TARGET, NGRAM, k=3), [("a", prompts[0], sampled)])["a"].outputs[0]
    assert a.spec is not None and a.token_ids == run_all(engine(TARGET, NGRAM, k=3), [("a", prompts[0], sampled)])[
        "a"].outputs[0].token_ids


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_draft_keeps_the_targets_output(pair, method):
    """A quantized draft, its tied LM head quantized too (its logits only propose), speculates to the
    target alone's greedy tokens, and its weights shrink."""
    from gemforge.kernels.quant import QuantizedWeight

    target, draft = pair
    prompts = prompts_of(4, seed=9)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    plain = run_all(engine(target), reqs)
    dense = engine(target, draft, k=3)
    quant = engine(target, draft, k=3, draft_quantization=method, group_size=32)  # (hidden 64)
    spec = run_all(quant, reqs)
    assert all(spec[r].outputs[0].token_ids == plain[r].outputs[0].token_ids for r in plain)
    assert isinstance(quant.drafter.model.w.embed, QuantizedWeight)
    assert quant.stats["spec_accepted"] > 0
    assert (quant.memory_report()["draft_weights"]["total"]
            < 0.6 * dense.memory_report()["draft_weights"]["total"])


def test_prompt_lookup_takes_no_draft_quantization(pair):
    target, _ = pair
    for field, value in (("draft_quantization", "int4"), ("draft_vocab_size", 100), ("draft_vocab_corpus", "src")):
        with pytest.raises(RequestError, match=f"{field} needs a draft model"):
            engine(target, NGRAM, **{field: value})


def special_pieces(tok) -> list[int]:
    """The control, unknown, byte and user-defined pieces: every draft vocabulary keeps them."""
    sp = tok.sp
    return [i for i in range(tok.vocab_size)
            if sp.IsControl(i) or sp.IsByte(i) or sp.IsUnknown(i) or sp.IdToPiece(i) in tok.special_ids]


def test_draft_vocabulary_keeps_special_pieces_and_characters_first(pair):
    """draft_vocabulary(tok, n): n ids, ascending; every control, byte and special piece and every
    single character before any longer piece, the longer ones by score (BPE: merge order)."""
    target, _ = pair
    tok = engine(target).tokenizer
    sp = tok.sp
    special = set(special_pieces(tok))
    base = [i for i in range(tok.vocab_size)
            if i in special or len(sp.IdToPiece(i).replace("\u2581", "", 1) or "x") == 1]
    for n in (1, len(base), len(base) + 50, tok.vocab_size):
        ids = draft_vocabulary(tok, n)
        assert len(ids) == n and ids == sorted(set(ids)), n
        if n >= len(base):
            assert set(base) <= set(ids), n
            longer = [i for i in ids if i not in base]
            rest = sorted((i for i in range(tok.vocab_size) if i not in base), key=lambda i: (-sp.GetScore(i), i))
            assert sorted(longer) == sorted(rest[: n - len(base)]), n
    for bad in (0, tok.vocab_size + 1):
        with pytest.raises(RequestError, match="draft_vocab_size must be in"):
            draft_vocabulary(tok, bad)


def test_draft_vocabulary_from_a_corpus(pair, tmp_path, monkeypatch):
    """With a corpus (a file, or the files below a directory), the kept tokens past the special pieces
    are the corpus's most frequent; a missing corpus, one without text, or a corpus without a size is
    refused naming the field."""
    target, draft = pair
    tok = engine(target).tokenizer
    (tmp_path / "a.py").write_text("def handler(request):\n    return request.user\n" * 50)
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 8)  # not UTF-8 text: skipped
    counts = Counter(tok.encode((tmp_path / "a.py").read_text(), add_bos=False))
    special = special_pieces(tok)
    for corpus in (tmp_path, tmp_path / "a.py"):
        ids = draft_vocabulary(tok, len(special) + len(counts), corpus)
        assert set(ids) == set(special) | set(counts), corpus
    monkeypatch.setattr(drafters, "CORPUS_CHARS", 16)  # a corpus is read up to CORPUS_CHARS characters
    head = (tmp_path / "a.py").read_text()[:16]
    assert corpus_counts(tok, tmp_path) == Counter(tok.encode(head, add_bos=False))
    for corpus, why in ((tmp_path / "missing", "no such file"), (tmp_path / "b.bin", "no UTF-8 text")):
        with pytest.raises(RequestError, match=why):
            draft_vocabulary(tok, 500, corpus)
    with pytest.raises(RequestError, match="draft_vocab_corpus ranks the tokens draft_vocab_size keeps"):
        engine(target, draft, draft_vocab_corpus=str(tmp_path))


@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_pruned_draft_vocabulary_keeps_the_targets_output(pair, method, monkeypatch):
    """A draft whose LM head keeps only draft_vocab_size rows proposes only those tokens, greedy (one
    request with logit_bias and min_tokens) and sampled, and speculation still gives the target alone's
    greedy tokens (dense, int8 and int4 drafts), accepting about as often as the whole draft; the pruned
    head is what a draft step reads (step_bytes), the full table only looked up."""
    target, draft = pair
    prompts = prompts_of(4, seed=13)
    greedy_params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    biased = SamplingParams(max_tokens=12, temperature=0.0, min_tokens=5, logit_bias={1: 9.0, 40: 2.0})
    reqs = [(f"r{i}", p, biased if i == 3 else greedy_params) for i, p in enumerate(prompts)]
    plain = run_all(engine(target), reqs)
    whole = engine(target, draft, k=3, draft_quantization=method, group_size=32)
    run_all(whole, reqs)
    eng = engine(target, draft, k=3, draft_vocab_size=700, draft_quantization=method, group_size=32)
    vocab = set(eng.drafter.vocab.tolist())
    assert len(vocab) == 700 and eng.drafter.model.w.head.shape == (700, eng.cfg.hidden_size)
    proposed = []
    propose = eng.drafter.propose

    def recording(seqs, ks):
        out = propose(seqs, ks)
        proposed.extend(out.tokens.tolist())
        return out
    monkeypatch.setattr(eng.drafter, "propose", recording)
    spec = run_all(eng, reqs)
    assert all(spec[r].outputs[0].token_ids == plain[r].outputs[0].token_ids for r in plain)
    rate = lambda e: e.stats["spec_accepted"] / e.stats["spec_proposed"]  # noqa: E731
    assert rate(eng) > 0.5 * rate(whole) > 0, (rate(eng), rate(whole))  # the draft's own tokens, in its vocabulary
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    run_all(eng, [(f"s{i}", p, sampled) for i, p in enumerate(prompts)])
    assert proposed and set(proposed) <= vocab
    full, pruned = whole.drafter.model.w, eng.drafter.model.w
    assert step_bytes(pruned) < step_bytes(full) == weight_bytes(full)["total"] < weight_bytes(pruned)["total"]


def test_kv_after_rollback_equals_never_drafting(pair):
    target, draft = pair
    spec = engine(target, draft, k=4)
    prompt = prompts_of(1, 7)[0]
    spec.add_request("a", prompt, SamplingParams(max_tokens=60, temperature=1.5, seed=1, ignore_eos=True))
    seq = spec.requests["a"].seqs[0]
    for _ in range(12):
        spec.step()
        if seq.spec_proposed > seq.spec_accepted + 2:
            break
    assert seq.spec_steps > 0 and seq.spec_proposed > seq.spec_accepted  # some drafts were rejected
    cached = seq.token_ids[: seq.num_cached]
    assert spec.cache.blocks.lengths[seq.seq_id] == seq.num_cached
    ref = engine(target)
    ref.cache.blocks.append("x", len(cached))
    ref.runner.run([WorkItem("x", cached, 0)])
    for layer in range(ref.cfg.num_layers):
        for kv in (0, 1):
            ours = spec.cache.data[layer, kv].view(-1, *spec.cache.data.shape[-2:])[
                spec.cache.blocks.slots(seq.seq_id, 0, len(cached))]
            theirs = ref.cache.data[layer, kv].view(-1, *ref.cache.data.shape[-2:])[
                ref.cache.blocks.slots("x", 0, len(cached))]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_draft_with_other_vocabulary_is_refused(make_checkpoint, tmp_path, pair):
    import json
    import shutil
    target, draft = pair
    other = tmp_path / "other"
    shutil.copytree(draft, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RequestError, match="vocabulary"):
        engine(target, other)
