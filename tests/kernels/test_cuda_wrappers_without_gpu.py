"""Without a GPU, where _C was built with its CUDA kernels: every "cuda" wrapper, its device check
bypassed, must get through validation and argument marshalling to the kernel launch, which then
fails cleanly (RuntimeError from the CUDA runtime). A wrapper whose arguments no longer match its
binding fails here with a TypeError, in CI, before any GPU session."""
import importlib

import pytest
import torch

from gemforge.kernels import AttnMetadata
from gemforge.kernels.quant import quantize_int4, quantize_int8


def _skip_reason():
    if torch.cuda.is_available():
        return "a GPU is present: tests/gpu runs these wrappers for real"
    try:
        ext = importlib.import_module("gemforge.kernels._C")
    except ImportError:
        return "gemforge._C is not built"
    return None if getattr(ext, "WITH_CUDA", False) else "gemforge._C was built without CUDA"


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
BF = torch.bfloat16


@pytest.fixture
def native(cuda_wrappers_on_cpu):
    return cuda_wrappers_on_cpu


def _decode_meta(n):
    return AttnMetadata(positions=torch.arange(n), cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32),
                        context_lens=torch.full((n,), 20, dtype=torch.int32),
                        block_tables=torch.arange(2 * n, dtype=torch.int32).view(n, 2),
                        slot_mapping=torch.arange(n), max_query_len=1, max_context_len=20)


CALLS = {
    "rms_norm": lambda N: N.rms_norm_cuda(torch.randn(3, 64, dtype=BF), torch.randn(64, dtype=BF), 1e-6,
                                          torch.randn(3, 64, dtype=BF)),
    "gelu_and_mul": lambda N: N.gelu_and_mul_cuda(torch.randn(3, 128, dtype=BF)),
    "rotary": lambda N: N.rotary_cuda(torch.randn(3, 4, 64, dtype=BF), torch.randn(3, 2, 64, dtype=BF),
                                      torch.arange(3), 10000.0),
    "write_kv": lambda N: N.write_kv_cuda(torch.randn(3, 2, 64, dtype=BF), torch.randn(3, 2, 64, dtype=BF),
                                          torch.zeros(4, 16, 2, 64, dtype=BF), torch.zeros(4, 16, 2, 64, dtype=BF),
                                          torch.arange(3)),
    "attention": lambda N: N.attention_cuda(torch.randn(3, 4, 64, dtype=BF), torch.zeros(8, 16, 2, 64, dtype=BF),
                                            torch.zeros(8, 16, 2, 64, dtype=BF), _decode_meta(3), 0.125),
    "attention_tensor_cores": lambda N: N.attention_cuda(
        torch.randn(3, 4, 64, dtype=BF), torch.zeros(8, 16, 2, 64, dtype=BF), torch.zeros(8, 16, 2, 64, dtype=BF),
        _decode_meta(3), 0.125, tensor_cores=True),
    "linear": lambda N: N.linear_cuda(torch.randn(1, 64, dtype=BF), torch.randn(40, 64, dtype=BF),
                                      torch.randn(40, dtype=BF)),
    "linear_tensor_cores": lambda N: N.linear_cuda(torch.randn(5, 64, dtype=BF), torch.randn(40, 64, dtype=BF),
                                                   torch.randn(40, dtype=BF), tensor_cores=True),
    "linear_int8": lambda N: N.linear_int8_cuda(torch.randn(1, 64, dtype=BF), *_quant("int8")),
    "linear_int4": lambda N: N.linear_int4_cuda(torch.randn(1, 128, dtype=BF), *_quant("int4")),
    "linear_int4_tensor_cores": lambda N: N.linear_int4_cuda(torch.randn(3, 128, dtype=BF), *_quant("int4"),
                                                             tensor_cores=True),
    "linear_int8_tensor_cores": lambda N: N.linear_int8_cuda(torch.randn(3, 64, dtype=BF), *_quant("int8"),
                                                             tensor_cores=True),
}


def _quant(fmt):
    if fmt == "int8":
        qw = quantize_int8(torch.randn(32, 64).to(BF))
    else:
        qw = quantize_int4(torch.randn(32, 128).to(BF), group_size=64)
    return qw.qweight, qw.scales, qw.zeros, qw.group_size


@pytest.mark.parametrize("op", CALLS)
def test_cuda_wrapper_reaches_the_launch(native, op):
    with pytest.raises(RuntimeError, match=r"gemforge\._C\.\w+: CUDA error"):
        CALLS[op](native)


class _Kernels:
    """Stands in for _C: records which quantized-linear kernel a wrapper launched."""
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


@pytest.mark.parametrize("flag", (False, True))
def test_int4_kernel_choice(native, monkeypatch, flag):
    """tensor_cores=None follows TENSOR_CORE_OPS; the tensor-core kernel takes up to 16 rows of a
    16-byte aligned x (k_split passed through); otherwise one row goes to the CUDA-core GEMV."""
    fake = _Kernels()
    monkeypatch.setattr(native, "_ext", lambda: fake)
    monkeypatch.setattr(native, "TENSOR_CORE_OPS", {"linear_int4"} if flag else set())
    qweight, scales, zeros, group = _quant("int4")
    native.linear_int4_cuda(torch.randn(1, 128, dtype=BF), qweight, scales, zeros, group)
    native.linear_int4_cuda(torch.randn(16, 128, dtype=BF), qweight, scales, zeros, group, tensor_cores=True,
                            k_split=4)
    native.linear_int4_cuda(torch.randn(129, dtype=BF)[1:].view(1, 128), qweight, scales, zeros, group,
                            tensor_cores=True)  # misaligned x
    names = [name for name, _ in fake.calls]
    assert names == ["w4a16_mma" if flag else "w4a16_gemm", "w4a16_mma", "w4a16_gemm"], names
    assert fake.calls[1][1][5:11] == (0, 16, 32, 128, 64, 4)  # bias, M, N, K, group, k_split


def test_dense_kernel_choice(native, monkeypatch):
    """Dense: one row to the CUDA GEMV, up to 16 rows (K % 32 == 0) to the tensor-core kernel when asked
    for or listed in TENSOR_CORE_OPS; more rows, or K not a multiple of 32, go to torch."""
    fake = _Kernels()
    monkeypatch.setattr(native, "_ext", lambda: fake)
    w = torch.randn(40, 64, dtype=BF)
    native.linear_cuda(torch.randn(1, 64, dtype=BF), w)
    native.linear_cuda(torch.randn(16, 64, dtype=BF), w, tensor_cores=True, k_split=2)
    monkeypatch.setattr(native, "TENSOR_CORE_OPS", {"linear"})
    native.linear_cuda(torch.randn(1, 64, dtype=BF), w)
    assert native.linear_cuda(torch.randn(17, 64, dtype=BF), w).shape == (17, 40)  # (torch)
    assert native.linear_cuda(torch.randn(3, 40, dtype=BF), torch.randn(40, 40, dtype=BF)).shape == (3, 40)
    assert [name for name, _ in fake.calls] == ["dense_gemv", "dense_mma", "dense_mma"], fake.calls
    assert fake.calls[1][1][3:8] == (0, 16, 40, 64, 2)  # bias, M, N, K, k_split
