"""On a GPU: the model with Triton/CUDA kernels, eager and replayed from CUDA graphs, against torch."""
import pytest
import torch

from gemforge.engine.config import ModelConfig
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.model import GemmaModel
from gemforge.engine.runner import ModelRunner, WorkItem
from gemforge.engine.weights import random_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8,
                  num_kv_heads=1, head_dim=128, max_position_embeddings=1024)
PROMPTS = [[2, 5, 9, 100, 7], [2] + list(range(40, 77)), [2, 1000]]
STEPS = 12


def decode(backend: str, graphs: bool, dtype, feed=None, quant: str | None = None, prompts=PROMPTS):
    """Prefill `prompts`, then STEPS decode steps fed with `feed` (or greedy); logits of every step.
    `quant` ("int8", "int4"): the layers' linears quantized (int4 in groups of 64)."""
    from gemforge.engine.quantization import LINEARS, QuantConfig

    w = random_weights(CFG, torch.float32, "cuda", seed=0, std=0.08)
    w = type(w)(w.embed.to(dtype), [type(l)(*(t.to(dtype) for t in vars(l).values())) for l in w.layers],
                w.final_norm.to(dtype))
    if quant:
        qc = QuantConfig(quant, group_size=64)
        for layer in w.layers:
            for name in LINEARS:
                setattr(layer, name, qc.quantize(name, getattr(layer, name)))
    model = GemmaModel(CFG, w, dtype, "cuda", backend)
    cache = KVCache(CFG.num_layers, 64, 16, CFG.num_kv_heads, CFG.head_dim, dtype, "cuda")
    runner = ModelRunner(model, cache, cuda_graphs=graphs, max_graph_batch=8, max_context=512)
    for i, p in enumerate(prompts):
        cache.blocks.append(i, len(p))
    logits = [runner.run([WorkItem(i, p, 0) for i, p in enumerate(prompts)]).clone()]
    tokens = [logits[-1].argmax(-1).tolist()]
    for s in range(STEPS):
        last = feed[s] if feed is not None else tokens[-1]
        items = []
        for i, p in enumerate(prompts):
            cache.blocks.append(i, 1)
            items.append(WorkItem(i, [last[i]], len(p) + s))
        logits.append(runner.run(items).clone())
        tokens.append(logits[-1].argmax(-1).tolist())
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_match_torch_backend(backend, dtype):
    tokens, ref32 = decode("torch", False, torch.float32)
    _, ref_lp = decode("torch", False, dtype, feed=tokens)
    _, ours = decode(backend, False, dtype, feed=tokens)
    assert torch.isfinite(ours).all()
    err, base = (ours - ref32).abs().max().item(), (ref_lp - ref32).abs().max().item()
    assert err <= 2 * base + 1e-2 * ref32.abs().max().item(), (err, base)


@pytest.mark.parametrize("sequences", [1, 3])
@pytest.mark.parametrize("quant, variant", [(None, None), (None, "gemv"), (None, "dmma"), (None, "pdl"), ("int8", None),
                                            ("int8", "mma"), ("int8", "unfused"), ("int8", "pdl"), ("int4", None),
                                            ("int4", "mma"), ("int4", "unfused"), ("int4", "pdl")])
def test_kernel_variants_match_torch_backend(quant, variant, sequences):
    """The kernels the GPU suite times end to end (bench_decode's formats: the defaults and each
    kernels._native.kernel_variant), replayed from CUDA graphs as the engine runs them, in bf16 with dense,
    int8 and int4 weights, one sequence (the one-row GEMVs, with the norms, GeGLU and RoPE fused) or three:
    the torch backend's logits on the same weights within the error bf16 gives the dense model against fp32."""
    from gemforge.kernels._native import kernel_variant

    prompts = PROMPTS[:sequences]
    tokens, ref32 = decode("torch", False, torch.float32, prompts=prompts)
    _, ref_lp = decode("torch", False, torch.bfloat16, feed=tokens, prompts=prompts)
    base = (ref_lp - ref32).abs().max().item()
    _, want = decode("torch", False, torch.bfloat16, feed=tokens, quant=quant, prompts=prompts)
    with kernel_variant(variant):
        _, ours = decode("auto", True, torch.bfloat16, feed=tokens, quant=quant, prompts=prompts)
    assert torch.isfinite(ours).all()
    err = (ours - want).abs().max().item()
    assert err <= 2 * base + 1e-2 * want.abs().max().item(), (err, base)


