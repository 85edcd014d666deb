"""The CUDA-graph step runner's batch layout, on CPU: StepGraphs pads every sequence to the step's
width and the batch to its bucket, and must give the eager runner's logits for the real rows and
write the same cache slots. Here the "graph" runs its captured call again over the static buffers
(tests/gpu replays real CUDA graphs); everything but the capture itself is the code the GPU runs."""
import random

import pytest
import torch

from gemforge.engine.config import ModelConfig
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.model import GemmaModel
from gemforge.engine.graphs import StepGraphs
from gemforge.engine.runner import ModelRunner, WorkItem
from gemforge.engine.weights import random_weights


class RerunGraphs(StepGraphs):
    """StepGraphs whose replay calls the step again and copies its logits into the first call's."""

    def _record(self, step):
        out = step()

        @torch.inference_mode()
        def replay():
            out.copy_(step())
        return replay, out


SHAPES = {"mqa": dict(num_heads=4, num_kv_heads=1, head_dim=16), "mha": dict(num_heads=4, num_kv_heads=4, head_dim=8)}
BLOCK = 4


def runners(shape: str, max_batch: int, max_context: int, max_width: int, device="cpu", backend="torch",
            graphs=RerunGraphs, blocks: int = 96):
    """An eager runner and one with `graphs`, each with its own cache, over one random model."""
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2,
                      max_position_embeddings=max_context, **SHAPES[shape])
    model = GemmaModel(cfg, random_weights(cfg, torch.float32, device, seed=3, std=0.15), torch.float32, device,
                       backend)
    caches = [KVCache(cfg.num_layers, blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim, torch.float32, device)
              for _ in range(2)]
    eager, graphed = ModelRunner(model, caches[0]), ModelRunner(model, caches[1])
    graphed.graphs = graphs(model, caches[1], max_batch, max_context, max_width)
    return eager, graphed, caches


def both(caches, op, *args):
    for c in caches:
        getattr(c.blocks, op)(*args)


