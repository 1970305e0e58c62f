"""The PagedAttention paper's memory study in miniature, as a simulation (no model runs).

Requests are token-count streams. A small FCFS loop drives the real
`jpaged.block_manager.BlockManager` (not the Scheduler): all requests arrive at step 0; each
step every running request appends one token (its KV is written), requests that reach their
length finish and free their blocks, and then waiting requests are admitted in arrival order
while memory lasts (a prompt is prefilled in one step). When a running request needs a block
and none is free, the latest-arrived running request is preempted (vLLM's recompute: its
blocks are freed and it waits at the head of the queue). Every simulation has a fixed KV budget
of `--kv-tokens` tokens. Every figure below is an average over the steps *under load* (some
request still waiting, so the KV budget is what limits the batch); the drain at the end, when
the queue is empty, is left out (a run in which no request ever waited is averaged over all
its steps, and marked).

Four measurements, the first three beside the paper's figures (Kwon et al., SOSP 2023, Fig. 2 and Fig. 15):

1. Share of KV memory holding real tokens while serving. jpaged: tokens stored / (allocated
   blocks x block size). Contiguous reservation systems (Orca-style), with
   the same FCFS admission and the same budget, reserve per request at admission:
   `max` = max_model_len (FasterTransformer / Orca "max"), `pow2` = the true prompt+output
   length rounded up to a power of two (Orca "pow2"), `oracle` = the true length. Their share is
   tokens stored / tokens reserved. Reservations are placed first-fit in one contiguous token
   space, so external fragmentation (gaps too small for the next request) limits admission; it
   shows in the "tokens / budget" column (tokens stored / the whole budget), which also counts
   memory no request holds.
2. Requests batched at the fixed KV budget: running requests per step.
3. Memory saved by sharing, on both workloads: parallel sampling (n sequences per request; the
   prompt's blocks are shared with `fork`, a shared, partially filled last block is copied on
   write) and beam search (width k; each step the k surviving beams are drawn uniformly at
   random, with replacement, from the current beams, seeded: a beam drawn m times forks into m,
   a beam never drawn dies; forked beams share all blocks by ref count and a block is copied
   only when written). Saving = 1 - blocks in use / blocks if every sequence held its own copy
   of all its tokens. In parallel sampling each sequence draws its own output length; all
   beams of a request run for the request's output length. A preempted group restarts from its
   prompt. Uniformly random survivors give all beams a recent common ancestor (about 2 x width
   steps back on average), so these savings need not match real beam search, whose survivors
   are picked by score.

4. Sliding window: the same requests for a model whose every layer attends to its last
   `--sliding-window` keys (Mistral's rule), with every block kept (as for a model with any
   full-attention layer) against the blocks behind each sequence's window released after every
   step (`BlockManager.release_behind_window`): requests batched, preemptions, steps to drain.

Workloads are synthetic approximations, NOT the real ShareGPT or Alpaca data sets: prompt and
output lengths are independent lognormals with the given means (mu = ln(mean) - sigma^2 / 2)
and sigmas, rounded, at least 1 token, and capped so that prompt + output <= 2048:

    ShareGPT-like: prompt mean 160, sigma 1.0; output mean 340, sigma 0.9
    Alpaca-like:   prompt mean 20,  sigma 0.6; output mean 60,  sigma 0.8

    python scripts/bench_memory.py [--num-requests 3000] [--sharing-requests 600]
        [--kv-tokens 16384] [--block-size 16] [--sliding-window 256] [--seed 0] [--quick]
        [--out bench_results/memory.json] [--plot bench_results/memory.png]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from jpaged.block_manager import BlockManager

MAX_MODEL_LEN = 2048
WATERMARK = 0.01  # share of blocks kept free at admission, as vLLM's scheduler does
SHARING_WIDTHS = (2, 4, 6)

# The paper's figures (Kwon et al., "Efficient Memory Management for Large Language Model
# Serving with PagedAttention", SOSP 2023).
PAPER_REAL_TOKEN_SHARE = {"jpaged": 96.3, "oracle": 38.2, "pow2": 26.8, "max": 20.4}  # Fig. 2, %
PAPER_SAVING_RANGE = {"parallel": (6.1, 9.8), "beam": (37.6, 55.2)}  # Fig. 15, Alpaca, %, n/width 2..6


# ---- workloads --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthDist:
    """A lognormal token-length distribution given by its mean and the sigma of its log."""

    mean: float
    sigma: float

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma**2 / 2
        return np.maximum(1, np.rint(rng.lognormal(mu, self.sigma, size))).astype(int)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthDist
    output: LengthDist
    max_len: int = MAX_MODEL_LEN


WORKLOADS = (
    Workload("ShareGPT-like", LengthDist(160, 1.0), LengthDist(340, 0.9)),
    Workload("Alpaca-like", LengthDist(20, 0.6), LengthDist(60, 0.8)),
)


def sample_requests(workload: Workload, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """`count` (prompt_len, output_len) pairs with prompt_len + output_len <= max_len."""
    prompts = np.minimum(workload.prompt.sample(count, rng), workload.max_len - 1)
    outputs = np.minimum(workload.output.sample(count, rng), workload.max_len - prompts)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


def sample_output_lengths(workload: Workload, prompt_len: int, count: int,
                          rng: np.random.Generator) -> list[int]:
    """`count` more output lengths for a prompt of `prompt_len` tokens (parallel sampling)."""
    return [int(o) for o in np.minimum(workload.output.sample(count, rng), workload.max_len - prompt_len)]


# ---- per-step statistics ----------------------------------------------------------------------

@dataclass
class StepLog:
    """What one simulation saw at the end of every step that had running requests."""

    tokens: list[int] = field(default_factory=list)  # tokens whose KV is stored (logical)
    held: list[int] = field(default_factory=list)  # token slots held: blocks x size, or reserved
    batch: list[int] = field(default_factory=list)  # running requests (groups)
    unshared: list[int] = field(default_factory=list)  # token slots if no block were shared
    loaded: list[bool] = field(default_factory=list)  # whether requests were still waiting

    def record(self, tokens: int, held: int, batch: int, loaded: bool, unshared: int | None = None) -> None:
        self.tokens.append(tokens)
        self.held.append(held)
        self.batch.append(batch)
        self.loaded.append(loaded)
        self.unshared.append(held if unshared is None else unshared)

    def measured(self) -> np.ndarray:
        """The steps averaged over: those under load (requests waiting), or all if there are none."""
        loaded = np.array(self.loaded, bool)
        return loaded if loaded.any() else np.ones_like(loaded)


@dataclass
class ServingResult:
    """Averages over the steps under load (some request waiting), or over all steps if none was."""

    policy: str
    steps: int
    steps_under_load: int
    real_token_share: float  # mean over steps of tokens / held
    budget_share: float  # mean over steps of tokens / budget
    held_share: float  # mean over steps of held / budget
    mean_batch: float
    preemptions: int = 0
    sharing_saving: float = 0.0  # mean over steps of 1 - held / unshared

    @classmethod
    def from_log(cls, policy: str, log: StepLog, budget: int, preemptions: int = 0) -> ServingResult:
        mask = log.measured()
        tokens, held = np.array(log.tokens, float)[mask], np.array(log.held, float)[mask]
        unshared, batch = np.array(log.unshared, float)[mask], np.array(log.batch, float)[mask]
        return cls(policy=policy, steps=len(log.tokens), steps_under_load=int(sum(log.loaded)),
                   real_token_share=float(np.mean(tokens / held)),
                   budget_share=float(np.mean(tokens / budget)),
                   held_share=float(np.mean(held / budget)),
                   mean_batch=float(np.mean(batch)), preemptions=preemptions,
                   sharing_saving=float(np.mean(1.0 - held / unshared)))


# ---- contiguous reservation (Orca / FasterTransformer style) ----------------------------------

def reservation(policy: str, total_len: int, max_len: int) -> int:
    """Tokens a contiguous system reserves for a request whose true length is `total_len`."""
    if policy == "max":
        return max_len
    if policy == "pow2":
        return min(max_len, 1 << (total_len - 1).bit_length())
    if policy == "oracle":
        return total_len
    raise ValueError(f"unknown reservation policy {policy!r}; expected max, pow2 or oracle")


class FirstFitArena:
    """One contiguous token address space; reservations placed first-fit, so gaps can form."""

    def __init__(self, size: int):
        self.size = size
        self.spans: list[tuple[int, int]] = []  # (start, length), sorted by start

    def allocate(self, length: int) -> int | None:
        """Start of a free span of `length` tokens, now taken; None if no gap is large enough."""
        end_of_previous = 0
        for start, span_length in self.spans:
            if start - end_of_previous >= length:
                break
            end_of_previous = start + span_length
        else:
            if self.size - end_of_previous < length:
                return None
        bisect.insort(self.spans, (end_of_previous, length))
        return end_of_previous

    def release(self, start: int, length: int) -> None:
        self.spans.remove((start, length))


@dataclass
class ReservedRequest:
    length: int  # tokens stored now
    total: int  # prompt + output: the request finishes when it stores this many
    start: int
    reserved: int


def simulate_reservation(requests: list[tuple[int, int]], policy: str, kv_tokens: int,
                         max_len: int = MAX_MODEL_LEN) -> ServingResult:
    """FCFS serving with each request's KV reserved contiguously at admission."""
    if kv_tokens < max_len:
        raise ValueError(f"kv_tokens={kv_tokens} is below max_model_len={max_len}: "
                         "a max-length request could never be admitted")
    arena, log = FirstFitArena(kv_tokens), StepLog()
    waiting, running = deque(requests), []
    while waiting or running:
        for request in running:
            request.length += 1
        for request in [r for r in running if r.length == r.total]:
            arena.release(request.start, request.reserved)
            running.remove(request)
        while waiting:
            prompt_len, output_len = waiting[0]
            reserved = reservation(policy, prompt_len + output_len, max_len)
            start = arena.allocate(reserved)
            if start is None:
                break
            waiting.popleft()
            running.append(ReservedRequest(prompt_len, prompt_len + output_len, start, reserved))
        if running:
            log.record(sum(r.length for r in running), sum(r.reserved for r in running), len(running),
                       loaded=bool(waiting))
    return ServingResult.from_log(policy, log, kv_tokens)


