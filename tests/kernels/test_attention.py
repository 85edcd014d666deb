"""write_kv and paged attention: the Triton kernels (interpreter on CPU) and the C++ CPU kernels against
the torch references."""
import importlib
from dataclasses import replace
import math

import pytest
import torch
from numerics import DTYPES, assert_close

from gemforge.kernels import AttnMetadata, attention, select, write_kv
from gemforge.kernels.attention import _attn_config, _num_partitions, attention_ref, attention_triton, write_kv_triton

attention_mod = importlib.import_module("gemforge.kernels.attention")  # the package re-exports the function


def make_batch(seqs, hq, hk, d, block_size, dtype, device, seed):
    """A flat batch for `seqs` = [(new tokens n, context length ctx), ...] over a random paged cache
    whose blocks are handed out in a random order. Returns (q, k_cache, v_cache, meta)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(ctx / block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_per_seq) + 2  # two blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seqs), max(blocks_per_seq, default=1)), -1, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = perm[used:used + nb]
        used += nb
    positions, slots = [], []
    for b, (n, ctx) in enumerate(seqs):
        pos = torch.arange(ctx - n, ctx)
        positions.append(pos)
        slots.append(tables[b, pos // block_size].long() * block_size + pos % block_size)
    lens = torch.tensor([n for n, _ in seqs], dtype=torch.int32)
    meta = AttnMetadata(
        positions=torch.cat(positions).long().to(device) if seqs else torch.empty(0, dtype=torch.long, device=device),
        cu_seqlens_q=torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).to(device),
        context_lens=torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32).to(device),
        block_tables=tables.to(device),
        slot_mapping=torch.cat(slots).to(device) if seqs else torch.empty(0, dtype=torch.long, device=device),
        max_query_len=max((n for n, _ in seqs), default=0),
        max_context_len=max((ctx for _, ctx in seqs), default=0),
    )
    cache_shape = (num_blocks, block_size, hk, d)
    k_cache = torch.randn(cache_shape, generator=g).to(device, dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(device, dtype)
    # q as the leading head slice of a fused qkv output: rows strided, as the model passes it
    q = torch.randn(meta.num_tokens, hq + 2 * hk, d, generator=g).to(device, dtype)[:, :hq]
    return q, k_cache, v_cache, meta


def check_attention(seqs, hq, hk, d, block_size, dtype, kernel, seed=0, max_context_len=None):
    """`max_context_len`: launch as if for a longer context than the batch's (as CUDA graphs do)."""
    q, k_cache, v_cache, meta = make_batch(seqs, hq, hk, d, block_size, dtype, kernel.device, seed)
    if max_context_len is not None:
        meta = replace(meta, max_context_len=max_context_len)
    scale = d ** -0.5
    out = attention(q, k_cache, v_cache, meta, scale, backend=kernel.backend)
    ref32 = attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    assert_close(out, ref32, attention_ref(q, k_cache, v_cache, meta, scale))
    return meta


@pytest.fixture
def big_gpu(monkeypatch):
    """Pretend the device has many SMs, so that small batches split their contexts into partitions."""
    monkeypatch.setattr(attention_mod, "_num_sms", lambda device: 1000)


def test_select_picks_triton(device):
    assert select("attention", "triton", device) is attention_triton
    assert select("write_kv", "triton", device) is write_kv_triton


# prefill (whole prompt), chunked prefill, decode, verify window, 1- and 2-token prompts
MIXED = [(17, 17), (1, 40), (5, 45), (9, 33), (1, 1), (2, 2)]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (8, 1)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_mixed_batch(heads, dtype, kernel, nan_empty):
    check_attention(MIXED, *HEADS[heads], d=16, block_size=16, dtype=dtype, kernel=kernel)


@pytest.mark.parametrize("seqs", [MIXED + [(20, 37)], [(37, 45)]], ids=["mixed", "one-prefill"])
@pytest.mark.parametrize("d", [32, 64, 96, 160])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_mixed_batch_bf16_head_dims(heads, d, seqs, kernel, nan_empty):
    """bf16 at head_dims of the C++ bf16 kernel (multiples of 32): row groups of 8, 4, 2 and 1 rows;
    a group spanning query tokens that see different numbers of keys (one sequence's prefill, whose
    kv heads are split across tasks, or more rows per group than heads per token)."""
    check_attention(seqs, *HEADS[heads], d=d, block_size=16, dtype=torch.bfloat16, kernel=kernel, seed=d)


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_mixed_batch_block_32_head_dim_48(heads, kernel, nan_empty):
    """Block size 32 and a head_dim that is not a power of two (padded and masked)."""
    check_attention(MIXED, *HEADS[heads], d=48, block_size=32, dtype=torch.bfloat16, kernel=kernel, seed=1)


