"""BlockManager bookkeeping: slots, rollback, free, prefix caching, invariants under random operations."""
import random

import pytest

from gemforge.engine.kv_cache import BlockManager


def test_slots_follow_block_table():
    m = BlockManager(8, block_size=4)
    assert m.append("a", 6) == [0, 1, 2, 3, 4, 5]
    assert m.append("b", 1) == [8]
    assert m.append("a", 3) == [6, 7, 12]
    assert {k: list(t) for k, t in m.tables.items()} == {"a": [0, 1, 3], "b": [2]}
    m.check_invariants()


def test_rollback_frees_emptied_blocks_and_reuses_slots():
    m = BlockManager(4, block_size=4)
    m.append("s", 9)                      # 3 blocks
    m.rollback("s", 5)                    # 4 tokens left -> 1 block
    assert m.lengths["s"] == 4 and len(m.tables["s"]) == 1 and m.num_free == 3
    assert m.append("s", 2) == m.slots("s", 4, 2)
    with pytest.raises(ValueError, match="roll back 7"):
        m.rollback("s", 7)
    m.check_invariants()


def test_exhaustion_is_reported_not_partial():
    m = BlockManager(3, block_size=4)
    m.append("a", 5)
    assert not m.can_append("b", 5) and m.can_append("b", 4)
    with pytest.raises(MemoryError):
        m.append("b", 5)
    assert "b" not in m.tables and m.num_free == 1
    m.check_invariants()


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["plain", "prefix-caching"])
def test_random_operations_keep_invariants(prefix_caching):
    """Random appends, rollbacks, frees and (with prefix caching) registrations and matches of
    sequences drawn from a few shared prompts; every match returns blocks registered for exactly
    those tokens."""
    rng = random.Random(7)
    m = BlockManager(50, block_size=4, prefix_caching=prefix_caching)
    prompts = [[rng.randrange(3) for _ in range(40)] for _ in range(3)]
    text, committed, owner = {}, {}, {}  # the tokens each sequence caches; how many are final; what a block holds
    for _ in range(3000):
        seq = rng.randrange(10)
        op = rng.random()
        if seq not in m.tables:
            text[seq], committed[seq] = list(rng.choice(prompts)[: rng.randrange(1, 41)]), 0
            hit = m.match(seq, text[seq][:-1])
            assert hit % 4 == 0 and hit <= len(text[seq]) - 1 and (prefix_caching or hit == 0)
            for i, b in enumerate(m.tables.get(seq, ())):
                assert owner[b] == text[seq][: 4 * (i + 1)], "a match gave a block of other tokens"
            committed[seq] = hit
            if m.reserve(seq, len(text[seq]) - hit):
                for i, b in enumerate(m.tables[seq]):
                    owner[b] = text[seq][: 4 * (i + 1)]
            else:
                m.free(seq)
        elif op < 0.4:
            n = rng.randrange(1, 12)
            if m.can_append(seq, n):
                start = m.lengths[seq]
                m.append(seq, n)
                text[seq] = text[seq][:start] + [rng.randrange(3) for _ in range(n)]
                for i in range(start // 4, len(m.tables[seq])):
                    owner[m.tables[seq][i]] = text[seq][: 4 * (i + 1)]
        elif op < 0.6:
            n = rng.randrange(0, m.lengths[seq] - committed[seq] + 1)
            m.rollback(seq, n)
            text[seq] = text[seq][: m.lengths[seq]]
        elif op < 0.8:
            committed[seq] = m.lengths[seq]
            m.register(seq, lambda s, n, t=text[seq]: t[s: s + n], committed[seq])
        else:
            m.free(seq)
        m.check_invariants()
    for s in list(m.tables):
        m.free(s)
    assert m.num_free == 50 and m.num_used == 0


def _tokens(t):
    return lambda start, n: t[start: start + n]


def test_prefix_blocks_are_shared_then_cached_then_evicted_tail_first():
    m = BlockManager(6, block_size=4, prefix_caching=True)
    a = list(range(10))
    m.append("a", 10)
    m.register("a", _tokens(a), 10)                  # 2 full blocks registered, the third is partial
    assert m.num_cached == 2
    assert m.match("b", a[:8] + [99, 98, 97]) == 8   # shares a's first two blocks
    assert list(m.tables["b"]) == list(m.tables["a"][:2]) and m.num_free == 3
    m.append("b", 3)
    m.free("a")                                      # b still holds the shared blocks
    assert m.num_free == 3 and m.num_used == 3
    m.free("b")                                      # held by none: cached, yet free to take
    assert m.num_free == 6 and m.num_cached == 2
    assert m.match("c", a[:9]) == 8 and m.num_free == 4
    m.free("c")
    m.check_invariants()
    m.append("d", 4 * 5)                             # 4 empty blocks, then the cached block-2 evicted first
    assert m.num_cached == 1 and m.match("e", a[:9]) == 4
    m.check_invariants()


def test_matches_are_exact():
    m = BlockManager(8, block_size=4, prefix_caching=True)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    m.append("a", 9)
    m.register("a", _tokens(a), 9)
    assert m.match("x", [1, 2, 3, 4, 5, 6, 7, 0, 9]) == 4          # second block differs in one token
    assert m.match("y", [0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0          # first block differs: nothing
    m.append("z", 4)
    m.register("z", _tokens([9, 9, 9, 9]), 4)
    assert m.match("w", [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 4          # a's second block follows another first block
    assert m.match("v", a[:7]) == 4                                # only full blocks of the tokens given
    m.check_invariants()


def test_evicted_blocks_leave_the_registry():
    """A block reused for other tokens after eviction is never matched for its old ones."""
    m = BlockManager(2, block_size=4, prefix_caching=True)
    a = list(range(8))
    m.append("a", 8)
    m.register("a", _tokens(a), 8)
    m.free("a")
    m.append("b", 8)                                 # evicts both and rewrites them
    m.register("b", _tokens([7] * 8), 8)
    m.free("b")
    assert m.match("c", a + [0]) == 0 and m.match("d", [7] * 9) == 8
    m.check_invariants()


def test_registered_blocks_cannot_be_rolled_back():
    m = BlockManager(4, block_size=4, prefix_caching=True)
    m.append("a", 10)
    m.register("a", _tokens(list(range(10))), 8)
    m.rollback("a", 2)
    with pytest.raises(ValueError, match="registered"):
        m.rollback("a", 1)
    m.check_invariants()


def test_without_prefix_caching_nothing_is_kept():
    m = BlockManager(4, block_size=4)
    m.append("a", 8)
    m.register("a", _tokens(list(range(8))), 8)
    m.free("a")
    assert m.num_cached == 0 and m.match("b", list(range(8))) == 0 and m.num_free == 4