# ---- paged KV cache: the real BlockManager ----------------------------------------------------

class SimSequence:
    """What BlockManager reads off a sequence. No token ids: prefix caching is never used here."""

    def __init__(self, request_id: str, num_tokens: int):
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.num_computed_tokens = num_tokens
        self.block_table: list[int] = []

    def token_ids(self, start: int, stop: int) -> list[int]:
        return [0] * (min(stop, self.num_tokens) - start)


def allocate(manager: BlockManager, seq: SimSequence, num_new_tokens: int) -> None:
    """Room for `num_new_tokens` tokens after `seq.num_computed_tokens` (shared blocks copied)."""
    if manager.allocate_slots(seq, num_new_tokens) is None:
        raise RuntimeError(f"{seq.request_id}: no room for {num_new_tokens} tokens")


def store_prompt(manager: BlockManager, seq: SimSequence) -> None:
    """Blocks for a fresh sequence's whole prompt."""
    seq.num_computed_tokens = 0
    allocate(manager, seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.release_behind_window(seq)


def append_token(manager: BlockManager, seq: SimSequence) -> None:
    """Write one more token's KV: copy the last block first if it is shared, grow if it is full."""
    allocate(manager, seq, 1)
    seq.num_tokens += 1
    seq.num_computed_tokens = seq.num_tokens
    manager.release_behind_window(seq)


def blocks_to_append(manager: BlockManager, seq: SimSequence) -> int:
    """Blocks `append_token` takes: a new one if the last is full, a copy if it is shared."""
    if seq.num_tokens % manager.block_size == 0:
        return 1
    return int(manager.ref_counts[seq.block_table[-1]] > 1)


class Group(Protocol):
    """What the FCFS loop schedules: one request's sequences (one, n samples, or k beams)."""

    sequences: list[SimSequence]

    def blocks_to_admit(self, manager: BlockManager) -> int: ...
    def admit(self, manager: BlockManager) -> None: ...
    def blocks_to_step(self, manager: BlockManager) -> int: ...  # an upper bound
    def step(self, manager: BlockManager, rng: np.random.Generator) -> bool: ...  # True: done, freed
    def preempt(self, manager: BlockManager) -> None: ...  # frees its blocks


class Request:
    """One sequence: stores prompt_len tokens when admitted, one more per step up to its total.

    Preemption keeps its generated tokens (they are recomputed on readmission, as in vLLM)."""

    def __init__(self, request_id: str, prompt_len: int, output_len: int):
        self.seq = SimSequence(request_id, prompt_len)
        self.total = prompt_len + output_len

    @property
    def sequences(self) -> list[SimSequence]:
        return [self.seq]

    def blocks_to_admit(self, manager: BlockManager) -> int:
        return manager.blocks_for(self.seq.num_tokens)

    def admit(self, manager: BlockManager) -> None:
        store_prompt(manager, self.seq)

    def blocks_to_step(self, manager: BlockManager) -> int:
        return blocks_to_append(manager, self.seq)

    def step(self, manager: BlockManager, rng: np.random.Generator) -> bool:
        """Append a token; return whether the request finished (its blocks are then freed)."""
        append_token(manager, self.seq)
        if self.seq.num_tokens == self.total:
            manager.free(self.seq)
            return True
        return False

    def preempt(self, manager: BlockManager) -> None:
        manager.free(self.seq)


class ParallelSampling:
    """n sequences sampled from one prompt: the prompt's blocks are shared by fork.

    Each sequence has its own output length and is freed when it finishes."""

    def __init__(self, request_id: str, prompt_len: int, output_lens: list[int]):
        self.request_id, self.prompt_len, self.output_lens = request_id, prompt_len, output_lens
        self.sequences: list[SimSequence] = []
        self.totals: dict[SimSequence, int] = {}

    def blocks_to_admit(self, manager: BlockManager) -> int:
        return manager.blocks_for(self.prompt_len)

    def admit(self, manager: BlockManager) -> None:
        parent = SimSequence(f"{self.request_id}.0", self.prompt_len)
        store_prompt(manager, parent)
        self.sequences = [parent]
        for index in range(1, len(self.output_lens)):
            child = SimSequence(f"{self.request_id}.{index}", self.prompt_len)
            manager.fork(parent, child)
            self.sequences.append(child)
        self.totals = {seq: self.prompt_len + out for seq, out in zip(self.sequences, self.output_lens)}

    def blocks_to_step(self, manager: BlockManager) -> int:
        return sum(blocks_to_append(manager, seq) for seq in self.sequences)

    def step(self, manager: BlockManager, rng: np.random.Generator) -> bool:
        for seq in list(self.sequences):
            append_token(manager, seq)
            if seq.num_tokens == self.totals[seq]:
                manager.free(seq)
                self.sequences.remove(seq)
        return not self.sequences

    def preempt(self, manager: BlockManager) -> None:
        for seq in self.sequences:
            manager.free(seq)
        self.sequences = []  # restarts from the prompt


class BeamSearch:
    """`width` beams over one prompt; each step the surviving beams are drawn at random.

    A beam drawn m times continues as m beams (m - 1 forks sharing all its blocks); a beam not
    drawn dies. All beams finish after `output_len` steps."""

    def __init__(self, request_id: str, prompt_len: int, output_len: int, width: int):
        self.request_id, self.prompt_len, self.output_len = request_id, prompt_len, output_len
        self.width = width
        self.sequences: list[SimSequence] = []
        self.steps_done = 0
        self._forks = 0

    def _new_sequence(self, num_tokens: int) -> SimSequence:
        self._forks += 1
        return SimSequence(f"{self.request_id}.{self._forks}", num_tokens)

    def blocks_to_admit(self, manager: BlockManager) -> int:
        return manager.blocks_for(self.prompt_len)

    def admit(self, manager: BlockManager) -> None:
        root = self._new_sequence(self.prompt_len)
        store_prompt(manager, root)
        self.sequences = [root] + [self._fork(manager, root) for _ in range(self.width - 1)]
        self.steps_done = 0

    def _fork(self, manager: BlockManager, parent: SimSequence) -> SimSequence:
        child = self._new_sequence(parent.num_tokens)
        manager.fork(parent, child)
        return child

    def blocks_to_step(self, manager: BlockManager) -> int:
        return self.width  # each surviving beam writes into at most one new or copied block

    def step(self, manager: BlockManager, rng: np.random.Generator) -> bool:
        draws = np.bincount(rng.integers(self.width, size=self.width), minlength=self.width)
        for beam, count in zip(self.sequences, draws):
            if count == 0:
                manager.free(beam)
        survivors = []
        for beam, count in zip(self.sequences, draws):
            if count:
                survivors += [beam] + [self._fork(manager, beam) for _ in range(count - 1)]
        self.sequences = survivors
        for beam in self.sequences:
            append_token(manager, beam)
        self.steps_done += 1
        if self.steps_done == self.output_len:
            self.preempt(manager)  # done: free every beam
            return True
        return False

    def preempt(self, manager: BlockManager) -> None:
        for beam in self.sequences:
            manager.free(beam)
        self.sequences = []  # restarts from the prompt if admitted again


@dataclass
class PagedRun:
    result: ServingResult
    manager: BlockManager  # kept for the caller to check that every block came back


def simulate_paged(groups: list[Group], kv_tokens: int, block_size: int, rng: np.random.Generator,
                   policy: str = "jpaged", sliding_window: int | None = None) -> PagedRun:
    """FCFS serving of `groups` (Request, ParallelSampling or BeamSearch) on a BlockManager."""
    manager = BlockManager(kv_tokens // block_size, block_size, enable_prefix_caching=False,
                           sliding_window=sliding_window)
    watermark = int(WATERMARK * manager.num_blocks)
    waiting, running, log, preemptions = deque(groups), [], StepLog(), 0
    while waiting or running:
        preempted = decode_step(manager, running, waiting, rng)
        preemptions += preempted
        if not preempted:
            admit_waiting(manager, running, waiting, watermark)
        if running:
            record_paged_step(manager, running, log, loaded=bool(waiting))
    result = ServingResult.from_log(policy, log, manager.num_blocks * block_size, preemptions)
    return PagedRun(result, manager)


def decode_step(manager: BlockManager, running: list[Group], waiting: deque[Group],
                rng: np.random.Generator) -> int:
    """One token for every running group, earliest first, preempting the latest when blocks run
    out; return how many groups were preempted."""
    preempted, index = 0, 0
    while index < len(running):
        group = running[index]
        while group.blocks_to_step(manager) > manager.num_free_blocks:
            victim = running.pop()
            victim.preempt(manager)
            waiting.appendleft(victim)
            preempted += 1
            if victim is group:
                if not running:
                    raise RuntimeError(f"the KV budget ({manager.num_blocks} blocks) is too small "
                                       "for one request of this workload to run alone")
                return preempted
        if group.step(manager, rng):
            running.pop(index)
        else:
            index += 1
    return preempted


def admit_waiting(manager: BlockManager, running: list[Group], waiting: deque[Group], watermark: int) -> None:
    while waiting and waiting[0].blocks_to_admit(manager) <= manager.num_free_blocks - watermark:
        group = waiting.popleft()
        group.admit(manager)
        running.append(group)
    if waiting and not running:
        raise RuntimeError(f"a prompt of {waiting[0].blocks_to_admit(manager)} blocks does not fit in an "
                           f"empty KV cache of {manager.num_blocks} blocks")


def record_paged_step(manager: BlockManager, running: list[Group], log: StepLog, loaded: bool) -> None:
    sequences = [seq for group in running for seq in group.sequences]
    used_blocks = manager.num_blocks - manager.num_free_blocks
    unshared_blocks = sum(len(seq.block_table) for seq in sequences)  # released entries too: all they would hold
    log.record(sum(seq.num_tokens for seq in sequences), used_blocks * manager.block_size,
               len(running), loaded, unshared_blocks * manager.block_size)


# ---- the studies ------------------------------------------------------------------------------

def serving_study(workload: Workload, num_requests: int, kv_tokens: int, block_size: int,
                  seed: int) -> tuple[list[ServingResult], list[PagedRun]]:
    """Real-token share and batch size: jpaged against the three reservation policies."""
    requests = sample_requests(workload, num_requests, np.random.default_rng(seed))
    groups = [Request(str(i), p, o) for i, (p, o) in enumerate(requests)]
    run = simulate_paged(groups, kv_tokens, block_size, np.random.default_rng(seed))
    results = [run.result] + [simulate_reservation(requests, policy, kv_tokens, workload.max_len)
                              for policy in ("oracle", "pow2", "max")]
    return results, [run]


def sharing_study(workload: Workload, num_requests: int, kv_tokens: int, block_size: int,
                  seed: int) -> tuple[list[ServingResult], list[PagedRun]]:
    """Blocks saved by sharing for parallel sampling and beam search of each width."""
    results, runs = [], []
    for kind in ("parallel", "beam"):
        for width in SHARING_WIDTHS:
            rng = np.random.default_rng(seed)
            groups = [make_group(kind, str(i), p, o, width, workload, rng)
                      for i, (p, o) in enumerate(sample_requests(workload, num_requests, rng))]
            run = simulate_paged(groups, kv_tokens, block_size, rng, policy=f"{kind} {width}")
            results.append(run.result)
            runs.append(run)
    return results, runs


def window_study(workload: Workload, num_requests: int, kv_tokens: int, block_size: int, seed: int,
                 window: int) -> tuple[list[ServingResult], list[PagedRun]]:
    """The serving study's requests with every block kept, and with the blocks behind a
    `window`-token sliding window released."""
    requests = sample_requests(workload, num_requests, np.random.default_rng(seed))
    runs = [simulate_paged([Request(str(i), p, o) for i, (p, o) in enumerate(requests)], kv_tokens, block_size,
                           np.random.default_rng(seed), policy=policy, sliding_window=kept)
            for policy, kept in (("every block", None), (f"window {window}", window))]
    return [run.result for run in runs], runs


def make_group(kind: str, request_id: str, prompt_len: int, output_len: int, width: int,
               workload: Workload, rng: np.random.Generator) -> Group:
    if kind == "parallel":
        others = sample_output_lengths(workload, prompt_len, width - 1, rng)
        return ParallelSampling(request_id, prompt_len, [output_len] + others)
    return BeamSearch(request_id, prompt_len, output_len, width)


def workload_summary(workload: Workload, num_requests: int, seed: int) -> dict:
    requests = np.array(sample_requests(workload, num_requests, np.random.default_rng(seed)))
    return {"prompt": asdict(workload.prompt), "output": asdict(workload.output),
            "max_len": workload.max_len, "sampled_mean_prompt": float(requests[:, 0].mean()),
            "sampled_mean_output": float(requests[:, 1].mean()),
            "note": "synthetic lognormal approximation, not the real data set"}


# ---- output -----------------------------------------------------------------------------------

def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


NO_QUEUE_NOTE = "* no request ever waited in this run: averaged over all its steps"


def steps(result: ServingResult) -> str:
    return f"{result.steps} ({result.steps_under_load}){'' if result.steps_under_load else '*'}"


def with_note(table: str, results: list[ServingResult]) -> str:
    return table + ("\n" + NO_QUEUE_NOTE if any(not r.steps_under_load for r in results) else "")


def serving_table(results: list[ServingResult]) -> str:
    rows = [[r.policy, pct(r.real_token_share), f"{PAPER_REAL_TOKEN_SHARE[r.policy]:.1f}%",
             pct(r.budget_share), pct(r.held_share), f"{r.mean_batch:.1f}", steps(r), r.preemptions]
            for r in results]
    return format_table(["policy", "real tokens / held", "paper", "tokens / budget", "held / budget",
                         "batched requests", "steps (loaded)", "preemptions"], rows)


def window_table(results: list[ServingResult]) -> str:
    rows = [[r.policy, pct(r.held_share), f"{r.mean_batch:.1f}", steps(r), r.preemptions] for r in results]
    return format_table(["KV blocks", "held / budget", "batched requests", "steps (loaded)", "preemptions"], rows)


def sharing_table(results: list[ServingResult]) -> str:
    rows = []
    for r in results:
        kind, width = r.policy.split()
        low, high = PAPER_SAVING_RANGE[kind]
        rows.append([kind, width, pct(r.sharing_saving), f"{low:.1f}-{high:.1f}%", f"{r.mean_batch:.1f}",
                     steps(r), r.preemptions])
    return format_table(["sharing", "n / width", "blocks saved", "paper (Alpaca, 2..6)",
                         "batched requests", "steps (loaded)", "preemptions"], rows)


POLICIES = ("jpaged", "oracle", "pow2", "max")
KIND_COLORS = (("parallel", "tab:blue"), ("beam", "tab:red"))


def plot_serving(ax, report: dict, key: str, scale: float, title: str) -> None:
    """Grouped bars of `key` per policy, one group member per workload."""
    x = np.arange(len(POLICIES))
    for offset, (name, workload) in zip((-0.2, 0.2), report["workloads"].items()):
        serving = {r["policy"]: r for r in workload["serving"]}
        bars = ax.bar(x + offset, [scale * serving[p][key] for p in POLICIES], 0.4, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, POLICIES)
    ax.set_title(title)


def plot_sharing(ax, report: dict) -> None:
    """Blocks saved against n / beam width, per workload, over the paper's ranges."""
    for (name, workload), style in zip(report["workloads"].items(), ("-", "--")):
        for kind, color in KIND_COLORS:
            points = [100 * r["sharing_saving"] for r in workload["sharing"] if r["policy"].startswith(kind)]
            ax.plot(SHARING_WIDTHS, points, style, color=color, marker="o", label=f"{kind}, {name}")
    for kind, color in KIND_COLORS:
        ax.axhspan(*PAPER_SAVING_RANGE[kind], color=color, alpha=0.12, label=f"paper {kind} range")
    ax.set_xticks(SHARING_WIDTHS)
    ax.set_xlabel("n (parallel sampling) / beam width")
    ax.set_title("KV blocks saved by sharing (%)")
    ax.legend(fontsize=7)


def plot_window(ax, report: dict) -> None:
    """Requests batched per step with every block kept and with a sliding window, per workload."""
    for offset, (name, workload) in zip((-0.2, 0.2), report["workloads"].items()):
        bars = ax.bar(np.arange(2) + offset, [r["mean_batch"] for r in workload["window"]], 0.4, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(np.arange(2), [r["policy"] for r in next(iter(report["workloads"].values()))["window"]])
    ax.set_title(f"requests batched per step, every layer windowed ({report['config']['sliding_window']} tokens)")
    ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> None:
    from bench_common import pyplot  # beside this script (the tests load this module alone)

    plt = pyplot()
    if plt is None:
        return

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    plot_serving(axes[0], report, "real_token_share", 100, "KV memory holding real tokens (%)")
    axes[0].scatter(np.arange(len(POLICIES)), [PAPER_REAL_TOKEN_SHARE[p] for p in POLICIES], color="black",
                    marker="_", s=600, zorder=3, label="paper (Fig. 2)")
    plot_serving(axes[1], report, "mean_batch", 1, "requests batched per step")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    plot_sharing(axes[2], report)
    plot_window(axes[3], report)
    config = report["config"]
    fig.suptitle(f"jpaged memory study (simulated; {config['kv_tokens']} KV tokens, block size "
                 f"{config['block_size']}; synthetic workloads)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry point ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=3000, help="requests in the serving study")
    parser.add_argument("--sharing-requests", type=int, default=600,
                        help="requests per parallel-sampling / beam-search simulation")
    parser.add_argument("--kv-tokens", type=int, default=16384, help="KV budget in tokens")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sliding-window", type=int, default=256, help="tokens each layer sees in the window study")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes (for tests)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/memory.json"))
    parser.add_argument("--plot", type=Path, default=None, help="default: beside --out, as .png")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests, args.sharing_requests = min(args.num_requests, 150), min(args.sharing_requests, 30)
    for name in ("num_requests", "sharing_requests", "kv_tokens", "block_size", "sliding_window"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.kv_tokens < MAX_MODEL_LEN * max(SHARING_WIDTHS):
        parser.error(f"--kv-tokens {args.kv_tokens} is below {MAX_MODEL_LEN * max(SHARING_WIDTHS)}: "
                     f"{max(SHARING_WIDTHS)} sequences of max_model_len {MAX_MODEL_LEN} must fit")
    return args


def run_study(args: argparse.Namespace, verbose: bool = True) -> tuple[dict, list[PagedRun]]:
    """Both studies on both workloads; returns the JSON report and the paged runs."""
    say = print if verbose else (lambda *a, **k: None)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
              | {"max_model_len": MAX_MODEL_LEN, "watermark": WATERMARK, "arrivals": "all at step 0"},
              "paper": {"real_token_share_pct": PAPER_REAL_TOKEN_SHARE,
                        "sharing_saving_pct": PAPER_SAVING_RANGE},
              "workloads": {}}
    runs: list[PagedRun] = []
    for workload in WORKLOADS:
        started = time.perf_counter()
        summary = workload_summary(workload, args.num_requests, args.seed)
        sizes = (args.kv_tokens, args.block_size, args.seed)
        serving, serving_runs = serving_study(workload, args.num_requests, *sizes)
        sharing, sharing_runs = sharing_study(workload, args.sharing_requests, *sizes)
        window, window_runs = window_study(workload, args.num_requests, *sizes, args.sliding_window)
        runs += serving_runs + sharing_runs + window_runs
        report["workloads"][workload.name] = {"lengths": summary, "serving": [asdict(r) for r in serving],
                                              "sharing": [asdict(r) for r in sharing],
                                              "window": [asdict(r) for r in window]}
        say(f"\n== {workload.name} (synthetic): prompt lognormal mean {workload.prompt.mean} sigma "
            f"{workload.prompt.sigma}, output mean {workload.output.mean} sigma {workload.output.sigma}, "
            f"prompt+output <= {workload.max_len}; sampled means {summary['sampled_mean_prompt']:.0f} / "
            f"{summary['sampled_mean_output']:.0f} tokens ({time.perf_counter() - started:.1f} s)")
        say(f"\n{args.num_requests} requests, {args.kv_tokens} KV tokens, block size {args.block_size}\n")
        say(with_note(serving_table(serving), serving))
        say(f"\nsharing: {args.sharing_requests} requests per row\n")
        say(with_note(sharing_table(sharing), sharing))
        say(f"\nsliding window of {args.sliding_window} tokens on every layer: the serving study's requests\n")
        say(with_note(window_table(window), window))
    return report, runs


def write_outputs(report: dict, out: Path, plot_path: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, plot_path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report, _ = run_study(args)
    args.plot = args.plot or args.out.with_suffix(".png")
    write_outputs(report, args.out, args.plot)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot.exists() else ""))
    return report


if __name__ == "__main__":
    main()
