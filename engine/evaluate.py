"""Model-quality measurements through the engine itself: perplexity and greedy agreement."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .runner import WorkItem


def window_logits(llm, ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(ids), V] of one teacher-forced forward over `ids`."""
    blocks = llm.engine.cache.blocks
    blocks.append("eval", len(ids))
    try:
        return llm.engine.runner.run([WorkItem("eval", ids, 0, all_logits=True)])
    finally:
        blocks.free("eval")


def perplexity(llm, ids: list[int], window: int = 256) -> float:
    """exp(mean next-token cross-entropy) over consecutive windows of `ids` (each starting at BOS)."""
    total, count = 0.0, 0
    bos = llm.tokenizer.bos_id
    for start in range(0, len(ids) - 1, window):
        chunk = [bos] + ids[start: start + window]
        if len(chunk) < 3:
            break
        logits = window_logits(llm, chunk[:-1])
        total += F.cross_entropy(logits, torch.tensor(chunk[1:], device=logits.device), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def greedy_agreement(a, b, ids: list[int], window: int = 256) -> float:
    """Fraction of positions of `ids` where models a and b predict the same next token."""
    agree = count = 0
    bos = a.tokenizer.bos_id
    for start in range(0, len(ids), window):
        chunk = [bos] + ids[start: start + window]
        pa, pb = window_logits(a, chunk).argmax(-1), window_logits(b, chunk).argmax(-1)
        agree += (pa == pb).sum().item()
        count += len(chunk)
    return agree / count
