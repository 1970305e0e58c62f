"""Block manager on its own: prefix caching, LRU eviction, fork and copy-on-write, swap, invariants.

The stateful test drives random operations against a model of the device: every KV slot holds
the token prefix whose last token it encodes, so wrong sharing, a missed copy or a stale cache
entry shows up as a slot that does not hold what its sequence needs.
"""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import jpaged.block_manager as block_manager_module
from jpaged.block_manager import NO_BLOCK, BlockManager, ComputedBlocks
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Request, Sequence


def make_seq(tokens, name="seq") -> Sequence:
    return Request(name, None, list(tokens), SamplingParams(max_tokens=100), seed=0).seqs[0]


def admit(manager: BlockManager, tokens, name="seq") -> Sequence:
    """Admit and fully compute a sequence, as the scheduler and engine would."""
    seq = make_seq(tokens, name)
    take_prefix(manager, seq)
    compute(manager, seq, seq.num_tokens)
    return seq


def take_prefix(manager: BlockManager, seq: Sequence) -> int:
    """Admit a fresh `seq` after its cached prefix, no new tokens yet; return the tokens covered."""
    computed = manager.get_computed_blocks(seq)
    assert manager.allocate_slots(seq, 0, computed) is not None
    seq.num_computed_tokens = computed.num_tokens
    return computed.num_tokens


def cached_tokens(manager: BlockManager, seq: Sequence) -> int:
    return manager.get_computed_blocks(seq).num_tokens


def compute(manager: BlockManager, seq: Sequence, target: int) -> list[tuple[int, int]]:
    slots = manager.allocate_slots(seq, target - seq.num_computed_tokens)
    assert slots is not None
    seq.num_computed_tokens = target
    manager.commit_full_blocks(seq, target)
    return slots.copies


# ---- prefix caching -----------------------------------------------------------------------


def test_common_prefix_is_reused_and_the_rest_allocated_fresh():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = admit(manager, range(10), "first")
    assert manager.prefix_cache_queries == 10 and manager.prefix_cache_hits == 0
    second = make_seq([0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52], "second")
    computed = manager.get_computed_blocks(second)
    assert computed == ComputedBlocks(tuple(first.block_table[:2]), 8)
    assert manager.allocate_slots(second, 3, computed) is not None
    assert second.block_table[:2] == first.block_table[:2]
    assert [manager.ref_counts[b] for b in second.block_table[:2]] == [2, 2]
    second.num_computed_tokens = 8
    compute(manager, second, 11)
    fresh = second.block_table[2]
    assert fresh not in first.block_table and manager.ref_counts[fresh] == 1
    assert manager.num_free_blocks == 8 - 4
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (21, 8)
    assert manager.prefix_cache_hit_rate == pytest.approx(8 / 21)
    manager.check_invariants()


def test_freed_blocks_stay_cached_and_are_hit_by_a_later_request():
    manager = BlockManager(num_blocks=4, block_size=2)
    first = admit(manager, [1, 2, 3, 4, 5], "first")
    blocks = list(first.block_table)
    manager.free(first)
    assert manager.num_free_blocks == 4 and len(manager.evictable) == 2  # two full blocks cached
    second = make_seq([1, 2, 3, 4, 9], "second")
    assert take_prefix(manager, second) == 4 and second.block_table == blocks[:2]
    assert len(manager.evictable) == 0 and manager.num_free_blocks == 2
    manager.check_invariants()


def test_at_least_one_token_is_left_to_compute():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.free(admit(manager, range(8)))
    exact = make_seq(range(8))  # every token is in cached full blocks
    assert take_prefix(manager, exact) == 4 and len(exact.block_table) == 1
    compute(manager, exact, 8)  # the last block is recomputed into a fresh block...
    assert len(manager.block_keys) == 2  # ...which is not registered a second time
    one_more = make_seq(range(9))
    assert take_prefix(manager, one_more) == 8
    short = make_seq(range(3))
    assert take_prefix(manager, short) == 0
    manager.check_invariants()


def test_cached_blocks_need_a_fresh_sequence():
    manager = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3])
    manager.allocate_slots(seq, 3)
    with pytest.raises(ValueError, match="fresh sequence"):
        manager.allocate_slots(seq, 0, ComputedBlocks())