def check_graph_steps(shape: str, seed: int, device="cpu", backend="torch", graphs=RerunGraphs, tol=1e-5,
                      warm: bool = False, chunks: tuple[int, int] = (6, 9)):
    """Random steps over up to 6 sequences (bucket padding to 8 with max_batch 8): decode tokens,
    verify windows of up to 5 tokens with every row's logits, short catch-up feeds wanting the last
    row, prompt chunks of `chunks` tokens (wider than any window: ragged graphs), mixes of all four,
    contexts up to the graph's limit, and rejected window tokens rolled back; the logits and the
    cache equal the eager runner's at every step. `warm`: both runners warm up first (scratch
    prefills; the graphed one captures every shape over padding), and no step captures a graph
    after that."""
    rng = random.Random(seed)
    max_context, max_width = 64, 5
    eager, graphed, caches = runners(shape, 8, max_context, max_width, device, backend, graphs)
    if warm:
        free = caches[1].blocks.num_free
        shapes = [(w, every) for w in range(1, max_width + 1) for every in (False, True)]
        assert eager.warmup(shapes, ragged=True) == 0
        cap = graphed.graphs.width * BLOCK  # padding tokens a sequence holds: T = 256 needs 4 of them here
        ragged = sum(-(-T // cap) <= b for T in graphed.graphs.RAGGED_TOKENS for b in (1, 2, 4, 8))
        # buckets 1, 2, 4, 8; w = 1 has one mode
        assert graphed.warmup(shapes, ragged=True) == 4 * (1 + 2 * (max_width - 1)) + ragged
        assert graphed.graphs.warmup(shapes, ragged=True) == 0  # nothing left to capture
        for c in caches:  # the scratch prefills' blocks are back
            assert c.blocks.num_free == free and not c.blocks.tables
            c.blocks.check_invariants()
        warmed = set(graphed.graphs.graphs), set(graphed.graphs.ragged)
    lens = {}
    for s in range(6):  # prompts, eagerly
        n = rng.randint(1, 20)
        both(caches, "append", s, n)
        ids = [rng.randrange(300) for _ in range(n)]
        for r in (eager, graphed):
            r.run([WorkItem(s, ids, 0)])
        lens[s] = n
    widths, modes, device_steps = set(), set(), set()
    for step in range(30):
        live = [s for s in lens if lens[s] < max_context]
        if not live:
            break
        items = []
        for s in rng.sample(live, rng.randint(1, len(live))):
            n = min(rng.choice([1, 1, 2, 3, 5, rng.randint(*chunks)]), max_context - lens[s])
            both(caches, "append", s, n)
            items.append(WorkItem(s, [rng.randrange(300) for _ in range(n)], lens[s],
                                  all_logits=n <= max_width and rng.random() < 0.5))
        wide = max(len(it.token_ids) for it in items) > max_width
        assert graphed.graphs.accepts(items) == (not wide or not any(it.all_logits for it in items))
        want = eager.run(items)
        flat = [t for it in items for t in it.token_ids]
        if rng.random() < 0.5:  # some tokens from the device (drafts, a step in flight's), the host's wrong there
            at = sorted(rng.sample(range(len(flat)), rng.randint(1, len(flat))))
            ids = torch.tensor([flat[x] for x in at], device=device)
            hidden = set(at)
            at = None if len(at) == len(flat) else at
            x, masked = 0, []
            for it in items:
                masked.append(WorkItem(it.seq_id, [(t + 1) % 300 if x + j in hidden else t
                                                   for j, t in enumerate(it.token_ids)], it.start, it.all_logits))
                x += len(it.token_ids)
            got = graphed.run(masked, ids, at)
            device_steps.add("ragged" if wide else max(len(it.token_ids) for it in items) > 1)
        else:
            got = graphed.run(items)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(caches[1].data, caches[0].data, rtol=tol, atol=tol)
        w = max(len(it.token_ids) for it in items)
        widths.add(w)
        modes.add("ragged" if wide else w > 1 and any(it.all_logits for it in items))
        for it in items:  # keep a random prefix of each window, as verification does
            n = len(it.token_ids)
            keep = rng.randint(1, n) if it.all_logits else n
            both(caches, "rollback", it.seq_id, n - keep)
            lens[it.seq_id] += keep
    assert {1, 5} <= widths and modes == {False, True, "ragged"} and len(device_steps) >= 2
    assert graphed.graphs.ragged and not graphed.graphs.failed  # (ragged steps wanting every row's logits: eager)
    if warm:  # every step replayed a warm-up capture
        assert (set(graphed.graphs.graphs), set(graphed.graphs.ragged)) == warmed
    assert all(b in (1, 2, 4, 8) for b, _, _ in graphed.graphs.graphs)
    shared = graphed.graphs.logits.data_ptr()  # one logits buffer for all graphs
    assert all(out.data_ptr() == shared for _, out in graphed.graphs.graphs.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graph_steps_equal_eager_steps(shape, seed):
    check_graph_steps(shape, seed)


def test_graph_steps_equal_eager_steps_through_the_triton_kernels():
    """The random steps again through the Triton kernels (the interpreter here), as a GPU runs them:
    the ragged layout (padding sequences, sequences of no tokens, attention tiled for the bucket's
    token count, chunks of 33-40 tokens: more than one attention tile of this shape holds) and padded
    windows give the eager Triton runner's logits and cache."""
    pytest.importorskip("triton")
    check_graph_steps("mqa", seed=5, backend="triton", tol=1e-5, chunks=(33, 40))


@pytest.mark.parametrize("shape", SHAPES)
def test_warmed_up_graphs_serve_every_step(shape):
    check_graph_steps(shape, seed=5, warm=True)


class RaggedFails(RerunGraphs):
    """Graphs whose ragged captures fail (as an op that cannot be captured would)."""

    def _ragged_step(self, T, b):
        def step():
            raise RuntimeError("operation not permitted when stream is capturing")
        return step


def test_a_shape_that_fails_to_capture_runs_eagerly(caplog):
    """A ragged graph that fails to capture is logged once and its shape runs eagerly from then on
    (the same logits as the eager runner), in warm-up as in serving; decode steps keep their graphs."""
    eager, graphed, caches = runners("mha", 8, 32, 1, graphs=RaggedFails)
    assert graphed.warmup([(1, False)], ragged=True) == 4  # the decode graphs of buckets 1, 2, 4, 8 only
    failed = dict(graphed.graphs.failed)
    assert failed and all(k[0] == "ragged" and "not permitted" in v for k, v in failed.items())
    rng = random.Random(4)
    for s in range(3):
        both(caches, "append", s, 7)
    for step in range(2):
        items = [WorkItem(s, [rng.randrange(300) for _ in range(7)], 0) for s in range(3)]  # a ragged step
        if step:  # the same sequences' next tokens: a decode step
            for s in range(3):
                both(caches, "append", s, 1)
            items = [WorkItem(s, [rng.randrange(300)], 7) for s in range(3)]
        torch.testing.assert_close(graphed.run(items), eager.run(items), rtol=1e-5, atol=1e-5)
    assert graphed.graphs.failed == failed and len(graphed.graphs.graphs) == 4
    assert sum("failed to capture" in r.message for r in caplog.records) == len(failed)  # once each
    eager, graphed, caches = runners("mha", 8, 32, 1, graphs=RaggedFails)  # failing while serving
    both(caches, "append", 0, 5)
    items = [WorkItem(0, [3, 1, 4, 1, 5], 0)]
    torch.testing.assert_close(graphed.run(items), eager.run(items), rtol=1e-5, atol=1e-5)
    assert list(graphed.graphs.failed) == [("ragged", 16, 2)] and not graphed.graphs.accepts(items)


def test_graphs_take_only_what_they_were_built_for():
    """Steps wider than the widest window, or batches past the window row limit, replay ragged graphs
    unless they want every row's logits; batches past the largest bucket (the padding's sequence
    counts), past the largest ragged token bucket, and tokens past the context limit run eagerly."""
    _, graphed, caches = runners("mqa", 8, 32, 3)
    for s in range(9):
        both(caches, "append", s, 31)
    g = graphed.graphs
    assert g.plan([WorkItem(s, [1], 30) for s in range(8)]) == (8, 1, False)
    assert not g.accepts([WorkItem(s, [1], 30) for s in range(9)])    # 9 sequences > max_batch
    assert g.accepts([WorkItem(0, [1, 2, 3], 28)])
    wide = [WorkItem(0, [1, 2, 3, 4], 27)]                             # 4 tokens > max_width: ragged
    assert g.plan(wide) == ("ragged", 16, 2)
    assert not g.accepts([WorkItem(0, [1, 2, 3, 4], 27, all_logits=True)])
    assert not g.accepts([WorkItem(0, [1, 2], 31)])                   # past max_context
    assert not g.accepts([])
    assert g._ragged_bucket(8, 16) == (16, 8) and g._ragged_bucket(8, 15) is None  # no bucket for 8 + padding
    assert g._ragged_bucket(1, 257) is None                                         # past the token buckets
    g.MAX_WINDOW_TOKENS = 12
    assert g.plan([WorkItem(s, [1, 2, 3], 28, all_logits=True) for s in range(4)]) == (4, 3, True)  # 4 x 3 rows
    five = [WorkItem(s, [1, 2, 3], 28) for s in range(5)]             # bucket 8 x 3 > 12 rows: ragged
    assert g.plan(five) == ("ragged", 16, 8)
    assert not g.accepts([WorkItem(s, [1, 2, 3], 28, all_logits=True) for s in range(5)])
    assert g.plan([WorkItem(s, [1], 30) for s in range(8)]) == (8, 1, False)  # decode steps are not limited


def test_speculative_engine_through_step_graphs(make_checkpoint):
    """The engine's target and draft runners with StepGraphs (rerun on CPU) give the target alone's
    greedy tokens; verify windows and the draft's two-token catch-up went through the graphs, all
    of them captured by the engine's warm-up (none while serving)."""
    from gemforge.engine import SamplingParams
    from gemforge.engine.engine import Engine, EngineConfig

    from test_engine import prompts_of, run_all

    target, _ = make_checkpoint("mha", seed=11)
    draft, _ = make_checkpoint("mha", seed=11, noise=0.03)  # agrees often: windows accepted whole, and not

    ragged = len(StepGraphs.RAGGED_TOKENS) * 5

    def build(draft_model=None):
        eng = Engine(target, EngineConfig(dtype="float32", device="cpu", draft_model=draft_model,
                                          num_speculative_tokens=3, adaptive_lookahead=False), progress=False)
        for r in (eng.runner, getattr(eng.drafter, "runner", None)):
            if r is not None:
                width = 2 if r is not eng.runner else (4 if draft_model else 1)
                r.graphs = RerunGraphs(r.model, r.cache, 16, eng.max_model_len, width)
        free = eng.cache.blocks.num_free
        # buckets 1, 2, 4, 8, 16: the target's decode steps and windows of 2..4, the draft's 1- and 2-token
        # steps, and each runner's ragged steps of 16..256 tokens
        assert eng.warmup() == (5 * 4 + 5 * 2 + 2 * ragged if draft_model else 5 + ragged)
        assert eng.cache.blocks.num_free == free and not eng.cache.blocks.tables
        return eng

    batch = 5
    prompts = prompts_of(batch, seed=4)
    reqs = [(f"r{i}", p, SamplingParams(max_tokens=7 + 3 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    plain = run_all(build(), reqs)
    spec_engine = build(draft)
    spec = run_all(spec_engine, reqs)
    for rid in plain:
        assert spec[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids, rid
    target_keys, draft_keys = spec_engine.runner.graphs.graphs, spec_engine.drafter.runner.graphs.graphs
    assert len(target_keys) == 20 and len(draft_keys) == 10  # no step captured a graph of its own
    assert len(spec_engine.runner.graphs.ragged) == len(spec_engine.drafter.runner.graphs.ragged) == ragged
    assert any(w == 4 and every for _, w, every in target_keys), target_keys   # verify windows
    assert any(w == 2 and not every for _, w, every in draft_keys), draft_keys  # the draft catching up
    assert 0 < spec_engine.stats["spec_accepted"] < spec_engine.stats["spec_proposed"]
    selfish = build(target)  # drafting for itself through the graphs (later draft steps take the tokens
    run_all(selfish, reqs)   # the step before picked from the device): every draft is accepted
    assert 0 < selfish.stats["spec_accepted"] == selfish.stats["spec_proposed"], selfish.stats
