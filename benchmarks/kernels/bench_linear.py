"""Weight-only quantized linear (W8A16, W4A16 g128) on the CodeGemma-2B / 7B projections.

On CUDA, per (model, projection, rows, format) the subject is our Triton kernel; its peers are bf16
F.linear on the dense weight, torch's own torch._weight_int8pack_mm / torch._weight_int4pack_mm
where this torch build runs them, and our torch backend (dequantize, then matmul). The bytes are the
subject's: packed weight + scales (+ zeros) + bf16 activations in and out, so every entry's GB/s is
an effective bandwidth over the quantized weight (bf16 F.linear really moves 2x / 4x more) and
speedup_vs_bf16 is the headline. On CPU: the nano model's shapes through the "cpu" backend (the C++
kernel over the stored layout, bf16) against torch's own CPU weight-only kernels and our torch
backend, and the dense bf16 projections through the "cpu" backend (the C++ linear over a
PackedWeight) against torch's F.linear and oneDNN on a weight prepacked into its own layout.
"""
import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, DTYPE, MODELS, ON_GPU, TOKENS, compare, nbytes, op_impls

from gemforge.kernels import select
from gemforge.kernels._native import cpu_packs_linear
from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import quantize_int4, quantize_int8, unpack_int4

ROWS = (1, 8, 64, 512) if ON_GPU else TOKENS
GROUP = 128


def _projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the model's linear layers (y = x @ W^T, W [N, K])."""
    h, d, inter = cfg["hidden"], cfg["head_dim"], cfg["inter"]
    return {"qkv": ((cfg["heads"] + 2 * cfg["kv_heads"]) * d, h), "o": (h, cfg["heads"] * d),
            "gate_up": (2 * inter, h), "down": (h, inter)}


CASES = [(model, proj, n, k) for model, cfg in MODELS.items() for proj, (n, k) in _projections(cfg).items()]


def _torch_native(x, qw):
    """torch's weight-only kernel on the same weight, or None where this torch build lacks it. Its
    int4 scales and zeros are [K/g, N, 2] with W = (q - 8) * scale + zero; its int4 weight layout is
    its own (CUDA: from bytes, high nibble first; CPU: from the codes as int32)."""
    try:
        if qw.fmt == "int8":
            fn = lambda: torch._weight_int8pack_mm(x, qw.qweight, qw.scales)  # noqa: E731
        else:
            q = unpack_int4(qw.qweight)
            sz = torch.stack([qw.scales.t(), torch.zeros_like(qw.scales.t())], dim=-1).contiguous()
            if x.is_cuda:
                packed = torch._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8)
                fn = lambda: torch._weight_int4pack_mm(x, packed, qw.group_size, sz)  # noqa: E731
            else:
                packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)
                fn = lambda: torch._weight_int4pack_mm_for_cpu(x, packed, qw.group_size, sz)  # noqa: E731
        fn()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return fn


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("model,proj,n,k", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_linear_quant(benchmark, model, proj, n, k, rows, fmt):
    benchmark.group = f"linear-{model}-{proj}"
    x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, group_size=GROUP)
    args = (x, qw.qweight, qw.scales, qw.zeros, qw.group_size, None)
    ref = select(f"linear_{fmt}", "torch", DEVICE)
    if ON_GPU:
        tri = select(f"linear_{fmt}", "triton", DEVICE)
        impls = {"triton": lambda: tri(*args), "bf16": lambda: F.linear(x, w),
                 "torch_native": _torch_native(x, qw), "torch": lambda: ref(*args)}
    else:  # the C++ kernel where it takes the case (bf16 x), torch's own CPU kernel, the dequantizing reference
        impls = {"torch_native": _torch_native(x, qw), "torch": lambda: ref(*args)}
        if DTYPE == torch.bfloat16 and cpu_packs_linear():
            cpu = select(f"linear_{fmt}", "cpu", DEVICE)
            impls = {"cpu": lambda: cpu(*args), **impls}
    benchmark.extra_info.update(model=model, proj=proj, n=n, k=k, rows=rows, fmt=fmt)
    expect = ref(*args).float()
    for name in ("triton", "cpu", "torch_native"):  # the peers must compute the same product
        if impls.get(name) is not None:
            rel = (impls[name]().float() - expect).abs().max() / expect.abs().max()
            benchmark.extra_info[f"{name}_max_rel_err"] = float(rel)
    compare(benchmark, impls, qw.nbytes + 2 * rows * (k + n))


def _onednn_prepacked(x, w):
    """torch's oneDNN GEMM on a weight reordered once into its own blocked layout (what inductor's
    CPU freezing passes use), or None where this torch build lacks the ops."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
        fn()
    except (RuntimeError, AttributeError):
        return None
    return fn


@pytest.mark.skipif(ON_GPU, reason="dense linear is cuBLAS on a GPU: there is no gemforge kernel to time")
@pytest.mark.parametrize("rows", TOKENS)
@pytest.mark.parametrize("model,proj,n,k", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_linear_dense_cpu(benchmark, model, proj, n, k, rows):
    benchmark.group = f"linear-dense-{model}-{proj}"
    x = torch.randn(rows, k, dtype=DTYPE)
    w = torch.randn(n, k, dtype=DTYPE) * 0.02
    benchmark.extra_info.update(model=model, proj=proj, n=n, k=k, rows=rows)
    impls = {"torch": lambda: F.linear(x, w), "onednn_prepacked": _onednn_prepacked(x, w)}
    if DTYPE == torch.bfloat16 and cpu_packs_linear():
        packed, cpu = PackedWeight.pack(w), select("linear_packed", "cpu", DEVICE)
        impls = {"cpu": lambda: cpu(x, packed), **impls}
    compare(benchmark, impls, nbytes(x, w) + rows * n * x.element_size())
