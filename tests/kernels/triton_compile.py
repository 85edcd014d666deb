"""Compile every Triton kernel launch the engine makes, for real NVIDIA targets, on a machine without
a GPU, and check that each fits the target's shared memory.

    python tests/kernels/triton_compile.py [--arch 90 --arch 80] [--json PATH]

The Triton op functions run on CPU tensors with Triton's own NVIDIA backend behind a stand-in driver
that reports the target GPU: each launch is compiled (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the
ptxas that Triton bundles) instead of run. The launches are those of the CodeGemma 2B and 7B shapes,
the bundled nano pair's small head dims, bf16/fp16/fp32, decode / verify / prefill / mixed attention
batches, and the int8/int4 linears at 1..512 rows. Each compiled kernel's shared memory, registers
and spilled bytes (from Triton's own ptxas -v log) are listed. Exit status 1 when a launch fails
to compile, needs more shared memory per block than the target has, or, for the CodeGemma shapes in
16 bits on sm_90, spills more than SPILL_LIMIT bytes per thread, or, launched programmatically (PDL), does
not wait for the previous kernel (griddepcontrol.wait). Every kernel is compiled afresh
(Triton's cache would skip ptxas and its log).

Run it with another Triton on the path to check that version too (`make check-triton36`: the GPU
machine's torch ships Triton 3.6). TRITON_INTERPRET must be unset: the interpreter compiles nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).parent))
from cuda_resources import ptxas_log_resources  # noqa: E402

# Largest dynamic shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 90: 232448}
# Bytes a serving launch may spill per thread on sm_90 (the H100/H200 we serve on and measure): one
# 8-byte slot. Listed, not held to it: sm_80 (with Triton 3.6 the 7B's bf16 prefill attention and the
# int4 GEMM at 512 rows spill 52-84 B there, unmeasured), fp32 attention (FMA dots at fp32 precision:
# KBs), the nano pair.
SPILL_LIMIT = 8
# The H100's SM count, for the ops' split-K decisions (they ask the device; there is none here).
NUM_SMS = 132


@dataclass
class Compiled:
    kernel: str
    arch: int
    case: str
    constexprs: dict
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0
    registers: int | None = None
    spilled: int | None = None
    error: str | None = None
    cases: list = field(default_factory=list)

    @property
    def serving(self) -> bool:
        """Launched for a CodeGemma shape in 16 bits: what a GPU serves."""
        return any(c.startswith("codegemma-") and "float32" not in c for c in self.cases)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.shared <= SHARED_LIMIT[self.arch]
                and not (self.serving and self.arch >= 90 and (self.spilled is None or self.spilled > SPILL_LIMIT)))


class _CompileOnlyDriver:
    """What JITFunction.run asks of the active driver, for a GPU that is not there."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def _pdl_error(ptx: str) -> str | None:
    """What is wrong with a programmatically launched kernel's PTX: no griddepcontrol.wait, or global memory
    read or written before it (the previous kernel may still be writing)."""
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0:
        return "launched programmatically (PDL) but its PTX has no griddepcontrol.wait"
    early = re.search(r"\b(ld|st|atom|red|cp\.async)\.global\S*", ptx[:wait])
    return f"launched programmatically (PDL) but {early.group(0)} comes before griddepcontrol.wait" if early else None


@contextlib.contextmanager
def compile_only(arch: int, records: dict, case: list):
    """Within the block, a Triton launch compiles for sm_`arch` and records a `Compiled` (keyed by
    kernel and specialisation) instead of running; a compile error is recorded, not raised."""
    real_run = JITFunction.run
    fresh = set()

    def run(self, *args, grid, warmup, **kwargs):
        if self not in fresh:  # kernels compiled for another arch earlier in this process
            self.device_caches.clear()
            fresh.add(self)
        opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        consts = {k: v for k, v in kwargs.items() if k not in opts}
        key = (self.__name__, arch, repr(sorted(consts.items())), repr(sorted(opts.items())),
               tuple(str(getattr(a, "dtype", type(a).__name__)) for a in args))
        rec = records.get(key)
        if rec is None:
            rec = records[key] = Compiled(self.__name__, arch, case[0], consts)
            try:
                log = io.StringIO()  # Triton prints its ptxas -v log here (knobs.nvidia.dump_ptxas_log)
                with contextlib.redirect_stdout(log):
                    k = real_run(self, *args, grid=grid, warmup=True, **kwargs)
                meta = k.metadata
                rec.num_warps, rec.num_stages, rec.shared = meta.num_warps, meta.num_stages, meta.shared
                res = ptxas_log_resources(log.getvalue())
                if res is not None:
                    rec.registers, rec.spilled = res
                if consts.get("PDL"):
                    rec.error = _pdl_error(k.asm["ptx"])
            except Exception as e:  # noqa: BLE001  reported per launch
                rec.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        rec.cases.append(case[0])
        return None

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = run
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True  # a cached kernel has no log
    try:
        yield
    finally:
        JITFunction.run = real_run
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        # (the stand-in driver stays: without a GPU Triton has no other)


