"""A/B of the AsyncEngine before (9b239c7: each step one asyncio.to_thread hop, outputs delivered
between steps) and after (one worker thread stepping back to back; with overlap=True it does not wait
for the delivery), interleaved in one process. Needs the old module beside it:
    git show 9b239c7:engine/async_engine.py | sed 's/^from \./from gemforge.engine./' > /tmp/old_async_engine.py
    python benchmarks/results/2026-11-27-cpu-async-delivery/ab_async.py        # do-nothing model
    python benchmarks/results/2026-11-27-cpu-async-delivery/ab_async.py real   # the nano model, bf16
"""
import sys, asyncio, time, gc, json, statistics, importlib.util
sys.path.insert(0, "benchmarks/engine"); sys.path.insert(0, "/tmp")
import bench_host_overhead as b
import old_async_engine as old
from gemforge.engine import SamplingParams
from gemforge.engine.async_engine import AsyncEngine as New
steps = 50
REAL = len(sys.argv) > 1
def per_step(cls, batch, stream):
    if REAL:
        from gemforge.engine.engine import Engine, EngineConfig
        engine = cls(Engine("models/nano-codegemma", EngineConfig(max_num_seqs=max(batch, 1), kv_cache_tokens=batch * 128 + 512), progress=False))
    else:
        engine = cls(b.null_engine("models/nano-codegemma", batch, 4 + steps + 32, 4))
    p = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    async def one(i):
        async for _ in engine.generate([2, 10, 11, 12], p, f"r{i}", stream=stream):
            pass
    async def run():
        await asyncio.gather(*(one(i) for i in range(batch)))
    gc.collect(); gc.freeze()
    try:
        t = time.perf_counter(); asyncio.run(run())
    finally:
        gc.unfreeze()
    return (time.perf_counter() - t) / (steps + 1) * 1e6
res = {}
for rnd in range(3 if REAL else 5):
    for batch in (1, 8, 64, 256):
        for stream in (True, False):
            for name, cls in (("step_per_thread_hop", old.AsyncEngine), ("worker_thread", New), ("worker_overlap", lambda e: New(e, overlap=True))):
                res.setdefault((batch, stream, name), []).append(per_step(cls, batch, stream))
rows = []
for batch in (1, 8, 64, 256):
    for stream in (True, False):
        row = {"running_seqs": batch, "stream": stream}
        for name in ("step_per_thread_hop", "worker_thread", "worker_overlap"):
            row[name + "_us"] = round(statistics.median(res[(batch, stream, name)]), 1)
        row["speedup"] = round(row["step_per_thread_hop_us"] / row["worker_thread_us"], 2)
        rows.append(row); print(json.dumps(row))
json.dump(rows, open("/tmp/ab_async%s.json" % ("-real" if REAL else ""), "w"), indent=1)
