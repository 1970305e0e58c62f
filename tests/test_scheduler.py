"""Scheduler and block manager on their own: budgets, chunking, FCFS and priority order, preemption,
block accounting."""

import pytest

import jpaged.block_manager as block_manager_module
from jpaged.block_manager import BlockManager
from jpaged.config import SchedulerConfig
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler, check_priority
from jpaged.sequence import Request, Sequence, SequenceStatus


def make_seq(name: str, prompt_len: int, priority: int = 0) -> Sequence:
    return Request(name, None, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100), seed=0,
                   priority=priority).seqs[0]


def run_step(scheduler: Scheduler):
    """Schedule one step and apply it as the engine would, sampling token 7 where due."""
    plan = scheduler.schedule()
    for item in plan.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.samples:
            item.seq.output_token_ids.append(7)
    return plan


def test_block_manager_grows_on_demand_and_frees():
    manager = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", 5)
    assert manager.allocate_slots(seq, 5).new_blocks == seq.block_table
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 2
    seq.num_computed_tokens = 5
    assert manager.allocate_slots(seq, 3).new_blocks == []
    assert len(seq.block_table) == 2
    assert len(manager.allocate_slots(seq, 4).new_blocks) == 1
    assert len(seq.block_table) == 3 and manager.ref_counts[seq.block_table[-1]] == 1
    assert manager.allocate_slots(seq, 12) is None  # 2 blocks needed, 1 free: nothing taken
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 1
    manager.free(seq)
    assert manager.num_free_blocks == 4 and seq.block_table == [] and not any(manager.ref_counts)


def test_token_budget_chunks_long_prompts_and_decodes_go_first():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, 4))
    short, long = make_seq("short", 3), make_seq("long", 25)
    scheduler.add(short)
    scheduler.add(long)
    plan = run_step(scheduler)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("short", 3), ("long", 7)]
    assert [s.samples for s in plan.scheduled] == [True, False]
    chunks = [run_step(scheduler).scheduled for _ in range(3)]
    assert [[(s.seq.request_id, s.num_new_tokens) for s in c] for c in chunks] == [
        [("short", 1), ("long", 9)], [("short", 1), ("long", 9)], [("short", 1), ("long", 1)]]
    assert long.num_computed_tokens == 26 and len(long.output_token_ids) == 2


def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), BlockManager(64, 4))
    for name in "abc":
        scheduler.add(make_seq(name, 2))
    plan = run_step(scheduler)
    assert [s.seq.request_id for s in plan.scheduled] == ["a", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]


def test_preemption_takes_latest_arrival_and_it_resumes_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), manager)
    first, second, third = make_seq("first", 2), make_seq("second", 2), make_seq("third", 2)
    for seq in (first, second, third):
        scheduler.add(seq)
    run_step(scheduler)  # each holds one full block and a sampled token that needs a second
    assert manager.num_free_blocks == 1
    plan = run_step(scheduler)
    assert plan.preempted == [third]
    assert third.status is SequenceStatus.WAITING and third.num_computed_tokens == 0
    assert third.block_table == [] and manager.num_free_blocks == 0
    fourth = make_seq("fourth", 1)
    scheduler.add(fourth)
    assert [s.request_id for s in scheduler.waiting] == ["third", "fourth"]
    scheduler.finish(first)
    plan = run_step(scheduler)
    assert [s.seq.request_id for s in plan.scheduled][-1] == "third"
    assert [s.num_new_tokens for s in plan.scheduled if s.seq is third] == [3]  # prompt + sampled token


def test_finish_releases_running_and_waiting_sequences():
    manager = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100), manager)
    running, waiting = make_seq("running", 6), make_seq("waiting", 3)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    scheduler.finish(running)
    scheduler.finish(waiting)
    assert not scheduler.has_unfinished()
    assert manager.num_free_blocks == 8 and not any(manager.ref_counts)


def test_admission_looks_up_the_cached_prefix_once(monkeypatch):
    manager = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), manager)
    first = make_seq("first", 13)
    scheduler.add(first)
    run_step(scheduler)
    manager.commit_full_blocks(first, first.num_computed_tokens)  # as the engine does after a step
    scheduler.finish(first)
    hashed = []
    real_hash = block_manager_module.hash_block
    monkeypatch.setattr(block_manager_module, "hash_block",
                        lambda parent, tokens: hashed.append(tokens) or real_hash(parent, tokens))
    second = make_seq("second", 13)  # the same prompt: its first 3 blocks are cached
    scheduler.add(second)
    plan = run_step(scheduler)
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("second", 1)]
    assert hashed == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]  # one lookup per block, once
    assert second.request.metrics.num_cached_prompt_tokens == 12
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (26, 12)


def test_priority_orders_admission_then_arrival():
    """vLLM's priority scheduling: lower values first, ties in arrival order."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, scheduling_policy="priority"),
                          BlockManager(64, 4))
    for name, priority in (("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", -1)):
        scheduler.add(make_seq(name, 2, priority))
    plan = run_step(scheduler)
    assert [s.seq.request_id for s in plan.scheduled] == ["e", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["d", "c", "a"]


def test_preemption_takes_the_lowest_priority_before_later_arrivals():
    manager = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, scheduling_policy="priority"),
                          manager)
    low, high, mid = make_seq("low", 2, priority=5), make_seq("high", 2, priority=0), make_seq("mid", 2, priority=1)
    for seq in (low, high, mid):
        scheduler.add(seq)
    assert [s.seq.request_id for s in run_step(scheduler).scheduled] == ["high", "mid", "low"]
    plan = run_step(scheduler)  # each needs a second block, one is free: the lowest priority goes
    assert plan.preempted == [low] and [s.seq.request_id for s in plan.scheduled] == ["high", "mid"]
    scheduler.add(make_seq("newer", 1, priority=3))
    assert [s.request_id for s in scheduler.waiting] == ["newer", "low"]


def test_check_priority_names_the_value_and_the_policy():
    check_priority(-3, "priority")
    check_priority(0, "fcfs")
    with pytest.raises(ValueError, match=r"priority 2 needs scheduling_policy='priority' .*'fcfs'"):
        check_priority(2, "fcfs")
    for bad in (1.5, True, "1", None):
        with pytest.raises(ValueError, match="priority must be an integer"):
            check_priority(bad, "priority")
    with pytest.raises(ValueError, match="scheduling_policy must be 'fcfs' or 'priority', got 'lifo'"):
        SchedulerConfig(scheduling_policy="lifo")