def test_cuda_graph_replay_equals_eager():
    eager_tokens, eager = decode("auto", False, torch.float16)
    graph_tokens, graph = decode("auto", True, torch.float16)
    assert graph_tokens == eager_tokens
    torch.testing.assert_close(graph, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_cuda_graph_replay_equals_eager(quant):
    """A quantized model (the int4 draft's case) replays from CUDA graphs as it runs eagerly."""
    tokens, eager = decode("auto", False, torch.float16, quant=quant)
    _, graph = decode("auto", True, torch.float16, feed=tokens, quant=quant)
    assert torch.isfinite(graph).all()
    torch.testing.assert_close(graph, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("shape", ["mqa", "mha"])
def test_graph_windows_equal_eager(shape, warm):
    """Real CUDA graphs of decode steps, verify windows and catch-up feeds (the batch layout that
    tests/engine/test_step_graphs.py checks on CPU) give the eager Triton/CUDA path's logits and cache,
    fp32: only the capture differs (and cuBLAS's choice per row count). `warm`: every graph captured
    first, over padding only (the engine's warm-up), then replayed with real steps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from test_step_graphs import check_graph_steps

    from gemforge.engine.graphs import StepGraphs

    check_graph_steps(shape, seed=5, device="cuda", backend="auto", graphs=StepGraphs, tol=1e-4, warm=warm)


def test_prefix_caching_and_prompt_lookup_keep_the_output():
    """The bundled nano model on the GPU (CUDA graphs on, fp32): prompts that share a prefix give the
    same greedy tokens with prefix caching as without (the second wave reuses the first's blocks),
    and prompt-lookup speculation gives the target's tokens."""
    import sysconfig
    from pathlib import Path

    from gemforge.engine import LLM, SamplingParams

    model = Path(__file__).resolve().parents[2] / "models" / "nano-codegemma"
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    prefix = source[:600]
    prompts = [prefix + source[1000 + 97 * i: 1030 + 97 * i] for i in range(4)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def tokens(llm, batch):
        return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]

    common = dict(dtype="float32", device="cuda", kv_cache_tokens=8192, progress=False)
    plain = LLM(model, enable_prefix_caching=False, **common)
    want = tokens(plain, prompts)
    del plain
    cached = LLM(model, **common)
    assert tokens(cached, prompts[:1]) == want[:1]
    assert tokens(cached, prompts[1:]) == want[1:] and cached.engine.scheduler.prefix_hits > 0
    del cached
    lookup = LLM(model, draft_model="[ngram]", enable_prefix_caching=False, **common)
    assert tokens(lookup, prompts) == want


def sampling_controls_on(device: str) -> None:
    """The nano pair on `device` (CUDA graphs on, fp32), every sampling control that edits logits in
    place: penalties, logit_bias, min_tokens (eos banned, then favoured), and logprobs, with the
    draft model speculating; n = 4 samples of one prompt that wait for its blocks. Greedy tokens and
    logprobs equal the target alone's, and the requests that may differ only in their draws finish
    well-formed."""
    from pathlib import Path

    from gemforge.engine import LLM, SamplingParams

    models = Path(__file__).resolve().parents[2] / "models"
    prompt = "def read_lines(path):\n    with open(path) as f:\n"
    common = dict(dtype="float32", device=device, kv_cache_tokens=8192, progress=False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, min_tokens=6, logit_bias={1: 8.0, 300: -100.0})
    plain = LLM(models / "nano-codegemma", **common)
    spec = LLM(models / "nano-codegemma", draft_model=models / "nano-codegemma-draft", num_speculative_tokens=3,
               adaptive_lookahead=False, **common)
    want, got = (llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0] for llm in (plain, spec))
    assert got.token_ids == want.token_ids and 300 not in got.token_ids and 1 not in got.token_ids[:6]
    assert [e["logprob"] for e in got.logprobs] == pytest.approx([e["logprob"] for e in want.logprobs], abs=1e-3)
    assert got.spec is not None and got.spec["verify_steps"] > 0
    penalised = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5)
    assert (spec.generate([prompt], penalised, use_tqdm=False)[0].outputs[0].token_ids
            == plain.generate([prompt], penalised, use_tqdm=False)[0].outputs[0].token_ids)
    samples = spec.generate([prompt * 8], SamplingParams(n=4, max_tokens=8, temperature=0.8, seed=1),
                            use_tqdm=False)[0]
    assert len(samples.outputs) == 4 and all(0 < len(o.token_ids) <= 8 for o in samples.outputs)
    assert samples.num_cached_tokens > 0  # the later samples matched the first one's prompt blocks


def test_sampling_controls_on_the_gpu():
    sampling_controls_on("cuda")


def async_speculation_on(device: str, overlap: bool | None = None, warmup: bool = True) -> None:
    """The nano pair behind the AsyncEngine on `device` (on a GPU: the CUDA graphs of decode steps,
    verify windows and draft catch-ups are captured by the engine's warm-up, or without it by the
    worker thread as steps need them, and delivery overlaps the next step): 8 concurrent greedy
    requests, streamed and not, equal the offline engine's outputs."""
    import asyncio
    from pathlib import Path

    from gemforge.engine import LLM, SamplingParams
    from gemforge.engine.async_engine import AsyncEngine
    from gemforge.engine.engine import Engine, EngineConfig

    models = Path(__file__).resolve().parents[2] / "models"
    kw = dict(dtype="float32", device=device, kv_cache_tokens=8192, draft_model=str(models / "nano-codegemma-draft"),
              num_speculative_tokens=3, adaptive_lookahead=False, warmup=warmup)
    prompts = [f"def f{i}(x):\n    return x * {i} + " for i in range(8)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(models / "nano-codegemma", progress=False, **kw).generate(
        prompts, params, use_tqdm=False)]
    engine = AsyncEngine(Engine(models / "nano-codegemma", EngineConfig(**kw), progress=False), overlap=overlap)

    async def one(i):
        outs = [o async for o in engine.generate(prompts[i], params, f"r{i}", stream=i % 2 == 0)]
        return outs[-1].outputs[0].token_ids

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=120)

    got = asyncio.run(main())
    assert got == want
    assert engine.engine.cache.blocks.num_used == 0 and engine.engine.stats.get("spec_windows", 0) > 0


