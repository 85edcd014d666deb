"""Tokenizer conventions (BOS, special tokens, FIM, chat) and the incremental detokenizer."""
import random

import pytest

from gemforge.engine.detokenizer import Detokenizer
from gemforge.engine.errors import RequestError
from gemforge.engine.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return Tokenizer(tokenizer_model)


def test_bos_always_first_and_gemma_id_layout(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.encode("x = 1")[0] == tok.bos_id
    assert tok.encode("")[0] == tok.bos_id


def test_special_tokens_are_single_ids(tok):
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"a{s}b", add_bos=False)
        assert tok.special_ids[s] in ids and ids.count(tok.special_ids[s]) == 1
        assert tok.decode(ids) == f"a{s}b"


def test_fim_psm_and_spm_layout(tok):
    sid = tok.special_ids
    psm = tok.encode(tok.fim_prompt("def f():\n", "\n    return y\n", "psm"))
    pre, suf, mid = sid["<|fim_prefix|>"], sid["<|fim_suffix|>"], sid["<|fim_middle|>"]
    assert psm[1] == pre and psm[-1] == mid and psm.index(suf) > 1
    spm_ids = tok.encode(tok.fim_prompt("def f():\n", "\n    return y\n", "spm"))
    assert spm_ids[1:3] == [pre, suf] and spm_ids.index(mid) < len(spm_ids) - 1
    assert tok.decode(spm_ids[spm_ids.index(mid) + 1:]) == "def f():\n"
    with pytest.raises(RequestError, match="fim_mode"):
        tok.fim_prompt("a", "b", "xyz")


def test_chat_template(tok):
    p = tok.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sort a list"}])
    assert p == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                 "<start_of_turn>user\nSort a list<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(RequestError, match="alternate"):
        tok.chat_prompt([{"role": "assistant", "content": "x"}])
    with pytest.raises(RequestError, match="role must be"):
        tok.chat_prompt([{"role": "robot", "content": "x"}])


TEXTS = ["def héllo():\n    return '✓ naïve 漢字 🙂'\n", "x = [1, 2, 3]  # ünïcödé ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\n\tpass"]


def stream(tok, ids, stop=()):
    d = Detokenizer(tok, stop)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    return pieces, d


@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenates_to_full_decode(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > 5 and any(tok.sp.IsByte(i) for i in ids), "byte-fallback pieces expected"
    pieces, d = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text == d.text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_random_ids_equals_decode(tok):
    rng = random.Random(1234)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        pieces, _ = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("stop, expected", [(["return"], "def héllo():\n    "), (["'✓"], "def héllo():\n    return "),
                                            (["never there"], TEXTS[0]), (["():", "h"], "def ")])
def test_stop_strings_truncate_and_are_held_back(tok, stop, expected):
    ids = tok.encode(TEXTS[0], add_bos=False)
    pieces, d = stream(tok, ids, stop)
    assert "".join(pieces) == d.text == expected
    # nothing emitted could have been the start of a stop string that later matched
    emitted = ""
    for p in pieces:
        emitted += p
        assert all(s not in emitted for s in stop)
    assert d.stopped == (stop != ["never there"])


@pytest.mark.parametrize("quiet, expected", [(0, "d"), (1, None), (3, None)])
def test_stop_strings_count_only_past_the_quiet_tokens(tok, quiet, expected):
    """Tokens pushed with stops=False (a request's first min_tokens) move the floor: a stop string
    counts only where it ends past their text, wherever it starts."""
    ids = tok.encode(TEXTS[0], add_bos=False)
    d = Detokenizer(tok, ["e"])
    pieces = [d.push(i, stops=j >= quiet) for j, i in enumerate(ids)] + [d.flush()]
    floor = len(tok.decode(ids[:quiet]))
    cut = TEXTS[0].find("e", max(0, floor - len("e") + 1))
    assert "".join(pieces) == d.text == (expected if expected is not None else TEXTS[0][:cut])
    assert d.stopped and TEXTS[0][:cut].count("e") == TEXTS[0][:floor].count("e")


def _expected_stream(tok, ids, stops, quiet):
    """What push/flush must hand out, from the definition: after each token the text so far less its
    longest suffix that begins a stop string; at the first token whose text completes a stop string
    (ending past the text of the first `quiet` tokens), the text up to the one that starts first."""
    pieces, emitted, floor = [], 0, 0
    for t in range(1, len(ids) + 1):
        text = tok.decode(ids[:t])
        if t <= quiet:
            floor = len(text)
        hits = [(i, s) for s in stops if (i := text.find(s, max(0, floor - len(s) + 1))) >= 0 and t > quiet]
        if hits:
            cut = min(hits)[0]
            pieces.append(text[emitted:cut])
            return pieces + [""] * (len(ids) - t + 1), text[:cut]
        held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        end = max(emitted, len(text) - held)
        pieces.append(text[emitted:end])
        emitted = end
    text = tok.decode(ids)
    return pieces + [text[emitted:]], text


def test_stop_strings_match_their_definition_on_random_overlapping_text(tok):
    """Random token streams over a four-character alphabet against random stop strings that overlap
    themselves and each other (the cases a matcher's fallbacks are for): every piece handed out equals
    the definition's, with and without quiet (min_tokens) tokens."""
    alphabet = set("ab \n")
    pool = [i for i in range(tok.vocab_size) if (t := tok.token_text(i)) and set(t) <= alphabet]
    assert len(pool) >= 8
    rng = random.Random(20261208)
    for _ in range(3000):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 24))]
        stops = ["".join(rng.choice("ab \n") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        quiet = rng.choice([0, 0, 1, 3])
        d = Detokenizer(tok, stops)
        pieces = [d.push(i, stops=j >= quiet) for j, i in enumerate(ids)] + [d.flush()]
        want_pieces, want_text = _expected_stream(tok, ids, stops, quiet)
        assert (pieces, d.text) == (want_pieces, want_text), (ids, stops, quiet)

