"""The adaptive lookahead of speculative decoding: how many tokens each sequence drafts per step.

Speculation pays when the tokens a window brings outweigh what its draft steps and its verify tokens
cost: at acceptance rate alpha a window of k drafts yields (1 - alpha^(k+1)) / (1 - alpha) tokens.
`best_lookahead` picks k from alpha and the step costs, `updated_rate` keeps alpha per sequence,
`StepCosts` measures the costs on the running steps, and `Lookahead` applies them each step.
"""
from __future__ import annotations

import functools
import statistics
from collections import deque

PROBE_EVERY = 16   # a sequence that stopped drafting tries one draft token again after this many steps,
PROBE_MAX = 256    # doubling (up to this) after each probe that did not bring drafting back
CALIBRATE_EVERY = 64  # speculative steps in a row after which one step decodes plainly (a fresh baseline)


def best_lookahead(alpha: float, k_max: int, draft_cost: float, verify_slope: float = 0.0,
                   first_draft_cost: float | None = None, measured: tuple = ()) -> int:
    """The lookahead k in 0..k_max with the most expected tokens per unit of time, the unit being one
    plain decode step. At acceptance rate alpha a window of k drafts yields (1 - alpha^(k+1)) /
    (1 - alpha) tokens (the last one the target's own) for k draft steps, the first costing
    `first_draft_cost` (it also catches the draft up; default `draft_cost`) and each other
    `draft_cost`, plus the target's verify step, which costs 1 + k * `verify_slope` (each window token
    adds that much to the target's forward); `measured` ((k, cost), ...) replaces that model by what
    whole windows of k were timed at. k = 0 is plain decoding, one token per unit. Ties go to the
    smaller k."""
    first = draft_cost if first_draft_cost is None else first_draft_cost
    timed = dict(measured)

    def tokens_per_cost(k: int) -> float:
        if k == 0:
            return 1.0
        tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
        return tokens / timed.get(k, 1 + first + (k - 1) * draft_cost + k * verify_slope)
    return max(range(k_max + 1), key=tokens_per_cost)


def updated_rate(rate: float, accepted: int, proposed: int, decay: float) -> float:
    """The acceptance rate alpha (the chance that a draft token is accepted given the ones before it
    were) as a mean over draft positions that decays by `decay` per position: a window is `accepted`
    successes, then one failure if accepted < proposed. The positions after the first rejection were
    never tried; counting them as failures (accepted / proposed) reads a k-token window's
    (alpha - alpha^(k+1)) / ((1 - alpha) k), 0.33 for alpha 0.6 at k = 4, and drags the lookahead down."""
    for _ in range(accepted):
        rate = decay * rate + (1 - decay)
    return decay * rate if accepted < proposed else rate


# (called per running sequence each step: the acceptance rate in hundredths and the costs repeat)
_best_lookahead = functools.lru_cache(maxsize=1 << 14)(best_lookahead)