def _shapes():
    """(name, hidden, heads, kv_heads, head_dim, intermediate): the real models and the nano pair."""
    from gemforge.engine.config import preset

    for name in ("codegemma-2b", "codegemma-7b"):
        c = preset(name)
        yield name, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    yield "nano", 256, 4, 4, 64, 1024
    yield "nano-draft", 128, 4, 1, 32, 384


def _attention_batches():
    """(label, new tokens per sequence, context per sequence): the batch kinds the engine forms."""
    yield "decode 1 x ctx 8192", [1], [8192]
    yield "decode 64 x ctx 2048", [1] * 64, [2048] * 64
    yield "decode 256 x ctx 512", [1] * 256, [512] * 256
    yield "verify 8 x (k=4)", [5] * 8, [1029] * 8
    yield "verify 1 x (k=8)", [9], [4000]
    yield "prefill 512", [512], [512]
    yield "mixed prefill 77 + 5 decodes", [77] + [1] * 5, [77] + [600] * 5
    # a ragged CUDA graph's layout (engine/graphs.py): 37 prompt tokens + 3 decodes, padded to 64 tokens by a
    # padding sequence, then sequences of no tokens up to the bucket of 8, captured for a query length of 64
    yield "ragged graph 64 tokens, 8 sequences", [37, 1, 1, 1, 24, 0, 0, 0], [37, 600, 600, 600, 24, 0, 0, 0]


@contextlib.contextmanager
def _programmatic():
    """Attention launched as on an sm_90 GPU with kernels._native.PROGRAMMATIC_LAUNCH on (CPU tensors say not)."""
    attention = importlib.import_module("gemforge.kernels.attention")  # (the package's `attention` is the op)
    real = attention.pdl_options
    attention.pdl_options = lambda t: {"PDL": True, "launch_pdl": True}
    try:
        yield
    finally:
        attention.pdl_options = real


