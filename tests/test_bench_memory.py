"""scripts/bench_memory.py: the simulated memory study keeps its invariants (no hard-coded figures).

The study runs once in --quick mode; the checks below hold by construction of the simulation,
whatever the sampled lengths."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jpaged.block_manager import BlockManager

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = load_script()


@pytest.fixture(scope="module")
def study():
    args = bench.parse_args(["--quick"])
    report, runs = bench.run_study(args, verbose=False)
    return args, report, runs


def by_policy(results: list[dict]) -> dict[str, dict]:
    return {r["policy"]: r for r in results}


def test_shares_are_fractions_of_what_is_held(study):
    _, report, _ = study
    for workload in report["workloads"].values():
        for result in workload["serving"]:  # with sharing, logical tokens can outnumber slots
            assert 0 < result["real_token_share"] <= 1
            assert result["budget_share"] <= result["held_share"] <= 1


def test_oracle_reservation_wastes_less_than_max_reservation(study):
    _, report, _ = study
    for workload in report["workloads"].values():
        serving = by_policy(workload["serving"])
        assert serving["oracle"]["real_token_share"] >= serving["max"]["real_token_share"]
        assert serving["pow2"]["real_token_share"] >= serving["max"]["real_token_share"]


def test_paged_memory_holds_mostly_real_tokens(study):
    _, report, _ = study
    for workload in report["workloads"].values():
        assert by_policy(workload["serving"])["jpaged"]["real_token_share"] > 0.9


def test_max_reservation_batches_at_most_budget_over_max_len(study):
    args, report, _ = study
    for workload in report["workloads"].values():
        assert by_policy(workload["serving"])["max"]["mean_batch"] <= args.kv_tokens // bench.MAX_MODEL_LEN


def test_sharing_saves_blocks_and_single_requests_share_nothing(study):
    _, report, _ = study
    for workload in report["workloads"].values():
        assert by_policy(workload["serving"])["jpaged"]["sharing_saving"] == 0.0
        for result in workload["sharing"]:
            assert 0 < result["sharing_saving"] < 1, result["policy"]


def test_every_block_is_free_at_the_end(study):
    _, _, runs = study
    assert len(runs) == 2 * (1 + 2 * len(bench.SHARING_WIDTHS) + 2)
    for run in runs:
        manager = run.manager
        assert manager.num_free_blocks == manager.num_blocks, run.result.policy
        assert not any(manager.ref_counts), run.result.policy
        manager.check_invariants()


def test_a_sliding_window_batches_more_long_requests(study):
    """The "every block" run is the serving study's; on the ShareGPT-like workload, whose
    sequences mostly outgrow a 256-token window, releasing the blocks behind it batches more
    requests with fewer preemptions."""
    args, report, _ = study
    for name, workload in report["workloads"].items():
        kept, windowed = workload["window"]
        assert kept["policy"] == "every block" and windowed["policy"] == f"window {args.sliding_window}"
        assert {k: v for k, v in kept.items() if k != "policy"} == {
            k: v for k, v in by_policy(workload["serving"])["jpaged"].items() if k != "policy"}
        assert windowed["held_share"] <= 1
        if name == "ShareGPT-like":
            assert windowed["mean_batch"] > kept["mean_batch"] and windowed["preemptions"] < kept["preemptions"]


def test_outputs_are_written(study, tmp_path):
    pytest.importorskip("matplotlib")
    _, report, _ = study
    bench.write_outputs(report, tmp_path / "memory.json", tmp_path / "memory.png")
    assert set(json.loads((tmp_path / "memory.json").read_text())["workloads"]) == {
        w.name for w in bench.WORKLOADS}
    assert (tmp_path / "memory.png").read_bytes().startswith(b"\x89PNG")


def test_parallel_sampling_shares_the_prompt_and_copies_its_last_block_on_write():
    manager = BlockManager(num_blocks=32, block_size=16)
    group = bench.ParallelSampling("r", prompt_len=40, output_lens=[5, 5, 5, 5])
    group.admit(manager)
    tables = [seq.block_table for seq in group.sequences]
    assert all(table == tables[0] for table in tables) and len(tables[0]) == 3
    assert [manager.ref_counts[b] for b in tables[0]] == [4, 4, 4]
    group.step(manager, np.random.default_rng(0))
    # Three writers copied the shared, partially filled last block; the fourth wrote in place.
    assert manager.num_blocks - manager.num_free_blocks == 6
    assert len({seq.block_table[-1] for seq in group.sequences}) == 4
    assert [manager.ref_counts[b] for b in group.sequences[0].block_table[:2]] == [4, 4]
    manager.check_invariants()


def test_beam_search_forks_share_blocks_and_all_come_back():
    manager = BlockManager(num_blocks=64, block_size=16)
    group = bench.BeamSearch("r", prompt_len=32, output_len=40, width=4)
    group.admit(manager)
    assert manager.num_blocks - manager.num_free_blocks == 2  # four beams, one copy of the prompt
    rng = np.random.default_rng(0)
    while not group.step(manager, rng):
        assert len(group.sequences) == 4
        used = manager.num_blocks - manager.num_free_blocks
        assert used <= sum(len(seq.block_table) for seq in group.sequences)
        manager.check_invariants()
    assert manager.num_free_blocks == manager.num_blocks
    assert not any(manager.ref_counts)


def test_first_fit_arena_fragments_and_reservations_round_as_named():
    arena = bench.FirstFitArena(100)
    starts = [arena.allocate(30) for _ in range(3)]
    assert starts == [0, 30, 60]
    arena.release(30, 30)
    assert arena.allocate(40) is None  # 40 tokens free in total, but in gaps of 30 and 10
    assert arena.allocate(25) == 30
    assert bench.reservation("max", 300, 2048) == 2048
    assert bench.reservation("pow2", 300, 2048) == 512
    assert bench.reservation("pow2", 1500, 2048) == 2048
    assert bench.reservation("oracle", 300, 2048) == 300


def test_bad_sizes_are_clear_errors():
    with pytest.raises(SystemExit):
        bench.parse_args(["--kv-tokens", "4096"])
    with pytest.raises(ValueError, match="kv_tokens=1000"):
        bench.simulate_reservation([(10, 10)], "oracle", kv_tokens=1000)