def test_lru_eviction_takes_the_least_recently_freed_and_a_hit_refreshes():
    manager = BlockManager(num_blocks=4, block_size=2)
    a, b, c = admit(manager, [1, 1], "a"), admit(manager, [2, 2], "b"), admit(manager, [3, 3], "c")
    block_of = {name: seq.block_table[0] for name, seq in zip("abc", (a, b, c))}
    for seq in (a, b, c):
        manager.free(seq)
    assert list(manager.evictable) == [block_of["a"], block_of["b"], block_of["c"]]
    hit = admit(manager, [1, 1, 9], "hit")  # a's block becomes most recently used
    manager.free(hit)
    assert list(manager.evictable) == [block_of["b"], block_of["c"], block_of["a"]]

    def cached(tokens):
        return cached_tokens(manager, make_seq(tokens + [0])) == 2

    pressure = make_seq([7] * 5, "pressure")  # nothing computed: each call holds that many tokens
    manager.allocate_slots(pressure, 2)  # takes the plain free block first
    assert cached([1, 1]) and cached([2, 2]) and cached([3, 3])
    manager.allocate_slots(pressure, 4)
    assert not cached([2, 2]) and cached([3, 3]) and cached([1, 1])
    manager.allocate_slots(pressure, 6)
    assert not cached([3, 3]) and cached([1, 1])
    assert manager.allocate_slots(pressure, 10) is None and len(pressure.block_table) == 3
    manager.allocate_slots(pressure, 8)
    assert not cached([1, 1]) and manager.num_free_blocks == 0 and not manager.block_keys
    manager.check_invariants()


def test_hash_collisions_never_return_another_prefix(monkeypatch):
    monkeypatch.setattr(block_manager_module, "hash_block", lambda parent_hash, tokens: 42)
    manager = BlockManager(num_blocks=8, block_size=2)
    manager.free(admit(manager, [1, 2, 3, 4, 5], "first"))
    assert cached_tokens(manager, make_seq([9, 9, 3, 4, 5])) == 0  # same hash, other tokens
    assert cached_tokens(manager, make_seq([1, 9, 3, 4, 5])) == 0
    manager.free(admit(manager, [5, 6, 3, 4, 5], "other first block"))
    # block (1, 2) is cached as a first block only
    assert cached_tokens(manager, make_seq([5, 6, 1, 2, 0])) == 2
    assert cached_tokens(manager, make_seq([1, 2, 3, 4, 0])) == 4  # equal tokens and parent still hit
    assert cached_tokens(manager, make_seq([5, 6, 3, 4, 0])) == 4
    assert len(manager.cached) == 1 and len(manager.cached[42]) == 4
    manager.check_invariants()


def test_prefix_caching_disabled():
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    manager.free(admit(manager, [1, 2, 3, 4, 5]))
    again = make_seq([1, 2, 3, 4, 5])
    assert cached_tokens(manager, again) == 0 and take_prefix(manager, again) == 0
    assert not again.block_table and not manager.block_keys and not manager.evictable
    assert manager.prefix_cache_queries == 0 and len(manager.free_block_ids) == 4
    manager.check_invariants()


def test_reset_prefix_cache_frees_only_evictable_blocks():
    manager = BlockManager(num_blocks=8, block_size=2)
    kept = admit(manager, [1, 2, 3, 4, 5], "kept")
    manager.free(admit(manager, [7, 8, 9, 9, 5], "dropped"))
    assert manager.reset_prefix_cache() == 2
    assert not manager.evictable and len(manager.free_block_ids) == 8 - 3
    assert cached_tokens(manager, make_seq([7, 8, 9, 9, 5])) == 0
    assert cached_tokens(manager, make_seq([1, 2, 3, 4, 5])) == 4 and kept.block_table
    manager.check_invariants()


