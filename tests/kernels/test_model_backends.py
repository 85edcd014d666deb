"""The whole model on Triton kernels (interpreter on CPU), and on the C++ CPU kernels, gives the torch
backend's greedy tokens."""
import os

import pytest
import torch

from gemforge.engine.config import ModelConfig
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.model import GemmaModel
from gemforge.engine.runner import ModelRunner, WorkItem
from gemforge.engine.weights import random_weights
from gemforge.kernels._native import cpu_packs_linear
from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import quantize_int4, quantize_int8
from gemforge.kernels.registry import unavailable_reason

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=128)


def greedy(backend: str, prompts, steps: int, quantize: bool | str = False, device=None, dtype=torch.float32,
           model_out: list | None = None, cfg: ModelConfig = CFG, native: bool = True):
    """quantize: True puts every gate_up in int4; "mixed" also the qkv in int8, the down in
    asymmetric int4 and the tied embedding / LM head in int4 (o stays dense)."""
    w = random_weights(cfg, dtype, "cpu", seed=3, std=0.3)
    if quantize:
        for layer in w.layers:
            layer.gate_up = quantize_int4(layer.gate_up, group_size=32)
            if quantize == "mixed":
                layer.qkv = quantize_int8(layer.qkv)
                layer.down = quantize_int4(layer.down, group_size=32, symmetric=False)
    if quantize == "mixed":
        w.embed = quantize_int4(w.embed, group_size=32)  # (the tied LM head, as a quantized draft's)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    w = type(w)(w.embed.to(device), [type(l)(*(t.to(device) for t in vars(l).values())) for l in w.layers],
                w.final_norm.to(device))
    model = GemmaModel(cfg, w, dtype, device, backend)
    if not native:
        model.native_layers = None
    if model_out is not None:
        model_out.append(model)
    cache = KVCache(cfg.num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    runner = ModelRunner(model, cache)
    for i, p in enumerate(prompts):
        cache.blocks.append(i, len(p))
    logits = [runner.run([WorkItem(i, p, 0) for i, p in enumerate(prompts)])]
    toks = [logits[-1].argmax(-1).tolist()]
    for s in range(steps):
        items = []
        for i, p in enumerate(prompts):
            cache.blocks.append(i, 1)
            items.append(WorkItem(i, [toks[-1][i]], len(p) + s))
        logits.append(runner.run(items))
        toks.append(logits[-1].argmax(-1).tolist())
    return toks, torch.cat(logits)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_model_matches_torch_model(backend, quantize):
    if backend == "cpu" and unavailable_reason("attention", "cpu", "cpu"):
        pytest.skip(unavailable_reason("attention", "cpu", "cpu"))
    device = "cpu" if backend == "cpu" else None
    prompts = [[2, 5, 9, 11, 40, 3, 7], [2, 60], [2] + list(range(10, 29))]  # 19 tokens: crosses a block
    ref_toks, ref = greedy("torch", prompts, 4, quantize, device)
    toks, ours = greedy(backend, prompts, 4, quantize, device)
    assert toks == ref_toks
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.skipif(unavailable_reason("attention", "cpu", "cpu") is not None, reason="gemforge._C not built")
def test_bf16_model_on_cpu_kernels_matches_torch_model():
    """In bf16 the "cpu" backend packs every dense matrix (where _C has the AVX512-BF16 linear) and its
    logits stay within bf16 rounding of the torch backend's; the greedy tokens agree."""
    prompts = [[2, 5, 9, 11, 40, 3, 7], [2, 60], [2] + list(range(10, 29))]
    models = []
    ref_toks, ref = greedy("torch", prompts, 4, device="cpu", dtype=torch.bfloat16)
    toks, ours = greedy("cpu", prompts, 4, device="cpu", dtype=torch.bfloat16, model_out=models)
    w = models[0].w
    assert isinstance(w.layers[0].qkv, PackedWeight) == isinstance(w.embed, PackedWeight) == cpu_packs_linear()
    assert toks == ref_toks
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


CFG_32 = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                     num_kv_heads=1, head_dim=32, max_position_embeddings=128)  # the bf16 attention kernel's dims


# CodeGemma-2B's attention (8 query heads on one KV head of 256 dims) with a hidden size over one
# 1024-element K slice of the packed linear and an MLP width that is not a multiple of 64
CFG_2B_HEADS = ModelConfig(vocab_size=96, hidden_size=1280, intermediate_size=2064, num_layers=1, num_heads=8,
                           num_kv_heads=1, head_dim=256, max_position_embeddings=128)


