"""A/B of the speculative step's greedy acceptance: every window's picks from one argmax and one device
read (greedy_picks, the engine now) against one argmax per sequence (greedy_picks stubbed out: accept()
then computes each window's own), do-nothing target and draft, k = 4, interleaved in one process.
    python benchmarks/results/2026-11-27-cpu-async-delivery/ab_greedy_picks.py
"""
import sys, time, gc, statistics, json
sys.path.insert(0, "benchmarks/engine")
import bench_host_overhead as b
from gemforge.engine import SamplingParams
from gemforge.engine import engine as engine_mod
from gemforge.engine.engine import Engine, EngineConfig
real = engine_mod.greedy_picks
def make(batch):
    ctx = 400
    eng = Engine("models/nano-codegemma", EngineConfig(dtype="float32", device="cpu", max_num_seqs=batch, max_model_len=ctx,
                 kv_cache_tokens=batch * ctx + 512, draft_model="models/nano-codegemma-draft", num_speculative_tokens=4,
                 adaptive_lookahead=False), progress=False)
    V = eng.cfg.vocab_size
    eng.runner.model = b.NullModel(V, batch * 8)
    eng.drafter.runner.model = b.NullModel(V, batch * 8)
    p = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [2, 10, 11, 12], p)
    for _ in range(3): eng.step()
    return eng
res = {}
for batch in (1, 8, 64):
    engines = {"per_sequence": make(batch), "one_read": make(batch)}
    gc.collect(); gc.freeze()
    for rnd in range(20):
        for name, eng in engines.items():
            engine_mod.greedy_picks = real if name == "one_read" else (lambda logits, windows: {})
            t = time.perf_counter(); eng.step(); res.setdefault((batch, name), []).append(time.perf_counter() - t)
    gc.unfreeze()
engine_mod.greedy_picks = real
rows = []
for batch in (1, 8, 64):
    row = {"running_seqs": batch, "k": 4, **{f"{n}_step_us": round(statistics.median(res[(batch, n)]) * 1e6) for n in ("per_sequence", "one_read")}}
    rows.append(row); print(json.dumps(row))
json.dump(rows, open("benchmarks/results/2026-11-27-cpu-async-delivery/ab-greedy-picks.json", "w"), indent=1)
