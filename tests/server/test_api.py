"""The OpenAI API through the official `openai` client: completions, infill, chat, streaming,
models, health, metrics and auth."""
import json

import httpx2 as httpx
import openai
import pytest
from harness import CONTEXT, MODEL, TIMEOUT, start_server

GREEDY = dict(model=MODEL, temperature=0.0, max_tokens=8)


def test_completion_defaults_and_usage(client, server):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):")  # the client's defaults
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.index == 0
    n_prompt = len(server.core.tokenizer.encode("def add(a, b):"))
    assert r.usage.prompt_tokens == n_prompt
    assert 1 <= r.usage.completion_tokens <= 16  # OpenAI's default max_tokens
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens


def test_greedy_completion_is_the_engine_output(client, server):
    prompt = "import os\nfor x in"
    r = client.completions.create(prompt=prompt, extra_body={"ignore_eos": True}, **GREEDY)
    ids = server.core.tokenizer.encode(prompt)
    r_ids = client.completions.create(prompt=ids, extra_body={"ignore_eos": True}, **GREEDY)
    assert r.choices[0].text == r_ids.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8


def test_batch_prompts_n_and_echo(client):
    prompts = ["def f(x):", "class A:"]
    r = client.completions.create(prompt=prompts, n=2, echo=True, **GREEDY)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0].startswith(prompts[0]) and by_index[2].startswith(prompts[1])
    assert by_index[0] == by_index[1]  # greedy: both samples agree
    single = client.completions.create(prompt=prompts[1], **GREEDY)
    assert by_index[3] == prompts[1] + single.choices[0].text


def test_logprobs_legacy_format(client):
    r = client.completions.create(prompt="x = ", logprobs=3, extra_body={"ignore_eos": True}, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(t) <= 3 and max(t.values()) <= 0 for t in lp.top_logprobs)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and top[tok] == pytest.approx(chosen) and chosen == pytest.approx(max(top.values()))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_legacy_top_logprobs_always_hold_the_sampled_token(client):
    """OpenAI's legacy format: top_logprobs has the chosen token besides the top `logprobs` (up to
    logprobs + 1 entries); logprobs=0 gives the chosen token alone."""
    for k in (0, 1):
        r = client.completions.create(model=MODEL, prompt="x = ", max_tokens=12, temperature=1.5, seed=3, logprobs=k,
                                      extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == 12
        for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[tok] == chosen and k <= len(top) <= k + 1


def test_infill_via_suffix_is_the_fim_prompt(client, server):
    tok = server.core.tokenizer
    prefix, suffix = "def add(a, b):\n    ", "\n    return result\n"
    r = client.completions.create(prompt=prefix, suffix=suffix, **GREEDY)
    fim = tok.fim_prompt(prefix, suffix)
    assert r.usage.prompt_tokens == len(tok.encode(fim))
    raw = client.completions.create(prompt=fim, extra_body={"stop_token_ids": tok.fim_stop_ids()}, **GREEDY)
    assert r.choices[0].text == raw.choices[0].text
    assert r.choices[0].finish_reason == raw.choices[0].finish_reason


def test_logit_bias_steers_completions_and_chat(client, server):
    tok = server.core.tokenizer
    t = tok.encode(" zebra", add_bos=False)[-1]
    forced = tok.decode([t] * 5)
    r = client.completions.create(prompt="def f(x):", logit_bias={str(t): 100}, **dict(GREEDY, max_tokens=5))
    assert r.choices[0].text == forced and r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0.0,
                                       max_tokens=5, logit_bias={str(t): 100})
    assert r.choices[0].message.content == forced
    u = tok.encode(" lion", add_bos=False)[-1]
    r = client.completions.create(prompt="def f(x):", logit_bias={str(t): 50, str(u): 60.5},
                                  **dict(GREEDY, max_tokens=3))
    assert r.choices[0].text == tok.decode([u] * 3)


def test_stop_string(client):
    kw = dict(prompt="import os", extra_body={"ignore_eos": True}, **GREEDY)
    full = client.completions.create(**kw).choices[0].text
    stop = full[3:6]
    if len(stop) < 3 or full.index(stop) < 1:
        pytest.skip(f"the random model's text {full!r} has no usable stop string")
    r = client.completions.create(stop=stop, **kw)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_completion(client, server):
    msgs = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "sum a list"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    prompt = server.core.tokenizer.chat_prompt(msgs)
    assert r.usage.prompt_tokens == len(server.core.tokenizer.encode(prompt))
    same = client.completions.create(prompt=prompt, extra_body={"stop_token_ids": server.core.tokenizer.chat_stop_ids()},
                                     model=MODEL, max_tokens=6, temperature=0)
    assert c.message.content == same.choices[0].text
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=6, temperature=0, n=2,
                                        logprobs=True, top_logprobs=2)
    assert [x.message.content for x in r2.choices] == [c.message.content] * 2
    assert all(len(t.top_logprobs) == 2 for t in r2.choices[0].logprobs.content)


