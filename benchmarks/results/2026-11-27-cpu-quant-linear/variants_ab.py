"""The kernel table's shapes at 1 / 8 / 64 rows, ours beside torch's CPU weight-only kernels: the script the
not-kept variants of README.md were timed with, each variant's build swapped into kernels/_C*.so between runs."""
import torch, time, sys
sys.path.insert(0, "benchmarks/kernels")
from gemforge.kernels.quant import quantize_int8, quantize_int4, unpack_int4
from gemforge.kernels import _native
def best(f, n=5):
    f(); b=1e9
    for _ in range(n):
        t=time.perf_counter(); f(); b=min(b,time.perf_counter()-t)
    return round(b*1e3,2)
torch.manual_seed(0)
for name,N,K in [("gate_up",32768,2048),("down",2048,16384)]:
    w=(torch.randn(N,K)*0.02).bfloat16(); q8=quantize_int8(w); q4=quantize_int4(w,128)
    for M in (1,8,64):
        x=torch.randn(M,K).bfloat16()
        r={"shape":name,"M":M}
        try:
            r["torch_int8pack"]=best(lambda: torch._weight_int8pack_mm(x,q8.qweight,q8.scales))
        except Exception as e: r["torch_int8pack"]=str(e)[:60]
        r["ours_int8"]=best(lambda: _native.linear_int8_cpu(x,q8.qweight,q8.scales,None,None))
        try:
            q=unpack_int4(q4.qweight)
            packed=torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous() if False else (q).to(torch.int32), 8) if hasattr(torch,"_convert_weight_to_int4pack_for_cpu") else None
            sz=torch.stack([q4.scales.t(), torch.zeros_like(q4.scales.t())],dim=-1).contiguous()
            r["torch_int4pack"]=best(lambda: torch._weight_int4pack_mm_for_cpu(x,packed,128,sz)) if packed is not None else None
        except Exception as e: r["torch_int4pack"]=str(e)[:80]
        r["ours_int4"]=best(lambda: _native.linear_int4_cpu(x,q4.qweight,q4.scales,q4.zeros,128))
        print(r, flush=True)