@pytest.mark.parametrize("warmup", [True, False])
def test_async_engine_speculation_on_the_gpu(warmup):
    async_speculation_on("cuda", warmup=warmup)


def test_async_scheduling_keeps_the_output_on_the_gpu():
    """The nano model on the GPU (CUDA graphs, warm-up): with async scheduling (the default there:
    each step launched before the previous step's tokens are read, decode steps taking them from the
    device through the graphs' input buffer) the outputs equal those of reading each step first, with
    requests arriving mid-run, seeded sampling, and a logprobs request switching steps to reading
    first while it runs. (ignore_eos everywhere: a stop would add a step in vain, and a batch of
    another size may round differently in cuBLAS.)"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from test_async_scheduling import drive

    from gemforge.engine import SamplingParams
    from gemforge.engine.engine import Engine, EngineConfig

    model = Path(__file__).resolve().parents[2] / "models" / "nano-codegemma"
    prompts = [f"def f{i}(x):\n    return x * {i} + " for i in range(8)]
    base = [(f"r{i}", prompts[i], SamplingParams(max_tokens=6 + 5 * i, temperature=0.0 if i % 2 else 0.8, seed=i,
                                                 ignore_eos=True)) for i in range(6)]
    late = [("lp", prompts[6], SamplingParams(max_tokens=5, temperature=0.0, logprobs=2, ignore_eos=True)),
            ("more", prompts[7], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))]
    outs = {}
    for a in (False, True):
        eng = Engine(model, EngineConfig(dtype="float32", device="cuda", kv_cache_tokens=8192, max_num_seqs=8,
                                         async_scheduling=a), progress=False)
        assert eng.async_scheduling == a and eng.runner.graphs is not None
        outs[a] = drive(eng, base, late)[1]
        assert not eng.runner.graphs.failed and eng.runner.graphs.ragged  # every shape captured
    for rid, want in outs[False].items():
        got = outs[True][rid].outputs[0]
        assert (got.token_ids, got.text) == (want.outputs[0].token_ids, want.outputs[0].text), rid


def test_pruned_draft_vocabulary_on_the_gpu():
    """The nano draft's LM head cut to 2048 of its 8192 rows: its CUDA graphs (captured by the warm-up)
    write logits of the head's width, and greedy speculation gives the target alone's tokens."""
    from pathlib import Path

    from gemforge.engine import LLM, SamplingParams

    models = Path(__file__).resolve().parents[2] / "models"
    common = dict(device="cuda", kv_cache_tokens=8192, progress=False)
    prompts = [f"def f{i}(x):\n    return x * {i} + " for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(models / "nano-codegemma", **common).generate(prompts, params,
                                                                                             use_tqdm=False)]
    spec = LLM(models / "nano-codegemma", draft_model=models / "nano-codegemma-draft", draft_vocab_size=2048,
               num_speculative_tokens=4, adaptive_lookahead=False, **common)
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want
    drafter = spec.engine.drafter
    assert drafter.runner.graphs.logits.shape[1] == 2048 and spec.engine.stats["spec_accepted"] > 0
