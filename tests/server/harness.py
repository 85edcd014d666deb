"""Test harness: real uvicorn servers on 127.0.0.1 (free ports) in background threads, each over its
own AsyncEngine (an engine's loop lives in its server's event loop), and a tiny checkpoint writer."""
import glob
import socket
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gemforge.engine.async_engine import AsyncEngine
from gemforge.engine.config import ModelConfig
from gemforge.engine.engine import Engine, EngineConfig
from gemforge.engine.loader import save_checkpoint
from gemforge.engine.server.app import build_app
from gemforge.engine.tokenizer import train_tokenizer
from gemforge.engine.weights import random_weights

MODEL = "tiny-codegemma"
TIMEOUT = 30.0
CONTEXT = 512


def write_checkpoint(d: Path) -> Path:
    """A tiny Gemma (2 layers, MQA) with random weights large enough for clear greedy argmaxes."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:60]
    tok = train_tokenizer(files, d / "tok" / "tokenizer", vocab_size=1200, max_chars=600_000)
    cfg = ModelConfig(vocab_size=1200, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=1, head_dim=32, max_position_embeddings=CONTEXT, dtype="float32")
    return save_checkpoint(d / "model", cfg, random_weights(cfg, torch.float32, seed=0, std=0.15),
                           tokenizer_model=tok)


@dataclass
class Server:
    url: str
    engine: AsyncEngine
    server: object
    thread: threading.Thread

    @property
    def core(self) -> Engine:
        return self.engine.engine

    def client(self, api_key: str = "unused", timeout: float = TIMEOUT):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def async_client(self):
        import openai
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine holds no request and no KV block (aborts are applied between steps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.core.requests and self.core.cache.blocks.num_used == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine not idle: {len(self.core.requests)} requests, "
                             f"{self.core.cache.blocks.num_used} blocks in use")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(checkpoint, api_key=None, kv_cache_tokens=4096, engine_kw=None, **app_kw) -> Server:
    import uvicorn

    config = EngineConfig(dtype="float32", device="cpu", kv_cache_tokens=kv_cache_tokens, **(engine_kw or {}))
    engine = AsyncEngine(Engine(checkpoint, config, progress=False), stall_seconds=5.0)
    app = build_app(engine, MODEL, api_key=api_key, **app_kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return Server(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread)


