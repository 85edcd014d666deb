"""BlockManager bookkeeping: slots, rollback, free, invariants under random operations."""
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


def test_random_operations_keep_invariants():
    rng = random.Random(7)
    m = BlockManager(50, block_size=16)
    for _ in range(2000):
        seq = rng.randrange(10)
        op = rng.random()
        if op < 0.6:
            n = rng.randrange(1, 40)
            if m.can_append(seq, n):
                m.append(seq, n)
        elif op < 0.8 and m.lengths.get(seq):
            m.rollback(seq, rng.randrange(0, m.lengths[seq] + 1))
        else:
            m.free(seq)
        m.check_invariants()
    for s in list(m.tables):
        m.free(s)
    assert m.num_free == 50
