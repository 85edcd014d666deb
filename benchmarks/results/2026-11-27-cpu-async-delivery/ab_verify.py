"""(Runs against commits up to 95e8671, before greedy_picks and accept_sampled became speculative.verdicts.)
A/B of the speculative step's verification, do-nothing target and draft, k = 4, interleaved in one
process: every window at once (greedy_picks: one argmax and one device read; accept_sampled: two
reads for all sampled windows; the engine now) against one window at a time (the same functions
called per window, as before).
    python benchmarks/results/2026-11-27-cpu-async-delivery/ab_verify.py           # greedy requests
    python benchmarks/results/2026-11-27-cpu-async-delivery/ab_verify.py sampled   # temperature 0.8
"""
import gc
import json
import statistics
import sys
import time

sys.path.insert(0, "benchmarks/engine")
import bench_host_overhead as null  # noqa: E402

from gemforge.engine import SamplingParams  # noqa: E402
from gemforge.engine import engine as engine_mod  # noqa: E402
from gemforge.engine.engine import Engine, EngineConfig  # noqa: E402

SAMPLED = sys.argv[1:] == ["sampled"]
together = {"greedy_picks": engine_mod.greedy_picks, "accept_sampled": engine_mod.accept_sampled}
one_by_one = {"greedy_picks": lambda logits, ws: {w.start: together["greedy_picks"](logits, [w])[w.start] for w in ws},
              "accept_sampled": lambda ws: [together["accept_sampled"]([w])[0] for w in ws]}


def make(batch):
    ctx = 400
    eng = Engine("models/nano-codegemma", EngineConfig(dtype="float32", device="cpu", max_num_seqs=batch, max_model_len=ctx,
                 kv_cache_tokens=batch * ctx + 512, draft_model="models/nano-codegemma-draft", num_speculative_tokens=4,
                 adaptive_lookahead=False), progress=False)
    eng.runner.model = null.NullModel(eng.cfg.vocab_size, batch * 8)
    eng.drafter.runner.model = null.NullModel(eng.cfg.vocab_size, batch * 8)
    for i in range(batch):
        params = SamplingParams(max_tokens=300, temperature=0.8 if SAMPLED else 0.0, seed=i, ignore_eos=True)
        eng.add_request(f"r{i}", [2, 10, 11, 12], params)
    for _ in range(3):
        eng.step()
    return eng


res, rows = {}, []
for batch in (1, 8, 64):
    engines = {"one_window_at_a_time": make(batch), "all_windows_at_once": make(batch)}
    gc.collect()
    gc.freeze()
    for _ in range(15):
        for name, eng in engines.items():
            for fn, impl in (together if name == "all_windows_at_once" else one_by_one).items():
                setattr(engine_mod, fn, impl)
            t = time.perf_counter()
            eng.step()
            res.setdefault((batch, name), []).append(time.perf_counter() - t)
    gc.unfreeze()
    rows.append({"running_seqs": batch, "k": 4, "sampled": SAMPLED,
                 **{f"{n}_step_us": round(statistics.median(res[(batch, n)]) * 1e6) for n in engines}})
    print(json.dumps(rows[-1]))
for fn, impl in together.items():
    setattr(engine_mod, fn, impl)
json.dump(rows, open(f"benchmarks/results/2026-11-27-cpu-async-delivery/ab-verify-{'sampled' if SAMPLED else 'greedy'}.json",
                     "w"), indent=1)