@pytest.mark.skipif(not cpu_packs_linear(), reason="gemforge._C lacks the AVX512-BF16 kernels")
@pytest.mark.parametrize("cfg,quantize", [(CFG_32, False), (CFG_2B_HEADS, False), (CFG_32, "mixed")],
                         ids=["small", "2b-heads", "small-int8-int4"])
def test_native_layers_are_bit_identical_to_op_by_op(cfg, quantize):
    """bf16 on the C++ kernels with packed (or weight-only int8 / int4) weights runs all layers in one
    C++ call (NativeLayers): the logits of prefill and decode steps equal the op-by-op forward's exactly."""
    prompts = [[2, 5, 9, 11, 40, 3, 7], [2, 60], [2] + list(range(10, 29))]
    models = []
    toks, native = greedy("cpu", prompts, 5, quantize, device="cpu", dtype=torch.bfloat16, cfg=cfg, model_out=models)
    assert models[0].native_layers is not None
    ref_toks, ops = greedy("cpu", prompts, 5, quantize, device="cpu", dtype=torch.bfloat16, cfg=cfg, native=False)
    assert toks == ref_toks and torch.equal(native, ops)


@pytest.mark.skipif(not cpu_packs_linear(), reason="gemforge._C lacks the AVX512-BF16 kernels")
@pytest.mark.parametrize("case", ["float32", "torch-backend", "int8-odd-K", "head_dim-16"])
def test_native_layers_only_where_every_op_is_native(case):
    """Not where an op would run elsewhere: fp32, the torch backend, a quantized linear whose K the C++
    kernel does not take (here 2064, not a multiple of 32: torch runs it), a head_dim the bf16
    attention kernel does not take."""
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    cfg = {"head_dim-16": CFG, "int8-odd-K": CFG_2B_HEADS}.get(case, CFG_32)
    w = random_weights(cfg, dtype, "cpu", seed=3, std=0.3)
    if case == "int8-odd-K":
        w.layers[0].down = quantize_int8(w.layers[0].down)
    model = GemmaModel(cfg, w, dtype, "cpu", "torch" if case == "torch-backend" else "cpu")
    assert model.native_layers is None


