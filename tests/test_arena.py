"""The shared-memory region and its allocator."""

import gc

import numpy as np
import pytest

from conftest import wait_until
from d3arrow.arena import ALIGNMENT, Arena, ArenaFull


@pytest.fixture
def arena():
    arena = Arena(8 * 2**20)
    yield arena
    arena.close()


def test_allocations_are_disjoint_aligned_views_of_the_region(arena):
    blocks = [arena.allocate(n) for n in (1, 100, 4096, 70_000)]
    spans = sorted((arena.offset_of(b), arena.offset_of(b) + b.size) for b in blocks)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert all(start % ALIGNMENT == 0 for start, _ in spans)
    for i, block in enumerate(blocks):
        np.frombuffer(block, dtype=np.uint8)[:] = i
    assert [block.to_pybytes()[0] for block in blocks] == [0, 1, 2, 3]


def test_space_returns_when_the_last_user_is_collected(arena):
    block = arena.allocate(2**20)
    block_id = arena.block_id(block)
    derived = np.frombuffer(block, dtype="f8")[10:]  # a value built on the allocation
    del block
    gc.collect()
    assert arena.get(block_id) is not None and arena.used >= 2**20
    del derived
    gc.collect()
    assert arena.get(block_id) is None and arena.used == 0


def test_freed_space_is_reused_and_coalesced(arena):
    a, b, c = (arena.allocate(2**20) for _ in range(3))
    first = arena.offset_of(a)
    del a, b
    gc.collect()
    big = arena.allocate(2 * 2**20)  # fits only in the two freed neighbours, merged
    assert arena.offset_of(big) == first
    del c


def test_full_arena_raises_arena_full(arena):
    keep = arena.allocate(6 * 2**20)
    with pytest.raises(ArenaFull, match="no free range"):
        arena.allocate(3 * 2**20)
    del keep
    gc.collect()
    arena.allocate(3 * 2**20)


def test_memory_is_reserved_ahead_of_use(arena):
    arena.allocate(100)
    assert wait_until(lambda: arena.reserved >= 100, timeout=2)


def test_arrow_objects_built_on_an_allocation_keep_it(arena):
    import pyarrow as pa

    block = arena.allocate(8 * 1000)
    np.frombuffer(block, dtype="f8")[:] = np.arange(1000)
    array = pa.Array.from_buffers(pa.float64(), 1000, [None, block])  # holds only C++ refs
    del block
    gc.collect()
    reuse = arena.allocate(8 * 1000)  # would land on the same range if it had been freed
    np.frombuffer(reuse, dtype="f8")[:] = -1
    assert array.to_numpy().tolist() == list(map(float, range(1000)))
