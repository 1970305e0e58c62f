"""Data parallelism: `data_parallel_size` replicas of the whole engine, one per slice of the mesh.

Each replica (an `LLMEngine`) owns its devices, weights, KV cache, block manager and scheduler,
so replicas never talk to each other. A new request goes to the replica with the fewest
unfinished requests; a step steps every busy replica, each from its own thread: jax releases the
GIL while a step computes, so the replicas' devices work at the same time. It implements
`EngineClient`, routing each call about a request to the replica that holds it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.engine_client import EngineStats, PromptType
from jpaged.loader.weights import host_tensors
from jpaged.lora import LoRARequest
from jpaged.outputs import RequestOutput
from jpaged.pooling import PoolingParams
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Sequence


class DataParallelEngine:
    def __init__(self, config: EngineConfig):
        num_replicas = config.parallel.data_parallel_size
        # Distinct seeds, so that unseeded requests on different replicas draw different samples.
        self.replicas = [LLMEngine(dataclasses.replace(config, seed=config.seed + r), replica=r)
                         for r in range(num_replicas)]
        first = self.replicas[0]
        self.config, self.model_name, self.model_config = config, first.model_name, first.model_config
        self.tokenizer, self.max_model_len, self.eos_token_ids = first.tokenizer, first.max_model_len, first.eos_token_ids
        self.default_sampling_params, self.max_logprobs = first.default_sampling_params, first.max_logprobs
        self.reasoning_parser, self.runner_type, self.pooling_task = first.reasoning_parser, first.runner_type, first.pooling_task
        self.classifier, self.vision_config = first.classifier, first.vision_config
        self.enable_prompt_embeds, self.max_images = first.enable_prompt_embeds, first.max_images
        self.interleave_mm_strings, self.enable_sleep_mode = first.interleave_mm_strings, first.enable_sleep_mode
        self.profiler_dir, self.logprobs_mode = first.profiler_dir, first.logprobs_mode
        self._replica_of: dict[str, LLMEngine] = {}
        self._pool = ThreadPoolExecutor(num_replicas, thread_name_prefix="jpaged-replica")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        if request_id in self._replica_of:
            raise ValueError(f"request id {request_id!r} is already in use")
        replica = min(self.replicas, key=LLMEngine.get_num_unfinished_requests)
        replica.add_request(request_id, prompt, params, priority, lora_request)
        self._replica_of[request_id] = replica

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """As `LLMEngine.add_lora`, on every replica or (raising) on none."""
        added = []
        try:
            for replica in self.replicas:
                if lora_request.lora_int_id not in replica.list_loras():
                    added.append(replica)
                replica.add_lora(lora_request)
        except ValueError:
            for replica in added:
                replica.remove_lora(lora_request.lora_int_id)
            raise
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """As `LLMEngine.remove_lora`, on every replica or (raising) on none."""
        busy = [replica for replica in self.replicas if replica.lora_in_use(lora_int_id)]
        if busy:
            return busy[0].remove_lora(lora_int_id)  # raises, counting its requests
        return any([replica.remove_lora(lora_int_id) for replica in self.replicas])

    def list_loras(self) -> set[int]:
        return set().union(*(replica.list_loras() for replica in self.replicas))

    def abort_request(self, request_id: str) -> None:
        replica = self._replica_of.pop(request_id, None)
        if replica is not None:
            replica.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(engine.has_unfinished_requests() for engine in self.replicas)

    def get_num_unfinished_requests(self) -> int:
        return sum(engine.get_num_unfinished_requests() for engine in self.replicas)

    def reset_prefix_cache(self) -> int:
        return sum(engine.reset_prefix_cache() for engine in self.replicas)

    def sleep(self, level: int = 1) -> None:
        if unfinished := self.get_num_unfinished_requests():  # before any replica sleeps
            raise ValueError(f"sleep with {unfinished} unfinished request(s): finish or abort them first")
        for engine in self.replicas:
            engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for engine in self.replicas:
            engine.wake_up(tags)

    def start_profile(self, prefix: str | None = None) -> Path:
        return self.replicas[0].start_profile(prefix)  # the trace is the process's: every replica's steps

    def stop_profile(self) -> Path:
        return self.replicas[0].stop_profile()

    def load_weights(self, weights) -> None:
        """`LLMEngine.load_weights` on every replica (the tensors read once, kept on the host
        meanwhile)."""
        if unfinished := self.get_num_unfinished_requests():
            raise ValueError(f"load_weights with {unfinished} unfinished request(s): finish or abort them first")
        tensors = list(host_tensors(weights))
        for engine in self.replicas:
            engine.load_weights(tensors)

    def apply_model(self, func) -> list:
        """`func(model)` on every replica's model, in replica order."""
        return [result for engine in self.replicas for result in engine.apply_model(func)]

    def is_sleeping(self) -> bool:
        return any(engine.is_sleeping() for engine in self.replicas)

    def get_sequence(self, request_id: str) -> Sequence:
        return self._replica_of[request_id].get_sequence(request_id)

    def fork_sequence(self, seq: Sequence) -> Sequence:
        return self._holder(seq).fork_sequence(seq)

    def free_sequence(self, seq: Sequence) -> None:
        replica = self._holder(seq)
        if replica is not None:
            replica.free_sequence(seq)

    def _holder(self, seq: Sequence) -> LLMEngine | None:
        """The replica that runs `seq`. Beam search forks and frees the sequences of a request a
        step may already have reported finished (its first beam dropped), so the request's own
        replica is looked up by its sequences once its id is forgotten."""
        replica = self._replica_of.get(seq.request_id)
        return replica or next((engine for engine in self.replicas if engine.holds_sequence(seq)), None)

    def step(self) -> list[RequestOutput]:
        busy = [engine for engine in self.replicas if engine.has_unfinished_requests()]
        outputs = [out for step in self._pool.map(LLMEngine.step, busy) for out in step]
        for out in outputs:
            if out.finished:
                self._replica_of.pop(out.request_id, None)
        return outputs

    def stats(self) -> EngineStats:
        """Counts summed over replicas; cache usage and hit rate averaged; layers streamed as in one
        replica; a step's working memory per device, the most of any replica."""
        each = [dataclasses.asdict(engine.stats()) for engine in self.replicas]
        averaged = ("kv_cache_usage", "prefix_cache_hit_rate")
        alike = ("num_resident_layers", "num_streamed_layers", "streamed_bytes_per_step")  # the same in every replica
        totals = {name: sum(s[name] for s in each) for name in each[0]}
        totals["step_temp_bytes"] = max(s["step_temp_bytes"] for s in each)
        return EngineStats(**{name: total / len(each) if name in averaged else total // len(each) if name in alike
                              else total for name, total in totals.items()})