@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_long_prefill_several_tiles(heads, kernel, nan_empty):
    """300 new tokens span several query tiles of one sequence (tile -> sequence by binary search)."""
    hq, hk = HEADS[heads]
    meta = check_attention([(300, 300), (3, 20)], hq, hk, d=16, block_size=16, dtype=torch.float16,
                           kernel=kernel, seed=2)
    if kernel.backend == "triton":
        assert meta.max_query_len > _attn_config(16, hq // hk, meta.max_query_len)["QT"]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_decode_split_k(heads, block_size, kernel, nan_empty, big_gpu):
    """Decode-only batch: the split-K path with many partitions per sequence (more than one chunk of the
    reduction), some partitions of the shorter sequences empty (their scratch stays NaN, to be ignored)."""
    hq, hk = HEADS[heads]
    seqs = [(1, 1100), (1, 17), (1, 300), (1, 1)]
    meta = check_attention(seqs, hq, hk, d=32, block_size=block_size, dtype=torch.bfloat16, kernel=kernel, seed=3)
    if kernel.backend == "triton":
        block_n = _attn_config(32, hq // hk, 1)["BLOCK_N"]
        assert _num_partitions(meta, hk, block_n, torch.device(kernel.device)) > 16


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_split_k_grid_sized_for_a_longer_context(heads, kernel, nan_empty, monkeypatch):
    """As a CUDA graph launches it: partitions counted for the longest context the model allows (4096),
    the batch's own contexts shorter (1100 and 40, decode and a verify window); each partition takes
    an equal share of its own sequence's context, several key tiles each (4 SMs, on any device)."""
    monkeypatch.setattr(attention_mod, "_num_sms", lambda device: 4)
    hq, hk = HEADS[heads]
    meta = check_attention([(1, 1100), (4, 40)], hq, hk, d=32, block_size=16, dtype=torch.bfloat16, kernel=kernel,
                           seed=6, max_context_len=4096)
    if kernel.backend == "triton":
        block_n = _attn_config(32, hq // hk, 4)["BLOCK_N"]
        parts = _num_partitions(meta, hk, block_n, torch.device(kernel.device))
        assert 1 < parts and parts * block_n < 1100, parts


def test_verify_windows_split_k(kernel, nan_empty, big_gpu):
    """Speculative verify windows (k + 1 tokens each) with long contexts also split the context."""
    meta = check_attention([(5, 200), (5, 9), (3, 150)], 8, 1, d=16, block_size=16, dtype=torch.float16,
                           kernel=kernel, seed=4)
    if kernel.backend == "triton":
        assert _num_partitions(meta, 1, _attn_config(16, 8, 5)["BLOCK_N"], torch.device(kernel.device)) > 1


# what benchmarks/kernels/sweep_attention.py may choose: each must compute the same attention
CONFIGS = [dict(BLOCK_N=16, parts=1), dict(BLOCK_N=32, parts=3, num_warps=4, num_stages=3), dict(BLOCK_N=128, parts=64),
           dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=32, BLOCK_N=128, num_stages=1), dict(BLOCK_M=128, BLOCK_N=32)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_tuned_configs(heads, config, device, nan_empty):
    """The tile table overridden: key tiles of 16-128, query tiles of 16-128 rows (BLOCK_M only where
    queries have several tokens), 1 to 64 split-K partitions, over decode, verify and prefill batches."""
    hq, hk = HEADS[heads]
    decode = "BLOCK_M" not in config
    seqs = [(1, 300), (3, 70), (1, 1), (1, 33)] if decode else [(70, 90), (1, 40), (17, 17), (5, 45)]
    q, k_cache, v_cache, meta = make_batch(seqs, hq, hk, 32, 16, torch.bfloat16, device, seed=7)
    out = attention_triton(q, k_cache, v_cache, meta, 32 ** -0.5, config=config)
    ref32 = attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, 32 ** -0.5)
    assert_close(out, ref32, attention_ref(q, k_cache, v_cache, meta, 32 ** -0.5), what=str(config))


@pytest.mark.parametrize("config,why", [
    (dict(BLOCK_K=64), "unknown config keys"), (dict(BLOCK_N=48), "BLOCK_N must be a power of two"),
    (dict(BLOCK_M=16), "BLOCK_M=16 applies to prefill"), (dict(parts=0), "parts=0 must be an int in"),
    (dict(parts=65), "parts=65")])
def test_tuned_config_errors(config, why, device):
    q, k_cache, v_cache, meta = make_batch([(1, 20)], 8, 1, 32, 16, torch.bfloat16, device, seed=8)
    with pytest.raises(ValueError, match=why):
        attention_triton(q, k_cache, v_cache, meta, 1.0, config=config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_head_dim_256_mqa(dtype, kernel, nan_empty):
    """The CodeGemma-2B shape: 8 query heads on one KV head of 256 dims (fp32 takes 32-key tiles, so
    the 33-token context spans two)."""
    check_attention([(3, 20), (1, 33)], 8, 1, d=256, block_size=16, dtype=dtype, kernel=kernel, seed=5)
    if kernel.backend == "triton" and dtype == torch.float32:
        assert _attn_config(256, 8, 1, itemsize=4)["BLOCK_N"] < 33


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(8, 1), (16, 16)], ids=["2b", "7b"])
def test_codegemma_shapes(heads, dtype, kernel, nan_empty):
    """Full-size CodeGemma heads: a mixed batch with long contexts, then a decode batch (split-K)."""
    if kernel.backend == "triton" and kernel.device == "cpu":
        pytest.skip("full-size shapes are too slow for the Triton interpreter")
    check_attention([(512, 512), (1, 8192), (5, 3000), (64, 1100), (1, 100)], *heads, d=256, block_size=16,
                    dtype=dtype, kernel=kernel, seed=7)
    n = 64 if kernel.device == "cuda" else 8  # on a CPU the padded torch reference is the slow part
    ctx = torch.randint(1, 4096, (n,), generator=torch.Generator().manual_seed(8)).tolist()
    check_attention([(1, c) for c in ctx], *heads, d=256, block_size=32, dtype=dtype, kernel=kernel, seed=9)


def naive_attention(q, k_cache, v_cache, meta, scale):
    """The definition, one sequence and one query head at a time, in float64."""
    bs, hq, hk = k_cache.shape[1], q.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    cu, ctx = meta.cu_seqlens_q.tolist(), meta.context_lens.tolist()
    for b in range(len(ctx)):
        slots = [meta.block_tables[b, i // bs].item() * bs + i % bs for i in range(ctx[b])]
        k = k_cache.flatten(0, 1)[slots].double()
        v = v_cache.flatten(0, 1)[slots].double()
        for t in range(cu[b], cu[b + 1]):
            p = ctx[b] - (cu[b + 1] - t)  # this token's position: it sees keys 0..p
            for h in range(hq):
                w = torch.softmax(scale * (k[: p + 1, h // (hq // hk)] @ q[t, h].double()), 0)
                out[t, h] = w @ v[: p + 1, h // (hq // hk)]
    return out


@pytest.mark.parametrize("seqs", [MIXED, [(1, 40), (1, 3), (1, 17)], [(1, 33), (1, 33)], [(1, 5)]],
                         ids=["mixed", "decode-ragged", "decode-equal", "decode-one"])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_reference_equals_the_definition(seqs, heads):
    """The torch reference (also the CPU backend, written for few ops) against the plain formula."""
    q, k_cache, v_cache, meta = make_batch(seqs, *HEADS[heads], d=16, block_size=16, dtype=torch.float32,
                                           device="cpu", seed=3)
    out = attention_ref(q, k_cache, v_cache, meta, 0.25)
    assert torch.allclose(out.double(), naive_attention(q, k_cache, v_cache, meta, 0.25), atol=1e-5, rtol=1e-5)


def test_empty_batch(kernel):
    q, k_cache, v_cache, meta = make_batch([], 4, 2, 16, 16, torch.float16, kernel.device, seed=0)
    out = attention(q, k_cache, v_cache, meta, 0.25, backend=kernel.backend)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv(dtype, kernel):
    """Written slots equal the input exactly; skipped (-1) and unowned slots keep their NaN."""
    g = torch.Generator().manual_seed(6)
    num_blocks, block_size, hk, d, tokens = 5, 16, 2, 24, 23
    kv = torch.randn(tokens, 3 * hk, d, generator=g).to(kernel.device, dtype)  # k, v: strided slices of a fused output
    k, v = kv[:, hk:2 * hk], kv[:, 2 * hk:]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::4] = -1
    slots = slots.to(kernel.device)
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype, device=kernel.device)
    v_cache = k_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots, backend=kernel.backend)
    keep = slots >= 0
    for cache, src in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, hk, d)
        assert torch.equal(flat[slots[keep]], src[keep])
        untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=kernel.device)
        untouched[slots[keep]] = False
        assert flat[untouched].isnan().all()


def test_cpu_backend_hands_long_prefill_chunks_to_torch():
    """A batch with a chunk of CPU_TORCH_PREFILL_TOKENS new tokens runs the torch reference whole."""
    from gemforge.kernels._native import CPU_TORCH_PREFILL_TOKENS
    from gemforge.kernels.registry import unavailable_reason
    if unavailable_reason("attention", "cpu", "cpu"):
        pytest.skip(unavailable_reason("attention", "cpu", "cpu"))
    n = CPU_TORCH_PREFILL_TOKENS
    q, k_cache, v_cache, meta = make_batch([(n, n + 9), (1, 20)], 4, 2, 16, 16, torch.bfloat16, "cpu", seed=8)
    assert torch.equal(attention(q, k_cache, v_cache, meta, 0.25, backend="cpu"),
                       attention_ref(q, k_cache, v_cache, meta, 0.25))


def test_cpu_bf16_kernel_keeps_long_prefill_chunks(monkeypatch, nan_empty):
    """In bf16 with a head_dim the bf16 kernel takes, long chunks stay with the C++ kernel."""
    from gemforge.kernels import _native
    if not _native._cpu_bf16_attention(torch.empty(1, 1, 64, dtype=torch.bfloat16)):
        pytest.skip("gemforge._C lacks the AVX512-BF16 attention kernel")
    n = _native.CPU_TORCH_PREFILL_TOKENS
    q, k_cache, v_cache, meta = make_batch([(n + 3, n + 40), (1, 20)], 8, 1, 64, 16, torch.bfloat16, "cpu", seed=8)
    monkeypatch.setattr(_native, "select", lambda *a: pytest.fail("handed to another backend"))
    out = attention(q, k_cache, v_cache, meta, 0.125, backend="cpu")
    assert_close(out, attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, 0.125),
                 attention_ref(q, k_cache, v_cache, meta, 0.125))


def test_cpu_backend_rejects_bad_tables_and_slots():
    """Out-of-range block ids, contexts beyond the block table and slots beyond the cache raise a
    ValueError naming the sequence or token (the C++ kernels check before reading or writing)."""
    from gemforge.kernels.registry import unavailable_reason
    if unavailable_reason("attention", "cpu", "cpu"):
        pytest.skip(unavailable_reason("attention", "cpu", "cpu"))
    q, k_cache, v_cache, meta = make_batch([(1, 20), (2, 9)], 4, 2, 16, 16, torch.float32, "cpu", seed=9)
    bad = meta.block_tables.clone()
    bad[1, 0] = k_cache.shape[0]  # one past the last block
    with pytest.raises(ValueError, match=r"sequence 1: block \d+ outside the cache's \d+ blocks"):
        attention(q, k_cache, v_cache, replace(meta, block_tables=bad), 0.25, backend="cpu")
    long = replace(meta, context_lens=torch.tensor([20, 9 + 16 * bad.shape[1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="sequence 1: context length .* exceeds its block table"):
        attention(q, k_cache, v_cache, long, 0.25, backend="cpu")
    beyond = replace(meta, cu_seqlens_q=torch.tensor([0, 1, 4], dtype=torch.int32))  # q has 3 tokens
    with pytest.raises(ValueError, match="cu_seqlens_q must run from 0 to at most the 3 query tokens"):
        select("attention", "cpu", "cpu")(q, k_cache, v_cache, beyond, 0.25)
    k = torch.randn(3, 2, 16)
    slots = torch.tensor([0, k_cache.shape[0] * k_cache.shape[1], 5])
    with pytest.raises(ValueError, match="slot .* of token 1 is outside the cache"):
        write_kv(k, k.clone(), k_cache, v_cache, slots, backend="cpu")


@pytest.mark.parametrize("seqs", [1, 2, 3, 16, 33, 64, 132, 256])
@pytest.mark.parametrize("kv_heads", [1, 16])
def test_partitions_fill_one_round_of_resident_programs(seqs, kv_heads, monkeypatch):
    """On an H100 (132 SMs, two resident decode programs each) the split-K grid never exceeds the 264
    slots when the sequences alone do not, and uses as many of them as the caps allow: a few programs
    over would make a second, nearly empty round (17 partitions of 16 sequences: 272 programs)."""
    monkeypatch.setattr(attention_mod, "_num_sms", lambda device: 132)
    meta = AttnMetadata(positions=None, cu_seqlens_q=None, context_lens=torch.zeros(seqs), block_tables=None,
                        slot_mapping=None, max_query_len=1, max_context_len=8192)
    parts = _num_partitions(meta, kv_heads, 64, torch.device("cpu"))
    programs = seqs * kv_heads
    if programs >= 264:
        assert parts == 1
    else:
        assert parts * programs <= 264 and (parts == attention_mod.MAX_PARTS or (parts + 1) * programs > 264), parts
