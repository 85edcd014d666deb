"""AsyncEngine: concurrent coroutines, abort, client cancellation, and a failing step."""
import asyncio

import pytest

from gemforge.engine import SamplingParams
from gemforge.engine.async_engine import AsyncEngine, EngineError
from gemforge.engine.engine import Engine, EngineConfig
from gemforge.engine.errors import RequestError


@pytest.fixture
def aengine(make_checkpoint):
    d, _ = make_checkpoint("mqa", seed=4)
    return AsyncEngine(Engine(d, EngineConfig(dtype="float32", device="cpu", kv_cache_tokens=1024), progress=False))


async def collect(engine, rid, prompt, params):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    return outs


def test_concurrent_requests_equal_sequential(aengine):
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [f"def f{i}(x):" * (i + 1) for i in range(6)]

    async def main():
        together = await asyncio.gather(*(collect(aengine, f"r{i}", q, p) for i, q in enumerate(prompts)))
        alone = [await collect(aengine, f"a{i}", q, p) for i, q in enumerate(prompts)]
        return together, alone

    together, alone = asyncio.run(main())
    for t, a in zip(together, alone):
        assert t[-1].outputs[0].token_ids == a[-1].outputs[0].token_ids
        assert "".join(o.outputs[0].delta for o in t) == t[-1].outputs[0].text
    assert aengine.engine.cache.blocks.num_used == 0


def test_abort_and_cancellation_free_blocks(aengine):
    p = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        gen = aengine.generate("x = 1", p, "abort-me")
        first = await gen.__anext__()
        await aengine.abort("abort-me")
        rest = [o async for o in gen]
        # a consumer that just stops (client disconnect) aborts too
        gen2 = aengine.generate("y = 2", p, "walk-away")
        await gen2.__anext__()
        await gen2.aclose()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not aengine.engine.requests:
                break
        return first, rest

    first, rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert aengine.engine.cache.blocks.num_used == 0 and not aengine.engine.requests


def test_bad_request_raises_at_once(aengine):
    async def main():
        with pytest.raises(RequestError, match="max_tokens"):
            await collect(aengine, "big", "x", SamplingParams(max_tokens=100000))
    asyncio.run(main())


def test_step_failure_fails_requests_but_engine_continues(aengine, monkeypatch):
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    real = aengine.engine.runner.run
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(items)

    monkeypatch.setattr(aengine.engine.runner, "run", flaky)

    async def main():
        with pytest.raises(EngineError, match="injected fault"):
            await collect(aengine, "victim", "def g():", p)
        after = await collect(aengine, "after", "def g():", p)
        assert aengine.healthy
        return after

    after = asyncio.run(main())
    assert after[-1].outputs[0].finish_reason == "length"
    assert aengine.engine.cache.blocks.num_used == 0
