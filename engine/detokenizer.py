"""Incremental detokenization with stop strings.

Each `push(token_id)` returns the new text that is now certain:
- UTF-8 safe: a token that ends in the middle of a multi-byte character (byte-fallback pieces)
  yields nothing until the character is complete, so '\ufffd' is never emitted half-way;
- stop strings: text that could still be the start of a stop string is held back until decided;
  once a stop string appears, the text ends right before it and `stopped` becomes True. A token
  pushed with `stops=False` (one of a request's first min_tokens) moves the floor: a stop string
  counts only where it ends past the text of those tokens (vLLM's min_tokens rule).
The pieces returned by push() and flush() concatenate to exactly the final `text`, which equals
`tokenizer.decode(all ids)` truncated at the first stop string.
"""
from __future__ import annotations

from .tokenizer import Tokenizer

# Decode a window that starts this many tokens before the unread ones, so sentencepiece sees the
# context it needs to place spaces and join byte pieces.
_CONTEXT = 6


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._borders = [_borders(s) for s in self.stop]
        self._matched = [0] * len(self.stop)  # per stop: its longest prefix that the text ends with
        self._scanned = 0  # characters of _decoded the stop strings have been matched against
        self.ids: list[int] = []
        self.prefix_offset = 0   # window start
        self.read_offset = 0     # tokens whose text is already in self._decoded
        self._decoded = ""       # all certain text, including any held-back part
        self.emitted = 0         # characters of _decoded handed out
        self.stopped = False
        self.stop_reason: str | None = None
        self.stop_floor = 0      # a stop string counts only where it ends past this many characters

    @property
    def text(self) -> str:
        return self._decoded[: self.emitted] if self.stopped else self._decoded

    def push(self, token_id: int, stops: bool = True) -> str:
        """Add one token; return the newly certain text (possibly ''). With `stops=False` no stop
        string may end in the text decoded so far."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        piece = self.tok.token_text(token_id) if self.read_offset == len(self.ids) - 1 else None
        if piece is not None:  # fast path: no pending bytes and a piece whose text is fixed
            self._decoded += piece
            self.read_offset = len(self.ids)
            self.prefix_offset = max(0, self.read_offset - _CONTEXT)
        else:
            window = self.tok.decode(self.ids[self.prefix_offset:])
            if window.endswith("\ufffd"):
                return ""  # an incomplete UTF-8 character: wait for its remaining bytes
            self._advance(window)
        if not stops:
            self.stop_floor = len(self._decoded)
        return self._release()

    def flush(self) -> str:
        """At the end of generation: release everything still held (incomplete bytes included)."""
        if not self.stopped and self.read_offset < len(self.ids):
            self._advance(self.tok.decode(self.ids[self.prefix_offset:]))
        if self.stopped:
            return ""
        out = self._decoded[self.emitted:]
        self.emitted = len(self._decoded)
        return out

    def _advance(self, window: str) -> None:
        prefix = self.tok.decode(self.ids[self.prefix_offset: self.read_offset])
        self._decoded += window[len(prefix):]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - _CONTEXT)

    def _release(self) -> str:
        text = self._decoded
        hit = self._scan(text) if self.stop else None
        if hit is not None:
            cut, self.stop_reason = hit
            self.stopped = True
            out = text[self.emitted: cut]
            self.emitted = cut
            return out
        end = len(text) - max(self._matched, default=0)  # (a suffix that may begin a stop string waits)
        out = text[self.emitted: end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _scan(self, text: str) -> tuple[int, str] | None:
        """Match the stop strings against the characters added since the last scan (Knuth-Morris-Pratt:
        O(1) amortised per character and stop string). Returns (start, stop string) of the stop string
        that starts first among those completed in them, counting only those that end past
        stop_floor; else None, with _matched holding each one's partial match at the end of `text`."""
        hits = []
        for j, (s, border) in enumerate(zip(self.stop, self._borders)):
            m, first = self._matched[j], None
            for e in range(self._scanned, len(text)):
                c = text[e]
                while m and s[m] != c:
                    m = border[m]
                if s[m] == c:
                    m += 1
                if m == len(s):
                    if first is None and e >= self.stop_floor:
                        first = e + 1 - m
                    m = border[m]
            self._matched[j] = m
            if first is not None:
                hits.append((first, s))
        self._scanned = len(text)
        return min(hits) if hits else None


def _borders(s: str) -> tuple[int, ...]:
    """KMP's table: entry n is the length of the longest proper prefix of s[:n] that is also its suffix."""
    border, k = [0] * (len(s) + 1), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = border[k]
        if s[i] == s[k]:
            k += 1
        border[i + 1] = k
    return tuple(border)
