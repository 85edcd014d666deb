"""The OpenAI-compatible HTTP app over an AsyncEngine.

    app = build_app(AsyncEngine(Engine(model_dir)), "codegemma-2b", api_key=None)

Routes: POST /v1/completions (`suffix` -> CodeGemma infill), POST /v1/chat/completions,
GET /v1/models (and /v1/models/{id}), POST /tokenize and /detokenize (vLLM's), GET /health (503 while the
engine is unhealthy), GET /metrics (Prometheus).
With an api key, every route but /health needs `Authorization: Bearer KEY`. Bodies are read with a
size limit and parsed strictly (protocol.py); every error leaves through errors.py.
"""
from __future__ import annotations

import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..async_engine import AsyncEngine
from ..errors import RequestError
from . import errors
from .errors import APIError
from .generation import Generation, until_disconnected
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard,
                       ModelList, TokenizeRequest, TokenizeResponse, parse_request)
from .render import ChatRenderer, CompletionRenderer, Renderer, response, sse

MAX_BODY_BYTES = 4 << 20


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it exceeds `limit` bytes (declared or actual)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _bearer_auth(api_key: str):
    async def check(request: Request) -> None:
        if request.url.path == "/health":
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    return check


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


async def _close(gen: Generation) -> None:
    """Runs after a stream however it ended, also when it was cancelled before its body began."""
    gen.close()


async def _serve(request: Request, gen: Generation, renderer: Renderer, stream: bool, include_usage: bool) -> Response:
    """Run a generation to a JSON response or an SSE stream; whichever way the HTTP request ends
    (done, error, client gone), its engine requests end with it."""
    try:
        if not stream:
            await until_disconnected(request, gen.collect())
            return JSONResponse(response(gen, renderer).model_dump())
        outputs = gen.outputs()
        # Wait for the first output before answering, so errors before it get a real status.
        first = await until_disconnected(request, anext(outputs))
        return StreamingResponse(sse(gen, renderer, _chain(first, outputs), include_usage),
                                 media_type="text/event-stream", background=BackgroundTask(_close, gen))
    except BaseException:
        gen.close()
        raise


def build_app(async_engine: AsyncEngine, model_name: str, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    core = async_engine.engine
    tokenizer = core.tokenizer
    metrics = Metrics(async_engine)
    created = int(time.time())
    app = FastAPI(title="gemforge", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(_bearer_auth(api_key))] if api_key else [])

    def count_rejected(err: APIError) -> None:
        if 400 <= err.status < 499:  # 499: the client left; 5xx: counted as failed where they happen
            metrics.outcome("rejected")

    errors.install(app, on_error=count_rejected)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(400, f"model {name!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def chat_prompt(messages) -> str:
        """The Gemma chat template over the request's messages."""
        return tokenizer.chat_prompt([{"role": m.role, "content": m.text()} for m in messages])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        params = req.sampling_params(default_max_tokens=16)  # OpenAI's default
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = Generation(async_engine, metrics, rid, req.prompts(), params, req.suffix, req.fim_mode,
                         stream=bool(req.stream))
        renderer = CompletionRenderer(rid, model_name, tokenizer, params.n, gen if req.echo else None)
        return await _serve(request, gen, renderer, bool(req.stream), req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        prompt = chat_prompt(req.messages)
        default_max_tokens = 1
        if req.requested_max_tokens is None:  # OpenAI's default: as much as the context leaves
            context = min(core.max_model_len, core.capacity)
            n_prompt = len(core.encode_prompt(prompt)[1])
            if n_prompt >= context:
                raise RequestError(f"the messages are {n_prompt} tokens, which leaves none of the model's context "
                                   f"of {context} tokens to answer in", field="messages")
            default_max_tokens = context - n_prompt
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            params = req.sampling_params(default_max_tokens)
            gen = Generation(async_engine, metrics, rid, [prompt], params,
                             extra_stop_ids=tokenizer.chat_stop_ids(), stream=bool(req.stream))
        except RequestError as e:  # name the field as the client spelled it
            if e.field == "max_tokens" and req.max_completion_tokens is not None:
                e.field = "max_completion_tokens"
            elif e.field == "logprobs" and req.top_logprobs is not None:
                e.field = "top_logprobs"
            raise
        renderer = ChatRenderer(rid, model_name, tokenizer, params.n)
        return await _serve(request, gen, renderer, bool(req.stream), req.include_usage)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> TokenizeResponse:
        req = parse_request(TokenizeRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        req.check()
        text = req.prompt if req.messages is None else chat_prompt(req.messages)
        ids = tokenizer.encode(text, add_bos=req.add_special_tokens is not False)
        return TokenizeResponse(count=len(ids), max_model_len=core.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> DetokenizeResponse:
        req = parse_request(DetokenizeRequest, await read_body(request, max_body_bytes))
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise RequestError(f"tokens: {bad[0]} is not a token id of the tokenizer [0, {tokenizer.vocab_size})",
                               field="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(req.tokens))

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, max_model_len=core.max_model_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> ModelCard:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return card()

    @app.get("/health")
    async def health() -> dict:
        if not async_engine.healthy:
            raise APIError(503, "the engine is not healthy")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