def test_allocate_slots_counts_revived_evictable_blocks():
    manager = BlockManager(num_blocks=3, block_size=2)
    manager.free(admit(manager, [1, 2, 3, 4, 5]))  # two cached blocks, both evictable
    seq = make_seq([1, 2, 3, 4, 5])
    assert manager.num_free_blocks == 3
    computed = manager.get_computed_blocks(seq)
    assert manager.allocate_slots(seq, 4, computed) is None
    assert not seq.block_table and len(manager.evictable) == 2 and manager.prefix_cache_queries == 5
    assert manager.allocate_slots(seq, 2, computed) is not None and manager.num_free_blocks == 0
    manager.check_invariants()


# ---- fork and copy-on-write ---------------------------------------------------------------


def test_fork_shares_blocks_and_copy_on_write_copies_only_shared_written_blocks():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = admit(manager, range(6), "parent")
    child = make_seq(range(6), "child")
    child.num_computed_tokens = parent.num_computed_tokens
    manager.fork(parent, child)
    first, last = parent.block_table
    assert child.block_table == [first, last]
    assert manager.ref_counts[first] == manager.ref_counts[last] == 2
    child.output_token_ids.append(100)
    slots = manager.allocate_slots(child, 1)
    assert slots.new_blocks == [] and slots.copies == [(last, child.block_table[1])]
    assert child.block_table[0] == first
    assert manager.ref_counts[first] == 2 and manager.ref_counts[last] == 1
    assert manager.ref_counts[child.block_table[1]] == 1
    parent.output_token_ids.append(200)
    assert manager.allocate_slots(parent, 1).copies == []  # the parent owns its last block alone
    assert [manager.ref_counts[b] for b in child.block_table] == [2, 1]  # the first is still shared
    manager.free(parent)
    assert manager.ref_counts[first] == 1
    manager.check_invariants()


def test_copy_on_write_needs_room():
    manager = BlockManager(num_blocks=2, block_size=4)
    parent = admit(manager, range(6))
    child = make_seq(range(6), "child")
    manager.fork(parent, child)
    child.num_computed_tokens = 4
    assert manager.allocate_slots(child, 2) is None  # the shared last block has no room to copy
    assert child.block_table == parent.block_table
    manager.check_invariants()


# ---- swap ---------------------------------------------------------------------------------


def test_swap_out_and_in_round_trip():
    manager = BlockManager(num_blocks=6, block_size=2, num_host_blocks=4)
    seq = admit(manager, [1, 2, 3, 4, 5], "seq")
    device_blocks = list(seq.block_table)
    assert manager.can_swap_out(seq)
    out = manager.swap_out(seq)
    assert [d for d, _ in out] == device_blocks and seq.block_table == []
    assert manager.host_block_table[seq] == [h for _, h in out]
    assert manager.num_free_blocks == 6 and manager.num_free_host_blocks == 1
    assert not manager.can_swap_out(seq)
    manager.check_invariants()
    assert manager.can_swap_in(seq)
    back = manager.swap_in(seq)
    assert [h for h, _ in back] == [h for _, h in out] and seq.block_table == [d for _, d in back]
    assert seq not in manager.host_block_table
    assert manager.num_free_blocks == 3 and manager.num_free_host_blocks == 4
    manager.check_invariants()


def test_swap_needs_room_and_free_releases_host_blocks():
    manager = BlockManager(num_blocks=6, block_size=2, num_host_blocks=2)
    big = admit(manager, range(5), "big")
    assert not manager.can_swap_out(big)  # 3 blocks, 2 host blocks
    no_host = BlockManager(num_blocks=4, block_size=2)
    assert not no_host.can_swap_out(admit(no_host, [1]))
    small = admit(manager, [1, 2, 3], "small")
    manager.swap_out(small)
    filler = make_seq(range(6), "filler")
    manager.allocate_slots(filler, 6)
    assert not manager.can_swap_in(small)
    with pytest.raises(RuntimeError, match="swapped out"):
        manager.allocate_slots(small, 1)
    manager.free(small)
    assert manager.num_free_host_blocks == 2 and small not in manager.host_block_table
    manager.check_invariants()