def test_chat_default_max_tokens_fills_the_context(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       extra_body={"ignore_eos": True, "stop_token_ids": []}, stop=None)
    assert r.usage.total_tokens == CONTEXT


@pytest.mark.parametrize("kind", ["completion", "completion_logprobs", "infill", "chat"])
def test_streaming_concatenates_to_the_non_streamed_text(client, kind):
    if kind == "chat":
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "write a loop"}], max_tokens=12, temperature=0,
                  n=2)
        full = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        texts = {c.index: "" for c in full.choices}
        for ch in chunks[:-1]:
            for c in ch.choices:
                texts[c.index] += c.delta.content or ""
        assert texts == {c.index: c.message.content for c in full.choices}
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        kw = dict(prompt=["for i in range(", "while True:"], model=MODEL, max_tokens=12, temperature=0)
        if kind == "infill":
            kw.update(prompt="def f(x):\n    ", suffix="\n    return y")
        if kind == "completion_logprobs":
            kw.update(logprobs=2)
        full = client.completions.create(**kw)
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        texts = {c.index: "" for c in full.choices}
        for ch in chunks[:-1]:
            for c in ch.choices:
                texts[c.index] += c.text
        assert texts == {c.index: c.text for c in full.choices}
        if kind == "completion_logprobs":
            streamed = [t for ch in chunks[:-1] for c in ch.choices if c.index == 0 and c.logprobs
                        for t in c.logprobs.token_logprobs]
            # (the second run finds the first's prompt blocks cached and may batch differently: fp32 noise)
            assert streamed == pytest.approx(full.choices[0].logprobs.token_logprobs, rel=1e-5, abs=1e-5)
    finishes = {c.index: c.finish_reason for ch in chunks[:-1] for c in ch.choices if c.finish_reason}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    usage = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)  # noqa: E731
    assert chunks[-1].choices == [] and usage(chunks[-1].usage) == usage(full.usage)
    # the same prompts a second time: their full blocks were cached by the first request
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= full.usage.prompt_tokens_details.cached_tokens


def test_raw_sse_framing(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_echo_with_logprobs_scores_the_prompt(client, server):
    """Evaluation harnesses' loglikelihood request (echo, logprobs, max_tokens=0): the prompt comes back
    with a logprob for each of its tokens (bos, not in the text, left out), text offsets into the
    echoed text; with tokens generated after it, the prompt's part is the same."""
    prompt = "def add(a, b):\n    return a + b\n"
    n_ids = len(server.core.tokenizer.encode(prompt))  # bos first
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == n_ids - 1 and "".join(lp.tokens) == prompt
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(v is not None and v <= 0 for v in lp.token_logprobs)
    assert all(len(t) in (2, 3) and t[tok] == v for tok, v, t in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    more = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert more.text.startswith(prompt) and len(more.logprobs.tokens) == len(lp.tokens) + 3
    assert more.logprobs.token_logprobs[: len(lp.tokens)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0,
                                            stream=True))
    assert "".join(c.text for ch in chunks for c in ch.choices) == prompt
    assert [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens] == lp.tokens
    ids = client.completions.create(model=MODEL, prompt=[17, 301, 45], echo=True, logprobs=0, max_tokens=0).choices[0]
    assert ids.logprobs.token_logprobs[0] is None and ids.logprobs.top_logprobs[0] is None  # nothing before it
    assert len(ids.logprobs.tokens) == 3 and all(v is not None for v in ids.logprobs.token_logprobs[1:])


def test_repeated_prompt_reports_cached_tokens(client, server):
    """The second identical prompt finds its full blocks in the prefix cache (all but the last token can
    be; blocks of 16): usage says so, as OpenAI's prompt_tokens_details.cached_tokens, and so does /metrics."""
    prompt = "def fibonacci(n):\n    " * 6
    n = len(server.core.tokenizer.encode(prompt))
    first = client.completions.create(prompt=prompt, **GREEDY)
    second = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **GREEDY)
    again = client.completions.create(prompt=prompt, **GREEDY)
    assert again.choices[0].text == first.choices[0].text and n > 16
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    rate = next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("gemforge_prefix_cache_hit_rate"))
    assert 0 < rate < 1


def test_speculative_server_output_and_metrics(checkpoint, client):
    """A server speculating by prompt lookup answers as the plain one does, and /metrics reports the
    acceptance rate and the tokens per verify window."""
    spec = start_server(checkpoint, engine_kw=dict(draft_model="[ngram]", adaptive_lookahead=False))
    try:
        prompt = [2] + [17, 301, 45, 9, 800] * 6  # the prompt's tail recurs in it: lookups find drafts
        kw = dict(prompt=prompt, extra_body={"ignore_eos": True}, **GREEDY)
        assert spec.client().completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
        text = httpx.get(f"{spec.url}/metrics", timeout=TIMEOUT).text
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("gemforge_spec")}
        assert 0 <= value["gemforge_spec_acceptance_rate"] <= 1 and value["gemforge_spec_tokens_per_window"] >= 1
        assert spec.core.stats["spec_windows"] > 0
    finally:
        spec.stop()


