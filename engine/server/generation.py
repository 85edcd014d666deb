"""The engine side of one HTTP request: its engine requests (one per prompt), their merged outputs,
and their abort when the client goes away.

    gen = Generation(engine, metrics, "cmpl-1", prompts, params)  # validates every prompt first
    async for i, out in gen.outputs(): ...   # (prompt index, cumulative RequestOutput)
    gen.close()                                # idempotent: aborts whatever is still running

`until_disconnected(request, awaitable)` runs a non-streaming await and cancels it (so the
generator's finally aborts the engine requests) when the client disconnects first.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from ..async_engine import AsyncEngine
from ..sampling import SamplingParams
from ..sequence import RequestOutput
from .errors import api_error
from .metrics import Metrics

_DONE = object()


class Generation:
    def __init__(self, engine: AsyncEngine, metrics: Metrics, request_id: str, prompts: list, params: SamplingParams,
                 suffix: str | None = None, fim_mode: str = "psm", extra_stop_ids=(), stream: bool = True):
        """stream=False: the engine delivers each prompt's final output only (`collect`)."""
        core = engine.engine
        self.prompt_texts: list[str] = []
        self.prompt_ids: list[list[int]] = []
        encoded = []
        for p in prompts:  # the engine's own validation, for all prompts before any of them runs
            text, ids = core.encode_prompt(p, suffix, fim_mode)
            core.check_request(len(ids), params)
            self.prompt_texts.append(text if text is not None else core.tokenizer.decode(ids))
            self.prompt_ids.append(ids)
            encoded.append((text, ids))
        self.engine, self.metrics = engine, metrics
        self.ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._args = [(p, params, rid, suffix, fim_mode, tuple(extra_stop_ids), stream, enc)
                      for p, rid, enc in zip(prompts, self.ids, encoded)]
        self.latest: list[RequestOutput | None] = [None] * len(prompts)  # per prompt, its last output
        self.error: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._last = [(time.monotonic(), 0)] * len(prompts)  # per prompt: (time, tokens) of its last news
        self._closed = False

    async def _pump(self, i: int, queue: asyncio.Queue) -> None:
        try:
            async for out in self.engine.generate(*self._args[i]):
                queue.put_nowait((i, out))
            queue.put_nowait((i, _DONE))
        except Exception as e:  # delivered to the consumer; cancellation just ends the task
            queue.put_nowait((i, e))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them; raises the first error."""
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.get_running_loop().create_task(self._pump(i, queue)) for i in range(len(self.ids))]
        try:
            running = len(self._tasks)
            while running:
                i, item = await queue.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, BaseException):
                    self.error = item
                    raise item
                else:
                    self._observe(i, item)
                    yield i, item
        finally:
            self.close()

    async def collect(self) -> list[RequestOutput]:
        """The final output of every prompt (non-streaming)."""
        async for _ in self.outputs():
            pass
        return self.latest

    def _observe(self, i: int, out: RequestOutput) -> None:
        """TTFT from the engine's first-token time; the tokens an output brings share the gap since the
        previous one (since the first token, for the first output: a final-only output brings them all)."""
        now, tokens = time.monotonic(), max(o.num_tokens for o in out.outputs)
        then, before = self._last[i]
        if tokens > before:
            if before == 0:
                first = out.first_token_time if out.first_token_time is not None else now
                self.metrics.ttft.observe(first - then)
                then, before = first, 1
            for _ in range(tokens - before):
                self.metrics.itl.observe((now - then) / (tokens - before))
            self._last[i] = (now, tokens)
        self.latest[i] = out

    @property
    def done(self) -> bool:
        return all(o is not None and o.finished for o in self.latest)

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens so far, prompt tokens found in the prefix cache)."""
        return (sum(map(len, self.prompt_ids)),
                sum(c.num_tokens for o in self.latest if o is not None for c in o.outputs),
                sum(o.num_cached_tokens for o in self.latest if o is not None))

    def close(self) -> None:
        """Abort what still runs and count the outcome. Cancelling a pump task ends its engine
        generator, which aborts the request and frees its blocks; nothing here awaits, so it is
        safe inside a cancellation."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        prompt, generated, _ = self.usage()
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.generation_tokens.inc(generated)
        if self.error is not None:
            if api_error(self.error).status >= 500:
                self.metrics.outcome("failed")
        else:
            self.metrics.outcome("ok" if self.done else "aborted")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, awaitable):
    """Await `awaitable` unless the client disconnects first: then cancel it, raise ClientDisconnect."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ClientDisconnect()
    return work.result()
