"""The sampled acceptance rule alone, one window of k = 4 random drafts (rejected at once, as a
poor draft's are) over V = 256000, before (accept_sampled, commit 95e8671) and after (verdicts);
mean of 200 calls after 20, alternating processes, 6 rounds (the best counts: this machine drifts). Run from the repository root after the
set-up in ab_spec_host.sh:  python benchmarks/results/2026-11-27-cpu-spec-one-read/ab_sampled_rule.py"""
import json
import os
import subprocess
import sys

CODE = r'''
import time, torch
from gemforge.engine import SamplingParams
import gemforge.engine.speculative as spec
V, k = 256000, 4
torch.manual_seed(0)
logits, q = torch.randn(k + 1, V), torch.softmax(torch.randn(k, V), -1)
drafts, p = torch.randint(V, (k,)), SamplingParams(temperature=0.8)
if hasattr(spec, "verdicts"):
    call = lambda: spec.verdicts(logits, drafts, [spec.Window(p, torch.Generator().manual_seed(1), slice(0, k + 1),
                                                               slice(0, k), list(range(k)))], q)
else:
    call = lambda: spec.accept_sampled([(p, torch.Generator().manual_seed(1), drafts.tolist(), logits, q)])
for _ in range(20):
    call()
t = time.perf_counter()
for _ in range(200):
    call()
print((time.perf_counter() - t) / 200 * 1e6)
'''
out = {"before": [], "after": []}
for _ in range(6):
    for side in out:
        env = dict(os.environ, PYTHONPATH="/tmp/oldpkg" if side == "before" else "")
        out[side].append(round(float(subprocess.check_output([sys.executable, "-c", CODE], env=env, cwd="/tmp")), 1))
print(json.dumps(out))
json.dump(out, open(os.path.join(os.path.dirname(__file__), "sampled_rule_us.json"), "w"), indent=1)
