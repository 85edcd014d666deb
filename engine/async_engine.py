"""AsyncEngine: many coroutines share one Engine through one background step loop.

    engine = AsyncEngine(Engine(model_dir))
    async for out in engine.generate(prompt, params, request_id):   # cumulative outputs + deltas
        ...
    await engine.abort(request_id)

Requests are validated when `generate` is called (a bad one raises RequestError at once). Adds and
aborts are applied by the loop between steps, so the Engine is only touched by one thread at a
time; each step runs in a worker thread so the event loop keeps serving. A coroutine that stops
iterating (a client disconnect) aborts its request. An exception inside a step fails the requests
in flight with EngineError; if the engine cannot be cleaned up afterwards it is marked dead.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from .engine import Engine
from .errors import GemforgeError, RequestError
from .sampling import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("gemforge.async")


class EngineError(GemforgeError, RuntimeError):
    """The engine failed while running a request (not the request's fault)."""


@dataclass
class _Pending:
    request_id: str
    prompt: object
    params: SamplingParams
    suffix: str | None
    fim_mode: str
    extra_stop_ids: tuple
    stream: bool


class AsyncEngine:
    def __init__(self, engine: Engine, stall_seconds: float = 30.0):
        self.engine = engine
        self.stall_seconds = stall_seconds
        self._queues: dict[str, asyncio.Queue] = {}
        self._adds: list[_Pending] = []
        self._aborts: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.dead: BaseException | None = None
        self.last_progress = time.monotonic()
        self.stepping = False

    # -- health -----------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.dead is not None or (self._loop_task is not None and self._loop_task.done()):
            return False
        busy = self.stepping or bool(self._queues)
        return not (busy and time.monotonic() - self.last_progress > self.stall_seconds)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._adds)

    # -- requests ---------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def generate(self, prompt, params: SamplingParams, request_id: str, suffix: str | None = None,
                       fim_mode: str = "psm", extra_stop_ids=(), stream: bool = True) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them: one each step it progresses, or with
        stream=False the final one only."""
        if self.dead is not None:
            raise EngineError(f"engine is dead: {self.dead!r}")
        if request_id in self._queues:
            raise RequestError(f"request id {request_id!r} is already running", field="request_id")
        _, ids = self.engine.encode_prompt(prompt, suffix, fim_mode)  # validation errors raise here
        self.engine.check_request(len(ids), params)
        self._ensure_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._adds.append(_Pending(request_id, prompt, params, suffix, fim_mode, tuple(extra_stop_ids), stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_later(request_id)
            self._queues.pop(request_id, None)

    def _abort_later(self, request_id: str) -> None:
        self._aborts.add(request_id)
        if self._wake is not None:
            self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its generator ends with a final output whose finish_reason is 'abort'."""
        self._abort_later(request_id)

    # -- the loop ---------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        adds, self._adds = self._adds, []
        for p in adds:
            if p.request_id in self._aborts:
                continue
            try:
                self.engine.add_request(p.request_id, p.prompt, p.params, p.suffix, p.fim_mode, p.extra_stop_ids,
                                        p.stream)
            except Exception as e:  # validated already; anything here is still the request's own failure
                self._deliver(p.request_id, e if isinstance(e, GemforgeError) else EngineError(str(e)))
        aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(rid, out)

    def _deliver(self, request_id: str, item) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self.engine.requests):
            try:
                self.engine.abort(rid)
            except Exception as e:  # cannot free its blocks: the engine is unusable
                self.dead = e
            self._deliver(rid, EngineError(f"request {rid} failed in the engine: {error!r}"))

    async def _run_loop(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self.last_progress = time.monotonic()
                self._wake.clear()
                if not (self._adds or self._aborts):
                    await self._wake.wait()
                continue
            self.stepping = True
            try:
                outs = await asyncio.to_thread(self.engine.step)
            except Exception as e:
                log.exception("engine step failed")
                self._fail_all(e)
                if self.dead is not None:
                    for rid in list(self._queues):
                        self._deliver(rid, EngineError(f"engine is dead: {self.dead!r}"))
                    return
                continue
            finally:
                self.stepping = False
            self.last_progress = time.monotonic()
            for out in outs:
                self._deliver(out.request_id, out)
            await asyncio.sleep(0)
