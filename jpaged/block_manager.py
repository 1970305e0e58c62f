"""The paged KV cache's bookkeeping: free blocks, ref counts, block tables, prefix cache, host pool.

Each sequence's `block_table` maps its logical blocks (token `i` is in logical block
`i // block_size`) to physical blocks of the device cache. Blocks are taken as a sequence grows
and released when their ref count drops to zero. The manager only does bookkeeping: every call
that needs KV data moved returns `(src, dst)` block pairs for the model runner to apply.

The scheduler's view of it is three calls, as vLLM V1's KV cache manager: `get_computed_blocks`
(a sequence's longest cached prefix, looked up once per admission), `allocate_slots` (room for n
new tokens, or None and no change when they do not fit) and `free`. Forks, swaps, prefix-cache
commits and releases behind a sliding window have their own calls.

Sharing, three ways:

- **Prefix caching.** A full, computed block is registered under a hash of its tokens chained
  with the hash of the block before it. A new sequence reuses the cached blocks of its longest
  cached prefix (`get_computed_blocks`) and computes only the rest. A sequence that asks for
  prompt logprobs reads no cached blocks (it must compute every prompt position), as in vLLM. The
  first block of a sequence run through a LoRA adapter chains from that adapter's own root key,
  so sequences share cached blocks only under the same adapter; a request's `cache_salt` is
  part of its first block's key, so salted prefixes are shared only under the same salt. Lookups
  compare the stored tokens and the identity of the parent block's key too, so a hash collision
  can only cost a miss, never return another prefix's KV. Registered blocks whose ref count drops to zero stay
  cached as *evictable*; allocation takes plain free blocks first, then evicts the least
  recently used cached block.
- **Fork** (parallel sampling, beam search): a child shares all its parent's blocks by ref
  count. Before KV is written into a block with ref count > 1, `allocate_slots` gives the
  writer a private copy. Full prefix-cached blocks are never written, so they are never copied.
- **Swap**: a sequence's blocks move to a host pool (`swap_out`) and back to fresh device
  blocks (`swap_in`). A block the sequence shares stays on the device for its other holders;
  the swapped sequence takes a host copy of it and gets a private device block back on swap-in,
  so no sharer is ever affected. Swapping is refused only when the host pool has no room.

Sliding windows. When every layer of the model attends to at most the last W keys (Mistral's
sliding window on all layers, say), a block wholly before the window of a sequence's next token
is never read again: `release_behind_window` releases it after each step, and its table entry
becomes `NO_BLOCK` (the step reads block 0 there, and every attention path skips blocks before a
query's window). A long sequence then holds about W / block_size blocks plus its next chunk's, as
vLLM's sliding-window KV manager does. Released cached blocks stay cached as evictable, the
oldest first in line for eviction, and a prefix hit needs only the cached blocks of its window
(`_match_prefix` follows the prefix's chain of keys past evicted blocks).

Order of a step's block moves on the device, for the returned pairs to stay correct when a block
released in one call is reallocated in a later call of the same step: swap-outs first, then
copy-on-write copies (all sources read before any destination is written), then swap-ins, then
the forward pass. Swap-ins may also go before the copies when no block is released before a
swap-in in the same step (the scheduler swaps in only in steps without preemption).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

from jpaged.sequence import Sequence

ROOT_HASH = 0x9E3779B97F4A7C15  # the parent hash of every sequence's first block
NO_BLOCK = -1  # a block-table entry released behind the sliding window (`release_behind_window`)


def _chunk(seq: Sequence, tokens: list[int], index: int, size: int) -> tuple:
    """What block `index` of `seq` is cached under: its tokens, then `(hash, offset)` of each of
    the prompt's input embeddings (an image, or an embeds prompt's block) it holds positions of,
    so that blocks of equal placeholders but other embeddings never match; the first block also
    holds the request's cache salt, which every later block chains from (vLLM's `cache_salt`)."""
    start, stop = index * size, (index + 1) * size
    chunk = tuple(tokens[start:stop])
    request = seq.request
    if index == 0 and request.cache_salt is not None:
        chunk += (("salt", request.cache_salt),)
    if not request.input_embeds:
        return chunk
    return chunk + tuple((embeds.hash, embeds.offset) for embeds in request.input_embeds
                         if embeds.offset < stop and embeds.offset + embeds.length > start)


def hash_block(parent_hash: int, tokens: tuple[int, ...]) -> int:
    """Hash of a full block: its tokens chained with the hash of the block before it."""
    return hash((parent_hash, tokens))


@dataclass(frozen=True, eq=False)
class BlockKey:
    """What a cached full block holds: a chained hash, its tokens, the key of the block before it.

    Compared by identity: a key stands for one exact prefix, the chain of `parent`s down to None.
    """

    hash: int
    tokens: tuple[int, ...]
    parent: BlockKey | None

    def matches(self, tokens: tuple[int, ...], parent: BlockKey | None) -> bool:
        return self.parent is parent and self.tokens == tokens


@dataclass(frozen=True)
class ComputedBlocks:
    """A sequence's longest cached prefix: its cached blocks, first to last (`NO_BLOCK` for those
    behind the sliding window of its first token to compute), and the tokens they hold
    (`len(blocks) * block_size`). Valid until the manager next changes."""

    blocks: tuple[int, ...] = ()
    num_tokens: int = 0


class Slots(NamedTuple):
    """What `allocate_slots` did: blocks appended to the table, and the `(src, dst)` block copies
    (copy-on-write) the device must make before the step writes."""

    new_blocks: list[int]
    copies: list[tuple[int, int]]


def reads_prefix_cache(seq: Sequence) -> bool:
    """Whether `seq` may start after cached blocks: not when it asks for prompt logprobs, which
    need every prompt position's logits."""
    return seq.sampling_params.prompt_logprobs is None