@pytest.mark.skipif(not cpu_packs_linear(), reason="gemforge._C lacks the AVX512-BF16 kernels")
def test_native_layers_reject_bad_metadata():
    from gemforge.kernels import AttnMetadata
    model = GemmaModel(CFG_32, random_weights(CFG_32, torch.bfloat16, "cpu", seed=3), torch.bfloat16, "cpu", "cpu")
    cache = KVCache(CFG_32.num_layers, 4, 16, CFG_32.num_kv_heads, CFG_32.head_dim, torch.bfloat16, "cpu")
    meta = AttnMetadata(positions=torch.arange(3, dtype=torch.int32), cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                        context_lens=torch.tensor([3], dtype=torch.int32), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                        slot_mapping=torch.arange(3), max_query_len=3, max_context_len=3)
    h = torch.randn(3, CFG_32.hidden_size).bfloat16()
    with pytest.raises(ValueError, match=r"decoder_layers: meta.positions must be a contiguous CPU torch.int64"):
        model.native_layers(h, meta, cache)
    bad_table = AttnMetadata(**{**vars(meta), "positions": torch.arange(3), "block_tables": torch.tensor([[4]], dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"sequence 0: block 4 outside the cache's 4 blocks"):
        model.native_layers(h, bad_table, cache)
    with pytest.raises(ValueError, match=r"decoder_logits: logits row 5 outside the batch's 3 tokens"):
        model.native_layers.logits(h, h.clone(), torch.tensor([0, 5]))


# Multi-query attention with a head_dim the CUDA decode kernel takes, K of every linear a multiple of 64
CFG_64 = ModelConfig(vocab_size=96, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4,
                     num_kv_heads=1, head_dim=64, max_position_embeddings=128)


@pytest.mark.parametrize("tensor_cores, sequences, variant", [(False, 3, None), (False, 1, None), (True, 3, None),
                                                              (False, 1, "unfused"), (False, 1, "pdl")])
def test_model_on_emulated_cuda_kernels_matches_torch_model(emulated_cuda, monkeypatch, tensor_cores, sequences,
                                                            variant):
    """The "cuda" backend with its kernels on the emulated device of csrc/emu/ (CPU tensors; prefill attention
    and linears of more rows than its kernels take go to Triton's interpreter, dense bf16 linears to the packed
    CPU kernel), bf16 with int8 and int4 weights, with and without the tensor-core kernels: the torch backend's
    greedy tokens, logits within bf16 rounding. The int8 QKV projections make the norm before them and RoPE
    with the cache write after them, the int4 gate_up projections the norm and GeGLU, the int4 LM head the final
    norm, each in its own launch (kernels._native.FUSE_INTO_LINEARS), wherever a CUDA kernel runs them: the
    CUDA-core GEMV in one sequence's decode steps, the tensor-core kernel in steps of up to 4 tokens; under
    kernels._native.kernel_variant("unfused"), by kernels of their own; under "pdl" launched programmatically
    (on the emulated sm_90: each kernel's threads call prior_grids_done first, the GEMV prefetches before it)."""
    import gemforge.kernels._native as native
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present): prefill attention would need CUDA tensors")
    monkeypatch.setattr(native, "TENSOR_CORE_OPS", {"linear", "linear_int8", "linear_int4", "attention"}
                        if tensor_cores else set())
    launches = []  # (kernel, geglu, norm, rope) of each quantized linear launch
    for name in ("w4a16_gemm", "w4a16_mma", "w8a16_gemm", "w8a16_mma"):
        def counted(*args, _name=name, _real=getattr(emulated_cuda, name)):
            # (..., geglu, norm_weight, residual, r_out, eps, rope, dtype, stream)
            launches.append((_name, args[-8], args[-7] != 0, args[-3][0] != 0))
            return _real(*args)
        monkeypatch.setattr(emulated_cuda, name, counted)
    prompts = [[2, 5, 9, 11, 40, 3, 7], [2, 60], [2] + list(range(10, 29))][:sequences]
    ref_toks, ref = greedy("torch", prompts, 4, "mixed", device="cpu", dtype=torch.bfloat16, cfg=CFG_64)
    with native.kernel_variant(variant):
        assert emulated_cuda.programmatic_launch() == (variant == "pdl")
        toks, ours = greedy("cuda", prompts, 4, "mixed", device="cpu", dtype=torch.bfloat16, cfg=CFG_64)
    assert not emulated_cuda.programmatic_launch()
    kind = "mma" if tensor_cores else "gemm" if sequences == 1 else None  # (else Triton's GEMM)
    int8, int4 = f"w8a16_{kind}", f"w4a16_{kind}"
    assert {name for name, *_ in launches} == ({int8, int4} if kind else set()), launches
    if variant == "unfused":
        assert {tuple(fused) for _, *fused in launches} == {(False, False, False)}, launches
    elif kind:  # (steps of at most 4 tokens) the QKV projections with the input norm and RoPE + cache write,
        assert (int8, False, True, True) in launches, launches  # gate_up with the post-attention norm and
        assert (int4, True, True, False) in launches, launches  # GeGLU, the int4 LM head with the final norm
        assert (int4, False, True, False) in launches, launches
    assert toks == ref_toks
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_kernel_variant_sets_the_choices_and_restores_them():
    """kernels._native.kernel_variant: each variant's kernels while it lasts, the defaults again after it (also
    when its body raises); an unknown name is refused."""
    import gemforge.kernels._native as native
    from gemforge.kernels.registry import preference

    def choices():
        return set(native.TENSOR_CORE_OPS), preference("linear"), native.FUSE_INTO_LINEARS, native.PROGRAMMATIC_LAUNCH

    defaults = choices()
    ops, linear, fuse, pdl = defaults
    expect = {"mma": (ops | {"linear_int4", "linear_int8"}, linear, fuse, pdl),
              "gemv": (ops, ("cuda", "torch"), fuse, pdl), "dmma": (ops | {"linear"}, ("cuda", "torch"), fuse, pdl),
              "unfused": (ops, linear, False, pdl), "pdl": (ops, linear, fuse, True), None: defaults}
    assert set(expect) == {None, *native.KERNEL_VARIANTS}
    for variant, want in expect.items():
        with pytest.raises(KeyError), native.kernel_variant(variant):
            assert choices() == want
            raise KeyError
        assert choices() == defaults
    with pytest.raises(ValueError, match="unknown variant 'fast'"), native.kernel_variant("fast"):
        pass