def _cases(dtypes, arch: int):
    """(label, thunk): each thunk calls one Triton op function on CPU tensors of a real launch shape
    (the kernels never run, so the tensors are left uninitialised and the block tables all say 0); on sm_90
    the 16-bit batch-1 decode attention (split-K and its reduction) programmatic too."""
    from gemforge.kernels.attention import AttnMetadata
    from gemforge.kernels.registry import select

    op = lambda name: select(name, "triton", "cuda")  # noqa: E731
    e = lambda *shape, dtype: torch.empty(*shape, dtype=dtype)  # noqa: E731
    ids = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731
    for name, hidden, hq, hk, d, inter in _shapes():
        for dt in dtypes:
            tag = f"{name} {str(dt).removeprefix('torch.')}"
            yield f"{tag} rms_norm", lambda dt=dt: op("rms_norm")(e(5, hidden, dtype=dt), e(hidden, dtype=dt), 1e-6)
            yield f"{tag} rms_norm+residual", lambda dt=dt: op("rms_norm")(
                e(5, hidden, dtype=dt), e(hidden, dtype=dt), 1e-6, e(5, hidden, dtype=dt))
            yield f"{tag} gelu_and_mul", lambda dt=dt: op("gelu_and_mul")(e(5, 2 * inter, dtype=dt))
            yield f"{tag} rotary", lambda dt=dt: op("rotary")(e(5, hq, d, dtype=dt), e(5, hk, d, dtype=dt), ids(5), 1e4)
            for page in (16, 32):
                yield f"{tag} write_kv page {page}", lambda dt=dt, page=page: op("write_kv")(
                    e(3, hk, d, dtype=dt), e(3, hk, d, dtype=dt), e(8, page, hk, d, dtype=dt),
                    e(8, page, hk, d, dtype=dt), ids(3))
                yield f"{tag} rotary_write_kv page {page}", lambda dt=dt, page=page: op("rotary_write_kv")(
                    e(3, hq + 2 * hk, d, dtype=dt)[:, :hq], e(3, hq + 2 * hk, d, dtype=dt)[:, hq:hq + hk],
                    e(3, hq + 2 * hk, d, dtype=dt)[:, hq + hk:], ids(3), 1e4, e(8, page, hk, d, dtype=dt),
                    e(8, page, hk, d, dtype=dt), ids(3))
            for label, new, ctx in _attention_batches():
                page = 16
                meta = AttnMetadata(
                    positions=ids(sum(new)), cu_seqlens_q=torch.tensor([0] + new).cumsum(0).to(torch.int32),
                    context_lens=torch.tensor(ctx, dtype=torch.int32),
                    block_tables=torch.zeros(len(new), -(-max(ctx) // page), dtype=torch.int32),
                    slot_mapping=ids(sum(new)), max_query_len=64 if label.startswith("ragged") else max(new),
                    max_context_len=8192 if label.startswith("ragged") else max(ctx))
                attend = lambda meta=meta, dt=dt, page=page: op("attention")(  # noqa: E731
                    e(meta.num_tokens, hq, d, dtype=dt), e(8, page, hk, d, dtype=dt), e(8, page, hk, d, dtype=dt),
                    meta, d ** -0.5)
                yield f"{tag} attention {label}", attend
                if arch >= 90 and dt != torch.float32 and label.startswith("decode 1 "):  # (what PDL is for)
                    def programmatic(attend=attend):
                        with _programmatic():
                            attend()
                    yield f"{tag} attention {label} programmatic", programmatic
            if dt == torch.float32:
                continue  # quantized weights serve 16-bit activations
            for proj, (n, k) in {"qkv": ((hq + 2 * hk) * d, hidden), "o": (hidden, hq * d),
                                 "gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
                for m in (1, 16, 64, 512):
                    yield f"{tag} int8 {proj} M={m}", lambda m=m, n=n, k=k, dt=dt: op("linear_int8")(
                        e(m, k, dtype=dt), e(n, k, dtype=torch.int8), e(n, dtype=dt), None, None)
                    for g, zeros in ((128, False), (128, True), (32, False)):
                        yield (f"{tag} int4 g{g}{' +zeros' if zeros else ''} {proj} M={m}",
                               lambda m=m, n=n, k=k, g=g, z=zeros, dt=dt: op("linear_int4")(
                                   e(m, k, dtype=dt), e(n, k // 2, dtype=torch.uint8), e(n, k // g, dtype=dt),
                                   e(n, k // g, dtype=dt) if z else None, g))


def check(archs=(90, 80), dtypes=(torch.bfloat16, torch.float32)) -> list[Compiled]:
    """Compile every launch of `_cases` for each arch; one record per kernel specialisation."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    for name in ("attention", "linear"):  # (the package's attention / linear names are the op functions)
        importlib.import_module(f"gemforge.kernels.{name}")._num_sms = lambda device: NUM_SMS
    records: dict = {}
    for arch in archs:
        case = [""]
        with compile_only(arch, records, case):
            for label, thunk in _cases(dtypes, arch):
                case[0] = label
                thunk()
    return list(records.values())


def _table(recs: list[Compiled]) -> str:
    lines = [f"{'kernel':<22} {'sm':>3} {'warps':>5} {'stages':>6} {'shared KiB':>10} {'regs':>4} {'spill B':>7}  "
             f"first case / error"]
    for r in sorted(recs, key=lambda r: (r.kernel, r.arch, -r.shared)):
        flag = "" if r.ok else "  <-- " + (
            r.error or (f"needs {r.shared} B of shared memory, sm_{r.arch} has {SHARED_LIMIT[r.arch]}"
                        if r.shared > SHARED_LIMIT[r.arch] else
                        f"spills {r.spilled} B per thread" if r.spilled is not None else "no ptxas log to read"))
        lines.append(f"{r.kernel:<22} {r.arch:>3} {r.num_warps:>5} {r.num_stages:>6} {r.shared / 1024:>10.1f} "
                     f"{r.registers if r.registers is not None else '?':>4} "
                     f"{r.spilled if r.spilled is not None else '?':>7}  {r.case}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                    help="compute capability x10 to compile for (repeatable; default 90 and 80)")
    ap.add_argument("--json", type=Path, help="write every record here")
    args = ap.parse_args(argv)
    recs = check(tuple(args.arch or (90, 80)))
    print(f"Triton {triton.__version__}, torch {torch.__version__}")
    print(_table(recs))
    bad = [r for r in recs if not r.ok]
    print(f"{len(recs)} kernel specialisations compiled for sm_{'/sm_'.join(map(str, args.arch or (90, 80)))} "
          f"from {sum(len(r.cases) for r in recs)} launches: "
          + ("all fit" if not bad else f"{len(bad)} FAILED")
          + f"; {sum(1 for r in recs if r.spilled)} spill, "
            f"{sum(1 for r in recs if r.spilled and r.serving)} of them serving launches")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "records": [asdict(r) for r in recs]}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
