"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, shaped like vLLM's.

`LLM` builds an engine (`LLMEngine`, or `DataParallelEngine` for replicas) from keyword arguments
(each one a field of the config dataclasses) and talks to it only through `EngineClient`: it
queues a batch of requests, steps the engine until all are done and returns their outputs in
input order, with a progress bar.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as SequenceABC
from pathlib import Path

from tqdm.auto import tqdm

from jpaged.beam_search import BeamSearchOutput, beam_search
from jpaged.chat_template import chat_text, checked_template, checked_variables
from jpaged.config import CacheConfig, EngineConfig, LoRAConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from jpaged.data_parallel import DataParallelEngine
from jpaged.engine import LLMEngine
from jpaged.engine_client import EngineClient, PromptType
from jpaged.images import IMAGE_PART_TYPES, chat_for_template
from jpaged.lora import LoRARequest
from jpaged.metrics import Metric, Metrics
from jpaged.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
    pooling_request_output,
)
from jpaged.pooling import POOLING_TASKS, PoolingParams
from jpaged.sampling_params import BeamSearchParams, SamplingParams, is_integer, truncated_prompt, unicode_text
from jpaged.scoring import pair_max_length, pair_scores, pair_token_ids, paired, score_pairs, score_type


def engine_config(model: str | None, speculative_config: dict | None = None, **kwargs) -> EngineConfig:
    """Distribute flat keyword arguments over the config dataclasses by field name;
    `speculative_config` is a dict of `SpeculativeConfig` fields, as vLLM's argument of that name
    (e.g. ``{"method": "ngram", "num_speculative_tokens": 4}``)."""
    parts = {"speculative": SpeculativeConfig.from_dict(speculative_config)}
    for name, cls in (("cache", CacheConfig), ("scheduler", SchedulerConfig), ("parallel", ParallelConfig),
                      ("lora", LoRAConfig)):
        names = {f.name for f in dataclasses.fields(cls)}
        parts[name] = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", *parts}
    unknown = sorted(set(kwargs) - engine_fields)
    if unknown:
        raise TypeError(f"unknown engine arguments: {unknown}")
    return EngineConfig(model=model, **kwargs, **parts)


def build_engine(model: str | None = None, **kwargs) -> EngineClient:
    """The engine `LLM(model, **kwargs)` runs: an `LLMEngine`, or a `DataParallelEngine` when
    `data_parallel_size` > 1. Keyword arguments are config fields (see `engine_config`)."""
    config = engine_config(model, **kwargs)
    return DataParallelEngine(config) if config.parallel.data_parallel_size > 1 else LLMEngine(config)


