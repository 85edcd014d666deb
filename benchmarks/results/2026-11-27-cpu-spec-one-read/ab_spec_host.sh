#!/bin/bash
# A/B of a speculative step's host time, do-nothing target and draft (bench_host_overhead.py --speculative),
# before (commit 95e8671: drafts read after the draft steps, verdicts in one to three more reads) and after
# (drafts and verdicts in one read), alternating processes; run from the repository root:
#   git worktree add /tmp/old 95e8671; mkdir -p /tmp/oldpkg/gemforge
#   ln -s /tmp/old/engine /tmp/oldpkg/gemforge/engine; ln -s "$PWD/kernels" /tmp/oldpkg/gemforge/kernels
#   bash benchmarks/results/2026-11-27-cpu-spec-one-read/ab_spec_host.sh
set -e
here=benchmarks/results/2026-11-27-cpu-spec-one-read
root=$PWD
for round in 1 2 3; do
  for side in before after; do
    pp=""; [ $side = before ] && pp=/tmp/oldpkg
    (cd benchmarks/engine && PYTHONPATH=$pp "$root/.venv/bin/python" bench_host_overhead.py --model ../../models/nano-codegemma \
      --draft ../../models/nano-codegemma-draft --batches 1 --prompt-lens 4 --async-batches --speculative 1 8 64 \
      --repeats 1 --out "$root/$here/spec_host-$side-$round.json")
  done
done
