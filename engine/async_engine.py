"""AsyncEngine: many coroutines share one Engine, stepped by one worker thread.

    engine = AsyncEngine(Engine(model_dir))
    async for out in engine.generate(prompt, params, request_id):   # cumulative outputs + deltas
        ...
    await engine.abort(request_id)

Requests are validated when `generate` is called (a bad one raises RequestError at once). Only the
worker thread touches the Engine: it applies the adds and aborts queued since its last step, runs
the next step, and hands the step's outputs to the event loop in one call, then goes on stepping
while there is work (no thread hop and no event-loop turn between steps); the event loop only
queues requests and delivers outputs, so it keeps serving HTTP meanwhile. A coroutine that stops
iterating (a client disconnect) aborts its request. An exception inside a step fails the requests
in flight with EngineError; if the engine cannot be cleaned up afterwards it is marked dead.
Each `generate` call runs in the Engine under a key of its own (request id and a serial number), so
a request id may be used again as soon as its last consumer has stopped listening: nothing of the
old request reaches the new one.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
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
    key: str  # the request's id in the Engine: one per generate call
    prompt: object
    params: SamplingParams
    suffix: str | None
    fim_mode: str
    extra_stop_ids: tuple
    stream: bool
    encoded: tuple  # encode_prompt's (text, ids)


class AsyncEngine:
    def __init__(self, engine: Engine, stall_seconds: float = 30.0, overlap: bool | None = None):
        """overlap: the worker runs the next step while the event loop delivers the last one's outputs
        (default: on a GPU, where a step mostly waits on the device; on a CPU the forward uses every
        core and the delivery would only slow it down, so the worker waits for it)."""
        self.engine = engine
        self.stall_seconds = stall_seconds
        self.overlap = str(engine.device).startswith("cuda") if overlap is None else overlap
        self._delivered = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}  # engine key -> its consumer's queue (event loop only)
        self._keys: dict[str, str] = {}  # request id -> the engine key of its running generate (event loop only)
        self._serial = itertools.count()
        self._lock = threading.Lock()  # guards _adds and _aborts, shared with the worker
        self._adds: list[_Pending] = []
        self._aborts: set[str] = set()
        self._work = threading.Event()  # set when there is something for the worker to do
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: threading.Thread | None = None
        self.dead: BaseException | None = None
        self.last_progress = time.monotonic()
        self.stepping = False

    # -- health -----------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.dead is not None or (self._worker is not None and not self._worker.is_alive()):
            return False
        busy = self.stepping or bool(self._queues)
        return not (busy and time.monotonic() - self.last_progress > self.stall_seconds)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._adds)

    # -- requests (event loop) --------------------------------------------------------------
    def _ensure_worker(self) -> None:
        self._loop = asyncio.get_running_loop()  # outputs go to the loop that asks for them
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="gemforge-engine", daemon=True)
            self._worker.start()

    async def generate(self, prompt, params: SamplingParams, request_id: str, suffix: str | None = None,
                       fim_mode: str = "psm", extra_stop_ids=(), stream: bool = True,
                       encoded=None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them: one each step it progresses, or with
        stream=False the final one only. encoded: Engine.encode_prompt's (text, ids) of this prompt,
        where the caller has them (it is tokenized once)."""
        if self.dead is not None:
            raise EngineError(f"engine is dead: {self.dead!r}")
        if request_id in self._keys:
            raise RequestError(f"request id {request_id!r} is already running", field="request_id")
        encoded = encoded or self.engine.encode_prompt(prompt, suffix, fim_mode)  # validation errors raise here
        self.engine.check_request(len(encoded[1]), params)
        self._ensure_worker()
        key = f"{request_id}#{next(self._serial)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[key], self._keys[request_id] = queue, key
        with self._lock:
            self._adds.append(_Pending(key, prompt, params, suffix, fim_mode, tuple(extra_stop_ids), stream, encoded))
        self._work.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item.request_id = request_id  # (the engine built it for this consumer alone)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._abort_later(key)
            self._queues.pop(key, None)
            if self._keys.get(request_id) == key:
                del self._keys[request_id]

    def _abort_later(self, key: str) -> None:
        with self._lock:
            self._aborts.add(key)
        self._work.set()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its generator ends with a final output whose finish_reason is 'abort'."""
        if request_id in self._keys:
            self._abort_later(self._keys[request_id])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """(event loop) Each item to its request's queue (by engine key), if the request is still
        listening; once the consumers it wakes have run, `_delivered` is set."""
        for key, item in items:
            q = self._queues.get(key)
            if q is not None:
                q.put_nowait(item)
        self._loop.call_soon(self._delivered.set)  # (after the woken consumers' turns)

    def _fail_listeners(self) -> None:
        """(event loop) Every request still listening gets the dead engine's error."""
        self._deliver([(rid, EngineError(f"engine is dead: {self.dead!r}")) for rid in list(self._queues)])

    # -- the worker ---------------------------------------------------------------------------
    def _post(self, callback, *args) -> bool:
        """Run callback(*args) on the event loop; False once that loop is closed (the worker then ends)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the loop is closed
            return False

    def _apply_pending(self) -> list[tuple[str, object]]:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, set()
        out = []
        for p in adds:  # (one aborted already is added too: its abort below gives its final output)
            try:
                self.engine.add_request(p.key, p.prompt, p.params, p.suffix, p.fim_mode, p.extra_stop_ids, p.stream,
                                        p.encoded)
            except Exception as e:  # validated already; anything here is still the request's own failure
                out.append((p.key, e if isinstance(e, GemforgeError) else EngineError(str(e))))
        for key in aborts:
            final = self.engine.abort(key)
            if final is not None:
                out.append((key, final))
        return out

    def _fail_all(self, error: BaseException) -> list[tuple[str, object]]:
        out = []
        for rid in list(self.engine.requests):
            try:
                self.engine.abort(rid)
            except Exception as e:  # cannot free its blocks: the engine is unusable
                self.dead = e
            out.append((rid, EngineError(f"request {rid} failed in the engine: {error!r}")))
        return out

    def _run(self) -> None:
        """Apply what is queued, step while there is work, post each step's outputs; idle otherwise.
        Ends when the event loop it posts to has closed, or when the engine is dead."""
        while True:
            try:
                delivered = self._apply_pending()
            except Exception as e:  # an abort that cannot free its blocks
                log.exception("applying adds and aborts failed")
                self.dead = e
                self._post(self._fail_listeners)
                return
            if not self.engine.has_unfinished():
                self.last_progress = time.monotonic()
                if delivered and not self._post(self._deliver, delivered):
                    return
                self._work.clear()
                with self._lock:
                    idle = not (self._adds or self._aborts)
                if idle and not self._work.wait(timeout=1.0) and self._loop.is_closed():
                    return
                continue
            self.stepping = True
            try:
                delivered += [(out.request_id, out) for out in self.engine.step()]
            except Exception as e:
                log.exception("engine step failed")
                delivered += self._fail_all(e)
            finally:
                self.stepping = False
            self.last_progress = time.monotonic()
            if delivered:
                self._delivered.clear()
                if not self._post(self._deliver, delivered):
                    return
                while not self.overlap and not self._delivered.wait(timeout=1.0):
                    if self._loop.is_closed():
                        return
            if self.dead is not None:
                self._post(self._fail_listeners)
                return
