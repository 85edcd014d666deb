"""Lane-by-lane CPU emulation of the tensor-core kernels written without a GPU (csrc/quant_gemv.cu
mma_gemv_kernel with its int4, int8 and dense lanes, csrc/attention.cu decode_partition_mma_kernel): every lane's
loads, byte permutes and
16-bit pairs as the kernels form them, and mma.sync m16n8k16 by its documented fragment layout (PTX ISA),
against an fp64 reference. It checks the index mapping of the kernels as written here (a copy, by hand),
not the compiled code; the GPU tests (tests/gpu) check that. Usage: python emulate_mma.py [OUT.json]"""
import json
import math
import sys

import torch

from gemforge.kernels.quant import quantize_int4, unpack_int4


def bits16(t):
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def word(lo, hi):  # two 16-bit patterns -> the 32-bit register (lo in the low half)
    return int(lo) | int(hi) << 16


def halves(u32, dt):
    return torch.tensor([u32 & 0xFFFF, u32 >> 16], dtype=torch.int32).to(torch.int16).view(dt).double()


def pack(lo, hi, dt):
    b = bits16(torch.tensor([lo, hi], dtype=torch.float64).to(dt))
    return word(b[0], b[1])


def byte_perm(a, b, sel):  # __byte_perm / PRMT
    by = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    return sum(by[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def mma(a, b, dt):
    """D (16 x 8) = A . B from the 32 lanes' fragments: a[lane] 4 registers, b[lane] 2 (lane = 4 r + c):
    A {(r, 2c), (r + 8, 2c), (r, 2c + 8), (r + 8, 2c + 8)} pairs along columns, B {(2c, r), (2c + 8, r)}
    pairs along rows."""
    A, B = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        r, c = lane >> 2, lane & 3
        for reg, (row, col) in enumerate([(r, 2 * c), (r + 8, 2 * c), (r, 2 * c + 8), (r + 8, 2 * c + 8)]):
            A[row, col], A[row, col + 1] = halves(a[lane][reg], dt)
        for reg, k in enumerate([2 * c, 2 * c + 8]):
            B[k, r], B[k + 1, r] = halves(b[lane][reg], dt)
    return A @ B


def gemv_int4(N, K, M, G, symmetric, dt, k_split, seed=0):
    """mma_gemv_kernel<W4MmaLane>: y [M, N] = x W^T, W int4 in the stored layout; returns (emulated, fp64
    reference)."""
    torch.manual_seed(seed)
    qw = quantize_int4(torch.randn(N, K).to(dt), G, symmetric)
    x = torch.randn(M, K).to(dt)
    by_mma = dt == torch.bfloat16  # the zero point by an mma (bf16) or a 16-bit subtraction (fp16)
    bias, bias_bits = (128.0, 0x43004300) if by_mma else (1024.0, 0x64006400)
    nt_count, groups, xb = (1 if M <= 8 else 2), K // G, bits16(x)
    y = torch.zeros(M, N, dtype=torch.float64)
    for tile in range((N + 15) // 16):
        rows = [min(tile * 16 + i, N - 1) for i in range(16)]
        acc = torch.zeros(16, 8 * nt_count, dtype=torch.float64)
        for split in range(k_split):
            for gi in range(split * groups // k_split, (split + 1) * groups // k_split):
                d = torch.zeros_like(acc)
                for w in range(G // 32):
                    for step in range(2):
                        a, az, b = [], [], [[] for _ in range(nt_count)]
                        for lane in range(32):
                            r, c = lane >> 2, lane & 3
                            pairs, zps = [], []
                            for h in range(2):
                                row = rows[r + 8 * h]
                                at = gi * (G // 2) + c * (G // 8) + 4 * w
                                v = int.from_bytes(bytes(qw.qweight[row, at:at + 4].tolist()), "little")
                                z = 8.0 if symmetric else qw.zeros[row, gi].item()
                                zp = pack(-(bias + z), -(bias + z), dt) if by_mma else pack(bias + z, bias + z, dt)
                                ps = []
                                for j in range(4):
                                    t = (byte_perm(v, v >> 4, 0x0400 + 0x0101 * j) & 0x000F000F) | bias_bits
                                    if not by_mma:
                                        lo, hi = halves(t, dt) - (bias + z)
                                        t = pack(lo.item(), hi.item(), dt)
                                    ps.append(t)
                                pairs.append(ps)
                                zps.append(zp)
                            lo, hi = pairs
                            a.append([lo[2 * step], hi[2 * step], lo[2 * step + 1], hi[2 * step + 1]])
                            az.append([zps[0], zps[1], zps[0], zps[1]])
                            for nt in range(nt_count):
                                k0 = gi * G + c * (G // 4) + 8 * w + 4 * step
                                xr = xb[min(nt * 8 + r, M - 1)]
                                b[nt].append([word(xr[k0], xr[k0 + 1]), word(xr[k0 + 2], xr[k0 + 3])])
                        for nt in range(nt_count):
                            d[:, nt * 8:nt * 8 + 8] += mma(a, b[nt], dt) + (mma(az, b[nt], dt) if by_mma else 0)
                scales = torch.tensor([qw.scales[row, gi].item() for row in rows], dtype=torch.float64)
                acc += scales[:, None] * d
        for i in range(16):
            if tile * 16 + i < N:
                y[:, tile * 16 + i] = acc[i, :M]
    codes = unpack_int4(qw.qweight).double()[:, :K]
    zeros = 8.0 if symmetric else qw.zeros.double().repeat_interleave(G, 1)
    return y, x.double() @ ((codes - zeros) * qw.scales.double().repeat_interleave(G, 1)).T


def gemv_dense(N, K, M, dt, k_split, seed=2):
    """mma_gemv_kernel<DenseMmaLane>: y = x W^T for a plain 16-bit W; chunks of 32 k, lane (r, c) reads 16
    bytes of rows r and r + 8 at k = 32 j + 8 c; returns (emulated, fp64 reference)."""
    torch.manual_seed(seed)
    w, x = torch.randn(N, K).to(dt), torch.randn(M, K).to(dt)
    wb, xb, nt_count, chunks = bits16(w), bits16(x), (1 if M <= 8 else 2), K // 32
    y = torch.zeros(M, N, dtype=torch.float64)
    for tile in range((N + 15) // 16):
        acc = torch.zeros(16, 8 * nt_count, dtype=torch.float64)
        for split in range(k_split):
            for j in range(split * chunks // k_split, (split + 1) * chunks // k_split):
                for step in range(2):
                    a, b = [], [[] for _ in range(nt_count)]
                    for lane in range(32):
                        r, c = lane >> 2, lane & 3
                        k0 = 32 * j + 8 * c + 4 * step
                        lo, hi = (wb[min(tile * 16 + r + 8 * h, N - 1)] for h in range(2))
                        a.append([word(lo[k0], lo[k0 + 1]), word(hi[k0], hi[k0 + 1]), word(lo[k0 + 2], lo[k0 + 3]),
                                  word(hi[k0 + 2], hi[k0 + 3])])
                        for nt in range(nt_count):
                            xr = xb[min(nt * 8 + r, M - 1)]
                            b[nt].append([word(xr[k0], xr[k0 + 1]), word(xr[k0 + 2], xr[k0 + 3])])
                    for nt in range(nt_count):
                        acc[:, nt * 8:nt * 8 + 8] += mma(a, b[nt], dt)
        for i in range(16):
            if tile * 16 + i < N:
                y[:, tile * 16 + i] = acc[i, :M]
    return y, x.double() @ w.double().T


def gemv_int8(N, K, M, dt, k_split, seed=3):
    """mma_gemv_kernel<Int8MmaLane>: u = q + 128 = 16 h + l; x . q = 16 x . (B + h) + x . (B + l)
    - (17 B + 128) sum x; chunks of 64 k, lane (r, c) reads 16 bytes of rows r and r + 8 at 64 j + 16 c."""
    from gemforge.kernels.quant import quantize_int8
    torch.manual_seed(seed)
    qw = quantize_int8(torch.randn(N, K).to(dt))
    x = torch.randn(M, K).to(dt)
    bias, bias_bits = (128.0, 0x43004300) if dt == torch.bfloat16 else (1024.0, 0x64006400)
    z = pack(-(17 * bias + 128), -(17 * bias + 128), dt)
    codes = qw.qweight.view(torch.uint8).to(torch.int64)
    xb, nt_count, chunks = bits16(x), (1 if M <= 8 else 2), K // 64
    y = torch.zeros(M, N, dtype=torch.float64)

    def pairs(u, shift):
        v = u >> shift
        return [(byte_perm(v, v, sel) & 0x000F000F) | bias_bits for sel in (0x0100, 0x0302)]

    for tile in range((N + 15) // 16):
        rows = [min(tile * 16 + i, N - 1) for i in range(16)]
        acc = torch.zeros(16, 8 * nt_count, dtype=torch.float64)
        for split in range(k_split):
            for j in range(split * chunks // k_split, (split + 1) * chunks // k_split):
                dh, dl = torch.zeros_like(acc), torch.zeros_like(acc)
                for w in range(4):
                    al, ah, az, b = [], [], [], [[] for _ in range(nt_count)]
                    for lane in range(32):
                        r, c = lane >> 2, lane & 3
                        k0 = 64 * j + 16 * c + 4 * w
                        u = [int.from_bytes(bytes(codes[rows[r + 8 * h], k0:k0 + 4].tolist()), "little")
                             ^ 0x80808080 for h in range(2)]
                        lo, hi = pairs(u[0], 0), pairs(u[1], 0)
                        al.append([lo[0], hi[0], lo[1], hi[1]])
                        lo, hi = pairs(u[0], 4), pairs(u[1], 4)
                        ah.append([lo[0], hi[0], lo[1], hi[1]])
                        az.append([z] * 4)
                        for nt in range(nt_count):
                            xr = xb[min(nt * 8 + r, M - 1)]
                            b[nt].append([word(xr[k0], xr[k0 + 1]), word(xr[k0 + 2], xr[k0 + 3])])
                    for nt in range(nt_count):
                        cols = slice(nt * 8, nt * 8 + 8)
                        dl[:, cols] += mma(al, b[nt], dt) + mma(az, b[nt], dt)
                        dh[:, cols] += mma(ah, b[nt], dt)
                scales = torch.tensor([qw.scales[row].item() for row in rows], dtype=torch.float64)
                acc += scales[:, None] * (16 * dh + dl)
        for i in range(16):
            if tile * 16 + i < N:
                y[:, tile * 16 + i] = acc[i, :M]
    return y, x.double() @ (qw.qweight.double() * qw.scales.double()[:, None]).T


def decode_attention(G, D, n, block_size, dt, start=0, hk=2, g=1, seed=1):
    """decode_partition_mma_kernel on one partition (keys start .. start + n) of one sequence and KV head
    g, normalised by l as a single-partition sequence is; returns (emulated [G, D], fp64 reference)."""
    torch.manual_seed(seed)
    nblocks = math.ceil((start + n) / block_size) + 2
    kc, vc = (torch.randn(nblocks, block_size, hk, D).to(dt) for _ in range(2))
    table = torch.randperm(nblocks)
    q = torch.randn(G * hk, D).to(dt)

    def row(cache, pos):
        return cache[table[pos // block_size], pos % block_size, g]

    qb, warps, kj, ktw = bits16(q[g * G:(g + 1) * G]), 4, D // 32, D // 4 // 16
    ps = torch.full((G, n), float("nan"), dtype=torch.float64)
    for warp in range(warps):  # QK, 8 keys a warp at a time
        for t0 in range(warp * 8, n, warps * 8):
            s = torch.zeros(16, 8, dtype=torch.float64)
            for j in range(kj):
                for step in range(2):
                    a, b = [], []
                    for lane in range(32):
                        r, c = lane >> 2, lane & 3
                        kr, base = bits16(row(kc, start + min(t0 + r, n - 1))), 8 * c + 32 * j + 4 * step
                        qr = qb[min(r, G - 1)]
                        qa = [word(qr[base], qr[base + 1]), word(qr[base + 2], qr[base + 3])] if r < G else [0, 0]
                        a.append([qa[0], 0, qa[1], 0])
                        b.append([word(kr[base], kr[base + 1]), word(kr[base + 2], kr[base + 3])])
                    s += mma(a, b, dt)
            for lane in range(32):
                r, c = lane >> 2, lane & 3
                for i in range(2):
                    if r < G and t0 + 2 * c + i < n:
                        ps[r, t0 + 2 * c + i] = s[r, 2 * c + i] * D ** -0.5 * math.log2(math.e)
    m = ps.max(1).values
    p = torch.exp2(ps - m[:, None])
    out = torch.full((G, D), float("nan"), dtype=torch.float64)
    for warp in range(warps):  # PV, this warp's D / 4 dims
        acc = [torch.zeros(16, 8, dtype=torch.float64) for _ in range(ktw)]
        for t0 in range(0, n, 16):
            a, b = [[] for _ in range(ktw)], []
            for lane in range(32):
                r, c = lane >> 2, lane & 3
                d0 = warp * (D // warps) + 2 * ktw * r
                keys = [t0 + 2 * c + (i & 1) + 8 * (i >> 1) for i in range(4)]
                w = [[word(*bits16(row(vc, start + k))[d0 + 2 * t:d0 + 2 * t + 2]) for t in range(ktw)] if k < n
                     else [0] * ktw for k in keys]
                pk = [p[min(r, G - 1), k].item() if r < G and k < n else 0.0 for k in keys]
                b.append([pack(pk[0], pk[1], dt), pack(pk[2], pk[3], dt)])
                for t in range(ktw):
                    a[t].append([byte_perm(w[0][t], w[1][t], 0x5410), byte_perm(w[0][t], w[1][t], 0x7632),
                                 byte_perm(w[2][t], w[3][t], 0x5410), byte_perm(w[2][t], w[3][t], 0x7632)])
            for t in range(ktw):
                acc[t] += mma(a[t], b, dt)
        for lane in range(32):
            r, c = lane >> 2, lane & 3
            d0 = warp * (D // warps) + 2 * ktw * r
            for t in range(ktw):
                for i in range(4):
                    if 2 * c + (i & 1) < G:
                        out[2 * c + (i & 1), d0 + 2 * t + (i >> 1)] = acc[t][r + 8 * (i >> 1), 2 * c + (i & 1)]
    out /= p.sum(1)[:, None]
    keys = torch.stack([row(kc, start + t) for t in range(n)]).double()
    values = torch.stack([row(vc, start + t) for t in range(n)]).double()
    scores = q[g * G:(g + 1) * G].double() @ keys.T * D ** -0.5
    return out, torch.softmax(scores, -1) @ values


def main(out_path=None):
    rows = []
    for N, K, M, G, sym, dt, ks in [(20, 128, 1, 128, True, torch.bfloat16, 1), (33, 256, 3, 64, False, torch.bfloat16, 2),
                                    (17, 96, 9, 32, False, torch.float16, 8), (16, 256, 16, 128, True, torch.float16, 1),
                                    (40, 192, 5, 32, True, torch.bfloat16, 4)]:
        y, ref = gemv_int4(N, K, M, G, sym, dt, ks)
        rows.append({"kernel": "mma_gemv_kernel<W4MmaLane>", "N": N, "K": K, "M": M, "group": G, "symmetric": sym,
                     "dtype": str(dt), "k_split": ks, "max_abs_err": (y - ref).abs().max().item(),
                     "max_abs_ref": ref.abs().max().item()})
        print(rows[-1], flush=True)
    for N, K, M, dt, ks in [(20, 96, 1, torch.bfloat16, 1), (33, 128, 9, torch.float16, 2),
                            (16, 64, 16, torch.bfloat16, 8)]:
        y, ref = gemv_dense(N, K, M, dt, ks)
        rows.append({"kernel": "mma_gemv_kernel<DenseMmaLane>", "N": N, "K": K, "M": M, "dtype": str(dt), "k_split": ks,
                     "max_abs_err": (y - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item()})
        print(rows[-1], flush=True)
    for N, K, M, dt, ks in [(20, 128, 1, torch.bfloat16, 1), (33, 192, 9, torch.float16, 8),
                            (16, 256, 16, torch.bfloat16, 2)]:
        y, ref = gemv_int8(N, K, M, dt, ks)
        rows.append({"kernel": "mma_gemv_kernel<Int8MmaLane>", "N": N, "K": K, "M": M, "dtype": str(dt),
                     "k_split": ks, "max_abs_err": (y - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item()})
        print(rows[-1], flush=True)
    for G, D, n, bs, dt, start in [(8, 256, 37, 16, torch.bfloat16, 0), (4, 128, 70, 32, torch.float16, 64),
                                   (1, 64, 16, 16, torch.bfloat16, 32), (8, 64, 9, 2, torch.bfloat16, 0)]:
        out, ref = decode_attention(G, D, n, bs, dt, start)
        rows.append({"kernel": "decode_partition_mma_kernel", "G": G, "D": D, "keys": n, "block_size": bs,
                     "dtype": str(dt), "start": start, "unwritten": int(out.isnan().sum()),
                     "max_abs_err": (out - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item()})
        print(rows[-1], flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
