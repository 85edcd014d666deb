"""Malformed requests, sent as raw HTTP: each gets its status and OpenAI error JSON naming the field."""
import json

import httpx2 as httpx
import pytest
from harness import CONTEXT, MODEL, TIMEOUT

C = {"model": MODEL, "prompt": "x", "max_tokens": 2}                                       # /v1/completions
H = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}    # /v1/chat/completions
U, S, A = ({"role": r, "content": "x"} for r in ("user", "system", "assistant"))
DROP = object()


def with_(base, **fields):
    out = dict(base)
    for k, v in fields.items():
        if v is DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


# (endpoint, body: dict or raw bytes, status, param)
CASES = [
    ("C", with_(C, max_tokens=-1), 400, "max_tokens"),
    ("C", with_(C, max_tokens=0), 400, "max_tokens"),
    ("C", with_(C, max_tokens=10**7), 400, "max_tokens"),
    ("C", with_(C, max_tokens=1.5), 400, "max_tokens"),
    ("C", with_(C, max_tokens="5"), 400, "max_tokens"),
    ("C", with_(C, max_tokens=True), 400, "max_tokens"),
    ("C", with_(C, max_tokens=CONTEXT), 400, "max_tokens"),               # prompt + max_tokens > context
    ("C", with_(C, prompt="x " * CONTEXT), 400, "max_tokens"),
    ("C", with_(C, temperature=-1), 400, "temperature"),
    ("C", with_(C, temperature=101), 400, "temperature"),
    ("C", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL.encode(), 400, "temperature"),
    ("C", b'{"model": "%s", "prompt": "x", "temperature": Infinity}' % MODEL.encode(), 400, "temperature"),
    ("C", with_(C, temperature="hot"), 400, "temperature"),
    ("C", with_(C, top_p=0), 400, "top_p"),
    ("C", with_(C, top_p=1.5), 400, "top_p"),
    ("C", with_(C, top_k=-2), 400, "top_k"),
    ("C", with_(C, min_p=2), 400, "min_p"),
    ("C", with_(C, repetition_penalty=0), 400, "repetition_penalty"),
    ("C", with_(C, presence_penalty=3), 400, "presence_penalty"),
    ("C", with_(C, frequency_penalty=-3), 400, "frequency_penalty"),
    ("C", with_(C, n=0), 400, "n"),
    ("C", with_(C, n=1000), 400, "n"),
    ("C", with_(C, logprobs=21), 400, "logprobs"),
    ("C", with_(C, logprobs=-1), 400, "logprobs"),
    ("C", with_(C, seed="abc"), 400, "seed"),
    ("C", with_(C, seed=2**64), 400, "seed"),
    ("C", with_(C, stop=5), 400, "stop"),
    ("C", with_(C, stop=[""]), 400, "stop"),
    ("C", with_(C, stop=["a", 1]), 400, "stop"),
    ("C", with_(C, stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("C", with_(C, min_tokens=5), 400, "min_tokens"),                    # > max_tokens
    ("C", with_(C, ignore_eos="no"), 400, "ignore_eos"),
    ("C", with_(C, model="gpt-4"), 400, "model"),
    ("C", with_(C, model=DROP), 400, "model"),
    ("C", with_(C, model=None), 400, "model"),
    ("C", with_(C, prompt=DROP), 400, "prompt"),
    ("C", with_(C, prompt=""), 400, "prompt"),
    ("C", with_(C, prompt=[]), 400, "prompt"),
    ("C", with_(C, prompt=[1, 99999]), 400, "prompt"),                   # out of the vocabulary
    ("C", with_(C, prompt=[-1]), 400, "prompt"),
    ("C", with_(C, prompt=[[1, 2], []]), 400, "prompt"),
    ("C", with_(C, prompt={"a": 1}), 400, "prompt"),
    ("C", b'{"model": "%s", "prompt": "\\ud800"}' % MODEL.encode(), 400, "prompt"),  # lone surrogate
    ("C", with_(C, best_of=2), 400, "best_of"),
    ("C", with_(C, echo=True, suffix="    return x"), 400, "echo"),
    ("C", with_(C, max_tokens=0), 400, "max_tokens"),
    ("C", with_(C, logit_bias={"x5": 10}), 400, "logit_bias"),
    ("C", with_(C, logit_bias={"-5": 10}), 400, "logit_bias"),
    ("C", with_(C, logit_bias={"5": 101}), 400, "logit_bias"),
    ("C", with_(C, logit_bias={"5": "up"}), 400, "logit_bias.5"),
    ("C", with_(C, logit_bias={"99999": 1}), 400, "logit_bias"),           # out of the vocabulary
    ("C", with_(C, stop_token_ids=[99999]), 400, "stop_token_ids"),
    ("C", with_(C, stream_options={"include_usage": True}), 400, "stream_options"),
    ("C", with_(C, stream=True, stream_options={"include_usage": "y"}), 400, "stream_options.include_usage"),
    ("C", with_(C, stream="yes"), 400, "stream"),
    ("C", with_(C, prompt=[5, 6], suffix="x"), 400, "suffix"),
    ("C", with_(C, suffix=7), 400, "suffix"),
    ("C", with_(C, fim_mode="mps"), 400, "fim_mode"),
    ("C", with_(C, temprature=0.5), 400, "temprature"),                  # unknown field
    ("C", with_(C, user=5), 400, "user"),
    ("H", with_(H, messages=DROP), 400, "messages"),
    ("H", with_(H, messages=[]), 400, "messages"),
    ("H", with_(H, messages="hi"), 400, "messages"),
    ("H", with_(H, messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    ("H", with_(H, messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("H", with_(H, messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("H", with_(H, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]), 400,
     "messages[0].content"),
    ("H", with_(H, messages=[U, U]), 400, "messages[1].role"),
    ("H", with_(H, messages=[U, S]), 400, "messages[1].role"),
    ("H", with_(H, messages=[U, A]), 400, "messages"),                    # must end with the user
    ("H", with_(H, max_tokens=CONTEXT), 400, "max_tokens"),
    ("H", with_(H, max_completion_tokens=-1), 400, "max_completion_tokens"),
    ("H", with_(H, top_logprobs=3), 400, "top_logprobs"),                 # without logprobs
    ("H", with_(H, logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("H", with_(H, temperature=-0.1), 400, "temperature"),
    ("H", with_(H, n=65), 400, "n"),
    ("H", with_(H, prompt="x"), 400, "prompt"),                           # a completions field
    ("C", b"{", 400, None),
    ("C", b'{"model": "\xff\xfe"}', 400, None),                            # not UTF-8
    ("C", b"[1, 2]", 400, None),
    ("C", b"", 400, None),
    ("H", b"null", 400, None),
    ("C", json.dumps(with_(C, prompt="x" * (5 << 20))).encode(), 413, None),
    ("C", b'{"model": "%s", "prompt": %s}' % (MODEL.encode(), b"[" * 100_000 + b"]" * 100_000), 400, None),  # nesting
    ("C", b'{"model": "%s", "prompt": [[[%s]]]}' % (MODEL.encode(), b"[" * 980 + b"]" * 980), 400, None),
    ("C", b'{"model": "%s", "prompt": "x", "max_tokens": 1%s}' % (MODEL.encode(), b"0" * 5000), 400, None),
    ("C", with_(C, logit_bias={"1" + "0" * 5000: 1}), 400, "logit_bias"),
    ("H", with_(H, max_tokens=DROP, messages=[{"role": "user", "content": "x " * CONTEXT}]), 400, "messages"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


@pytest.mark.parametrize("endpoint,body,status,param", CASES, ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_malformed_request(http, server, endpoint, body, status, param):
    path = {"C": "/v1/completions", "H": "/v1/chat/completions"}[endpoint]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"], err
    assert not server.core.requests


def test_table_size():
    assert len(CASES) >= 40


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/completions", 405), ("POST", "/v1/embeddings", 404),
                                                ("DELETE", "/v1/models", 405)])
def test_unknown_routes(http, method, path, status):
    r = http.request(method, path)
    assert r.status_code == status and r.json()["error"]["message"]


def test_server_still_serves_after_bad_requests(http):
    r = http.post("/v1/completions", json=C)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
