"""Where a greedy decode step of the nano target goes on this CPU, alone (K = 0) and speculating
with the nano draft at a fixed lookahead K: the target's and the draft's forwards (timed by wrapping
`forward`) and the rest of `Engine.step` (host bookkeeping), per step, over a 128-token generation
after a ~600-character prompt, 3 requests one after another:
    python benchmarks/results/2026-12-07-cpu-spec-host/spec_split.py K
"""
import sys
import time

from gemforge.engine import SamplingParams
from gemforge.engine.engine import Engine, EngineConfig


def main(k: int):
    spec = dict(draft_model="models/nano-codegemma-draft", num_speculative_tokens=k, adaptive_lookahead=False) if k else {}
    eng = Engine("models/nano-codegemma", EngineConfig(max_num_seqs=1, **spec), progress=False)
    spent = {"target": 0.0, "draft": 0.0}

    def timed(model, key):
        forward = model.forward

        def run(*args, **kwargs):
            t = time.perf_counter()
            out = forward(*args, **kwargs)
            spent[key] += time.perf_counter() - t
            return out
        model.forward = run

    timed(eng.runner.model, "target")
    if k:
        timed(eng.drafter.runner.model, "draft")
    ids = eng.tokenizer.encode(open("engine/engine.py").read()[:600])
    for rep in range(3):
        eng.add_request(f"r{rep}", ids, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
        eng.step()  # the prompt
        spent.update(target=0.0, draft=0.0)
        steps, t = 0, time.perf_counter()
        while eng.has_unfinished():
            eng.step()
            steps += 1
        us = lambda s: round(s / steps * 1e6, 1)  # noqa: E731
        wall = time.perf_counter() - t
        print({"k": k, "steps": steps, "step_us": us(wall), "target_us": us(spent["target"]),
               "draft_us": us(spent["draft"]), "host_us": us(wall - spent["target"] - spent["draft"]),
               "tokens_per_s": round(128 / wall, 1)}, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
