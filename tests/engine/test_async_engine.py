"""AsyncEngine: concurrent coroutines, abort, client cancellation, and a failing step."""
import asyncio

import pytest

from gemforge.engine import SamplingParams
from gemforge.engine.async_engine import AsyncEngine, EngineError
from gemforge.engine.engine import Engine, EngineConfig
from gemforge.engine.errors import RequestError


@pytest.fixture(params=[False, True], ids=["sync", "async"])  # the engine's async scheduling (the GPU default)
def aengine(make_checkpoint, request):
    d, _ = make_checkpoint("mqa", seed=4)
    return AsyncEngine(Engine(d, EngineConfig(dtype="float32", device="cpu", kv_cache_tokens=1024,
                                              async_scheduling=request.param), progress=False))


async def collect(engine, rid, prompt, params):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    return outs


@pytest.mark.parametrize("overlap", [False, True])  # True: the GPU default (the next step runs during delivery)
def test_concurrent_requests_equal_sequential(aengine, overlap):
    aengine.overlap = overlap
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


def test_non_streaming_requests_get_their_final_output_only(aengine):
    """stream=False: one output, the finished one, equal to a streamed request's last (its delta the
    whole text, its first-token time set), while a streamed request beside it gets one per step; an
    abort still ends it with an output."""
    p = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)

    async def main():
        whole = [o async for o in aengine.generate("def g(x):", p, "quiet", stream=False)]
        both = await asyncio.gather(
            collect(aengine, "loud", "def g(x):", p),
            _quiet(aengine, "quiet2", "def g(x):", p))
        gen = aengine.generate("x = 1", SamplingParams(max_tokens=500, ignore_eos=True), "cut", stream=False)
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        await aengine.abort("cut")
        return whole, both, await task

    whole, (loud, quiet2), cut = asyncio.run(main())
    assert len(whole) == 1 and whole[0].finished and len(quiet2) == 1 and len(loud) == 9
    for out in (whole[0], quiet2[0]):
        assert out.outputs[0].token_ids == loud[-1].outputs[0].token_ids
        assert out.outputs[0].delta == out.outputs[0].text == loud[-1].outputs[0].text
        assert out.first_token_time is not None
    assert cut.finished and cut.outputs[0].finish_reason == "abort"
    assert aengine.engine.cache.blocks.num_used == 0


async def _quiet(engine, rid, prompt, params):
    return [o async for o in engine.generate(prompt, params, rid, stream=False)]


def test_only_the_worker_thread_touches_the_engine_and_it_ends_with_the_loop(aengine):
    """Adds, aborts and steps all run on the one worker thread (the event loop only queues and
    delivers); it serves a second event loop after the first closes, and ends when its loop has."""
    import threading
    import time

    seen = set()
    for name in ("add_request", "abort", "step"):
        real = getattr(aengine.engine, name)

        def spy(*a, _real=real, **kw):
            seen.add(threading.current_thread().name)
            return _real(*a, **kw)
        setattr(aengine.engine, name, spy)
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def main(tag):
        gen = aengine.generate("def h():", SamplingParams(max_tokens=300, ignore_eos=True), f"cut-{tag}")
        await gen.__anext__()
        await gen.aclose()  # a walk-away abort
        return await collect(aengine, f"ok-{tag}", "def h():", p)

    first, second = asyncio.run(main(1)), asyncio.run(main(2))
    assert first[-1].outputs[0].token_ids == second[-1].outputs[0].token_ids and len(first) == 6
    assert seen == {"gemforge-engine"}, seen
    worker = aengine._worker
    for _ in range(40):  # the worker notices its loop has closed within a second
        if not worker.is_alive():
            break
        time.sleep(0.1)
    assert not worker.is_alive()
    assert aengine.engine.cache.blocks.num_used == 0 and not aengine.engine.requests


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


def test_request_id_can_be_used_again_once_its_consumer_stops(aengine):
    """A consumer that walks away aborts its request; the same id, used again at once, runs its own
    prompt to the end and gets nothing of the old request (each generate call has its own engine key).
    An abort asked before the worker took the request still ends its generator, with 'abort'."""
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    async def main():
        background = asyncio.ensure_future(collect(aengine, "bg", "import os\n", long))  # (keeps the worker busy)
        gen = aengine.generate("def f(x):\n", long, "X")
        for _ in range(3):
            await gen.__anext__()
        await gen.aclose()
        again = await collect(aengine, "X", "class A:\n", short)
        early = aengine.generate("y = 2", long, "early")
        first = asyncio.ensure_future(early.__anext__())
        await asyncio.sleep(0)  # (generate has queued it; the worker may not have taken it yet)
        await aengine.abort("early")
        ended = [await first] + [o async for o in early]
        await aengine.abort("bg")
        await background
        return again, ended

    again, ended = asyncio.run(main())
    out = again[-1]
    assert out.request_id == "X" and out.prompt == "class A:\n" and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 5
    assert ended[-1].finished and ended[-1].outputs[0].finish_reason == "abort" and ended[-1].request_id == "early"
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

    def flaky(items, *device_ids):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(items, *device_ids)

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
