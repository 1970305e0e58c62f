"""The engine loop: requests in, one scheduled and executed step at a time, outputs back.

`LLMEngine` owns the scheduler (and through it the block manager) and the model runner.
`step()` schedules, runs the model, appends the sampled tokens, applies stop conditions and
frees what finished. It is the streaming interface; `LLM` drives it for whole batches.
"""

from __future__ import annotations

import logging
import random

import numpy as np

from jpaged.block_manager import BlockManager
from jpaged.config import EngineConfig, ModelConfig
from jpaged.loader.source import open_model
from jpaged.model_runner import ModelRunner
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.sequence import Sequence

logger = logging.getLogger("jpaged")

PromptType = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        source = open_model(config.model)
        self.model_name = source.name
        self.model_config = ModelConfig.from_hf(source.hf_config, source.generation_config)
        self.tokenizer = source.tokenizer
        self.max_model_len = self._resolve_max_model_len()
        self.runner = ModelRunner(self.model_config, config, source.weights())
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Sequence] = {}
        self._seed_rng = random.Random(config.seed)
        logger.info("engine ready: %s, %d KV blocks of %d tokens, max_model_len %d",
                    self.model_name, self.runner.num_blocks, config.cache.block_size, self.max_model_len)

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        asked = self.config.scheduler.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len {asked} exceeds the model's max_position_embeddings {limit}")
        return asked or limit

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError for input that can never be served."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._check_fits(token_ids, params)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(32)
        seq = Sequence(request_id, text, token_ids, params, seed)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = [int(t) for t in prompt["prompt_token_ids"]]
                return prompt.get("prompt"), token_ids
            if "prompt" not in prompt:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, list):
            return None, [int(t) for t in prompt]
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens + max_tokens {params.max_tokens} = {total} "
                             f"exceeds max_model_len {self.max_model_len}")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise ValueError(f"prompt of {len(token_ids)} tokens + max_tokens {params.max_tokens} = {total} "
                             f"exceeds the KV cache's {capacity} tokens")

    def prompt_logits(self, token_ids: list[int]) -> np.ndarray:
        """Float32 logits `[len(token_ids), vocab]` at every position of one prompt."""
        self._check_fits(token_ids, SamplingParams(max_tokens=1))
        seq = Sequence("prompt-logits", None, token_ids, SamplingParams(), seed=0)
        return self.runner.prompt_logits(token_ids, self.block_manager, seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.finish("abort")
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One scheduled model step; outputs for every sequence that took part in it."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        tokens = self.runner.execute(plan.scheduled)
        outputs = []
        for item, token in zip(plan.scheduled, tokens):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                seq.output_token_ids.append(int(token))
                self._check_stop(seq)
            if seq.is_finished:
                self.scheduler.finish(seq)
                self.requests.pop(seq.request_id, None)
            outputs.append(self.request_output(seq))
        return outputs

    def _check_stop(self, seq: Sequence) -> None:
        params, token = seq.sampling_params, seq.output_token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop", token if token in params.stop_token_ids else None)
        elif token in params.stop_token_ids:
            seq.finish("stop", token)
        elif params.stop and self._cut_at_stop_string(seq):
            return
        elif len(seq.output_token_ids) >= params.max_tokens:
            seq.finish("length")

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        params = seq.sampling_params
        text = self.decode(seq)
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                seq.output_text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
                seq.finish("stop", stop)
                return True
        return False

    def decode(self, seq: Sequence) -> str:
        if seq.output_text is not None:
            return seq.output_text
        # Decoding after a few prompt tokens keeps word-boundary spaces that a tokenizer drops at
        # the start of a text (SentencePiece's leading "▁").
        skip = seq.sampling_params.skip_special_tokens
        context = seq.prompt_token_ids[-4:]
        prefix = self.tokenizer.decode(context, skip_special_tokens=skip)
        full = self.tokenizer.decode(context + seq.output_token_ids, skip_special_tokens=skip)
        if full.startswith(prefix):
            return full[len(prefix):]
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=skip)

    def request_output(self, seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(0, self.decode(seq), list(seq.output_token_ids),
                                      seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.is_finished)
