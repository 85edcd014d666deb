"""Sentencepiece tokenizer with Gemma's conventions and CodeGemma's prompt formats.

- BOS is always prepended by `encode` (Gemma degrades badly without it).
- Special tokens written in text (`<|fim_prefix|>`, `<start_of_turn>`, ...) become single ids.
- Fill-in-the-middle: PSM = <|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>,
  SPM = <|fim_prefix|><|fim_suffix|>suf<|fim_middle|>pre (the prefix directly before the middle).
- Chat (instruction-tuned models): <start_of_turn>{role}\n{content}<end_of_turn>\n ... ending in
  <start_of_turn>model\n; a system message is folded into the first user turn, as Gemma does.
"""
from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from .errors import RequestError, TokenizerError

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FILE_SEPARATOR = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FILE_SEPARATOR, START_OF_TURN, END_OF_TURN)


class Tokenizer:
    """Wraps `tokenizer.model`; ids follow the checkpoint (Gemma: pad 0, eos 1, bos 2, unk 3)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer.model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({e})") from None
        self.path = path
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{path}: the model defines no BOS/EOS pieces")
        self.special_ids: dict[str, int] = {}
        for tok in SPECIAL_TOKENS:
            i = self.sp.PieceToId(tok)
            if i != self.sp.unk_id() and self.sp.IdToPiece(i) == tok:
                self.special_ids[tok] = i
        self._special_re = (re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")
                            if self.special_ids else None)
        self._control = {i for i in range(self.vocab_size) if self.sp.IsControl(i)}
        self._texts = self._piece_texts()

    def _piece_texts(self) -> list[str | None] | None:
        """Each id's text when decoding is plain concatenation of pieces ('▁' -> ' '; true for
        Gemma's identity normalizer without dummy prefix); None for byte and unknown pieces, whose
        text depends on their neighbours. None overall if this model does not decode that way."""
        sp = self.sp
        texts = [None if sp.IsByte(i) or sp.IsUnknown(i) else "" if sp.IsControl(i)
                 else sp.IdToPiece(i).replace("\u2581", " ") for i in range(self.vocab_size)]
        probe = [i for i in self.encode(" def f(x):\n    return  x[0] + 1  # ok\n pass <|fim_prefix|>", add_bos=False)
                 if texts[i] is not None]
        if self.decode(probe) != "".join(texts[i] for i in probe):
            return None
        return texts

    def token_text(self, token_id: int) -> str | None:
        """The text `token_id` always adds when appended, or None if it depends on its neighbours."""
        return self._texts[token_id] if self._texts is not None and 0 <= token_id < self.vocab_size else None

    def same_vocab(self, other: "Tokenizer") -> bool:
        """True when both tokenizers map every id to the same piece."""
        return self.vocab_size == other.vocab_size and self.first_difference(other) is None

    def first_difference(self, other: "Tokenizer") -> int | None:
        """The first id both tokenizers have that they map to different pieces; None if there is none."""
        for i in range(min(self.vocab_size, other.vocab_size)):
            if self.sp.IdToPiece(i) != other.sp.IdToPiece(i):
                return i
        return None

    def token_id(self, piece: str) -> int:
        """The id of a special token; TokenizerError if this tokenizer lacks it."""
        if piece not in self.special_ids:
            raise TokenizerError(f"{self.path}: tokenizer has no single token for {piece!r}")
        return self.special_ids[piece]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, BOS first; special-token strings map to their single ids."""
        ids = [self.bos_id] if add_bos else []
        parts = self._special_re.split(text) if self._special_re else [text]
        for part in parts:
            if not part:
                continue
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            else:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`; control tokens (bos/eos/pad) are dropped when `skip_special`, and so are ids past
        the tokenizer's pieces (a checkpoint may pad its embedding table beyond them): they have no text."""
        n = self.vocab_size
        return self.sp.DecodeIds([i for i in ids if 0 <= i < n and not (skip_special and i in self._control)])

    def fim_prompt(self, prefix: str, suffix: str, mode: str = "psm") -> str:
        """CodeGemma fill-in-the-middle prompt; the model then generates the middle."""
        for tok in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE):
            self.token_id(tok)
        if mode == "psm":
            return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
        if mode == "spm":
            return f"{FIM_PREFIX}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{prefix}"
        raise RequestError(f"fim_mode must be 'psm' or 'spm', got {mode!r}", field="fim_mode")

    def fim_stop_ids(self) -> list[int]:
        """Infill ends at <|file_separator|> (and at eos, which every request stops on)."""
        return [self.special_ids[FILE_SEPARATOR]] if FILE_SEPARATOR in self.special_ids else []

    def chat_prompt(self, messages: list[dict]) -> str:
        """Gemma chat template over [{'role': 'system'|'user'|'assistant', 'content': str}, ...]."""
        self.token_id(START_OF_TURN), self.token_id(END_OF_TURN)
        turns, system = [], None
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string", field=f"messages[{i}].content")
            if role == "system":
                if turns or system is not None:
                    raise RequestError("a system message must come first", field=f"messages[{i}].role")
                system = content
                continue
            if role not in ("user", "assistant"):
                raise RequestError(f"messages[{i}].role must be system, user or assistant, got {role!r}",
                                   field=f"messages[{i}].role")
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise RequestError(f"messages[{i}].role is {role!r} but roles must alternate user/assistant "
                                   f"starting with user", field=f"messages[{i}].role")
            if system is not None and not turns:
                content = f"{system}\n\n{content}"
            turns.append(f"{START_OF_TURN}{'user' if role == 'user' else 'model'}\n{content}{END_OF_TURN}\n")
        if not turns or len(turns) % 2 == 0:
            raise RequestError("messages must end with a user message", field="messages")
        return "".join(turns) + f"{START_OF_TURN}model\n"

    def chat_stop_ids(self) -> list[int]:
        return [self.special_ids[END_OF_TURN]] if END_OF_TURN in self.special_ids else []


def train_tokenizer(files, model_prefix: str | Path, vocab_size: int = 8000, max_chars: int = 20_000_000) -> Path:
    """Train a Gemma-style sentencepiece model on source files: BPE with byte fallback, no dummy
    prefix, digits split, whitespace kept (indentation pieces), newline as a piece of its own, ids
    pad 0 / eos 1 / bos 2 / unk 3, and CodeGemma's special tokens as single pieces."""
    import io

    def blocks():  # paragraphs separated by blank lines, newlines kept
        used = 0
        for f in files:
            text = Path(f).read_text(encoding="utf-8", errors="ignore")
            for block in text.split("\n\n"):
                if used > max_chars:
                    return
                if block.strip():
                    used += len(block)
                    yield block[:8000] + "\n"

    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=blocks(), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=list(SPECIAL_TOKENS) + ["\n"], byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_by_whitespace=True, character_coverage=1.0, max_sentence_length=16384,
        num_threads=2, minloglevel=2)
    out = Path(f"{model_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return out
