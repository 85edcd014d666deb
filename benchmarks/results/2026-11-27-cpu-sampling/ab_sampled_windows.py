"""A/B of the speculative step with sampled requests (temperature 0.8, seeded; k = 4; do-nothing target
and draft): the windows' rejection sampling one sequence at a time (accept_sampled per window, as
accept() did) against all windows at once (accept_sampled, the engine now), interleaved.
    python benchmarks/results/2026-11-27-cpu-sampling/ab_sampled_windows.py
"""
import sys, time, gc, statistics, json
sys.path.insert(0, "benchmarks/engine")
import bench_host_overhead as b
from gemforge.engine import SamplingParams
from gemforge.engine import engine as engine_mod, speculative
from gemforge.engine.engine import Engine, EngineConfig
real = engine_mod.accept_sampled
one_by_one = lambda ws: [speculative.accept_sampled([w])[0] for w in ws]
def make(batch):
    ctx = 400
    eng = Engine("models/nano-codegemma", EngineConfig(dtype="float32", device="cpu", max_num_seqs=batch, max_model_len=ctx,
                 kv_cache_tokens=batch * ctx + 512, draft_model="models/nano-codegemma-draft", num_speculative_tokens=4,
                 adaptive_lookahead=False), progress=False)
    V = eng.cfg.vocab_size
    eng.runner.model = b.NullModel(V, batch * 8)
    eng.drafter.runner.model = b.NullModel(V, batch * 8)
    for i in range(batch):
        eng.add_request(f"r{i}", [2, 10, 11, 12], SamplingParams(max_tokens=300, temperature=0.8, seed=i, ignore_eos=True))
    for _ in range(3): eng.step()
    return eng
res = {}
for batch in (1, 8, 64):
    engines = {"per_sequence": make(batch), "together": make(batch)}
    gc.collect(); gc.freeze()
    for rnd in range(15):
        for name, eng in engines.items():
            engine_mod.accept_sampled = real if name == "together" else one_by_one
            t = time.perf_counter(); eng.step(); res.setdefault((batch, name), []).append(time.perf_counter() - t)
    gc.unfreeze()
engine_mod.accept_sampled = real
rows = []
for batch in (1, 8, 64):
    rows.append({"running_seqs": batch, "k": 4, "sampled": True, **{f"{n}_step_us": round(statistics.median(res[(batch, n)]) * 1e6) for n in ("per_sequence", "together")}})
    print(json.dumps(rows[-1]))
json.dump(rows, open("benchmarks/results/2026-11-27-cpu-sampling/ab-sampled-windows.json", "w"), indent=1)