class StepCosts:
    """Measured seconds of a plain decode step, of a window's first draft step (which also catches
    the draft up) and of each later one, and of a speculative decode step's target side (verify
    forward, acceptance, bookkeeping) with its window tokens per sequence: the adaptive lookahead's
    costs in plain steps, each from the last 32 samples, by median (a shared machine's stalls would
    drag a mean), recomputed every 8th sample. The target side is taken to cost 1 + slope * (window
    tokens per sequence) plain steps: on a GPU at small batch a window is nearly free (slope ~ 0), on
    a CPU or at large batch every token costs. Fixed per-step costs (host work, launches), which
    dominate small models and CPUs, are in the samples; a weight-bytes ratio leaves them out. Whole
    steps in which every sequence drafted k are timed too (`window_costs`): measured, they replace
    that model for k."""

    KINDS = ("plain", "verify", "first", "draft")
    REFRESH = 8  # after the first REFRESH samples of a kind, its median is recomputed every REFRESH-th
    WINDOW_SAMPLES = 4  # timed windows of one lookahead before their cost replaces the model's

    def __init__(self, draft_prior: float, window: int = 32):
        self.draft_prior = draft_prior  # draft cost until both sides are measured
        self.samples = {kind: deque(maxlen=window) for kind in self.KINDS}  # verify: (seconds, tokens)
        self.recorded = dict.fromkeys(self.KINDS, 0)
        self.median: dict[str, float | None] = dict.fromkeys(self.KINDS)  # seconds; kept current by record()
        self.verify_slope = 0.0  # kept current by record(); 0 until plain and verify steps are measured
        self.windows: dict[int, deque] = {}  # lookahead k -> seconds of whole steps that all drafted k
        self.windows_recorded: dict[int, int] = {}
        self.window_costs: tuple = ()  # ((k, plain steps), ...) kept current by record_window()

    def record_window(self, k: int, seconds: float) -> None:
        """A whole speculative step (drafts, verify, acceptance) in which every sequence drafted k."""
        samples = self.windows.setdefault(k, deque(maxlen=16))
        samples.append(seconds)
        self.windows_recorded[k] = count = self.windows_recorded.get(k, 0) + 1
        if count % self.WINDOW_SAMPLES or not self.median["plain"]:
            return  # refreshed every WINDOW_SAMPLES-th window of k
        self.window_costs = tuple(sorted((j, statistics.median(t) / self.median["plain"])
                                         for j, t in self.windows.items() if len(t) >= self.WINDOW_SAMPLES))

    def record(self, kind: str, seconds: float, window_tokens: float = 0.0) -> None:
        """One step's seconds; for "verify", also its draft tokens per scheduled sequence (> 0)."""
        self.samples[kind].append((seconds, window_tokens) if kind == "verify" else seconds)
        self.recorded[kind] += 1
        if self.recorded[kind] > self.REFRESH and self.recorded[kind] % self.REFRESH:
            return  # a median of the last 32 moves slowly: every step need not pay for it
        verify, plain = self.samples["verify"], self.median["plain"]
        if kind == "verify":
            self.median[kind] = statistics.median(t for t, _ in verify)
        else:
            self.median[kind] = plain = statistics.median(self.samples[kind])
        if kind in ("plain", "verify") and verify and plain:
            self.verify_slope = min(4.0, statistics.median(max(0.0, t / plain - 1) / x for t, x in verify))

    def _ratio(self, seconds: float | None) -> float:
        base = self.median["plain"] or self.median["verify"]
        return self.draft_prior if seconds is None or base is None else min(16.0, seconds / base)

    @property
    def first_draft_cost(self) -> float:
        return self._ratio(self.median["first"])

    @property
    def draft_cost(self) -> float:
        """A later draft step (the first's cost until windows of two drafts have run)."""
        return self._ratio(self.median["draft"] or self.median["first"])


