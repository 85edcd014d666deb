"""OpenAI's request and response schemas (the subset gemforge serves) and request-body parsing.

Requests are strict: a field of the wrong JSON type or an unknown field is an error naming it;
`null` means "the default". Ranges are not checked here: SamplingParams' own table (RANGES) does
that when `sampling_params()` builds the engine's parameters, so the limits live in one place.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from ..errors import RequestError
from ..sampling import SamplingParams

# Request fields handed to SamplingParams under the same name.
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "min_tokens", "stop", "stop_token_ids", "ignore_eos")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False


class _GenerateRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extensions).
    Each endpoint defines `requested_max_tokens` and `num_logprobs`, which it spells its own way."""
    model: str
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None

    def check(self) -> None:
        """Rules across fields and what gemforge does not support; RequestError names the field."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", field="stream_options")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams, after check(); a RequestError names the offending field."""
        self.check()
        given = {k: v for k in SAMPLING_FIELDS if (v := getattr(self, k)) is not None}
        if self.logit_bias:
            given["logit_bias"] = self.token_bias()
        max_tokens = self.requested_max_tokens
        return SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                              logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs, **given)

    def token_bias(self) -> dict[int, float]:
        """logit_bias with its JSON keys (token ids written as decimal strings) as integers."""
        bias = {}
        for key, value in self.logit_bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise RequestError(f"logit_bias keys must be token ids written as decimal integers, got {key[:24]!r}",
                                   field="logit_bias")
            bias[int(key)] = value
        return bias

    @property
    def num_prompt_logprobs(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerateRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    fim_mode: Literal["psm", "spm"] = "psm"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs returns the prompt's token logprobs too (as evaluation harnesses ask
        with max_tokens=0); echo with max_tokens=0 alone, the prompt's tokens with theirs."""
        if not self.echo:
            return None
        return self.logprobs if self.logprobs is not None else (0 if self.max_tokens == 0 else None)

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt (text or token ids) per engine request."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", field="prompt")
        return list(p)

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError(f"best_of must equal n (got best_of={self.best_of}, n={self.n or 1})", field="best_of")
        if self.echo and self.suffix is not None:
            raise RequestError("echo cannot be combined with suffix (infill)", field="echo")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerateRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", field="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses ---------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]   # None: an echoed prompt's first token (nothing before it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole response and a stream chunk alike (OpenAI uses one shape for both)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """A chat chunk's delta: only the fields it carries (OpenAI's chunks omit the others)."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nones(self, serialize):
        return {k: v for k, v in serialize(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a text prompt, or chat messages rendered as /v1/chat/completions would."""
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("give exactly one of prompt and messages", field="prompt")


class DetokenizeRequest(_Request):
    model: str
    tokens: list[int]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gemforge"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- parsing -----------------------------------------------------------------------------------
_FIELD_NAMES = frozenset(name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions,
                                         TokenizeRequest, DetokenizeRequest) for name in m.model_fields)


def _param(loc: tuple, extra: bool) -> str:
    """`messages[0].content` (or `logit_bias.5`) from a pydantic error location, dropping union-member
    tags."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i and loc[i - 1] == "logit_bias":  # a key of the one mapping field
            out += f".{part}"
        elif part in _FIELD_NAMES or (extra and part == loc[-1]):
            out += f".{part}" if out else part
        else:
            break
    return out


def _bad_string(obj, path: str = "") -> str | None:
    """The path of the first string holding a lone surrogate (valid JSON, invalid Unicode)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(obj, dict):
        return next((p for k, v in obj.items() if (p := _bad_string(v, f"{path}.{k}" if path else k))), None)
    elif isinstance(obj, list):
        return next((p for i, v in enumerate(obj) if (p := _bad_string(v, f"{path}[{i}]"))), None)
    return None


def parse_request(model: type[_Request], raw: bytes) -> _Request:
    """Decode a JSON body into `model`; RequestError names what is malformed."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer past 4300 digits; deep nesting
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        if (where := _bad_string(data)) is not None:
            raise RequestError(f"{where} holds an unpaired surrogate (invalid Unicode)", field=where)
        return model.model_validate(data)
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    except ValidationError as e:
        errs = e.errors(include_url=False)
        first = errs[0]
        param = _param(first["loc"], first["type"] == "extra_forbidden")
        detail = "; ".join(f"{_param(x['loc'], x['type'] == 'extra_forbidden') or 'body'}: {x['msg']}"
                           for x in errs[:3])
        raise RequestError(f"invalid request: {detail}", field=param or None) from None