class LLM:
    def __init__(self, model: str | None = None, *, trust_remote_code: bool = False, enforce_eager: bool = False,
                 disable_log_stats: bool = True, **kwargs):
        """An engine for `model` (see `build_engine`). vLLM's `trust_remote_code` and
        `enforce_eager` are taken, so that vLLM scripts run unchanged, and change nothing: jpaged
        runs no model code from a hub, and every step is a compiled program. With
        `disable_log_stats=False` (vLLM's), the requests this LLM runs are recorded for
        `get_metrics`."""
        self.engine: EngineClient = build_engine(model, **kwargs)
        self._request_counter = itertools.count()
        self._enqueued: list[str] = []  # `enqueue`'s requests, until `wait_for_completion`
        self._metrics = None if disable_log_stats else Metrics(self.engine.model_name)

    @property
    def llm_engine(self) -> EngineClient:
        """`engine`, under vLLM's name for it."""
        return self.engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    def start_profile(self, profile_prefix: str | None = None) -> Path:
        """Start a jax profiler trace of what the engine runs (vLLM's), into
        `<profiler_dir>/<profile_prefix>` (default: the time); returns that folder. Needs
        `LLM(..., profiler_dir=FOLDER)`. ValueError while a trace runs."""
        return self.engine.start_profile(profile_prefix)

    def stop_profile(self) -> Path:
        """End the trace and write it (`plugins/profile/<run>/<host>.xplane.pb` for TensorBoard
        / XProf and `.trace.json.gz` for Perfetto); returns its folder."""
        return self.engine.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (vLLM's), as after new weights or to time a cold prompt. Returns
        True where it is empty now; False while requests are unfinished: the blocks they hold
        stay cached (every other cached block is dropped)."""
        self.engine.reset_prefix_cache()
        return not self.engine.has_unfinished_requests()

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the weights and the KV cache until `wake_up`, as vLLM's
        sleep mode: level 1 keeps the weights in host memory, level 2 discards them (for
        `load_weights` to replace; `wake_up` otherwise reads them again from the model's files).
        The prefix cache is emptied, compiled programs stay. Needs `LLM(...,
        enable_sleep_mode=True)`. ValueError for another level, and while a request is
        unfinished."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Give back what `sleep` freed: all of it, or the parts `tags` names ("weights",
        "kv_cache"). Requests are refused (ValueError) until both are back."""
        self.engine.wake_up(tags)

    def load_weights(self, weights) -> None:
        """Replace the model's weights, as an RLHF loop hands its updated policy over: `weights`
        maps HF checkpoint names to tensors (`hf_model.state_dict()`, or an iterable of `(name,
        tensor)`; all of them or any subset, the others stay), placed, split and quantized as the
        model's own were; the prefix cache is emptied. See `LLMEngine.load_weights` for what is
        refused."""
        self.engine.load_weights(weights)

    def apply_model(self, func) -> list:
        """Run `func` on the model inside each worker and return its results (vLLM's
        `apply_model`): one per data-parallel replica, in order. The model is the engine's Flax
        `nnx.Module`, its weights jax arrays as they sit on the devices (split over a replica's
        devices under tensor, pipeline or expert parallelism; quantized and with fused
        projections as the engine keeps them). `func` should only read it; `load_weights`
        replaces weights. ValueError while the weights sleep and with `offload_weights`."""
        return self.engine.apply_model(func)

    def get_metrics(self) -> list[Metric]:
        """A snapshot of the engine's metrics, as vLLM's `LLM.get_metrics()` gives them: the
        server's `/metrics` (README, "Metrics") as `jpaged.metrics.Counter`, `Gauge` and
        `Histogram` objects (name, labels, values), the latencies and finish reasons of the
        requests this LLM ran (its `generate`, `chat`, `embed`, ... calls) since it was made.
        ValueError unless the LLM was made with `disable_log_stats=False` (as in vLLM)."""
        if self._metrics is None:
            raise ValueError("get_metrics needs the LLM made with disable_log_stats=False (as in vLLM), which records "
                             "the requests it runs")
        return self._metrics.snapshot(self.engine.stats())

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no `SamplingParams`: jpaged's defaults, with
        the model's generation-config recommendations on top (see `generation_config`)."""
        return SamplingParams(**self.engine.default_sampling_params)

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: SequenceABC[int] | None = None,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs for `prompts`, in their order. `priority` (one int per prompt, lower served
        first) needs `scheduling_policy="priority"`. `lora_request` (one for every prompt, or one
        per prompt, None for the base model) needs `enable_lora=True`. ValueError names the
        prompt it refuses."""
        requests = self._generate_requests(prompts, sampling_params, priority, lora_request)
        self._check_no_other_requests("generate")
        return self._run(self._add(*requests), use_tqdm)

    def enqueue(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        priority: SequenceABC[int] | None = None,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
    ) -> list[str]:
        """Add `prompts` to the engine without running it (vLLM's `enqueue`), taken and checked
        as `generate` takes them; returns their request ids, in order. `wait_for_completion`
        runs them (with any enqueued before) and returns their outputs."""
        requests = self._generate_requests(prompts, sampling_params, priority, lora_request)
        self._check_only_enqueued("enqueue")
        request_ids = self._add(*requests)
        self._enqueued.extend(request_ids)
        return request_ids

    def wait_for_completion(self, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run the engine until every request `enqueue` and `enqueue_chat` added has finished, and
        return their outputs in the order they were enqueued (vLLM's `wait_for_completion`); an
        empty list when none waits. A request aborted meanwhile (`llm.engine.abort_request`) has
        no output. On an interrupt or a failed step they are aborted, as `generate`'s are."""
        self._check_only_enqueued("wait_for_completion")
        request_ids, self._enqueued = self._enqueued, []
        return self._run(request_ids, use_tqdm)

    def _forget_aborted(self) -> int:
        """The engine's unfinished requests; none left means every enqueued one was aborted
        (through `llm.engine.abort_request`): they are forgotten, and counted as aborted."""
        pending = self.engine.get_num_unfinished_requests()
        if pending == 0:
            for request_id in self._enqueued if self._metrics is not None else ():
                self._metrics.observe_aborted(request_id)
            self._enqueued.clear()
        return pending

    def _check_only_enqueued(self, call: str) -> None:
        """RuntimeError where the engine holds requests added through `engine.add_request`, whose
        outputs `wait_for_completion` would swallow (counted: requests aborted since they were
        enqueued cannot be told apart). Forgets the enqueued requests once the engine holds none."""
        pending = self._forget_aborted()
        if pending > len(self._enqueued):
            raise RuntimeError(f"{call}: the engine holds {pending - len(self._enqueued)} unfinished requests added "
                               "through llm.engine.add_request, whose outputs wait_for_completion would not return: "
                               "step them with llm.engine.step() or abort them first")

    def _generate_requests(self, prompts, sampling_params, priority, lora_request) -> tuple:
        """`generate`'s arguments as `_add` takes them, one entry per prompt."""
        self._check_generates()
        prompts = _prompt_list(prompts)
        params = self._per_prompt_params(sampling_params, len(prompts))
        loras = _per_prompt_loras(lora_request, len(prompts))
        if priority is not None and not isinstance(priority, SequenceABC):
            raise TypeError(f"priority must be a list of ints, one per prompt; got {type(priority).__name__} {priority!r:.50}")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        return prompts, params, priorities, loras

    def _check_generates(self) -> None:
        if self.engine.runner_type == "pooling":
            raise ValueError(f"this engine runs runner='pooling': it {_POOLING_TASKS[self.engine.pooling_task]} "
                             "and generates nothing")

    def embed(self, prompts: PromptType | SequenceABC[PromptType], use_tqdm: bool = True,
              lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
              pooling_params: PoolingParams | SequenceABC[PoolingParams] | None = None,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        """The embedding of each prompt (text or token ids), in their order: `outputs.embedding`,
        a list of `hidden_size` floats (see `jpaged/pooling.py`); `pooling_params` (one, or one
        per prompt) with `use_activation=False` leaves it unnormalised. `truncate_prompt_tokens`
        (every prompt's `PoolingParams.truncate_prompt_tokens`) keeps each prompt's last N tokens.
        Needs `runner="pooling"`; ValueError names the prompt it refuses (empty, or longer than
        `max_model_len`)."""
        return self._pool("embed", prompts, use_tqdm, lora_request, pooling_params, truncate_prompt_tokens)

    def classify(self, prompts: PromptType | SequenceABC[PromptType], use_tqdm: bool = True,
                 lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
                 pooling_params: PoolingParams | SequenceABC[PoolingParams] | None = None,
                 truncate_prompt_tokens: int | None = None) -> list[ClassificationRequestOutput]:
        """Each prompt's class probabilities, in their order: `outputs.probs`, one float per label
        (`outputs.label`: the most probable one's name), from a sequence classification model's
        head (see `jpaged/pooling.py`); `pooling_params` (one, or one per prompt) with
        `use_activation=False` gives the head's raw logits instead; `truncate_prompt_tokens` as
        for `embed`. Needs `runner="pooling"` and such a model; ValueError names the prompt it
        refuses (empty, or longer than `max_model_len`)."""
        return self._pool("classify", prompts, use_tqdm, lora_request, pooling_params, truncate_prompt_tokens)

    def encode(self, prompts: PromptType | SequenceABC[PromptType],
               pooling_params: PoolingParams | SequenceABC[PoolingParams] | None = None, *, use_tqdm: bool = True,
               lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
               pooling_task: str | None = None, truncate_prompt_tokens: int | None = None
               ) -> list[PoolingRequestOutput]:
        """Each prompt's pooling output, in their order (vLLM's `LLM.encode`): `outputs.data`, a
        float32 numpy array: the embedding ("embed") or class probabilities ("classify"), or one
        row per prompt token, its normalised final state ("token_embed", multi-vector retrieval)
        or its class probabilities ("token_classify", a `*ForTokenClassification` model's, or a
        reward model's per-token scores). `pooling_task` is required and must be the engine's
        (`pooler_config["task"]` chooses it at load; see `jpaged/pooling.py`); `pooling_params`
        and `truncate_prompt_tokens` as for `embed`. ValueError for no task or another task, and
        as `embed` gives."""
        if pooling_task is None:
            raise ValueError("LLM.encode needs pooling_task: 'embed' (as LLM.embed), 'classify' (as LLM.classify), "
                             "'token_embed' (a vector per token) or 'token_classify' (class probabilities per token)")
        outputs = self._pool(pooling_task, prompts, use_tqdm, lora_request, pooling_params, truncate_prompt_tokens,
                             f"LLM.encode(pooling_task={pooling_task!r})")
        return [pooling_request_output(out) for out in outputs]

    def score(self, data_1: str | SequenceABC[str], data_2: str | SequenceABC[str], /, *, use_tqdm: bool = True,
              lora_request: LoRARequest | None = None, pooling_params: PoolingParams | None = None,
              truncate_prompt_tokens: int | None = None, chat_template: str | None = None,
              chat_template_kwargs: dict | None = None) -> list[ScoringRequestOutput]:
        """A score per text pair, in `data_2`'s order: `outputs.score`. Pairs are one query
        (`data_1`, a text) with each document of `data_2` (1:N), or the i-th query with the i-th
        document (N:N). A cross-encoder (a classifier of one label) scores each pair as one
        prompt (its probability); an embedding model scores the cosine of the two embeddings, or,
        run for `token_embed`, the MaxSim of their token embeddings (see `jpaged/scoring.py`). A
        cross-encoder's pairs go through `chat_template` where one is given (`chat_template_kwargs`: its variables, such as a reranker's `instruction`) as
        a "query" turn and a "document" turn. `pooling_params` with `use_activation=False`
        gives a cross-encoder's raw logit instead of its probability. `truncate_prompt_tokens`
        (-1: `max_model_len`) cuts each pair's encoding as its tokenizer truncates (the longer
        text first, separators kept), or each text's to its last tokens on an embedding model.
        Needs `runner="pooling"`. ValueError for another model (one that generates, classifies
        tokens, or classifies into several labels), texts that do not pair up, a template that
        fails, or a text the engine refuses (named by its place)."""
        kind = score_type(self.engine.pooling_task, self.engine.classifier)
        queries, documents = score_pairs(data_1, data_2)
        for name, value, cls in (("lora_request", lora_request, LoRARequest),
                                 ("pooling_params", pooling_params, PoolingParams)):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__} or None; got {type(value).__name__}")
        if chat_template is not None:
            if kind != "cross-encoder":
                raise ValueError("chat_template renders a cross-encoder's pairs; an embedding model embeds each text "
                                 "on its own")
            chat_template = checked_template(chat_template)
        chat_template_kwargs = checked_variables(chat_template_kwargs)
        max_length = pair_max_length(truncate_prompt_tokens, self.engine.max_model_len)
        self._check_no_other_requests("score")
        if kind == "cross-encoder":
            prompts = [self._pair_prompt(i, query, document, chat_template, chat_template_kwargs, max_length)
                       for i, (query, document) in enumerate(paired(queries, documents))]
            name = lambda i: f"pair {i}"
        else:
            prompts = [{"prompt": text, "prompt_token_ids": truncated_prompt(
                self.engine.tokenizer.encode(text), truncate_prompt_tokens, self.engine.max_model_len)}
                for text in queries + documents]
            name = lambda i: f"data_1[{i}]" if i < len(queries) else f"data_2[{i - len(queries)}]"
        count = len(prompts)
        outputs = self._add_and_run(prompts, [pooling_params] * count, [0] * count, [lora_request] * count, use_tqdm,
                                    name=name)
        scores = pair_scores(kind, outputs, len(queries))
        if kind == "cross-encoder":
            return [ScoringRequestOutput(out.request_id, ScoringOutput(score), out.prompt_token_ids, out.finished,
                                         out.metrics) for out, score in zip(outputs, scores)]
        pad = self.engine.tokenizer.pad_token_id
        return [ScoringRequestOutput(f"{query.request_id}_{document.request_id}", ScoringOutput(score),
                                     query.prompt_token_ids + ([] if pad is None else [pad]) + document.prompt_token_ids,
                                     True)
                for (query, document), score in zip(paired(outputs[:len(queries)], outputs[len(queries):]), scores)]

    def _pair_prompt(self, index: int, query: str, document: str, chat_template: str | None,
                     chat_template_kwargs: dict, max_length: int | None) -> dict:
        try:
            return {"prompt_token_ids": pair_token_ids(self.engine.tokenizer, query, document,
                                                       self.engine.classifier.use_sep_token, chat_template,
                                                       chat_template_kwargs, max_length)}
        except ValueError as err:
            raise ValueError(f"pair {index}: {err}") from err

    def _pool(self, task: str, prompts, use_tqdm: bool, lora_request, pooling_params, truncate_prompt_tokens,
              call: str | None = None) -> list:
        call = call or f"LLM.{task}"
        if self.engine.runner_type != "pooling":
            raise ValueError(f"{call} needs an engine made with runner='pooling' (this one generates)")
        if task not in POOLING_TASKS:
            raise ValueError(f"pooling_task must be one of {', '.join(POOLING_TASKS)}, got {task!r:.50}")
        if self.engine.pooling_task != task:
            raise ValueError(f"{call} cannot run on this model: it {_POOLING_TASKS[self.engine.pooling_task]}")
        prompts = _prompt_list(prompts)
        self._check_no_other_requests(task)
        params = _per_prompt(pooling_params, len(prompts), PoolingParams, "pooling_params", "pooling params")
        if truncate_prompt_tokens is not None:
            params = [dataclasses.replace(param or PoolingParams(), truncate_prompt_tokens=truncate_prompt_tokens)
                      for param in params]
        return self._add_and_run(prompts, params, [0] * len(prompts), _per_prompt_loras(lora_request, len(prompts)),
                                 use_tqdm)

    def _add_and_run(self, prompts, params, priorities, loras, use_tqdm: bool,
                     name=lambda i: f"prompt {i}") -> list:
        return self._run(self._add(prompts, params, priorities, loras, name), use_tqdm)

    def _add(self, prompts, params, priorities, loras, name=lambda i: f"prompt {i}") -> list[str]:
        """Add one request per prompt; their ids. A prompt refused is a ValueError naming it
        (`name(index)`), and none of the call's requests stays."""
        request_ids = []
        try:
            for prompt, param, rank, lora in zip(prompts, params, priorities, loras):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, param, rank, lora)
                request_ids.append(request_id)
        except BaseException as err:  # a refused prompt (or an interrupt): none of the call's requests stays
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            if isinstance(err, ValueError):
                raise ValueError(f"{name(len(request_ids))}: {err}") from err
            raise
        return request_ids

    def _per_prompt_params(self, sampling_params, count: int) -> list[SamplingParams]:
        params = _per_prompt(sampling_params, count, SamplingParams, "sampling_params", "sampling params")
        return [self.get_default_sampling_params() if p is None else p for p in params]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        pooling = self.engine.runner_type == "pooling"
        desc = {"embed": "embedding", "classify": "classifying", "token_embed": "embedding tokens",
                "token_classify": "classifying tokens"}.get(self.engine.pooling_task, "generating")
        bar = tqdm(total=len(request_ids), desc=desc, unit="req",
                   disable=not use_tqdm)
        generated_before, started = self.engine.stats().num_generated_tokens, time.perf_counter()
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
                        if self._metrics is not None:
                            self._metrics.observe_finished(output)
                if use_tqdm and not pooling:  # every token generated so far, unfinished requests' too
                    generated = self.engine.stats().num_generated_tokens - generated_before
                    bar.set_postfix_str(f"{generated / (time.perf_counter() - started):.1f} tok/s out")
        except BaseException:  # an interrupt or a failed step: the call's requests leave the engine
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
            if self._metrics is not None:  # aborted here, or through llm.engine.abort_request meanwhile
                for request_id in request_ids:
                    if request_id not in finished:
                        self._metrics.observe_aborted(request_id)
        return [finished[request_id] for request_id in request_ids if request_id in finished]

    def beam_search(self, prompts: PromptType | SequenceABC[PromptType], params: BeamSearchParams,
                    lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """The `params.beam_width` best continuations of each prompt, best first, through the
        LoRA adapter `lora_request` names (one for every prompt, or one per prompt, None for the
        base model), as `generate` takes it; `use_tqdm` shows a bar of the rounds (tokens) done."""
        prompts = _prompt_list(prompts)
        loras = _per_prompt_loras(lora_request, len(prompts))
        self._check_no_other_requests("beam_search")
        return beam_search(self.engine, prompts, params, loras, use_tqdm)

    def _check_no_other_requests(self, call: str) -> None:
        """RuntimeError where the engine holds requests added through `enqueue` or
        `engine.add_request`: `call` steps the engine until its own requests finish, and would
        swallow the others' outputs."""
        pending = self._forget_aborted()
        if self._enqueued:
            raise RuntimeError(f"{call} steps the engine until its own requests finish, and "
                               f"{min(len(self._enqueued), pending)} requests added by enqueue wait: "
                               "wait_for_completion() runs them and returns their outputs")
        if pending:
            raise RuntimeError(f"{call} steps the engine until its own requests finish, and the engine holds {pending} "
                               "unfinished requests added through llm.engine.add_request, whose outputs it would "
                               "not return: step them with llm.engine.step() or abort them first")

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        continue_final_message: bool = False,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
        chat_template_content_format: str = "auto",
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template (given
        `tools`, OpenAI-style function definitions, for templates that render them). Each output's
        `prompt` is the rendered conversation. With `continue_final_message` (and
        `add_generation_prompt=False`), the reply continues the final (assistant) message instead
        of starting a new turn, as in vLLM.

        `chat_template` (the template's Jinja text) replaces the tokenizer's; `chat_template_kwargs`
        are extra variables for the template (such as `enable_thinking` where a template reads
        it). `chat_template_content_format` (vLLM's): how the template takes message contents,
        "string" (text, parts joined by newlines), "openai" (lists of parts, each image
        `{"type": "image"}`) or "auto" (lists where the template loops over a message's
        content, else text). ValueError when there is no chat template at all, the template does
        not parse, a variable would set one of `apply_chat_template`'s own arguments
        (`chat_template.py`), or the content format is unknown.
        On a model that reads images (LLaVA), content parts `{"type": "image_url", "image_url":
        {"url": ...}}` or `{"type": "image_pil", "image_pil": image}` give the turn's images
        (`jpaged/images.py`), rendered by the template as its image token; on any other model
        they are a ValueError."""
        prompts = self._chat_prompts(messages, add_generation_prompt, tools, chat_template, chat_template_kwargs,
                                     continue_final_message, chat_template_content_format)
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def _chat_prompts(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None,
                      chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                      continue_final_message: bool = False, chat_template_content_format: str = "auto") -> list[dict]:
        """`chat`'s conversations rendered as prompts (text, token ids and images)."""
        self._check_generates()
        conversations = _conversations(messages)
        tokenizer = self.engine.tokenizer
        if chat_template is not None:
            chat_template = checked_template(chat_template)
        elif not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.engine.model_name} has no chat template; pass chat_template")
        chat_template_kwargs = checked_variables(chat_template_kwargs)
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the final message: it needs add_generation_prompt=False")
        prompts = []
        for index, conversation in enumerate(conversations):
            try:
                conversation, images = chat_for_template(conversation, tokenizer, self.engine.vision_config,
                                                         chat_template, max_images=self.engine.max_images,
                                                         content_format=chat_template_content_format,
                                                         interleave=self.engine.interleave_mm_strings)
            except ValueError as err:
                raise ValueError(f"conversation {index}: {err}") from err
            text = chat_text(tokenizer, conversation, add_generation_prompt, tools, chat_template, chat_template_kwargs,
                             continue_final_message)
            prompt = {"prompt": text, "prompt_token_ids": tokenizer.encode(unicode_text("the rendered chat", text),
                                                                           add_special_tokens=False)}
            prompts.append(prompt | ({"multi_modal_data": {"image": images}} if images else {}))
        return prompts

    def enqueue_chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        continue_final_message: bool = False,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
        chat_template_content_format: str = "auto",
    ) -> list[str]:
        """`chat`'s conversations added to the engine without running it (vLLM's `enqueue_chat`),
        taken and rendered as `chat` takes them; returns their request ids.
        `wait_for_completion` runs them."""
        prompts = self._chat_prompts(messages, add_generation_prompt, tools, chat_template, chat_template_kwargs,
                                     continue_final_message, chat_template_content_format)
        return self.enqueue(prompts, sampling_params, lora_request=lora_request)


def chat_token_ids(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                   tools: list[dict] | None = None, chat_template: str | None = None,
                   chat_template_kwargs: dict | None = None) -> list[int]:
    """A conversation's prompt token ids through the chat template (see `chat_text`)."""
    text = chat_text(tokenizer, conversation, add_generation_prompt, tools, chat_template, chat_template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def _per_prompt(value, count: int, cls: type, name: str, noun: str, none_means: str = "") -> list:
    """`value` (one `cls`, None, or a list of one per prompt) as a list of one per prompt. A list
    may hold None items where `none_means` says what None is. TypeError for anything else,
    ValueError for a list of another length (`noun`: what its items are, for the message)."""
    if value is None or isinstance(value, cls):
        return [value] * count
    if not isinstance(value, SequenceABC) or not all(isinstance(v, cls) or (none_means and v is None) for v in value):
        raise TypeError(f"{name} must be a {cls.__name__} or a list of them{f' ({none_means})' if none_means else ''}, "
                        f"one per prompt; got {type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"got {len(value)} {noun} for {count} prompts")
    return list(value)


def _per_prompt_loras(lora_request, count: int) -> list[LoRARequest | None]:
    return _per_prompt(lora_request, count, LoRARequest, "lora_request", "lora requests", "None for the base model")


_POOLING_TASKS = {"embed": "embeds prompts (LLM.embed)", "classify": "classifies prompts (LLM.classify)",
                  "token_embed": "embeds each prompt token (LLM.encode(pooling_task='token_embed'))",
                  "token_classify": "classifies each prompt token (LLM.encode(pooling_task='token_classify'))"}


def _prompt_list(prompts) -> list[PromptType]:
    """`prompts` as a list of prompts: one prompt (a string, a dict, or a flat list of token ids)
    becomes a list of one. ValueError for anything else."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and is_integer(prompts[0])):
        return [prompts]
    if isinstance(prompts, SequenceABC) and not isinstance(prompts, (bytes, bytearray)):
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of token ids, a dict, or a list of those; got "
                     f"{type(prompts).__name__}")


def _conversations(messages) -> list[list[dict]]:
    """One conversation (a list of message dicts) or a list of them, as a list of conversations,
    each message's content as text: a list of OpenAI text parts (`{"type": "text", "text": ...}`)
    (or text and image parts) kept as a list for `chat_images` to join or pass on, and an
    assistant's None as "". ValueError naming the first
    message that is not a dict with a string "role" and such a "content", or for no messages."""
    if not isinstance(messages, list) or not messages:
        got = type(messages).__name__ if messages else repr(messages)
        raise ValueError(f"messages must be a list of message dicts or a list of such lists, got {got}")
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation:
            got = type(conversation).__name__ if conversation else "no messages"
            raise ValueError(f"conversation {i} must be a list of message dicts, got {got}")
        for j, message in enumerate(conversation):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
                raise ValueError(f"conversation {i}, message {j} must be a dict with a string 'role' and a "
                                 f"'content', got {message!r:.200}")
    return [[{**message, "content": _text(message, f"conversation {i}, message {j}")}
             for j, message in enumerate(conversation)] for i, conversation in enumerate(conversations)]


def _text(message: dict, where: str) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    if content is None and message["role"] == "assistant":  # a turn that only calls tools
        return ""
    parts = content if isinstance(content, list) else None
    texts = [isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts or ()]
    images = [isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in parts or ()]
    if parts is None or not all(text or image for text, image in zip(texts, images)):
        raise ValueError(f"{where}: content must be a string or a list of text and image parts "
                         f'({{"type": "text", "text": ...}}, {{"type": "image_url", "image_url": {{"url": ...}}}}), '
                         f"got {content!r:.200}")
    return parts  # joined, or kept for a template that reads parts, by `chat_images`