def test_swapping_out_a_sharer_leaves_the_shared_blocks_to_the_others():
    manager = BlockManager(num_blocks=8, block_size=2, num_host_blocks=4)
    parent = admit(manager, [1, 2, 3], "parent")
    child = make_seq([1, 2, 3], "child")
    manager.fork(parent, child)
    shared = list(parent.block_table)
    assert manager.swap_out(child) == [(shared[0], 0), (shared[1], 1)]
    assert parent.block_table == shared and [manager.ref_counts[b] for b in shared] == [1, 1]
    assert manager.allocate_slots(parent, 1).copies == []  # the parent may write in place now
    back = manager.swap_in(child)
    assert not set(d for _, d in back) & set(shared)
    manager.check_invariants()


def test_one_step_of_moves_is_correct_in_the_documented_order():
    """Block 1 is a copy-on-write source, a swap-out source and a swap-in destination at once."""
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False,
                           num_host_blocks=4)
    device, host = {}, {}
    s, t = admit(manager, [1, 2, 3], "s"), make_seq([1, 2, 3], "t")
    t.num_computed_tokens = 3
    manager.fork(s, t)  # t shares s's blocks; v holds the other two
    v = admit(manager, [5, 6, 7], "v")
    for seq in (s, v):
        for pos, block in enumerate(seq.block_table):
            device[block] = ("data", seq.request_id, pos)
    host.update((h, device[d]) for d, h in manager.swap_out(v))
    expected = {"s": [device[b] for b in s.block_table], "t": [device[b] for b in s.block_table],
                "v": [host[h] for h in manager.host_block_table[v]]}

    t.output_token_ids.append(4)
    cow = manager.allocate_slots(t, 1).copies
    swap_out = manager.swap_out(s)  # s is preempted to host in the same step
    swap_in = manager.swap_in(v)
    assert {src for src, _ in cow} & {d for d, _ in swap_out} & {d for _, d in swap_in}

    host.update((h, device[d]) for d, h in swap_out)
    device.update([(dst, device[src]) for src, dst in cow])  # all sources read before writing
    device.update((d, host[h]) for h, d in swap_in)
    assert [device[b] for b in t.block_table] == expected["t"]
    assert [device[b] for b in v.block_table] == expected["v"]
    assert [host[h] for h in manager.host_block_table[s]] == expected["s"]
    manager.check_invariants()


# ---- invariants ---------------------------------------------------------------------------


def test_check_invariants_catches_corruption():
    def fresh():
        manager = BlockManager(num_blocks=4, block_size=2)
        return manager, admit(manager, [1, 2, 3])

    manager, _ = fresh()
    manager.ref_counts[0] += 1
    with pytest.raises(AssertionError, match="ref count"):
        manager.check_invariants()
    manager, _ = fresh()
    manager.free_block_ids.append(manager.free_block_ids[0])
    with pytest.raises(AssertionError, match="twice"):
        manager.check_invariants()
    manager, seq = fresh()
    manager.free_block_ids.append(seq.block_table[1])
    with pytest.raises(AssertionError, match="both free and referenced"):
        manager.check_invariants()
    manager, _ = fresh()
    manager.free_block_ids.pop()
    with pytest.raises(AssertionError, match="leaked"):
        manager.check_invariants()
    manager, _ = fresh()
    manager.cached[123] = manager.cached.pop(next(iter(manager.cached)))
    with pytest.raises(AssertionError, match="registered hash differs"):
        manager.check_invariants()


def test_freeing_twice_raises():
    manager = BlockManager(num_blocks=4, block_size=2)
    seq = admit(manager, [1, 2, 3])
    blocks = list(seq.block_table)
    manager.free(seq)
    seq.block_table = blocks
    with pytest.raises(RuntimeError, match="freed twice"):
        manager.free(seq)


# ---- random operations against a model of the device --------------------------------------

NUM_BLOCKS, BLOCK_SIZE, NUM_HOST_BLOCKS, MAX_TOKENS = 10, 2, 6, 14
tokens_strategy = st.lists(st.integers(0, 1), min_size=1, max_size=9)  # few tokens: prefixes repeat


