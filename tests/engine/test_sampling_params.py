"""SamplingParams validation (one table of ranges) and the sampler's contracts."""
import math

import pytest
import torch

from gemforge.engine.errors import RequestError
from gemforge.engine.sampling import RANGES, SamplingParams, apply_penalties, sample

BAD = [("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("temperature", -0.1),
       ("temperature", math.nan), ("temperature", math.inf), ("top_p", 0.0), ("top_p", 1.01),
       ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
       ("frequency_penalty", -3), ("n", 0), ("logprobs", 21), ("seed", "7"), ("temperature", True),
       ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"), ("prompt_logprobs", 21),
       ("logit_bias", {"5": 1.0}), ("logit_bias", {5: 101}), ("logit_bias", {-1: 1.0}), ("logit_bias", [1]),
       ("logit_bias", {5: math.nan}), ("logit_bias", {True: 1.0}), ("logit_bias", {5: "1"})]


@pytest.mark.parametrize("field, value", BAD)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=field) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field


def test_openai_defaults_and_every_range_edge_are_valid():
    SamplingParams(temperature=1.0, top_p=1.0, n=1, presence_penalty=0.0, frequency_penalty=0.0)
    for name, (lo, hi, lo_in, hi_in, _) in RANGES.items():
        for v, ok in ((lo, lo_in), (hi, hi_in)):
            if ok and name != "n" or (name == "n" and v <= 64):
                kw = {name: v}
                if name == "min_tokens":
                    kw["max_tokens"] = max(1, v)
                if name == "max_tokens" and v == 0:
                    kw["prompt_logprobs"] = 0  # max_tokens=0 is only for prompt logprobs
                SamplingParams(**kw)


def test_min_tokens_cannot_exceed_max_tokens():
    with pytest.raises(RequestError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_seeded_sampling_is_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 5000)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=42)
    alone = [sample(logits[2:3].clone(), [p], [p.make_generator("cpu")]).item() for _ in range(3)]
    others = [SamplingParams(temperature=1.0, seed=i) for i in range(3)]
    batch = [p if i == 2 else others[i if i < 2 else 2] for i in range(4)]
    batched = []
    for _ in range(3):
        gens = [q.make_generator("cpu") for q in batch]
        batched.append(sample(logits.clone(), batch, gens)[2].item())
    assert alone == batched


def test_greedy_top_k_1_and_filters():
    torch.manual_seed(1)
    logits = torch.randn(3, 1000)
    greedy = SamplingParams(temperature=0.0)
    topk1 = SamplingParams(temperature=1.0, top_k=1, seed=3)
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=3)
    out = sample(logits.clone(), [greedy, topk1, tiny_p], [None, topk1.make_generator("cpu"), tiny_p.make_generator("cpu")])
    assert out.tolist() == logits.argmax(-1).tolist()


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p = SamplingParams(temperature=1.0, seed=7)
    g = p.make_generator("cpu")
    counts = torch.bincount(torch.stack([sample(logits.clone(), [p], [g]) for _ in range(4000)]).flatten(), minlength=3)
    freq = counts.float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.035)  # > 4.5 sigma


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [p], [[0]], [[1, 1, 2]])
    assert torch.allclose(logits, torch.tensor([[1.0, -4.0 - 1.0, 0.5 - 0.75, 0.5]]))


