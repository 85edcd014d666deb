"""Clients that go away, faults in the model forward, and a dead engine: requests end, KV blocks are
freed, errors are 500 in OpenAI's JSON, and the server keeps serving (or says it is unhealthy)."""
import asyncio
import json
import random
import time

import httpx2 as httpx
import openai
import pytest
from harness import MODEL, TIMEOUT, start_server

PROMPTS = [f"def f{i}(x):\n    return x * {i}" if i % 2 else f"import os\nfor k in range({i}):" for i in range(10)]


def body(prompt, **kw):
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True} | kw


def test_200_concurrent_streams_with_random_disconnects(server):
    rng = random.Random(0)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        alone = [c.post("/v1/completions", json=body(p)).json()["choices"][0]["text"] for p in PROMPTS]
    quitters = set(rng.sample(range(200), 50))
    cuts = {i: rng.randint(0, 10) for i in quitters}   # events read before hanging up; 0 = during prefill

    async def one(client, i):
        req = client.build_request("POST", "/v1/completions", json=body(PROMPTS[i % len(PROMPTS)], stream=True))
        if cuts.get(i) == 0:
            task = asyncio.ensure_future(client.send(req, stream=True))
            await asyncio.sleep(rng.uniform(0, 0.05))
            task.cancel()
            return None
        r = await client.send(req, stream=True)
        try:
            assert r.status_code == 200
            text, events = "", 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if i in cuts and events >= cuts[i]:
                    return None
                if line != "data: [DONE]":
                    text += "".join(ch["text"] for ch in json.loads(line[6:])["choices"])
            return text
        finally:
            await r.aclose()

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(200))), TIMEOUT * 2)

    results = asyncio.run(main())
    for i, text in enumerate(results):
        if i not in quitters:
            assert text == alone[i % len(PROMPTS)], i
    server.wait_idle()


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Every engine step takes 50 ms, so a request of 400 tokens runs ~20 s unless aborted."""
    run = server.core.runner.run

    def slow(items, *device_ids):
        time.sleep(0.05)
        return run(items, *device_ids)

    monkeypatch.setattr(server.core.runner, "run", slow)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("hang_up_after", [0.02, 0.4])   # during the first step (prefill) / mid-decode
def test_disconnect_aborts_and_frees_blocks(server, slow_steps, stream, hang_up_after):
    t0, done = time.monotonic(), False
    try:
        with httpx.Client(base_url=server.url, timeout=hang_up_after) as c:
            with c.stream("POST", "/v1/completions", json=body("x = 1", max_tokens=400, stream=stream)) as r:
                for line in r.iter_lines():
                    done = line == "data: [DONE]"
                    if time.monotonic() - t0 > hang_up_after:
                        break
    except httpx.TimeoutException:
        pass
    assert not done
    server.wait_idle(timeout=3.0)


@pytest.fixture
def faults(server, monkeypatch):
    """faults(fail_on={k}, hold_first=w): the engine's k-th step from now raises; with hold_first,
    the first step waits until w more requests are queued, so they all enter the next step together."""
    run = server.core.runner.run
    calls = {"n": 0}

    def arm(fail_on, hold_first=0):
        def flaky(items, *device_ids):
            calls["n"] += 1
            deadline = time.monotonic() + TIMEOUT
            while calls["n"] == 1 and server.engine.num_waiting < hold_first and time.monotonic() < deadline:
                time.sleep(0.005)
            if calls["n"] in fail_on:
                raise RuntimeError("injected fault")
            return run(items, *device_ids)

        monkeypatch.setattr(server.core.runner, "run", flaky)
        return calls

    yield arm
    monkeypatch.undo()
    server.wait_idle()
    ok = server.client().completions.create(model=MODEL, prompt="a = 1", max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200


def test_fault_in_forward_is_a_500_for_the_requests_in_it(server, faults):
    calls = faults(fail_on={2}, hold_first=3)
    client = server.async_client()

    async def main():
        blocker = asyncio.ensure_future(client.completions.create(model=MODEL, prompt="z", max_tokens=4))
        deadline = time.monotonic() + TIMEOUT
        while calls["n"] < 1 and not blocker.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # until the blocker's step runs: the next three then wait together
        return await asyncio.gather(
            blocker,
            client.completions.create(model=MODEL, prompt="a = 1", max_tokens=4),
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4),
            client.completions.create(model=MODEL, prompt="b = 2", max_tokens=4, stream=True),
            return_exceptions=True)

    for r in asyncio.run(main()):
        assert isinstance(r, openai.InternalServerError) and r.status_code == 500, r
        assert "injected fault" in r.body["message"] and r.body["type"] == "internal_server_error"
    metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    assert 'gemforge_requests_total{outcome="failed"} 4.0' in metrics


def test_fault_mid_stream_is_an_error_event(server, faults):
    faults(fail_on={4})
    chunks = []
    with pytest.raises(openai.APIError, match="injected fault"):
        for ch in server.client().completions.create(model=MODEL, prompt="c = 3", max_tokens=20, stream=True,
                                                     extra_body={"ignore_eos": True}):
            chunks.append(ch)
    assert chunks  # the error came in-band, after the stream had started


def test_dead_engine_fails_fast_and_health_turns_503(checkpoint):
    s = start_server(checkpoint)
    try:
        def broken(*a, **kw):
            raise RuntimeError("device lost")

        s.core.runner.run = broken   # every step fails...
        s.core.abort = broken        # ...and cleanup fails too: the engine is dead
        client = s.client(timeout=10.0)
        t0 = time.monotonic()
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert e.value.status_code == 500
        with pytest.raises(openai.InternalServerError):
            list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2, stream=True))
        assert time.monotonic() - t0 < 10
        r = httpx.get(f"{s.url}/health", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["message"]
        assert httpx.get(f"{s.url}/metrics", timeout=5).status_code == 200
    finally:
        s.stop()
