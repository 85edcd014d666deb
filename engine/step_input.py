"""What one engine step feeds the model: the flat batch of the scheduled sequences (FlatBatch) and the
previous step's sampled tokens that the host has not read yet (InFlight)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .runner import WorkItem
from .transfer import HostCopy


@dataclass
class InFlight:
    """A step whose sampled tokens the host has not read: its sampling sequences, in row order, their
    tokens on the device (the next step's input) and their copy on the way to the host."""
    seqs: list
    tokens: torch.Tensor
    copy: HostCopy
    _rows: dict | None = None

    @classmethod
    def launch(cls, seqs: list, tokens: torch.Tensor) -> "InFlight":
        return cls(seqs, tokens, HostCopy(tokens))

    def read(self) -> list[int]:
        return self.copy.read()

    def row(self, seq) -> int:
        if self._rows is None:
            self._rows = {s.seq_id: i for i, s in enumerate(self.seqs)}
        return self._rows[seq.seq_id]


@dataclass
class FlatBatch:
    """One step's model input: a WorkItem per scheduled sequence, in order, and what its rows mean.
    rows[i]: sequence i's rows of the logits (its last token's, a verify window's k + 1, or a scored
    prompt chunk's every row); plain: the sequences that sample a token; scored: the prompt chunks whose
    logprobs are wanted; at / fed: the flat positions of tokens the step in flight samples and their
    sequences; draft_at: the flat positions of the windows' drafts (proposal.tokens, in order)."""
    items: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    plain: list = field(default_factory=list)
    scored: list = field(default_factory=list)
    at: list = field(default_factory=list)
    fed: list = field(default_factory=list)
    draft_at: list = field(default_factory=list)
    size: int = 0  # tokens
    prompt_tokens: int = 0

    @classmethod
    def pack(cls, scheduled, window: dict) -> "FlatBatch":
        """window: id(scheduled) -> (its drafts' span in the proposal, their q rows), for verify windows."""
        b, r = cls(), 0
        for i, sc in enumerate(scheduled):
            seq, start, n = sc.seq, sc.start, sc.num_tokens
            if not seq.output_ids and not seq.pending:
                b.prompt_tokens += n
            if seq.pending:  # (only ever its last token, sampled by the step in flight, fed alone)
                b.at.append(b.size)
                b.fed.append(seq)
                toks = [0]
            else:
                toks = seq.tokens(start, n)
            if id(sc) in window:
                b.draft_at += range(b.size + len(toks), b.size + len(toks) + sc.lookahead)
                b.items.append(WorkItem(seq.seq_id, toks + [0] * sc.lookahead, start, all_logits=True))
                b.rows.append(slice(r, r + 1 + sc.lookahead))
            else:
                every = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_ids)
                if every:  # a prompt chunk whose tokens' logprobs are wanted: logits of every row
                    b.scored.append(i)
                b.items.append(WorkItem(seq.seq_id, toks, start, all_logits=every))
                b.rows.append(slice(r, r + (n if every else 1)))
                if sc.completes:  # brought up to date: a token is sampled
                    b.plain.append(i)
            r = b.rows[-1].stop
            b.size += len(b.items[-1].token_ids)
        return b