@pytest.mark.parametrize("vocab", [1200, 97, 8192])  # blocks of 40; one block (97 is prime); 128
def test_draw_follows_each_rows_distribution(vocab):
    """draw(): per row from its own generator, the counts of 12000 draws fit the row's (unnormalised)
    distribution by chi-square (for df >= 10 the 0.999 quantile of chi2(df) is below df + 4.5 sqrt(2 df),
    so a correct sampler fails with probability < 0.001 per row), tokens of zero probability (every
    7th, and the whole first half of the second row, whose mass sits in its last block) are never
    drawn, and a row draws the same token alone as beside other rows from the same generator state."""
    from gemforge.engine.sampling import draw

    g = torch.Generator().manual_seed(vocab)
    p = torch.softmax(torch.randn(2, vocab, generator=g) * 2.5, -1) * torch.tensor([[3.0], [0.5]])
    p[:, ::7] = 0
    p[1, : vocab // 2] = 0
    trials = 12000
    gens = [torch.Generator().manual_seed(10 + r) for r in range(2)]
    drawn = torch.stack([draw(p, gens) for _ in range(trials)])  # [trials, 2]
    for r in range(2):
        counts = torch.bincount(drawn[:, r], minlength=vocab).double()
        assert counts[p[r] == 0].sum() == 0
        expected = p[r].double() / p[r].sum() * trials
        big = expected >= 5  # the rest pooled into one cell
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = exp > 0
        chi2, df = (((obs - exp) ** 2 / exp)[keep]).sum().item(), int(keep.sum()) - 1
        assert df >= 10 and chi2 < df + 4.5 * math.sqrt(2 * df), (r, chi2, df)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    alone = draw(p[1:], [a])
    beside = draw(p, [torch.Generator().manual_seed(99), b])
    assert alone.item() == beside[1].item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_filter_keeps_what_the_full_sort_keeps(seed):
    """On a CPU, _filter looks for the top-k / top-p cut among each row's best 1024 tokens: on rows of
    every kind (top-k inside or past the candidates, top-p reached among them or not (those rows
    are sorted whole), min-p alone, no filter, top_p = 1) it keeps the tokens the full sort keeps,
    except a token whose cumulative mass lies within 1e-5 of top_p (fp32 normalises two ways)."""
    from gemforge.engine.sampling import _filter, _filter_sorted

    g = torch.Generator().manual_seed(seed)
    V = (1025, 3000, 8192)[seed]
    x = torch.randn(9, V, generator=g) * torch.tensor([0.3, 1, 3, 3, 0.3, 1, 3, 0.3, 1])[:, None]
    tk = torch.tensor([0, 5, 0, 2000, 0, 1, 0, 0, 3000])
    tp = torch.tensor([1.0, 1.0, 0.9, 0.95, 0.5, 1.0, 1.0, 0.999, 0.8])
    mp = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.1, 0.0, 0.02])
    ours, ref = _filter(x, tk, tp, mp), _filter_sorted(x, tk, tp, mp)
    kept, ref_kept = ours > -math.inf, ref > -math.inf
    assert torch.equal(ours[kept & ref_kept], x[kept & ref_kept])
    p = torch.softmax(x, -1)
    mass_before = torch.empty_like(p).scatter_(-1, p.argsort(-1, descending=True),
                                               p.sort(-1, descending=True).values.cumsum(-1)) - p
    for r, t in (kept != ref_kept).nonzero().tolist():
        assert abs(mass_before[r, t] - tp[r]) < 1e-5, (r, t, mass_before[r, t].item(), tp[r].item())
    assert (kept != ref_kept).sum() <= 2
    assert kept[0].all() and kept[1].sum() == 5 and kept[5].sum() == 1  # no filter; top_k 5 (top_p 1); top_k 1


def _hf_probs(logits: torch.Tensor, t: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """HF generate's sampling chain, its own warpers in its order: temperature, top-k, top-p, min-p."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = ([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
               + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p > 0 else []))
    ids, s = torch.zeros(1, 1, dtype=torch.long), logits[None].clone()
    for warper in warpers:
        s = warper(ids, s)
    return s.softmax(-1)[0]


@pytest.mark.parametrize("vocab", [64, 3000])  # 3000: the CPU's candidate path (FILTER_CANDIDATES)
def test_filters_give_hf_transformers_distribution(vocab):
    """probs() against HF's own warpers on random rows: top_p is a share of what top_k left (with top_k 3
    of tokens holding 0.3, 0.2, 0.12, ... and top_p 0.7, two stay), ties at the k-th logit all stay
    (bf16 logits tie often), min_p is relative to the best. Rows with exact ties are checked with top_k
    alone: where a top-p cut falls between tied tokens, which of them stay is either library's choice."""
    from gemforge.engine.sampling import probs

    g = torch.Generator().manual_seed(vocab)
    worst = 0.0
    for case in range(120):
        tied = case % 3 == 0
        x = torch.randn(vocab, generator=g) * 3
        x = x.to(torch.bfloat16).float() if tied else x
        t = (0.05, 0.7, 1.0, 2.0)[case % 4]
        top_k = (0, 1, 3, 40, vocab + 5)[case % 5]
        top_p = 1.0 if tied else (1.0, 0.9, 0.5, 0.1)[case // 5 % 4]
        min_p = (0.0, 0.0, 0.05)[case // 20 % 3]
        p = SamplingParams(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p)
        ours, ref = probs(x[None], [p])[0], _hf_probs(x, t, top_k, top_p, min_p)
        assert torch.equal(ours > 0, ref > 0), (case, t, top_k, top_p, min_p)
        worst = max(worst, (ours - ref).abs().sum().item())
    assert worst < 1e-5
    skewed = torch.tensor([0.30, 0.20, 0.12, 0.11, 0.10, 0.09, 0.08]).log()
    got = probs(skewed[None], [SamplingParams(temperature=1.0, top_k=3, top_p=0.7)])[0]
    torch.testing.assert_close(got, torch.tensor([0.6, 0.4, 0, 0, 0, 0, 0]))
