"""One row of x against int4 / int8 weights of three shapes with the same (or half the) weight count:
the per-row cost that exposed the missing prefetch. Run from the repository root; prints ms and GB/s.
Its runs this session, builds without and with the prefetch alternating, three rounds each (ms,
int4 / int8): 32768 x 2048: 2.03-2.09 / 1.84-1.97 without, 0.84-0.86 / 1.40-1.71 with; 8192 x 8192:
1.19-1.34 / 1.85-1.88 without, 0.87-0.88 / 1.29-1.40 with; 2048 x 16384: 0.37-0.43 / 0.64-0.69
without, 0.41-0.45 / 0.39-0.50 with."""
import torch, time
from gemforge.kernels.quant import quantize_int4, quantize_int8
from gemforge.kernels import _native
def best(f, n=7):
    f(); b=1e9
    for _ in range(n):
        t=time.perf_counter(); f(); b=min(b,time.perf_counter()-t)
    return round(b*1e3,3)
torch.manual_seed(0)
for N,K in [(32768,2048),(8192,8192),(2048,16384)]:
    w=(torch.randn(N,K)*0.02).bfloat16(); q4=quantize_int4(w,128); q8=quantize_int8(w)
    x=torch.randn(1,K).bfloat16()
    t4=best(lambda: _native.linear_int4_cpu(x,q4.qweight,q4.scales,q4.zeros,128))
    t8=best(lambda: _native.linear_int8_cpu(x,q8.qweight,q8.scales,None,None))
    print(N,K,"int4",t4,"ms",round(N*K/2/t4/1e6,1),"GB/s | int8",t8,"ms",round(N*K/t8/1e6,1),"GB/s")
