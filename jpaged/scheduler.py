"""Continuous batching with chunked prefill, prefix reuse and preemption, first come first served
or by request priority.

Sequences are kept in order of (priority, arrival): under `scheduling_policy="fcfs"` every
priority is 0, so arrival alone decides; under `"priority"` a lower priority value goes first,
arrival breaking ties (vLLM's priority scheduling). Every step the scheduler spends a token
budget: first on running sequences in that order
(one token for a decode, with its draft tokens while the step's rows and drafts together number
at most the step's logits rows; a chunk of the remaining prompt for a prefill, which never ends
inside an image whose tokens see each other), then on bringing back
swapped-out sequences, then on waiting requests, which start after their longest cached prefix. Blocks come from the
block manager's narrow face: `get_computed_blocks` once per admission, `allocate_slots` for each
scheduled chunk (None: no room), `free`; plus `swap_out` / `swap_in` for swap preemption.
When the block manager runs out of blocks, the last running sequence in that order (the latest
arrival of the lowest priority) is preempted: swapped to host memory (`preemption_mode="swap"`, when the host pool has room) or
freed, to be recomputed from its tokens later. Sequences on hold (beams waiting for their
siblings' step) are passed over.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from jpaged.block_manager import BlockManager, Slots
from jpaged.config import SchedulerConfig
from jpaged.sampling_params import is_integer
from jpaged.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # its draft tokens included
    samples: bool  # whether this step reaches the sequence's last token, so samples the next one
    num_draft_tokens: int = 0  # speculative tokens after its last one, the first of `seq.draft_token_ids`

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        past_end = seq.num_computed_tokens + num_new_tokens - seq.num_tokens
        return cls(seq, num_new_tokens, past_end >= 0, max(past_end, 0))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    num_draft_tokens: int = 0  # each checked in a row of the step's logits of its own


def _by_priority(seq: Sequence):
    return seq.priority


def check_priority(priority: object, policy: str) -> None:
    """Raise ValueError unless `priority` is an int that `policy` ("fcfs" | "priority") takes:
    any int under "priority", only 0 under "fcfs" (as vLLM refuses it)."""
    if not is_integer(priority):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(f"priority {priority} needs scheduling_policy='priority' (the engine's is {policy!r})")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_rows: int | None = None,
                 max_loras: int = 1):
        """`max_rows`: the most sequences and draft tokens a step takes together (its logits rows,
        `StepShapes.max_rows`); `max_num_seqs` by default. `max_loras`: the most LoRA adapters the
        running sequences may use together (a waiting one that would add another waits, and
        later ones may go first, as in vLLM)."""
        self.config = config
        self.max_loras = max_loras
        self.max_rows = max_rows or config.max_num_seqs
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # each queue is kept in priority (arrival) order
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_block_copies = 0

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=_by_priority)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one: it already holds (shared) blocks."""
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_by_priority)

    def holds(self, seq: Sequence) -> bool:
        """Whether `seq` is in one of the queues (waiting, running or swapped out)."""
        return any(seq is queued for queue in (self.waiting, self.running, self.swapped) for queued in queue)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_swapped(out)
            if not self.swapped:
                self._schedule_waiting(out, budget)
        return out

    def _scheduled(self, out: SchedulerOutput, seq: Sequence, num_new: int, slots: Slots) -> None:
        self.num_block_copies += len(slots.copies)
        out.block_copies += slots.copies
        out.scheduled.append(ScheduledSequence.of(seq, num_new))

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0 and len(out.scheduled) < self.config.max_num_seqs:
            seq = self.running[index]
            if seq.on_hold:
                index += 1
                continue
            spare_rows = max(0, self.max_rows - len(self.running) - out.num_draft_tokens)
            num_drafts = min(len(seq.draft_token_ids), spare_rows, budget - 1) if seq.num_uncomputed_tokens == 1 else 0
            num_new = seq.chunk_within_images(seq.num_computed_tokens, min(seq.num_uncomputed_tokens + num_drafts, budget))
            if num_new == 0:  # the next image does not fit in what is left of the step
                index += 1
                continue
            while (slots := self.block_manager.allocate_slots(seq, num_new)) is None:
                if num_drafts:
                    num_new -= num_drafts
                    num_drafts = 0
                    continue
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    return budget
            out.num_draft_tokens += num_drafts
            self._scheduled(out, seq, num_new, slots)
            budget -= num_new
            index += 1
        return budget

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        rows_to_come = self._rows_to_come()
        while self.swapped:
            seq = self.swapped[0]
            rows = rows_to_come + self._samples_to_come(seq)
            if rows > self.config.max_num_seqs or not self._lora_fits(seq) or not self.block_manager.can_swap_in(seq):
                return
            self.swapped.pop(0)
            out.swap_in += self.block_manager.swap_in(seq)
            self.add_running(seq)
            rows_to_come = rows

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        index, rows_to_come = 0, self._rows_to_come()
        while index < len(self.waiting) and budget > 0:
            seq = self.waiting[index]
            if seq.on_hold or not self._lora_fits(seq):
                index += 1
                continue
            rows = rows_to_come + self._samples_to_come(seq)
            alone = rows_to_come + out.num_draft_tokens == 0  # a request of more samples than fit starts alone
            if not alone and (rows > self.config.max_num_seqs or rows + out.num_draft_tokens > self.max_rows):
                return
            computed = self.block_manager.get_computed_blocks(seq)
            num_new = seq.chunk_within_images(computed.num_tokens, min(seq.num_tokens - computed.num_tokens, budget))
            if num_new == 0:
                return
            slots = self.block_manager.allocate_slots(seq, num_new, computed)
            if slots is None:
                return
            seq.num_computed_tokens = computed.num_tokens
            self.waiting.pop(index)
            self._note_first_schedule(seq, computed.num_tokens)
            self._scheduled(out, seq, num_new, slots)
            self.add_running(seq)
            rows_to_come = rows
            budget -= num_new

    def _lora_fits(self, seq: Sequence) -> bool:
        """Whether `seq` may run beside the running sequences within `max_loras` adapters."""
        lora = seq.request.lora
        if lora is None:
            return True
        running = {s.request.lora.lora_int_id for s in self.running if s.request.lora is not None}
        return lora.lora_int_id in running or len(running) < self.max_loras

    def _rows_to_come(self) -> int:
        """Rows the running sequences will take once every running request has forked its samples
        (beams on hold take none)."""
        return sum(self._samples_to_come(seq) for seq in self.running if not seq.on_hold)

    @staticmethod
    def _samples_to_come(seq: Sequence) -> int:
        """Running sequences `seq` will make: itself, and the samples its request forks from it
        once its prompt is computed."""
        request = seq.request
        return 1 + (request.num_samples - len(request.seqs) if seq.index == 0 else 0)

    @staticmethod
    def _note_first_schedule(seq: Sequence, cached: int) -> None:
        metrics = seq.request.metrics
        if seq.index == 0 and metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.monotonic()
            metrics.num_cached_prompt_tokens = cached

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.num_preemptions += 1
        seq.draft_token_ids = []
        out.preempted.append(seq)
        if self.config.preemption_mode == "swap" and self.block_manager.can_swap_out(seq):
            out.swap_out += self.block_manager.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, seq, key=_by_priority)
            self.num_swap_outs += 1
            return
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free(seq)