class BlockManager:
    """`sliding_window`: None, or W when no layer's query sees more than its last W keys (then
    `release_behind_window` frees what no query reaches again)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0, sliding_window: int | None = None):
        if num_blocks < 0 or block_size <= 0 or num_host_blocks < 0 or (sliding_window or 1) <= 0:
            raise ValueError(f"bad sizes: num_blocks={num_blocks}, block_size={block_size}, "
                             f"num_host_blocks={num_host_blocks}, sliding_window={sliding_window}")
        self.sliding_window = sliding_window
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # plain free, unregistered
        self.ref_counts = [0] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0; least recent first
        self.block_keys: dict[int, BlockKey] = {}  # registered block -> its key
        self.cached: dict[int, list[int]] = {}  # hash -> registered blocks with that hash
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up
        self.prefix_cache_hits = 0  # tokens found cached
        # per sequence: how many leading blocks are committed, and the key of the last one
        self._progress: dict[Sequence, tuple[int, BlockKey | None]] = {}
        self._holders: dict[Sequence, None] = {}  # sequences that may hold device blocks
        self._lora_roots: dict[int, BlockKey] = {}  # adapter id -> the parent key of its first blocks
        self.num_host_blocks = num_host_blocks
        self.host_free_block_ids: deque[int] = deque(range(num_host_blocks))
        self.host_ref_counts = [0] * num_host_blocks
        self.host_block_table: dict[Sequence, list[int]] = {}  # swapped-out sequences

    # ---- counting --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free plus evictable cached ones."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.host_free_block_ids)

    @property
    def usage(self) -> float:
        """Share of device blocks referenced by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- the scheduler's calls -------------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence) -> ComputedBlocks:
        """The cached blocks of a fresh `seq`'s longest cached prefix; changes nothing.

        At least one token is always left to compute. Empty when prefix caching is off or `seq`
        reads no cached blocks (`reads_prefix_cache`). Under a sliding window the blocks no query
        of `seq` reaches, all but the prefix's last, are `NO_BLOCK`: only those in the window are
        taken. Pass the result to `allocate_slots`.
        """
        if not (self.enable_prefix_caching and reads_prefix_cache(seq)):
            return ComputedBlocks()
        blocks = self._match_prefix(seq)
        return ComputedBlocks(tuple(blocks), len(blocks) * self.block_size)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> Slots | None:
        """Make room for `num_new_tokens` more tokens of `seq`, or return None (changing nothing)
        when the free blocks are too few.

        `computed` (from `get_computed_blocks`, for a fresh sequence only) is taken first: its
        blocks head the table and the new tokens follow them; the caller then sets
        `seq.num_computed_tokens = computed.num_tokens`. Blocks shared with other sequences in
        the range the new tokens are written to are replaced by private copies. Admitting with
        `computed` counts the lookup in the prefix-cache hit rate.

        Raises ValueError when `computed` is given for a sequence that already holds blocks or
        computed tokens, RuntimeError when `seq` is swapped out.
        """
        if seq in self.host_block_table:
            raise RuntimeError(f"sequence {seq.request_id} is swapped out; swap it in to grow it")
        if computed is not None and (seq.block_table or seq.num_computed_tokens):
            raise ValueError(
                f"cached blocks go to a fresh sequence; {seq.request_id} has "
                f"{len(seq.block_table)} blocks, {seq.num_computed_tokens} computed tokens")
        reused = computed.blocks if computed is not None else ()
        start = seq.num_computed_tokens + len(reused) * self.block_size
        stop = start + num_new_tokens
        missing = max(0, self.blocks_for(stop) - len(seq.block_table) - len(reused))
        copied = self._shared_indices(seq, start, stop)
        revived = sum(block_id in self.evictable for block_id in reused)
        if missing + len(copied) + revived > self.num_free_blocks:
            return None
        for block_id in _live(reused):
            self.evictable.pop(block_id, None)
            self.ref_counts[block_id] += 1
        seq.block_table.extend(reused)
        if computed is not None:
            self._progress[seq] = (len(reused), self.block_keys[reused[-1]] if reused else self._root(seq))
            if self.enable_prefix_caching and reads_prefix_cache(seq):
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += computed.num_tokens
        new_blocks = [self._allocate() for _ in range(missing)]
        seq.block_table.extend(new_blocks)
        if seq.block_table:
            self._holders[seq] = None
        copies = []
        for index in copied:
            src, dst = seq.block_table[index], self._allocate()
            self.ref_counts[src] -= 1  # was shared, so someone still holds it
            seq.block_table[index] = dst
            copies.append((src, dst))
        return Slots(new_blocks, copies)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s device blocks (last first) and host blocks; forget its progress."""
        for block_id in _live(reversed(seq.block_table)):
            self._release(block_id)
        seq.block_table = []
        for host_id in _live(self.host_block_table.pop(seq, [])):
            self._release_host(host_id)
        self._progress.pop(seq, None)
        self._holders.pop(seq, None)

    def release_behind_window(self, seq: Sequence) -> int:
        """Release the blocks of `seq` that no query of its reaches again: its next token, at
        position `seq.num_computed_tokens`, sees keys from that position - `sliding_window` + 1
        on, and so does every later one. Their entries become `NO_BLOCK`; returns how many
        were released (0 without a sliding window)."""
        table = seq.block_table
        stop = start = min(self._blocks_behind_window(seq.num_computed_tokens), len(table))
        while start > 0 and table[start - 1] != NO_BLOCK:  # those before were released in earlier steps
            start -= 1
        for index in range(start, stop):  # oldest first: the first to be evicted, as no window reads them
            self._release(table[index])
            table[index] = NO_BLOCK
        return stop - start

    def _blocks_behind_window(self, position: int) -> int:
        """How many leading blocks hold only keys before the sliding window of a query at
        `position` (0 without a window)."""
        if self.sliding_window is None:
            return 0
        return max(0, position - self.sliding_window + 1) // self.block_size

    def _allocate(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        elif self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self._unregister(block_id)
        else:
            raise RuntimeError("no free KV cache block")
        self.ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        if self.ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} freed twice")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            if block_id in self.block_keys:
                self.evictable[block_id] = None  # most recently used end
            else:
                self.free_block_ids.append(block_id)

    # ---- prefix caching --------------------------------------------------------------------

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """The blocks of `seq`'s longest prefix whose needed blocks are cached: all of them without
        a sliding window; under one, those the window of its first token to compute reaches and
        the last (whose key the next commits chain from), `NO_BLOCK` before them. Blocks are
        found by the chain of their prefix's keys, which outlives evicted blocks, so a prefix
        whose oldest blocks were evicted is still found under a window (as vLLM's sliding-window
        manager finds it)."""
        size = self.block_size
        tokens = seq.token_ids(0, seq.num_tokens)
        num_full = (seq.num_tokens - 1) // size  # the last token is always computed
        root = self._root(seq)
        keys: list = [root] + [_UNKNOWN] * num_full  # keys[i + 1]: the key of chunks[:i + 1], once found
        chunks: list[tuple[int, ...]] = []
        found: list[int | None] = []
        block_hash = root.hash if root is not None else ROOT_HASH
        for index in range(num_full):
            chunks.append(chunk := _chunk(seq, tokens, index, size))
            block_hash = hash_block(block_hash, chunk)
            block_id = self._find(block_hash, chunks, index, keys)
            if block_id is None and self.sliding_window is None:
                break
            found.append(block_id)
        missing = list(accumulate((block_id is None for block_id in found), initial=0))
        for n in range(len(found), 0, -1):
            first = min(self._blocks_behind_window(n * size), n - 1)
            if missing[n] == missing[first]:
                return [NO_BLOCK] * first + found[first:n]
        return []

    def _find(self, block_hash: int, chunks: list[tuple[int, ...]], index: int, keys: list) -> int | None:
        """A cached block holding `chunks[index]` after the prefix `chunks[:index]`, or None;
        records the keys of the prefix it confirms in `keys`."""
        for block_id in self.cached.get(block_hash, ()):
            key = self.block_keys[block_id]
            if key.tokens == chunks[index] and _is_prefix_key(key.parent, chunks, index - 1, keys):
                keys[index + 1] = key
                return block_id
        return None

    def _root(self, seq: Sequence) -> BlockKey | None:
        """The parent key of `seq`'s first block: None for the base model, else its LoRA adapter's."""
        lora = seq.request.lora
        if lora is None:
            return None
        return self._lora_roots.setdefault(lora.lora_int_id, BlockKey(hash(("lora", lora.lora_int_id)), (), None))

    def forget_lora(self, lora_int_id: int) -> None:
        """Stop matching the cached prefixes of adapter `lora_int_id` (it was removed, and the id may
        come back as another adapter); its unused cached blocks are evicted as any others."""
        self._lora_roots.pop(lora_int_id, None)

    def _lookup(self, tokens: tuple[int, ...], parent: BlockKey | None) -> int | None:
        parent_hash = parent.hash if parent is not None else ROOT_HASH
        for block_id in self.cached.get(hash_block(parent_hash, tokens), ()):
            if self.block_keys[block_id].matches(tokens, parent):
                return block_id
        return None

    def commit_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Register every block of `seq` whose tokens are all computed and not yet registered."""
        if not self.enable_prefix_caching:
            return
        done, parent = self._progress.get(seq, (0, self._root(seq)))
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= done:
            return
        size = self.block_size
        tokens = seq.token_ids(0, num_full * size)
        for index in range(done, num_full):
            if seq.block_table[index] == NO_BLOCK:  # released before it was committed: the chain ends
                num_full = index
                break
            chunk = _chunk(seq, tokens, index, size)
            parent = self._commit_block(seq.block_table[index], chunk, parent)
        self._progress[seq] = (num_full, parent)

    def _commit_block(self, block_id: int, tokens: tuple[int, ...],
                      parent: BlockKey | None) -> BlockKey:
        """Register `block_id` unless this prefix is cached already; return the prefix's key."""
        own = self.block_keys.get(block_id)
        if own is not None and own.matches(tokens, parent):
            return own
        found = self._lookup(tokens, parent)
        if found is not None:
            return self.block_keys[found]  # an equal block is cached; this one stays unregistered
        key = BlockKey(hash_block(parent.hash if parent else ROOT_HASH, tokens), tokens, parent)
        if own is None:  # a block registered under another key (shared by fork) is left as is
            self.block_keys[block_id] = key
            self.cached.setdefault(key.hash, []).append(block_id)
        return key

    def _unregister(self, block_id: int) -> None:
        key = self.block_keys.pop(block_id)
        bucket = self.cached[key.hash]
        bucket.remove(block_id)
        if not bucket:
            del self.cached[key.hash]

    def reset_prefix_cache(self) -> int:
        """Move every evictable cached block to the plain free list; return how many moved."""
        moved = len(self.evictable)
        for block_id in self.evictable:
            self._unregister(block_id)
            self.free_block_ids.append(block_id)
        self.evictable.clear()
        return moved

    # ---- fork and copy-on-write ------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of `parent`'s blocks with `child` (whose table must be empty).

        The caller gives the child the parent's tokens and `num_computed_tokens`.
        """
        if child.block_table or child in self.host_block_table:
            raise ValueError(f"fork target {child.request_id} already holds blocks")
        if parent in self.host_block_table:
            raise ValueError(f"cannot fork {parent.request_id}: it is swapped out")
        for block_id in _live(parent.block_table):
            self.ref_counts[block_id] += 1
        child.block_table = list(parent.block_table)
        if child.block_table:
            self._holders[child] = None
        if parent in self._progress:
            self._progress[child] = self._progress[parent]

    def _shared_indices(self, seq: Sequence, start: int, stop: int) -> list[int]:
        if stop <= start:
            return []
        last = min((stop - 1) // self.block_size, len(seq.block_table) - 1)
        return [i for i in range(start // self.block_size, last + 1)
                if seq.block_table[i] != NO_BLOCK and self.ref_counts[seq.block_table[i]] > 1]

    # ---- swap ------------------------------------------------------------------------------

    def can_swap_out(self, seq: Sequence) -> bool:
        return (bool(seq.block_table) and seq not in self.host_block_table
                and len(_live(seq.block_table)) <= len(self.host_free_block_ids))

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move `seq`'s blocks to the host pool; return `(device, host)` pairs to copy.

        Each device block loses `seq`'s reference: unshared blocks are freed (cached ones become
        evictable), shared ones stay with their other holders, untouched. `NO_BLOCK` entries
        stay as they are.
        """
        if not self.can_swap_out(seq):
            raise RuntimeError(f"cannot swap out {seq.request_id}: {len(_live(seq.block_table))} blocks, "
                               f"{len(self.host_free_block_ids)} free host blocks")
        pairs = []
        for block_id in _live(seq.block_table):
            host_id = self.host_free_block_ids.popleft()
            self.host_ref_counts[host_id] = 1
            pairs.append((block_id, host_id))
        for block_id in _live(reversed(seq.block_table)):
            self._release(block_id)
        self.host_block_table[seq] = _relabel(seq.block_table, [host_id for _, host_id in pairs])
        seq.block_table = []
        self._holders.pop(seq, None)
        return pairs

    def can_swap_in(self, seq: Sequence) -> bool:
        table = self.host_block_table.get(seq)
        return table is not None and len(_live(table)) <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring `seq`'s blocks back to fresh device blocks; return `(host, device)` pairs."""
        if not self.can_swap_in(seq):
            raise RuntimeError(f"cannot swap in {seq.request_id}: not swapped out or "
                               f"{self.num_free_blocks} free blocks are too few")
        host_table = self.host_block_table.pop(seq)
        pairs = [(host_id, self._allocate()) for host_id in _live(host_table)]
        for host_id in _live(host_table):
            self._release_host(host_id)
        seq.block_table = _relabel(host_table, [block_id for _, block_id in pairs])
        self._holders[seq] = None
        return pairs

    def _release_host(self, host_id: int) -> None:
        if self.host_ref_counts[host_id] <= 0:
            raise RuntimeError(f"host block {host_id} freed twice")
        self.host_ref_counts[host_id] -= 1
        if self.host_ref_counts[host_id] == 0:
            self.host_free_block_ids.append(host_id)

    # ---- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent anywhere."""
        held = self._count(seq.block_table for seq in self._holders)
        self._check_pool("block", self.num_blocks, self.ref_counts, held,
                         list(self.free_block_ids) + list(self.evictable))
        assert not set(self.free_block_ids) & set(self.block_keys), "a plain free block is cached"
        assert all(b in self.block_keys for b in self.evictable), "an evictable block is not cached"
        assert self.enable_prefix_caching or not self.block_keys, "blocks cached with caching off"
        entries = [(h, b) for h, bucket in self.cached.items() for b in bucket]
        assert len(entries) == len(self.block_keys), "hash table and registered blocks disagree"
        for h, block_id in entries:
            assert block_id in self.block_keys and self.block_keys[block_id].hash == h, (
                f"hash table entry {h} -> block {block_id} whose registered hash differs")
        self._check_pool("host block", self.num_host_blocks, self.host_ref_counts,
                         self._count(self.host_block_table.values()),
                         list(self.host_free_block_ids))
        for seq in self.host_block_table:
            assert not seq.block_table, f"{seq.request_id} is swapped out but holds device blocks"

    @staticmethod
    def _count(tables) -> dict[int, int]:
        counts: dict[int, int] = {}
        for table in tables:
            for block_id in _live(table):
                counts[block_id] = counts.get(block_id, 0) + 1
        return counts

    @staticmethod
    def _check_pool(name: str, size: int, ref_counts: list[int], held: dict[int, int],
                    free: list[int]) -> None:
        assert len(free) == len(set(free)), f"a {name} is listed free twice"
        free_set = set(free)
        for block_id in range(size):
            refs = ref_counts[block_id]
            assert refs == held.get(block_id, 0), (
                f"{name} {block_id}: ref count {refs}, held by {held.get(block_id, 0)} tables")
            assert not (refs and block_id in free_set), (
                f"{name} {block_id} is both free and referenced")
            assert refs or block_id in free_set, (
                f"{name} {block_id} leaked: neither free nor referenced")
        assert set(held) <= set(range(size)), f"a table holds an unknown {name}"


