"""The LLM API end to end on a tiny random checkpoint: infill, stops, n, limits, the CLI."""
import pytest

from gemforge.engine import LLM, RequestError, SamplingParams
from gemforge.engine.cli import main


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    d, _ = make_checkpoint("mqa", seed=5)
    return LLM(d, dtype="float32", device="cpu", progress=False, kv_cache_tokens=512)


def test_outputs_shape_and_order(llm):
    outs = llm.generate(["a = 1", "def g():", [2, 50, 60]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["a = 1", "def g():", None]
    assert outs[2].prompt_token_ids == [2, 50, 60]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 5 and c.finish_reason == "length" and isinstance(c.text, str)
        assert c.text == llm.tokenizer.decode(c.token_ids)
    assert llm.cache.blocks.num_used == 0


def test_batched_equals_alone(llm):
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["import sys\n", "x", "class A:\n    pass\n" * 3]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    alone = [llm.generate(q, p, use_tqdm=False)[0].outputs[0].token_ids for q in prompts]
    assert batched == alone


def test_infill_prompt_and_file_separator_stop(llm):
    fsep = llm.tokenizer.special_ids["<|file_separator|>"]
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    out = llm.generate(["def f(x):\n"], p, suffixes=["    return y\n"], use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert ids[1] == llm.tokenizer.special_ids["<|fim_prefix|>"] and ids[-1] == llm.tokenizer.special_ids["<|fim_middle|>"]
    # force the stop: make <|file_separator|> the only token the request may end on early
    first = out.outputs[0].token_ids[0]
    stop_p = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=[first])
    stopped = llm.generate(["def f(x):\n"], stop_p, suffixes=["    return y\n"], use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.text == ""
    assert fsep in llm.tokenizer.fim_stop_ids()


def test_stop_string_ends_text(llm):
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = llm.generate("def g():", p, use_tqdm=False)[0].outputs[0]
    text = full.text
    if len(text) < 3:
        pytest.skip("random model produced too little text")
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = llm.generate("def g():", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)] and out.stop_reason == stop


def test_n_completions_with_seed_are_reproducible(llm):
    p = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    a = llm.generate("x =", p, use_tqdm=False)[0]
    b = llm.generate("x =", p, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert [c.index for c in a.outputs] == [0, 1, 2]


def test_request_beyond_context_is_rejected(llm):
    with pytest.raises(RequestError, match="exceeds the model's context") as e:
        llm.generate("x", SamplingParams(max_tokens=600), use_tqdm=False)
    assert e.value.field == "max_tokens"
    with pytest.raises(RequestError, match="prompt token ids"):
        llm.generate([[2, 10**7]], SamplingParams(max_tokens=2), use_tqdm=False)
    for field in ("logit_bias", "stop_token_ids"):
        bad = {10**7: 1.0} if field == "logit_bias" else [10**7]
        with pytest.raises(RequestError, match=f"{field}: token id 10000000 is outside the vocabulary") as e:
            llm.generate(["x", "y"], SamplingParams(max_tokens=2, **{field: bad}), use_tqdm=False)
        assert e.value.field == field and not llm.engine.requests


def test_cli_generate_and_infill(make_checkpoint, capsys):
    d, _ = make_checkpoint("mqa", seed=5)
    assert main(["generate", "--model", str(d), "--prompt", "def f():", "--max-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def f():")
    assert main(["generate", "--model", str(d), "--prompt", "a", "--suffix", "b", "--max-tokens", "3", "--device", "cpu"]) == 0
    assert main(["generate", "--model", str(d / "nope"), "--prompt", "a"]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_serve_flags_reach_the_engine_config(make_checkpoint):
    """Every `gemforge serve` engine flag lands in the EngineConfig (defaults: async scheduling and
    warm-up left to the device), and a memory fraction outside (0, 1] is refused by name."""
    from gemforge.engine.cli import build_parser, serve_config
    from gemforge.engine.engine import Engine

    args = build_parser().parse_args([
        "serve", "M", "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.5",
        "--kv-cache-tokens", "4096", "--max-model-len", "1024", "--quantization", "int8", "--draft-model", "D",
        "--draft-quantization", "int4", "--num-speculative-tokens", "3", "--no-enable-prefix-caching",
        "--no-cuda-graphs", "--no-warmup", "--async-scheduling"])
    c = serve_config(args)
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.gpu_memory_utilization, c.kv_cache_tokens, c.max_model_len,
            c.quantization, c.draft_model, c.draft_quantization, c.num_speculative_tokens, c.enable_prefix_caching,
            c.cuda_graphs, c.warmup, c.async_scheduling) == (8, 512, 0.5, 4096, 1024, "int8", "D", "int4", 3, False,
                                                             False, False, True)
    c = serve_config(build_parser().parse_args(["serve", "M"]))
    assert c.async_scheduling is None and c.warmup and c.cuda_graphs and c.max_num_batched_tokens == 2048
    c.gpu_memory_utilization, c.device = 1.5, "cpu"
    d, _ = make_checkpoint("mqa", seed=5)
    with pytest.raises(RequestError, match=r"gpu_memory_utilization must be in \(0, 1\], got 1.5") as e:
        Engine(d, c, progress=False)
    assert e.value.field == "gpu_memory_utilization"


@pytest.mark.parametrize("options, field, message", [
    (dict(device="tpu"), "device", "'tpu' is not a device name"),
    (dict(device="cuda:7"), "device", "(no CUDA device is available|has .* CUDA device)"),
    (dict(backend="cuda"), "backend", "backend 'cuda': .*unavailable"),
    (dict(backend="tritonn"), "backend", "backend must be 'auto' or one of"),
    (dict(dtype="float64"), "dtype", "dtype must be 'auto' or one of"),
    (dict(max_model_len=0), "max_model_len", "max_model_len must be a positive integer, got 0"),
    (dict(max_model_len=10 ** 6), "max_model_len", "exceeds the model's max_position_embeddings"),
    (dict(max_num_seqs=0), "max_num_seqs", "max_num_seqs must be a positive integer"),
    (dict(kv_cache_tokens=-16), "kv_cache_tokens", "kv_cache_tokens must be a positive integer"),
])
def test_engine_options_are_checked_before_loading(make_checkpoint, capsys, options, field, message):
    d, _ = make_checkpoint("mqa", seed=5)
    options = {"device": "cpu", **options}
    with pytest.raises(RequestError, match=message) as e:
        LLM(d, progress=False, **options)
    assert e.value.field == field
    if field == "device":  # the CLI says it in one line
        assert main(["generate", "--model", str(d), "--prompt", "a", "--device", options["device"]]) == 2
        assert capsys.readouterr().err.startswith("gemforge: error: device")


def test_kv_cache_that_cannot_fit_names_max_model_len(make_checkpoint, tmp_path):
    import json
    import shutil

    src, _ = make_checkpoint("mqa", seed=5)
    d = tmp_path / "long"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 10 ** 12}))
    with pytest.raises(RequestError, match="KV cache of one 1000000000000-token sequence .* does not fit") as e:
        LLM(d, device="cpu", progress=False)
    assert e.value.field == "max_model_len"
    assert LLM(d, device="cpu", progress=False, max_model_len=512).engine.max_model_len == 512


def test_ids_past_the_tokenizer_decode_to_nothing(llm):
    """A checkpoint may pad its embedding table past the tokenizer's pieces: such ids have no text."""
    tok = llm.tokenizer
    hello = tok.encode("hello", add_bos=False)
    assert tok.decode(hello + [tok.vocab_size, tok.vocab_size + 5] + hello) == "hellohello"


def test_chat_answers_through_the_template_and_ends_at_end_of_turn(llm, capsys):
    """LLM.chat is generate over the Gemma chat template, stopping at <end_of_turn> (not in the text);
    one conversation or a list of them; `gemforge generate --chat` prints the answer."""
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    tok = llm.tokenizer
    same = llm.generate([tok.chat_prompt(convo)], greedy, use_tqdm=False)[0].outputs[0]
    [one] = llm.chat(convo, greedy, use_tqdm=False)
    assert one.prompt == tok.chat_prompt(convo) and one.outputs[0].token_ids[:2] == same.token_ids[:2]
    eot = tok.token_id("<end_of_turn>")
    ends = SamplingParams(max_tokens=6, min_tokens=2, temperature=0.0, logit_bias={eot: 100.0})
    two = llm.chat([convo, [{"role": "user", "content": "hi"}]], ends, use_tqdm=False)
    for out in two:
        o = out.outputs[0]
        assert len(o.token_ids) == 3 and o.token_ids[-1] == eot and o.finish_reason == "stop" and "<end" not in o.text
    with pytest.raises(RequestError, match="messages must be a non-empty list"):
        llm.chat([], greedy)
    with pytest.raises(RequestError, match="alternate|must end"):
        llm.chat([{"role": "assistant", "content": "x"}], greedy)


def test_cli_generate_chat(make_checkpoint, capsys):
    d, _ = make_checkpoint("mqa", seed=5)
    assert main(["generate", "--model", str(d), "--prompt", "hi", "--chat", "--max-tokens", "3", "--device", "cpu"]) == 0
    assert "tokens, finish_reason=" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt", "a", "--chat", "--suffix", "b", "--device", "cpu"]) == 2


def test_default_kv_cache_holds_max_num_seqs_whole_sequences_at_most(make_checkpoint):
    """Sized by memory (a GPU: gpu_memory_utilization of the card), but never past what max_num_seqs
    whole-context sequences use: a small model does not take the card, and a second engine fits beside it."""
    d, _ = make_checkpoint("mqa", seed=5)
    eng = LLM(d, device="cpu", progress=False, max_num_seqs=3).engine
    assert eng.capacity == 3 * eng.max_model_len
    assert LLM(d, device="cpu", progress=False, max_num_seqs=1, max_model_len=100).engine.capacity == 112  # (blocks of 16)
    from gemforge.engine.config import preset
    from gemforge.engine.kv_cache import KVCache

    seven_b = preset("codegemma-7b")  # a draft's pool has the target's blocks: a token costs both
    both = KVCache.bytes_per_token(eng.cfg.num_layers, eng.cfg.num_kv_heads, eng.cfg.head_dim, 4) + \
        KVCache.bytes_per_token(seven_b.num_layers, seven_b.num_kv_heads, seven_b.head_dim, 4)
    wide = LLM(d, device="cpu", progress=False).engine
    assert wide._default_cache_tokens() == 64 * wide.max_model_len
    assert wide._default_cache_tokens(seven_b) == (2 << 30) // both


def test_cli_bench_checks_its_models_first(capsys, tmp_path):
    """`gemforge bench` finds the bundled pair from any working directory, and a wrong path fails at once
    (not after minutes of kernel benchmarks)."""
    assert main(["bench", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "nope/config.json: config.json not found" in capsys.readouterr().err
    assert main(["bench", "--draft", str(tmp_path / "nope2"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