class Lookahead:
    """How many tokens each running sequence drafts next step: with `adaptive`, the k in 0..k_max
    with the most expected tokens per unit of time (`best_lookahead`) at the sequence's recent
    acceptance rate, under the costs of a draft step and of a verify window's tokens, as given
    (`draft_cost`, in plain decode steps: then windows count as free) or measured (`costs`,
    `draft_prior` until then); else k_max. A seeded sampled request (Sequence.seeded) adapts to its own
    acceptance only, under the given or prior cost, and skips the calibrating plain steps: how many
    random draws its windows take then depends on nothing outside it, so its seed replays."""

    def __init__(self, k_max: int, adaptive: bool, draft_cost: float | None, draft_prior: float):
        self.k_max, self.adaptive, self.given = k_max, adaptive, draft_cost
        self.costs = StepCosts(draft_prior)
        self.rate = 1.0  # acceptance over all sequences: a new sequence's starting estimate
        self.since_plain = 0  # speculative steps measured since the last plain one

    @property
    def given_or_prior(self) -> float:
        """A draft step in plain decode steps as given, else as estimated before any step ran (a fixed cost)."""
        return self.given if self.given is not None else self.costs.draft_prior

    @property
    def draft_cost(self) -> float:
        """A draft step in plain decode steps: as given, or measured."""
        return self.given if self.given is not None else self.costs.draft_cost

    @property
    def first_draft_cost(self) -> float:
        """A window's first draft step (it also catches the draft up) in plain decode steps."""
        return self.given if self.given is not None else self.costs.first_draft_cost

    @property
    def verify_slope(self) -> float:
        """What one window token per sequence adds to a speculative step's target side, in plain decode
        steps: measured (0 when draft_cost is given)."""
        return 0.0 if self.given is not None else self.costs.verify_slope

    def assign(self, running, max_model_len: int) -> None:
        """Set `lookahead` of each running sequence: the best k (0 when drafting does not pay, with
        one-token probes at backing-off intervals), never past max_tokens or the context, and 0 for
        requests with penalties (their logits depend on the tokens inside the window). Measuring,
        after CALIBRATE_EVERY speculative steps in a row one step decodes plainly: the baseline the
        costs are relative to."""
        timed = self.costs.window_costs if self.given is None else ()
        costs = (self.k_max, self.draft_cost, self.verify_slope, self.first_draft_cost, timed)
        fixed = (self.k_max, self.given_or_prior)  # a seeded request's: the draws it takes replay with its seed
        calibrate = self.adaptive and self.given is None and self.since_plain >= CALIBRATE_EVERY
        for s in running:
            p = s.params
            if (calibrate and not s.seeded) or p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty:
                s.lookahead = 0
                continue
            want = self.k_max
            if self.adaptive:
                want = _best_lookahead(round(s.spec_rate * 100) / 100, *(fixed if s.seeded else costs))
                if want:
                    s.spec_idle, s.spec_probe_every = 0, PROBE_EVERY
                else:
                    s.spec_idle += 1
                    if s.spec_idle >= s.spec_probe_every:  # re-measure its acceptance now and then
                        want, s.spec_idle, s.spec_probe_every = 1, 0, min(2 * s.spec_probe_every, PROBE_MAX)
            s.lookahead = max(0, min(want, p.max_tokens - len(s.output_ids) - 1, max_model_len - s.num_tokens - 1))

    def update(self, s, accepted: int, proposed: int) -> None:
        """A verified window of `proposed` drafts, `accepted` of them kept: the sequence's counts and
        its and the overall acceptance rates."""
        s.spec_proposed, s.spec_accepted, s.spec_steps = (s.spec_proposed + proposed, s.spec_accepted + accepted,
                                                          s.spec_steps + 1)
        s.spec_rate = updated_rate(s.spec_rate, accepted, proposed, 0.8)
        self.rate = updated_rate(self.rate, accepted, proposed, 0.98)

    def measure(self, drafter, spec: list, num_seqs: int, seconds: float) -> None:
        """Record an all-decode step of `seconds` (only such steps count: a prefill chunk would inflate
        the target's side, a finishing request's output the step, a draft catching up on many tokens
        its own): plain when nothing was `spec`ulated, else the draft's first and later steps
        (`drafter.seconds`) and the rest of the step with its window tokens per sequence, and, when
        every sequence drafted the same k, the whole step as a window of k (`best_lookahead` then uses
        that instead of the model)."""
        if not spec:
            self.costs.record("plain", seconds)
            self.since_plain = 0
        elif drafter.most_fed <= 2:
            drafted = drafter.seconds
            self.costs.record("first", drafted[0])
            if len(drafted) > 1:
                self.costs.record("draft", sum(drafted[1:]) / (len(drafted) - 1))
            self.costs.record("verify", seconds - sum(drafted), sum(sc.lookahead for sc in spec) / num_seqs)
            if len(spec) == num_seqs and len({sc.lookahead for sc in spec}) == 1:
                self.costs.record_window(spec[0].lookahead, seconds)
            self.since_plain += 1
