"""Engine outputs -> OpenAI JSON: whole responses and SSE streams, for completions and chat alike.

An endpoint's Renderer knows its JSON shapes; `response()` and `sse()` hold the machinery the two
endpoints share. Choice `index` = prompt index * n + completion index. The streamed texts are the
engine's deltas, so they concatenate to exactly the non-streamed text.
"""
from __future__ import annotations

import re
import time
from typing import AsyncIterator

from pydantic import BaseModel

from ..sequence import CompletionOutput
from ..tokenizer import Tokenizer
from .errors import report
from .generation import Generation
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                       ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, TokenLogprob,
                       PromptTokensDetails, TopLogprob, Usage)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (sentencepiece: '▁' is a space, '<0xNN>' one raw byte)."""
    piece = tokenizer.sp.IdToPiece(token_id)
    m = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")


class Renderer:
    """One endpoint's JSON shapes; the base holds the ids and the token strings of logprobs."""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, n: int):
        self.id, self.model, self.tok, self.n = request_id, model, tokenizer, n
        self.created = int(time.time())

    def token(self, token_id: int) -> tuple[str, list[int]]:
        b = token_bytes(self.tok, token_id)
        return b.decode("utf-8", errors="replace"), list(b)

    def index(self, prompt_index: int, out: CompletionOutput) -> int:
        return prompt_index * self.n + out.index

    # One endpoint's shapes: a choice of a chunk, a choice of a whole response, and the wrappers.
    def stream_choice(self, prompt_index: int, index: int, text: str, entries: list[dict] | None,
                      finish_reason: str | None, first: bool) -> BaseModel:
        raise NotImplementedError

    def final_choice(self, prompt_index: int, index: int, out: CompletionOutput) -> BaseModel:
        raise NotImplementedError

    def chunk(self, choices: list, usage: Usage | None = None) -> BaseModel:
        raise NotImplementedError

    def response(self, choices: list, usage: Usage) -> BaseModel:
        raise NotImplementedError


class CompletionRenderer(Renderer):
    """/v1/completions: legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset); echo: a
    choice's text starts with its prompt and, with logprobs, its logprobs with the prompt's tokens
    (the bos token, which the echoed text does not show, left out)."""

    def __init__(self, request_id, model, tokenizer, n, echo: Generation | None = None):
        super().__init__(request_id, model, tokenizer, n)
        self.echo = echo
        self._offset: dict[int, int] = {}

    def _logprobs(self, index: int, entries: list[dict] | None) -> CompletionLogprobs | None:
        if entries is None:
            return None
        tokens, offsets, offset = [], [], self._offset.get(index, 0)
        for e in entries:
            tokens.append(self.token(e["token"])[0])
            offsets.append(offset)
            offset += len(tokens[-1])
        self._offset[index] = offset
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[e["logprob"] for e in entries], text_offset=offsets,
            top_logprobs=[None if e["top"] is None else self._top(e, text) for e, text in zip(entries, tokens)])

    def _top(self, entry: dict, text: str) -> dict[str, float]:
        """The entry's top tokens and, as OpenAI's legacy format has it (up to logprobs + 1 of them), its own."""
        top = {self.token(t)[0]: lp for t, lp in entry["top"].items()}
        top.setdefault(text, entry["logprob"])
        return top

    def stream_choice(self, prompt_index, index, text, entries, finish_reason, first):
        if first and self.echo is not None:
            text = self.echo.prompt_texts[prompt_index] + text
            prompt = self.echo.latest[prompt_index].prompt_logprobs
            if entries is not None and prompt is not None:
                entries = prompt[1:] + entries if prompt[0]["token"] == self.tok.bos_id else prompt + entries
        return CompletionChoice(index=index, text=text, logprobs=self._logprobs(index, entries),
                                finish_reason=finish_reason)

    def final_choice(self, prompt_index, index, out):
        return self.stream_choice(prompt_index, index, out.text, _entries(out), out.finish_reason, True)

    def chunk(self, choices, usage=None):
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    response = chunk


class ChatRenderer(Renderer):
    """/v1/chat/completions: messages, deltas (the role in a choice's first chunk), chat logprobs."""

    def _logprobs(self, entries: list[dict] | None) -> ChatLogprobs | None:
        if entries is None:
            return None

        def top(token_id: int, lp: float) -> TopLogprob:
            text, b = self.token(token_id)
            return TopLogprob(token=text, logprob=lp, bytes=b)

        return ChatLogprobs(content=[TokenLogprob(**top(e["token"], e["logprob"]).model_dump(),
                                                  top_logprobs=[top(t, lp) for t, lp in e["top"].items()])
                                     for e in entries])

    def stream_choice(self, prompt_index, index, text, entries, finish_reason, first):
        delta = Delta(role="assistant", content=text) if first else Delta(content=text or None)
        return ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs(entries), finish_reason=finish_reason)

    def final_choice(self, prompt_index, index, out):
        return ChatChoice(index=index, message=AssistantMessage(content=out.text),
                          logprobs=self._logprobs(_entries(out)), finish_reason=out.finish_reason)

    def chunk(self, choices, usage=None):
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def response(self, choices, usage):
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)


def _entries(out: CompletionOutput, start: int = 0) -> list[dict] | None:
    """Logprob entries of out's tokens from `start` (the engine appends to the list as it runs, so
    it is cut at the tokens this output holds)."""
    return None if out.logprobs is None else out.logprobs[start: out.num_tokens]


def _usage(gen: Generation) -> Usage:
    prompt, completion, cached = gen.usage()
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def response(gen: Generation, renderer: Renderer) -> BaseModel:
    """The whole response of a finished generation."""
    choices = [renderer.final_choice(i, renderer.index(i, o), o) for i, f in enumerate(gen.latest) for o in f.outputs]
    return renderer.response(choices, _usage(gen))


def _event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def sse(gen: Generation, renderer: Renderer, outputs: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    """`data: {chunk}` events of `outputs` (gen's merged outputs), an error event if the engine
    fails mid-stream, the usage chunk if asked for, then `data: [DONE]`."""
    sent: dict[int, int] = {}   # choice index -> its tokens streamed so far
    ended: set[int] = set()
    try:
        async for i, out in outputs:
            choices = []
            for o in out.outputs:
                c = renderer.index(i, o)
                if c in ended:
                    continue
                first, entries = c not in sent, _entries(o, sent.get(c, 0))
                sent[c] = o.num_tokens
                if first or o.delta or o.finish_reason or entries:
                    choices.append(renderer.stream_choice(i, c, o.delta, entries, o.finish_reason, first))
                if o.finish_reason:
                    ended.add(c)
            if choices:
                yield _event(renderer.chunk(choices))
        if include_usage:
            yield _event(renderer.chunk([], _usage(gen)))
    except Exception as e:  # the response has started: report in-band, as OpenAI does
        yield _event(report(e).response())
    finally:
        gen.close()
    yield "data: [DONE]\n\n"