_UNKNOWN = object()  # a prefix key not found yet


def _is_prefix_key(key: BlockKey | None, chunks: list[tuple[int, ...]], index: int, keys: list) -> bool:
    """Whether `key` is the key of the prefix `chunks[:index + 1]`: its chain of parents holds
    those chunks down to a key already confirmed in `keys` (`keys[0]`: the root). The keys it
    passes are recorded in `keys`."""
    passed = []
    while keys[index + 1] is _UNKNOWN:
        if key is None or key.tokens != chunks[index]:
            return False
        passed.append((index, key))
        key, index = key.parent, index - 1
    if key is not keys[index + 1]:
        return False
    for i, confirmed in passed:
        keys[i + 1] = confirmed
    return True


def _live(table) -> list[int]:
    """The entries of a block table (or an iterator over one) that hold blocks."""
    return [block_id for block_id in table if block_id != NO_BLOCK]


def _relabel(table: list[int], block_ids: list[int]) -> list[int]:
    """`table` with its live entries replaced, in order, by `block_ids` (`NO_BLOCK` entries kept)."""
    replacements = iter(block_ids)
    return [NO_BLOCK if block_id == NO_BLOCK else next(replacements) for block_id in table]


def blocks_held_under_window(sliding_window: int, block_size: int, max_new_tokens: int) -> int:
    """The most blocks a sequence holds at once when no layer's query sees more than its last
    `sliding_window` keys and a step computes at most `max_new_tokens` of it: its next token's
    window and the new tokens, block-aligned at both ends (`release_behind_window` after every step)."""
    return -(-(sliding_window - 1 + max_new_tokens) // block_size) + 1
