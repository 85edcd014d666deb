"""argmax(scores): each row's greedy pick, the index of its maximum over the last dim (the first
on ties; a NaN counts as the maximum, its first index wins, as with torch.max). The torch backend
is the reference; the "cpu" backend (csrc/cpu/argmax.cpp) is faster for fp32 rows of a 256000 /
8192-token vocabulary on our CI CPU (benchmarks/kernels/bench_argmax.py), where the greedy pick is a
visible part of a step."""
from __future__ import annotations

import torch

from .registry import register, select


@register("argmax", "torch")
def argmax_ref(scores: torch.Tensor) -> torch.Tensor:
    return scores.max(-1).indices


def argmax(scores: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """int64 [...] indices of the maxima of scores [..., V] along the last dim."""
    if scores.shape[-1] == 0:
        raise ValueError(f"argmax: scores of shape {tuple(scores.shape)} have an empty last dim")
    return select("argmax", backend, scores.device)(scores)