def test_tokenize_and_detokenize(server, client):
    """vLLM's /tokenize (a prompt, or chat messages as the chat route renders them) and /detokenize:
    the ids the engine runs, and back; bad input is a 400 naming the field."""
    tok, url = server.core.tokenizer, server.url
    text = "def f(x):\n    return x"
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text}, timeout=TIMEOUT).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == CONTEXT
    r2 = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False},
                    timeout=TIMEOUT).json()
    assert r2["tokens"] == r["tokens"][1:]
    assert httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": r["tokens"]},
                      timeout=TIMEOUT).json() == {"prompt": text}
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages}, timeout=TIMEOUT).json()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert r["count"] == chat.usage.prompt_tokens
    for path, body, field in (("tokenize", {"model": MODEL}, "prompt"),
                              ("tokenize", {"model": MODEL, "prompt": "a", "messages": messages}, "prompt"),
                              ("tokenize", {"model": "gpt-4", "prompt": "a"}, "model"),
                              ("detokenize", {"model": MODEL, "tokens": [1, 10**6]}, "tokens"),
                              ("detokenize", {"model": MODEL, "tokens": [-3]}, "tokens"),
                              ("detokenize", {"model": MODEL, "tokens": "abc"}, "tokens")):
        resp = httpx.post(f"{url}/{path}", json=body, timeout=TIMEOUT)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field, (path, body, resp.text)


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for name in ("gemforge_requests_total", "gemforge_requests_running", "gemforge_requests_waiting",
                 "gemforge_kv_cache_blocks_used", "gemforge_prompt_tokens_total", "gemforge_generation_tokens_total",
                 "gemforge_time_to_first_token_seconds_bucket", "gemforge_inter_token_latency_seconds_bucket"):
        assert name in text
    assert 'gemforge_requests_total{outcome="ok"}' in text


def test_latency_histograms_count_streamed_and_whole_responses(client, server):
    """TTFT counts one observation per completion, inter-token latency one per token after the first,
    whether the response streamed (an output each step) or not (the engine delivers the final output
    only), and each observed time is within the request's wall time."""
    import time

    def counts():  # {"ttft_count": ..., "ttft_sum": ..., "itl_count": ..., "itl_sum": ...}
        text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
        return {f"{short}_{s}": value[f"gemforge_{name}_seconds_{s}"] for s in ("count", "sum")
                for short, name in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"))}

    kw = dict(prompt="def area(r):\n", extra_body={"ignore_eos": True}, **GREEDY)
    for stream in (False, True):
        before, t = counts(), time.monotonic()
        if stream:
            assert len(list(client.completions.create(stream=True, **kw))) >= 8
        else:
            assert client.completions.create(**kw).usage.completion_tokens == 8
        wall, after = time.monotonic() - t, counts()
        assert after["ttft_count"] - before["ttft_count"] == 1, stream
        assert after["itl_count"] - before["itl_count"] == 7, stream
        ttft, itl = (after[f"{k}_sum"] - before[f"{k}_sum"] for k in ("ttft", "itl"))
        assert 0 < ttft < wall and 0 < itl < wall and ttft + itl <= wall, (stream, ttft, itl, wall)


def test_bad_requests_through_the_client(client):
    cases = [(dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
             (dict(model="gpt-4"), "model"), (dict(prompt=""), "prompt"), (dict(prompt=[5, 10**6]), "prompt"),
             (dict(max_tokens=100000), "max_tokens"), (dict(n=65), "n"), (dict(best_of=3), "best_of")]
    for kw, param in cases:
        args = dict(model=MODEL, prompt="x") | kw
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="x")


def test_api_key(checkpoint):
    s = start_server(checkpoint, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{s.url}{path}", timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{s.url}/health", timeout=TIMEOUT).status_code == 200
        ok = s.client(api_key="sesame").completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert ok.usage.completion_tokens == 1
    finally:
        s.stop()


def test_chat_stream_deltas_carry_only_their_fields(server):
    """As OpenAI's: the first delta names the role, later ones carry content only (no nulls)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d and None not in d.values() for d in deltas[1:])
    assert any("content" in d for d in deltas[1:])


def test_a_prompt_is_tokenized_once(client, server, monkeypatch):
    """The server validates a request's prompts before queueing them and hands their token ids on:
    a long prompt costs one tokenization, not one per layer it passes (the event loop's included)."""
    tok = server.core.tokenizer
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **kw: calls.append(text) or encode(text, *a, **kw))
    prompt = "def g(x):\n    return x\n" * 20
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert calls == [prompt]