class BlockManagerMachine(RuleBasedStateMachine):
    """Device slot (block, offset) holds the prefix tuple whose last token's KV it stores."""

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, num_host_blocks=NUM_HOST_BLOCKS)
        self.device = [[None] * BLOCK_SIZE for _ in range(NUM_BLOCKS)]
        self.host = [[None] * BLOCK_SIZE for _ in range(NUM_HOST_BLOCKS)]
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.names = iter(range(10**9))

    def _new_seq(self, tokens) -> Sequence:
        return make_seq(tokens, f"s{next(self.names)}")

    def _write(self, seq: Sequence, start: int, stop: int) -> None:
        tokens = seq.token_ids(0, stop)
        for pos in range(start, stop):
            block = seq.block_table[pos // BLOCK_SIZE]
            self.device[block][pos % BLOCK_SIZE] = tuple(tokens[:pos + 1])

    def _step(self, seq: Sequence, target: int, computed: ComputedBlocks | None = None) -> bool:
        """Compute `seq` up to `target` if there is room (allocate slots, copy, write, commit);
        a fresh `seq` starts after `computed`. No room changes nothing."""
        manager = self.manager
        start = seq.num_computed_tokens + (computed.num_tokens if computed else 0)
        before = (list(seq.block_table), list(manager.ref_counts), manager.num_free_blocks)
        slots = manager.allocate_slots(seq, target - start, computed)
        if slots is None:
            assert (seq.block_table, manager.ref_counts, manager.num_free_blocks) == before
            return False
        for src, dst in slots.copies:
            assert before[1][src] > 1 and manager.ref_counts[dst] == 1  # only shared blocks copied
            assert seq.block_table.index(dst) == before[0].index(src)
            self.device[dst] = list(self.device[src])
        self._write(seq, start, target)
        seq.num_computed_tokens = target
        manager.commit_full_blocks(seq, target)
        return True

    def _drop(self, seq: Sequence) -> None:
        self.manager.free(seq)
        (self.running if seq in self.running else self.swapped).remove(seq)

    @rule(tokens=tokens_strategy, data=st.data())
    def add(self, tokens, data):
        seq = self._new_seq(tokens)
        computed = self.manager.get_computed_blocks(seq)
        hit = computed.num_tokens
        assert hit % BLOCK_SIZE == 0 and hit < len(tokens) and len(computed.blocks) * BLOCK_SIZE == hit
        target = data.draw(st.integers(hit + 1, len(tokens)), label="prefill to")
        if self._step(seq, target, computed):  # else no room: it stays waiting, holding nothing
            self.running.append(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 1), max_size=3))
    def append(self, data, new_tokens):
        seq = data.draw(st.sampled_from(self.running), label="seq")
        seq.output_token_ids.extend(new_tokens[:MAX_TOKENS - seq.num_tokens])
        if seq.num_uncomputed_tokens == 0:
            return
        target = data.draw(st.integers(seq.num_computed_tokens + 1, seq.num_tokens),
                           label="compute to")
        if not self._step(seq, target):
            self._drop(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.running), label="parent")
        child = self._new_seq(parent.prompt_token_ids)
        child.output_token_ids = list(parent.output_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.manager.fork(parent, child)
        self.running.append(child)

    @precondition(lambda self: self.running or self.swapped)
    @rule(data=st.data())
    def free(self, data):
        self._drop(data.draw(st.sampled_from(self.running + self.swapped), label="seq"))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def swap_out(self, data):
        seq = data.draw(st.sampled_from(self.running), label="seq")
        if not self.manager.can_swap_out(seq):
            live = len(seq.block_table) - seq.block_table.count(NO_BLOCK)
            assert not seq.block_table or live > self.manager.num_free_host_blocks
            return
        for device_id, host_id in self.manager.swap_out(seq):
            self.host[host_id] = list(self.device[device_id])
        self.running.remove(seq)
        self.swapped.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seq = data.draw(st.sampled_from(self.swapped), label="seq")
        if not self.manager.can_swap_in(seq):
            return
        for host_id, device_id in self.manager.swap_in(seq):
            self.device[device_id] = list(self.host[host_id])
        self.swapped.remove(seq)
        self.running.append(seq)

    @precondition(lambda self: self.manager.evictable)
    @rule()
    def reset_cache(self):
        evictable = len(self.manager.evictable)
        assert self.manager.reset_prefix_cache() == evictable and not self.manager.evictable

    @invariant()
    def bookkeeping_is_consistent(self):
        manager = self.manager
        manager.check_invariants()
        referenced = sum(1 for refs in manager.ref_counts if refs)
        assert len(manager.free_block_ids) + len(manager.evictable) + referenced == NUM_BLOCKS
        assert manager.num_free_blocks == NUM_BLOCKS - referenced
        assert set(manager.host_block_table) == set(self.swapped)
        in_host = sum(len(table) - table.count(NO_BLOCK) for table in manager.host_block_table.values())
        assert manager.num_free_host_blocks + in_host == NUM_HOST_BLOCKS

    @invariant()
    def every_computed_slot_holds_its_prefix(self):
        for seq in self.running + self.swapped:
            table, memory = ((seq.block_table, self.device) if seq in self.running
                             else (self.manager.host_block_table[seq], self.host))
            tokens = seq.token_ids(0, seq.num_tokens)
            for pos in range(self._first_readable(seq), seq.num_computed_tokens):
                assert memory[table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] == tuple(tokens[:pos + 1])

    def _first_readable(self, seq: Sequence) -> int:
        """The first position a query of `seq` may still read (all of them without a window)."""
        return 0

    @invariant()
    def every_cached_block_holds_its_key(self):
        for block_id, key in self.manager.block_keys.items():
            chain = []
            while key is not None:
                chain.append(key.tokens)
                key = key.parent
            prefix = tuple(token for tokens in reversed(chain) for token in tokens)
            start = len(prefix) - BLOCK_SIZE
            assert self.device[block_id] == [prefix[:start + j + 1] for j in range(BLOCK_SIZE)]

    def teardown(self):
        for seq in self.running + self.swapped:
            self.manager.free(seq)
        manager = self.manager
        manager.check_invariants()
        assert manager.num_free_blocks == NUM_BLOCKS and not any(manager.ref_counts)
        assert manager.num_free_host_blocks == NUM_HOST_BLOCKS and not any(manager.host_ref_counts)
        assert not manager.host_block_table


BlockManagerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase


class CollidingHash:
    """A machine's operations under a hash that ignores the parent and collides all the time."""

    def __init__(self):
        self.real_hash = block_manager_module.hash_block
        block_manager_module.hash_block = lambda parent_hash, tokens: sum(tokens) % 2
        super().__init__()

    def teardown(self):
        try:
            super().teardown()
        finally:
            block_manager_module.hash_block = self.real_hash


class CollidingHashMachine(CollidingHash, BlockManagerMachine):
    """The same operations under the colliding hash."""


CollidingHashMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCollidingHashMachine = CollidingHashMachine.TestCase


class SlidingWindowMachine(BlockManagerMachine):
    """The same operations on a model whose every layer sees its last 3 keys: after each step the
    blocks behind the next token's window go, and everything a query can still read is intact."""

    WINDOW = 3

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, num_host_blocks=NUM_HOST_BLOCKS,
                                    sliding_window=self.WINDOW)

    def _step(self, seq, target, computed=None):
        done = super()._step(seq, target, computed)
        if done:
            self.manager.release_behind_window(seq)
        return done

    def _first_readable(self, seq):
        return max(0, seq.num_computed_tokens - self.WINDOW + 1)

    @invariant()
    def only_blocks_a_query_reads_are_held(self):
        for seq in self.running:
            behind = self._first_readable(seq) // BLOCK_SIZE
            assert all(b == NO_BLOCK for b in seq.block_table[:behind])
            assert NO_BLOCK not in seq.block_table[behind:]


SlidingWindowMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSlidingWindowMachine = SlidingWindowMachine.TestCase


def test_a_long_sequence_holds_only_its_window():
    """Window 6, blocks of 4: computing 40 tokens one at a time never holds more than the blocks
    the next token's window spans plus the one it is written to; prefix-cached blocks released
    behind the window stay cached, and every block is free again at the end."""
    manager = BlockManager(num_blocks=8, block_size=4, sliding_window=6)
    seq = make_seq(range(2))
    take_prefix(manager, seq)
    compute(manager, seq, 2)
    for target in range(3, 41):
        seq.output_token_ids.append(100 + target)
        compute(manager, seq, target)
        released = manager.release_behind_window(seq)
        live = [b for b in seq.block_table if b != NO_BLOCK]
        first = max(0, target - 6 + 1)
        assert seq.block_table[:first // 4] == [NO_BLOCK] * (first // 4)
        assert len(live) == len(seq.block_table) - first // 4 <= 3
        assert released == (1 if target >= 9 and (target - 5) % 4 == 0 else 0), target
        manager.check_invariants()
    assert len(seq.block_table) == 10 and len(manager.evictable) == 8 - len(live) - len(manager.free_block_ids)
    manager.free(seq)
    manager.check_invariants()
    assert manager.num_free_blocks == 8 and not any(manager.ref_counts)


def test_no_window_releases_nothing():
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = admit(manager, range(30))
    assert manager.release_behind_window(seq) == 0 and NO_BLOCK not in seq.block_table


def test_a_cached_prefix_under_a_window_revives_only_the_blocks_its_window_reaches():
    """A 30-token sequence, freed and cached whole; the same prompt comes again. Of its seven
    cached blocks (4 tokens each) the first token to compute, at 28, sees 23..28 with a window of
    6: only blocks 5 and 6 are taken, the rest stay evictable."""
    manager = BlockManager(num_blocks=10, block_size=4, sliding_window=6)
    first = admit(manager, range(30), "first")
    table = list(first.block_table)
    assert manager.release_behind_window(first) == 6  # the next token, 30, sees 25..30
    manager.free(first)
    again = make_seq(range(30), "again")
    computed = manager.get_computed_blocks(again)
    assert computed == ComputedBlocks((NO_BLOCK,) * 5 + tuple(table[5:7]), 28)
    evictable = len(manager.evictable)
    assert manager.allocate_slots(again, 2, computed) is not None
    assert len(manager.evictable) == evictable - 2 and again.block_table[:5] == [NO_BLOCK] * 5
    manager.check_invariants()
    manager.free(again)
    assert manager.num_free_blocks == 10 and not any(manager.ref_counts)


def test_a_one_token_window_still_takes_the_last_cached_block():
    """With a window of 1 no cached block is read again, but the prefix's last block is taken
    anyway: its key chains the blocks the sequence commits next."""
    manager = BlockManager(num_blocks=10, block_size=4, sliding_window=1)
    first = admit(manager, range(21), "first")
    table = list(first.block_table)
    manager.free(first)
    again = make_seq(range(21), "again")
    computed = manager.get_computed_blocks(again)
    assert computed == ComputedBlocks((NO_BLOCK,) * 4 + (table[4],), 20)
    take_prefix(manager, again)
    compute(manager, again, 21)
    again.output_token_ids.extend(range(50, 54))
    compute(manager, again, 25)
    manager.check_invariants()
    assert manager.get_computed_blocks(make_seq(list(range(21)) + list(range(50, 54)) + [9], "third")).num_tokens == 24
    manager.free(again)
    assert manager.num_free_blocks == 10 and not any(manager.ref_counts)


def test_a_prefix_whose_oldest_blocks_were_evicted_is_found_by_its_window():
    """Window 6, blocks of 4: a 30-token sequence is cached (its seven full blocks), then another
    one evicts the two oldest of them (released first behind the window, so the least recently
    used). The same prompt again still finds the two blocks its window reaches."""
    manager = BlockManager(num_blocks=10, block_size=4, sliding_window=6)
    first = admit(manager, range(30), "first")
    table = list(first.block_table)
    manager.release_behind_window(first)
    manager.free(first)
    other = admit(manager, range(100, 120), "other")  # 3 plain free blocks, then 2 evicted
    assert set(table[:2]) <= set(other.block_table) and not set(table[2:7]) & set(other.block_table)
    manager.free(other)
    computed = manager.get_computed_blocks(make_seq(range(30), "again"))
    assert computed == ComputedBlocks((NO_BLOCK,) * 5 + tuple(table[5:7]), 28)
    manager.check_invariants()


class CollidingHashWindowMachine(CollidingHash, SlidingWindowMachine):
    """The windowed operations under the colliding hash: prefixes found past evicted blocks are
    confirmed by their keys' tokens, never by a hash."""


CollidingHashWindowMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCollidingHashWindowMachine = CollidingHashWindowMachine.TestCase
