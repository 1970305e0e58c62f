"""The engine loop: requests in, one scheduled and executed step at a time, outputs back.

`LLMEngine` owns the scheduler (and through it the block manager) and the model runner.
`step()` schedules, moves blocks (swaps, copy-on-write), runs the model, appends the sampled
tokens, forks the extra samples of a request once its prompt is computed, turns each sequence's
new token into text (`jpaged/detokenizer.py`), applies stop conditions and frees what finished.
It implements `EngineClient` (`jpaged/engine_client.py`), the interface `LLM`, beam search and a
server use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from jpaged import compile_cache, profiler
from jpaged.block_manager import BlockManager, blocks_held_under_window
from jpaged.config import (
    CLASSIFIER_SUFFIX,
    TOKEN_CLASSIFIER_SUFFIX,
    EngineConfig,
    ModelConfig,
    PixtralVisionConfig,
    QwenVisionConfig,
    VisionConfig,
    vision_config_of,
)
from jpaged.detokenizer import IncrementalDetokenizer, NoDetokenizer, token_text
from jpaged.engine_client import EngineStats, PromptType
from jpaged.images import (
    ImageProcessor,
    as_image_list,
    check_image_count,
    embedding_runs,
    pixel_hash,
    widened_prompt,
)
from jpaged.loader.source import open_model
from jpaged.loader.weights import host_tensors
from jpaged.lora import LoRAAdapter, LoRARequest, load_lora_adapter
from jpaged.model_runner import WAKE_UP_TAGS, ModelRunner, StepOutput
from jpaged.models.pixtral_vision import PixtralImageEncoder
from jpaged.models.quantization import gguf_packed
from jpaged.models.qwen_vision import QwenImageEncoder
from jpaged.models.vision import ImageEncoder
from jpaged.mrope import prompt_positions
from jpaged.ngram_proposer import NgramProposer, accepted_tokens, can_draft
from jpaged.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
)
from jpaged.padding import MAX_BIASED_TOKENS, StepShapes
from jpaged.parallel.layout import check_layout
from jpaged.pooling import (
    LM_HEAD_TENSORS,
    Classifier,
    PoolingParams,
    answer_token_ids,
    check_dimensions,
    default_runner,
    pooled_output,
    pooler_for_task,
    pooling_task,
    read_pooler_config,
    split_score_head,
    token_head,
    with_matryoshka,
)
from jpaged.prompt_inputs import InputEmbeds, PromptInputs, embeds_by_block, parse_prompt
from jpaged.reasoning import ReasoningParser
from jpaged.sampling_params import (
    ALL_LOGPROBS,
    SamplingParams,
    bad_words_token_ids,
    device_seed,
    generation_defaults,
    logprob_cap,
    truncated_prompt,
    unicode_text,
)
from jpaged.scheduler import Scheduler, SchedulerOutput, check_priority
from jpaged.sequence import Request, Sequence
from jpaged.structured_output import GrammarCompiler
from sharding.mesh import replica_meshes

if TYPE_CHECKING:
    from jpaged.sampler import SamplerOutput

logger = logging.getLogger("jpaged")
EMBEDDING_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)  # a pooling runner's requests

__all__ = ["EngineStats", "LLMEngine", "PromptType"]
NO_TEXT = NoDetokenizer()


class LLMEngine:
    def __init__(self, config: EngineConfig, replica: int | None = None):
        """One engine; under data parallelism, replica `replica` of `data_parallel_size` (see
        `DataParallelEngine`), running on that replica's devices."""
        if replica is None and config.parallel.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size {config.parallel.data_parallel_size} runs one engine per "
                             "replica: use LLM or DataParallelEngine")
        self.config = config
        self.max_images = (config.limit_mm_per_prompt or {}).get("image")  # None: no limit
        self.interleave_mm_strings = config.interleave_mm_strings
        self.enable_sleep_mode = config.enable_sleep_mode
        self.profiler_dir = config.profiler_dir
        self.logprobs_mode = config.logprobs_mode
        if config.compilation_cache:
            compile_cache.enable()
        source = open_model(config.model, config.tokenizer, config.revision)
        if config.hf_overrides:
            source = dataclasses.replace(source, hf_config={**source.hf_config, **config.hf_overrides})
        self.model_name = source.name
        architectures = source.hf_config.get("architectures") or []
        if config.runner == "auto":
            runner = default_runner(architectures, config.pooler_config)
            try:
                config = self.config = dataclasses.replace(config, runner=runner)
            except ValueError as err:
                raise ValueError(f"runner 'auto' runs {source.name} (architectures {architectures}) with runner="
                                 f"{runner!r}: {err}") from err
            logger.info("runner 'auto': %s runs with runner=%r (architectures %s)", source.name, config.runner,
                        architectures)
        classifies = [name for name in architectures if name.endswith((CLASSIFIER_SUFFIX, TOKEN_CLASSIFIER_SUFFIX))]
        if classifies and config.runner != "pooling":
            call = ("LLM.encode(pooling_task='token_classify')" if classifies[0].endswith(TOKEN_CLASSIFIER_SUFFIX)
                    else "LLM.classify")
            raise ValueError(f"{source.name} is a classification model ({classifies[0]}): it runs with runner='pooling'"
                             f" ({call}), not runner='generate'")
        self.pooling_task = pooling_task(architectures, config.pooler_config) if config.runner == "pooling" else None
        self.pooler = None if self.pooling_task is None else with_matryoshka(pooler_for_task(
            read_pooler_config(source.folder, source.hf_config.get("hidden_size")), self.pooling_task, config.pooler_config), source.hf_config)
        if self.pooler is not None and self.pooler.reads_every_token and config.parallel.pipeline_parallel_size > 1:
            raise ValueError(f"{self.pooler.name} pooling runs on one pipeline stage only (a pipeline may cut "
                             "a prompt chunk across micro-batches); got pipeline_parallel_size "
                             f"{config.parallel.pipeline_parallel_size}")
        self.model_config = ModelConfig.from_hf(source.hf_config, source.generation_config)
        answers = token_head(source.hf_config) if config.runner == "pooling" else None
        if answers and not classifies:
            raise ValueError(f"{source.name}: classifier_from_token and method read a causal LM as a classifier only "
                             "where its architectures name a *ForSequenceClassification (set them, e.g. through "
                             "hf_overrides)")
        if self.model_config.bidirectional:
            self._check_bidirectional(source.name, config)
        lm_head_tied = self.model_config.tie_word_embeddings
        if config.runner == "pooling":  # no LM head: a base model's checkpoint has none, and embeddings need none
            self.model_config = dataclasses.replace(self.model_config, tie_word_embeddings=True)
        self.default_sampling_params = generation_defaults(self._generation_config(source.generation_config))
        if self.default_sampling_params:
            logger.info("sampling defaults from generation_config.json: %s (generation_config='none' keeps "
                        "jpaged's own)", self.default_sampling_params)
        check_layout(self.model_config, config.parallel)
        meshes = replica_meshes(config.parallel)
        self.max_model_len = self._resolve_max_model_len()
        self.max_logprobs = logprob_cap(config.max_logprobs, self.model_config.vocab_size)
        with ThreadPoolExecutor(max_workers=1) as pool:  # the tokenizer loads while the weights do
            tokenizer = pool.submit(source.load_tokenizer)
            packed = gguf_packed(source.block_types, source.name) if config.quantization == "gguf" else {}
            head: dict = {}
            token_rows = functools.cache(lambda: answer_token_ids(tokenizer.result(), answers[0])) if answers else None
            vision = self._vision_config(source)
            # every token of a prompt sees every other: a prompt is computed in one step
            self.reads_prompt_whole = self.model_config.bidirectional or (vision is not None and vision.prefix_lm)
            config = self.config = dataclasses.replace(
                config, scheduler=config.scheduler.with_step_budget(self.max_model_len, self.reads_prompt_whole))
            if isinstance(vision, QwenVisionConfig) and vision.deepstack_layers:
                self.model_config = dataclasses.replace(self.model_config,
                                                        deepstack_layers=len(vision.deepstack_layers))
            self._checkpoint_weights = lambda: split_score_head(source.weights(packed), {}, token_rows)
            self._checkpoint_names = source.checkpoint_names
            self.runner = ModelRunner(self.model_config, config, split_score_head(source.weights(packed), head, token_rows),
                                      self.step_shapes(), meshes[replica or 0], packed=packed,
                                      token_states=self.pooler is not None and self.pooler.pooling_type == "all",
                                      reads_embeds=vision is not None or config.enable_prompt_embeds,
                                      mrope=isinstance(vision, QwenVisionConfig),
                                      bidirectional=self.reads_prompt_whole or (vision is not None and
                                                                                vision.bidirectional))
            self.tokenizer = tokenizer.result()
        self.image_encoder, self.image_processor, self.vision_config = self._image_reader(vision, source)
        self.enable_prompt_embeds = config.enable_prompt_embeds
        self.classifier = self._classifier(source, head, answers, lm_head_tied) if classifies else None
        if len(self.tokenizer) > self.model_config.vocab_size:
            hint = "is tokenizer= the model's?" if config.tokenizer else "is the model's tokenizer the one it ships with?"
            logger.warning("the tokenizer has %d tokens, more than the model's vocabulary of %d: prompts holding ids "
                           "past it are refused (%s)", len(self.tokenizer), self.model_config.vocab_size, hint)
        self.max_model_len = self._fit_to_cache(self.max_model_len)
        # LongRoPE's factors follow the context the engine serves, known once the KV cache is sized
        self.model_config = dataclasses.replace(self.model_config,
                                                rope=self.model_config.rope.for_context(self.max_model_len))
        self.runner.use_rope(self.model_config.rope)
        if config.compile_warmup:
            self.warm_up()
        # The tokenizer's EOS ends a sequence with no stop_reason; the model's other EOS ids (its
        # generation config's) end it as stop tokens do, their id the stop_reason (vLLM's reading).
        self.primary_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | ({self.primary_eos} - {None})
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.reasoning_parser = (ReasoningParser.from_tokenizer(config.reasoning_parser, self.tokenizer)
                                 if config.reasoning_parser else None)
        self.runner_type = config.runner
        prefix_caching = config.cache.enable_prefix_caching
        if prefix_caching and self.pooler is not None and self.pooler.reads_every_token:
            logger.info("%s pooling reads every prompt token's state: prefix caching is off", self.pooler.name)
            prefix_caching = False
        if prefix_caching and self.reads_prompt_whole:
            logger.info("%s reads each prompt whole, every token seeing the later ones: prefix caching is off",
                        self.model_name)
            prefix_caching = False
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          enable_prefix_caching=prefix_caching,
                                          num_host_blocks=self.runner.num_host_blocks,
                                          sliding_window=self.model_config.kv_window)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.runner.shapes.max_rows,
                                   config.lora.max_loras)
        self.loras: dict[int, LoRAAdapter] = {}  # adapters read so far, by lora_int_id
        self.requests: dict[str, Request] = {}
        self._seed_rng = random.Random(config.seed)
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0
        self.proposer = NgramProposer(config.speculative) if config.speculative.enabled else None
        self.num_draft_tokens = 0
        self.num_accepted_draft_tokens = 0
        logger.info("engine ready: %s, weights %.1f MiB on the device%s (%s), %d KV blocks of %d tokens (%.1f MiB, "
                    "%s), max_model_len %d%s%s", self.model_name, self.runner.weight_bytes / 2**20,
                    (f" + {self.runner.offloaded_bytes / 2**20:.1f} MiB streamed (all devices)" if self.runner.offload
                     else "") + (f" + {self.runner.lora.nbytes / 2**20:.1f} MiB of LoRA slots" if self.runner.lora
                                 else ""),
                    config.quantization or "not quantized", self.runner.num_blocks, config.cache.block_size,
                    self.runner.kv_cache_bytes / 2**20, config.cache.kv_cache_dtype, self.max_model_len,
                    f", n-gram speculation of {config.speculative.num_speculative_tokens} tokens"
                    if self.proposer else "",
                    f", step working memory up to {self.runner.step_temp_bytes / 2**20:.1f} MiB per device"
                    if self.runner.step_temp_bytes else "")

    def _vision_config(self, source) -> VisionConfig | QwenVisionConfig | PixtralVisionConfig | None:
        """The vision tower of a model that reads images, where this engine can feed it (one
        pipeline stage, no streamed layers, runner "generate"); None otherwise (logged)."""
        if source.vision_config is None:
            return None
        if self.max_images == 0:
            logger.info("limit_mm_per_prompt allows no images: %s serves its text alone, its vision tower not loaded",
                        source.name)
            return None
        vision = vision_config_of(source.vision_config)
        parallel = self.config.parallel
        if parallel.pipeline_parallel_size > 1 or self.config.offload_weights or self.config.runner != "generate":
            logger.warning("%s reads images on one pipeline stage, without offload_weights, under runner 'generate': "
                           "this engine serves its text alone", source.name)
            return None
        return vision

    def _image_reader(self, vision, source) -> tuple:
        """(image encoder, image processor, vision config) of a model that reads images (`vision`),
        the config completed from the processor (its size limits) and the tokenizer (Pixtral's
        break tokens); Nones where `vision` is None. ValueError for a tokenizer without Pixtral's
        `[IMG_BREAK]` / `[IMG_END]`."""
        if vision is None:
            return None, None, None
        pixtral = isinstance(vision, PixtralVisionConfig)
        if pixtral:
            processor = ImageProcessor(source.folder, patch_size=vision.patch_size * vision.spatial_merge_size)
        else:  # Gemma 3's whole image alone, without pan-and-scan crops (vLLM's default too)
            processor = ImageProcessor(source.folder, **({"do_pan_and_scan": False} if vision.bidirectional else {}))
        encoder = ImageEncoder
        if isinstance(vision, QwenVisionConfig):
            encoder, vision = QwenImageEncoder, vision.with_pixel_limits(processor.pixel_limits())
        elif pixtral:
            vocab = self.tokenizer.get_vocab()
            if missing := [name for name in ("[IMG_BREAK]", "[IMG_END]") if name not in vocab]:
                raise ValueError(f"{source.name}'s tokenizer lacks {missing}, the tokens that end the rows of a "
                                 "Pixtral image")
            vision = vision.with_longest_edge(processor.longest_edge()).with_special_tokens(vocab["[IMG_BREAK]"],
                                                                                            vocab["[IMG_END]"])
            encoder = PixtralImageEncoder
        elif vision.bidirectional or vision.prefix_lm:
            vision = vision.with_newlines(self.tokenizer.get_vocab())
            if (budget := self.config.scheduler.max_num_batched_tokens) < vision.tokens_per_image:
                raise ValueError(f"{source.name}: an image is {vision.tokens_per_image} tokens, which attend to each "
                                 "other and so are computed in one step: max_num_batched_tokens must be at least that, "
                                 f"got {budget}")
        return encoder(vision, source.vision_weights, self.runner.first_device), processor, vision

    def _generation_config(self, model_generation_config: dict) -> dict:
        """The generation config whose sampling defaults the engine applies (`generation_config`)."""
        setting = self.config.generation_config
        if setting in ("none", "vllm"):  # "vllm": as vLLM users turn it off
            return {}
        if setting == "auto":
            return model_generation_config
        path = Path(setting) / "generation_config.json"
        if not path.is_file():
            raise ValueError(f"generation_config {setting!r}: no generation_config.json there (give 'auto', 'none' "
                             "or a folder holding one)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err

    def _classifier(self, source, head: dict, answers: tuple[list[str], str] | None, lm_head_tied: bool) -> Classifier:
        """The `score` head the checkpoint of a sequence classification model holds, or that the
        rows of its `answers` tokens make (`pooling.token_head`) of its LM head (of its embedding,
        where `lm_head_tied`)."""
        weight, name, bias = head.get("score"), "score.weight", head.get("score.bias")
        if answers:
            weight = head.get(LM_HEAD_TENSORS[0], head.get(LM_HEAD_TENSORS[1]) if lm_head_tied else None)
            name = "the answer tokens' rows of lm_head.weight" + (" or the tied embedding" if lm_head_tied else "")
        expected = self.model_config.hidden_size
        if weight is None or weight.ndim != 2 or weight.shape[1] != expected:
            found = "none" if weight is None else f"one of shape {tuple(weight.shape)}"
            raise ValueError(f"{source.name} is a classification model, but its checkpoint has {found} for "
                             f"{name} (expected [num_labels, {expected}])")
        return Classifier.from_token_rows(source.hf_config, weight, *answers) if answers else Classifier.from_hf(
            source.hf_config, weight, bias)

    def step_shapes(self) -> StepShapes:
        """The padded sizes of every step this engine can run (they fix its compiled programs)."""
        sched = self.config.scheduler
        return StepShapes.for_limits(sched.max_num_batched_tokens, sched.max_num_seqs, self.max_model_len,
                                     self.config.cache.block_size, self.model_config.vocab_size, self._num_draft_rows())

    def _num_draft_rows(self) -> int:
        """Logits rows beyond `max_num_seqs` for draft checks: enough for one sequence's drafts.
        No more: drafts that took a full batch to a larger token count would cost more than they
        save in a compute-bound step."""
        speculative = self.config.speculative
        return max(0, speculative.num_speculative_tokens + 1 - self.config.scheduler.max_num_seqs) \
            if speculative.enabled else 0

    def warm_up(self) -> None:
        """Compile every step program before the first request, with a progress bar (see
        `ModelRunner.warm_up`): afterwards no request waits on a compilation."""
        with tqdm(total=len(self.runner.programs()), desc="compiling step programs", unit="program") as bar:
            self.runner.warm_up(bar.update)

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        asked = self.config.scheduler.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len {asked} exceeds the model's limit of {limit} tokens (its "
                             "max_position_embeddings)")
        return asked or limit

    def _fit_to_cache(self, max_model_len: int) -> int:
        """`max_model_len`, lowered to what the KV cache holds where it holds less (logged), so
        that every request within it can run and a server's default `max_tokens` fits. Under a
        sliding window on every layer a sequence holds only its window's blocks and its next
        chunk's, so any length runs where those fit."""
        capacity = self.runner.num_blocks * self.config.cache.block_size
        window, block_size = self.model_config.kv_window, self.config.cache.block_size
        if max_model_len <= capacity or (window and blocks_held_under_window(
                window, block_size, self.config.scheduler.max_num_batched_tokens) <= self.runner.num_blocks):
            return max_model_len
        logger.warning("max_model_len lowered from %d to %d tokens, what the KV cache holds (%d blocks of %d tokens); "
                       "give the cache more memory (cpu_kv_cache_gib, gpu_memory_utilization or num_blocks) to serve "
                       "longer sequences", max_model_len, capacity, self.runner.num_blocks, self.config.cache.block_size)
        return capacity

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        """Queue a request; raises ValueError for input that can never be served, a `priority`
        other than 0 without `scheduling_policy="priority"`, or a `lora_request` the engine cannot
        run (see `add_lora`). Under the pooling runner a request takes `PoolingParams` or None (it
        embeds or classifies its prompt and samples nothing), else `SamplingParams` or None.
        ValueError while the engine sleeps (`sleep`)."""
        if self.runner.is_sleeping:
            raise ValueError(f"the engine is sleeping ({' and '.join(self.runner.sleeping_parts)} off the device): "
                             "wake it up first (LLM.wake_up, or the server's POST /wake_up)")
        pooling_params = None
        if self.pooler is not None:
            if params is not None and not isinstance(params, PoolingParams):
                raise ValueError(f"runner='pooling' {'classifies' if self.classifier else 'embeds'} prompts and "
                                 "samples nothing: add requests with PoolingParams or none, not SamplingParams")
            check_dimensions(params, self.pooling_task, self.pooler,
                             self.pooler.embedding_size(self.model_config.hidden_size))
            keep = None if params is None else params.truncate_prompt_tokens
            pooling_params, params = params, dataclasses.replace(EMBEDDING_PARAMS, truncate_prompt_tokens=keep)
        elif isinstance(params, PoolingParams):
            raise ValueError("this engine generates: add requests with SamplingParams or none; PoolingParams are for "
                             "runner='pooling'")
        # a copy, checked afresh as it is made: the caller may have changed fields since making theirs
        params = SamplingParams(**self.default_sampling_params) if params is None else dataclasses.replace(params)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        check_priority(priority, self.config.scheduler.scheduling_policy)
        lora = self._lora_adapter(lora_request)
        parsed = self._parse(prompt)
        token_ids, embeds = parsed.token_ids, parsed.embeds
        images = as_image_list(parsed.multi_modal_data)
        check_image_count(len(images), self.max_images)
        if images and self.image_encoder is None:
            raise ValueError(f"{self.model_name} reads no images (multi_modal_data holds {len(images)})")
        if images:
            spans = [self.vision_config.placeholder_ids(image.height, image.width) for image in images]
            token_ids, offsets = widened_prompt(token_ids, self.vision_config, spans, self.tokenizer.bos_token_id)
            if params.truncate_prompt_tokens is not None:
                raise ValueError("truncate_prompt_tokens would cut a prompt with images (its placeholders); leave it "
                                 "unset for such prompts")
        if embeds is not None:
            self._check_embeds_prompt(embeds, params)
        token_ids = truncated_prompt(token_ids, params.truncate_prompt_tokens, self.max_model_len)
        if embeds is not None:
            embeds = embeds[len(embeds) - len(token_ids):]
        room = self.max_model_len - len(token_ids)
        if token_ids and room < (0 if self.pooler else 1):  # an embedding adds no token
            held = self.block_manager.num_blocks * self.block_manager.block_size == self.max_model_len
            what = "is longer than" if self.pooler else "leaves no room for output within"
            raise ValueError(f"prompt of {len(token_ids)} tokens {what} max_model_len "
                             f"{self.max_model_len}{' (what the KV cache holds)' if held else ''}")
        if self.reads_prompt_whole:
            self._check_prefix(len(token_ids))
        if token_ids and not self.pooler and (params.max_tokens is None or params.max_tokens > room):  # ends at max_model_len (vLLM's)
            params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        params = self._resolve_logprobs(params)
        if params.best_of > params.n and self.logprobs_mode.endswith("_logits"):
            raise ValueError(f"best_of {params.best_of} ranks samples by their cumulative logprob, and under "
                             f"logprobs_mode {self.logprobs_mode!r} the engine returns logits: use a *_logprobs mode")
        bad_words = bad_words_token_ids(params.bad_words, self.tokenizer)
        self._check_fits(token_ids, params, bad_words)
        seed = device_seed(params.seed) if params.seed is not None else self._seed_rng.getrandbits(32)
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        if grammar is not None and self.reasoning_parser and not self.reasoning_parser.reasoning_ended(token_ids):
            grammar.starts_after = self.reasoning_parser.end_token_id  # the model thinks first, unconstrained
        request = Request(request_id, parsed.text, token_ids, params, seed, grammar, int(priority), lora)
        request.bad_words_token_ids = bad_words
        request.pooling_params = pooling_params
        request.cache_salt = parsed.cache_salt
        if images:
            request.input_embeds = self._image_inputs(images, offsets, spans)
            if self.vision_config.bidirectional:
                request.bidirectional_spans = [(given.offset, given.offset + given.length)
                                               for given in request.input_embeds]
            if isinstance(self.vision_config, QwenVisionConfig):
                grids = [self.vision_config.grid(image.height, image.width) for image in images]
                request.mrope_positions, request.mrope_delta = prompt_positions(len(token_ids), offsets, grids)
        if self.reads_prompt_whole:
            request.bidirectional_spans = [(0, len(token_ids))]
        if embeds is not None:
            request.input_embeds, request.embeds_prompt = embeds_by_block(embeds, self.block_manager.block_size), True
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read the adapter `lora_request` names now, so that requests naming it start at once
        (vLLM's `add_lora`); True. ValueError as `add_request` gives for it."""
        return self._lora_adapter(lora_request) is not None

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter read before and clear its device slot (vLLM's `remove_lora`); False
        for an id not known. ValueError while unfinished requests run through it."""
        if lora_int_id not in self.loras:
            return False
        if users := self.lora_in_use(lora_int_id):
            raise ValueError(f"LoRA adapter {self.loras[lora_int_id].request.lora_name!r} (lora_int_id {lora_int_id}) "
                             f"is in use by {users} unfinished requests")
        del self.loras[lora_int_id]
        self.runner.lora.evict(lora_int_id)
        self.block_manager.forget_lora(lora_int_id)
        return True

    def lora_in_use(self, lora_int_id: int) -> int:
        """How many unfinished requests run through adapter `lora_int_id`."""
        adapter = self.loras.get(lora_int_id)
        if adapter is None:
            return 0
        return sum(1 for request in self.requests.values() if request.lora is adapter)

    def list_loras(self) -> set[int]:
        """The ids of the adapters read so far (vLLM's `list_loras`)."""
        return set(self.loras)

    def _lora_adapter(self, lora_request: LoRARequest | None) -> LoRAAdapter | None:
        """The adapter `lora_request` names, read once per `lora_int_id`. ValueError without
        `enable_lora`, for an id already used by another adapter, or for a folder the model cannot
        take (`load_lora_adapter`)."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if not self.config.lora.enable_lora:
            raise ValueError(f"lora_request {lora_request.lora_name!r} needs an engine started with enable_lora=True")
        known = self.loras.get(lora_request.lora_int_id)
        if known is None:
            known = self.loras[lora_request.lora_int_id] = load_lora_adapter(
                lora_request, self.model_config, self.config.lora.max_lora_rank)
        elif (known.request.lora_name, Path(known.request.lora_path).resolve()) != (
                lora_request.lora_name, Path(lora_request.lora_path).resolve()):
            raise ValueError(f"lora_int_id {lora_request.lora_int_id} is adapter {known.request.lora_name!r} "
                             f"({known.request.lora_path}); {lora_request.lora_name!r} ({lora_request.lora_path}) "
                             "needs an id of its own")
        return known

    def _parse(self, prompt: PromptType) -> PromptInputs:
        """`prompt` parsed (`jpaged/prompt_inputs.py`); ValueError for prompt embeddings to an engine
        not started for them."""
        parsed = parse_prompt(prompt, lambda text: self.tokenizer.encode(unicode_text("prompt", text)))
        if parsed.embeds is not None and not self.config.enable_prompt_embeds:
            raise ValueError("prompt_embeds needs an engine started with enable_prompt_embeds=True "
                             "(--enable-prompt-embeds)")
        return parsed

    def _check_embeds_prompt(self, embeds, params: SamplingParams) -> None:
        """ValueError for embeddings of another width than the model's, or asking for prompt
        logprobs (an embeds prompt has no tokens to score)."""
        if embeds.shape[1] != self.model_config.hidden_size:
            raise ValueError(f"prompt_embeds rows hold {embeds.shape[1]} values, the model's hidden_size is "
                             f"{self.model_config.hidden_size}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs needs prompt tokens; a prompt given as prompt_embeds has none")

    @staticmethod
    def _check_bidirectional(name: str, config: EngineConfig) -> None:
        """ValueError where a model that reads prompts bidirectionally (EmbeddingGemma) would
        generate, or run as a pipeline (which may cut a prompt's step across micro-batches)."""
        if config.runner != "pooling":
            raise ValueError(f"{name} reads each prompt bidirectionally (use_bidirectional_attention): it is an "
                             "embedding model and runs with runner='pooling' (LLM.embed), not runner='generate'")
        if config.parallel.pipeline_parallel_size > 1:
            raise ValueError(f"{name} reads each prompt whole in one step, on one pipeline stage; got "
                             f"pipeline_parallel_size {config.parallel.pipeline_parallel_size}")

    def _check_prefix(self, length: int) -> None:
        """ValueError for a prompt of `length` tokens that a model reading prompts whole
        (PaliGemma, EmbeddingGemma) cannot read: longer than a step, or, for a prefix LM
        (PaliGemma), than a layer's sliding window (where HF's mask lets the prompt's tokens see
        past the window, which the attention kernels do not)."""
        if length > (budget := self.config.scheduler.max_num_batched_tokens):
            raise ValueError(f"prompt of {length} tokens: {self.model_name} reads a prompt whole in one step (its "
                             f"tokens see each other), and max_num_batched_tokens is {budget} (raise it to read longer "
                             "prompts)")
        if self.model_config.bidirectional:  # its windows reach both ways, as the kernels read them
            return
        if length > (window := min((w for w in self.model_config.sliding_windows if w), default=length)):
            raise ValueError(f"prompt of {length} tokens: {self.model_name} reads a prompt whole, and a prompt longer "
                             f"than its layers' sliding window of {window} tokens is not supported")

    def _image_inputs(self, images: list, offsets: list[int], spans: list[list[int]]) -> list[InputEmbeds]:
        """Each image's embeddings, placed at the image tokens of its placeholders (`spans`, from
        `offsets` in the prompt). ValueError where the image processor made another number of
        embeddings than the model's config foretold."""
        inputs = []
        for image, pixels, offset, span in zip(images, self.image_processor.pixel_values(images), offsets, spans):
            embeds = self.image_encoder.encode(pixels, image.height, image.width)
            runs = embedding_runs(span, self.vision_config.image_token_id)
            if len(embeds) != (expected := sum(length for _, length in runs)):
                raise ValueError(f"the image processor made {len(embeds)} embeddings of a {image.height}x{image.width} "
                                 f"image, and the model's config {expected}: their settings differ")
            digest, done = pixel_hash(pixels), 0
            for start, length in runs:
                inputs.append(InputEmbeds(offset + start, embeds[done:done + length], digest))
                done += length
        return inputs

    def _resolve_logprobs(self, params: SamplingParams) -> SamplingParams:
        """`params` with `ALL_LOGPROBS` counts made the vocabulary's size; ValueError for a count
        past `max_logprobs`."""
        vocab, resolved = self.model_config.vocab_size, {}
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked == ALL_LOGPROBS:
                resolved[name] = asked = vocab
            if asked is not None and asked > self.max_logprobs:
                whole = f" (the whole vocabulary of {vocab} tokens)" if name in resolved else ""
                raise ValueError(f"{name} {getattr(params, name)}{whole} is more than max_logprobs {self.max_logprobs}"
                                 f", the most top logprobs this engine returns per token; start it with a larger "
                                 f"max_logprobs (-1: the whole vocabulary)")
        return dataclasses.replace(params, **resolved) if resolved else params

    def _check_fits(self, token_ids: list[int], params: SamplingParams, bad_words: list[list[int]]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        for what, ids in (("prompt token ids", token_ids), ("logit_bias token ids", params.logit_bias or {}),
                          ("allowed_token_ids", params.allowed_token_ids or []),
                          ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{what} {outside[:5]} are outside the vocabulary [0, {vocab})")
        always_banned = {word[0] for word in bad_words if len(word) == 1}
        if params.allowed_token_ids and always_banned.issuperset(params.allowed_token_ids):
            raise ValueError(f"allowed_token_ids {params.allowed_token_ids[:5]} are all blocked by bad_words "
                             f"{params.bad_words[:5]}: no token could be sampled")
        ending = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        if params.allowed_token_ids and params.min_tokens and always_banned | ending >= set(params.allowed_token_ids):
            raise ValueError(f"allowed_token_ids {params.allowed_token_ids[:5]} are all EOS, stop_token_ids or bad_words"
                             f", which cannot be sampled before min_tokens {params.min_tokens}: no token could be "
                             "sampled")
        if params.allowed_token_ids is not None:
            biased = len(params.allowed_token_ids)
            what = f"allowed_token_ids list {biased} ids"
        else:
            parts = {"logit_bias": (len(params.logit_bias or {}), "ids"), "bad_words": (len(bad_words), "token sequences")}
            if params.min_tokens:
                parts["stop_token_ids"] = (len(params.stop_token_ids) + len(self.eos_token_ids), "ids with EOS, under min_tokens")
            biased = sum(count for count, _ in parts.values())
            largest_first = sorted(parts.items(), key=lambda item: -item[1][0])  # the refusal names the largest
            what = ", ".join(f"{field} ({count} {unit})" for field, (count, unit) in largest_first) + f" bias {biased} tokens"
        if biased > MAX_BIASED_TOKENS:
            raise ValueError(f"{what}, more than the limit {MAX_BIASED_TOKENS}")

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self._finish_text(seq)
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> int:
        return self.block_manager.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free the device memory the engine holds until `wake_up` (vLLM's sleep mode): the
        weights go to host memory (level 1) or are discarded (level 2, for weights that
        `load_weights` will replace); the KV cache and the prefix cache are dropped; compiled
        programs stay. Needs `enable_sleep_mode`. ValueError for another level, while requests are
        unfinished (finish or abort them first), and with `offload_weights`."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep needs an engine made with enable_sleep_mode=True (--enable-sleep-mode)")
        if type(level) is not int or level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (weights kept in host memory) or 2 (weights discarded), "
                             f"got {level!r:.50}")
        self._check_idle("sleep")
        self.runner.sleep(discard_weights=level == 2)
        self.block_manager.reset_prefix_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Give back what `sleep` freed: everything, or the parts `tags` names ("weights",
        "kv_cache"; vLLM's tags, so that weights can be updated before the cache is made).
        Weights discarded by `sleep(level=2)` are read again from the model's files. ValueError
        for another tag."""
        if isinstance(tags, str) or not isinstance(tags, (list, tuple, type(None))):
            raise ValueError(f"wake_up tags must be a list such as ['weights'], got {tags!r:.50}")
        if unknown := sorted(set(tags or ()) - set(WAKE_UP_TAGS)):
            raise ValueError(f"wake_up tags {unknown} are not among {list(WAKE_UP_TAGS)}")
        tags = WAKE_UP_TAGS if tags is None else tuple(tags)  # an empty list wakes nothing, as vLLM's
        if "weights" in tags and self.runner.weights_discarded:
            self.runner.load_weights(self._checkpoint_weights())
        self.runner.wake_up(tags)

    def load_weights(self, weights) -> None:
        """Replace the model's weights with `weights`, as an RLHF trainer hands over its updated
        policy (vLLM's `load_weights`): a mapping or iterable of (HF checkpoint name, tensor),
        torch tensors or numpy / jax arrays; every tensor of the model's checkpoint
        (`model.state_dict()` of an HF model of the same config; a base model's names and a
        vision-language model's language-model names as its checkpoints write them, its vision
        tower's left out) or any subset of them, the others staying as they are (after a
        level-2 `sleep`, every tensor). They are placed, split over the engine's devices and
        quantized (`quantization`) as the model's own were; compiled programs stay, the prefix
        cache is emptied (its KV came from the old weights). Weights that `sleep` freed come
        back with them, so `sleep(level=2)`, `load_weights`, `wake_up()` never holds two copies
        on the device. ValueError naming a tensor of the wrong shape, not floats or (after a
        level-2 sleep) missing (the old weights then stay in use), while requests are
        unfinished, and for `quantization="gguf"`, `offload_weights` and classifier models."""
        self._check_idle("load_weights")
        if self.config.quantization == "gguf":
            raise ValueError("load_weights takes float tensors; quantization='gguf' keeps GGML blocks as the file "
                             "holds them (load the model with quantization='int8' or none)")
        if self.classifier is not None:
            raise ValueError(f"load_weights replaces a generating or embedding model's weights; {self.model_name} is "
                             "a classifier, whose score head it would not replace")
        self.runner.load_weights(self._checkpoint_names(host_tensors(weights)))
        self.block_manager.reset_prefix_cache()

    def apply_model(self, func) -> list:
        """`[func(model)]`: vLLM's `apply_model`, run on this engine's Flax model (one worker; see
        `ModelRunner.apply_model` for the model and what is refused)."""
        return [self.runner.apply_model(func)]

    def start_profile(self, prefix: str | None = None) -> Path:
        """Start a jax profiler trace of what the engine runs, into `<profiler_dir>/<prefix>`
        (vLLM's `start_profile`; `jpaged/profiler.py`); returns that folder. ValueError without
        `profiler_dir`, and while a trace runs."""
        return profiler.start(self.profiler_dir, prefix)

    def stop_profile(self) -> Path:
        """End the trace `start_profile` began and write it; returns its folder. ValueError where
        none runs."""
        return profiler.stop()

    def _check_idle(self, action: str) -> None:
        if unfinished := self.get_num_unfinished_requests():
            raise ValueError(f"{action} with {unfinished} unfinished request{'s' * (unfinished > 1)}: finish or "
                             "abort them first")

    def is_sleeping(self) -> bool:
        return self.runner.is_sleeping

    def get_sequence(self, request_id: str) -> Sequence:
        return self.requests[request_id].seqs[0]

    def fork_sequence(self, seq: Sequence) -> Sequence:
        child = Sequence(seq.request, seq.index, seq.prompt_token_ids)
        child.output_token_ids = list(seq.output_token_ids)
        child.output_logprobs = list(seq.output_logprobs)
        child.grammar = seq.grammar.copy() if seq.grammar is not None else None
        self.block_manager.fork(seq, child)
        child.num_computed_tokens = seq.num_computed_tokens
        self.scheduler.add_running(child)
        return child

    def holds_sequence(self, seq: Sequence) -> bool:
        """Whether `seq` runs here: waiting, running or swapped out (not finished or freed)."""
        return self.scheduler.holds(seq)

    def free_sequence(self, seq: Sequence) -> None:
        if not seq.is_finished:
            seq.finish("abort")
            self._finish_text(seq)
        self.scheduler.finish(seq)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_swapped=len(self.scheduler.swapped),
            kv_cache_usage=self.block_manager.usage,
            num_blocks=self.block_manager.num_blocks,
            num_free_blocks=self.block_manager.num_free_blocks,
            prefix_cache_hit_rate=self.block_manager.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_swap_outs=self.scheduler.num_swap_outs,
            num_prompt_tokens_computed=self.num_prompt_tokens_computed,
            num_generated_tokens=self.num_generated_tokens,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_draft_tokens=self.num_accepted_draft_tokens,
            num_compilations=self.runner.num_compilations,
            weight_bytes=self.runner.weight_bytes,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            step_temp_bytes=self.runner.step_temp_bytes,
            **self.runner.offload_stats(),
        )

    def step(self) -> list[RequestOutput]:
        """One scheduled model step; outputs for every request that took part in it."""
        if self.runner.is_sleeping:  # it holds no requests
            return []
        if self.proposer is not None:
            self._propose_drafts()
        plan = self.scheduler.schedule()
        self.runner.move_blocks(plan)
        if not plan.scheduled:
            return []
        result = self.runner.execute(plan.scheduled, sorted(self.eos_token_ids))
        if result.pooled is not None:
            return self._embeddings_done(plan, result.pooled)
        sampled = result.sampled
        if result.prompt_rows is not None:
            self._record_prompt_logprobs(plan.scheduled, result)
        touched: dict[str, Request] = {}
        checked = 0  # draft checks taken so far from `result.draft_sampled`
        for row, item in enumerate(plan.scheduled):
            seq = item.seq
            self._count_computed(seq, item.num_new_tokens)
            seq.num_computed_tokens += item.num_new_tokens - item.num_draft_tokens
            if item.num_draft_tokens:
                drafts = seq.draft_token_ids[:item.num_draft_tokens]
                picks = [(result.draft_sampled, checked + i) for i in range(len(drafts))] + [(sampled, row)]
                checked += len(drafts)
                seq.num_computed_tokens += self._append_verified(seq, drafts, picks)
            elif item.samples:
                self._record_logprobs(seq, sampled, row)
                self._append_token(seq, int(sampled.token_ids[row]))
            seq.draft_token_ids = []
            self.block_manager.commit_full_blocks(seq, seq.num_computed_tokens)
            self.block_manager.release_behind_window(seq)
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[seq.request_id] = seq.request
        outputs = [self.request_output(request) for request in touched.values()]
        for request in touched.values():
            if request.is_finished:
                self.requests.pop(request.request_id, None)
        return outputs

    def _embeddings_done(self, plan: SchedulerOutput, pooled) -> list[EmbeddingRequestOutput]:
        """Advance each sequence of a pooling step (`pooled`: `pooled_rows` of its rows, or each
        row's token states); those whose prompt is now computed end with their output
        (jpaged/pooling.py)."""
        outputs, kind = [], self.pooler.pooling_type
        for row, item in enumerate(plan.scheduled):
            seq = item.seq
            restart = seq.num_computed_tokens == 0  # a chunk from position 0 (again, after a recompute)
            if kind == "all":
                seq.pooled = [pooled[row]] if restart else [*seq.pooled, pooled[row]]
            elif kind == "mean":
                seq.pooled = pooled[1][row] + (0.0 if restart else seq.pooled)
            elif kind == "cls" and restart:
                seq.pooled = pooled[2][row]
            self._count_computed(seq, item.num_new_tokens)
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit_full_blocks(seq, seq.num_computed_tokens)
            self.block_manager.release_behind_window(seq)
            if item.samples:
                if kind == "last":
                    state = pooled[0][row]
                elif kind == "all":
                    state = np.concatenate(seq.pooled)
                else:
                    state = seq.pooled / (seq.num_tokens if kind == "mean" else 1)
                seq.request.embedding = pooled_output(state, seq.request.pooling_params, self.classifier, self.pooler)
                seq.pooled = None
                metrics = seq.request.metrics  # the pooled output is the first and last: TTFT and e2e, as vLLM's
                metrics.first_token_time = metrics.last_token_time = metrics.finished_time = time.monotonic()
                seq.finish("stop")
                self.scheduler.finish(seq)
                self.requests.pop(seq.request_id, None)
                outputs.append(self.request_output(seq.request))
        return outputs

    def _propose_drafts(self) -> None:
        """Draft tokens for each running sequence about to decode (see `ngram_proposer`), never
        more than its request's remaining tokens less one, nor past the first its structured-output
        grammar forbids."""
        for seq in self.scheduler.running:
            limit = seq.sampling_params.max_tokens - len(seq.output_token_ids) - 1
            drafts = self.proposer.propose(seq, limit) if seq.num_uncomputed_tokens == 1 and can_draft(seq) else []
            if drafts and seq.grammar is not None:
                drafts = drafts[:seq.grammar.valid_prefix(drafts)]
            seq.draft_token_ids = drafts

    def _append_verified(self, seq: Sequence, drafts: list[int], picks: list[tuple[SamplerOutput, int]]) -> int:
        """Append the tokens a step with `drafts` emits for `seq` (until a stop condition ends it),
        with their logprobs where wanted; the number of drafts appended, whose K/V the step
        computed. `picks` locate the step's draw after the last token and after each draft
        (a `SamplerOutput` and its row), one more than `drafts`."""
        tokens = accepted_tokens(drafts, [int(out.token_ids[row]) for out, row in picks])
        self.num_draft_tokens += len(drafts)
        self.num_accepted_draft_tokens += len(tokens) - 1
        for appended, (token, (out, row)) in enumerate(zip(tokens, picks), 1):
            self._record_logprobs(seq, out, row)
            self._append_token(seq, token)
            if seq.is_finished:
                break
        return min(appended, len(tokens) - 1)

    def _count_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        num_prompt = len(seq.prompt_token_ids)
        self.num_prompt_tokens_computed += max(0, min(num_prompt, seq.num_computed_tokens + num_new_tokens)
                                               - seq.num_computed_tokens)

    def _record_prompt_logprobs(self, scheduled, result: StepOutput) -> None:
        """File each prompt position's logprobs under its request: entry `p + 1` holds the logprob
        of prompt token `p + 1` and the top ones at position `p`. A prompt is computed in order
        (a preempted one again from the start), so the last position completes the list."""
        found = result.prompt_logprobs
        for row, (index, position) in enumerate(zip(result.prompt_rows.owner.tolist(),
                                                    result.prompt_rows.position.tolist())):
            request = scheduled[index].seq.request
            wanted, token = request.params.prompt_logprobs, request.prompt_token_ids[position + 1]
            request.prompt_logprobs_so_far[position + 1] = self._logprob_entry(
                token, float(found.token_logprobs[row]), int(found.ranks[row]), found.top_ids[row][:wanted],
                found.top_logprobs[row][:wanted], request.params.detokenize)
            if position + 2 == len(request.prompt_token_ids):
                request.prompt_logprobs = request.prompt_logprobs_so_far

    def _record_logprobs(self, seq: Sequence, sampled, row: int) -> None:
        if sampled.logprobs is None or not seq.sampling_params.computes_logprobs:
            return
        token, logprob = int(sampled.token_ids[row]), float(sampled.logprobs[row])
        seq.cumulative_logprob += logprob
        wanted = seq.sampling_params.logprobs
        if wanted is not None:
            seq.output_logprobs.append(self._logprob_entry(token, logprob, int(sampled.ranks[row]),
                                                           sampled.top_ids[row][:wanted],
                                                           sampled.top_logprobs[row][:wanted],
                                                           seq.sampling_params.detokenize))

    def _logprob_entry(self, token: int, logprob: float, rank: int, top_ids, top_logprobs,
                       detokenize: bool) -> dict[int, Logprob]:
        """One position's logprobs as vLLM reports them: the chosen token's first, then the top
        ones, ranked 1.. in order (a chosen token among them takes its top entry); each token's
        text where the request's text is made (`detokenize`), else None."""
        def text(token: int) -> str | None:
            return token_text(self.tokenizer, token) if detokenize else None

        entry = {token: Logprob(logprob, rank, text(token))}
        for rank, (top, top_logprob) in enumerate(zip(top_ids.tolist(), top_logprobs.tolist()), 1):
            entry[top] = Logprob(top_logprob, rank, text(top))
        return entry

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept(token):
            logger.warning("request %s: token %d breaks its structured output (%s); the sequence ends (abort)",
                           seq.request_id, token, seq.grammar.error)
        self.num_generated_tokens += 1
        metrics = seq.request.metrics
        metrics.last_token_time = now = time.monotonic()
        if seq.index == 0:
            metrics.num_output_tokens += 1
            if metrics.first_token_time is None:
                metrics.first_token_time = now
        if len(seq.output_token_ids) == 1 and len(seq.request.seqs) < seq.request.num_samples:
            self._fork(seq)
        self._check_stop(seq)
        if seq.request.is_finished:
            metrics.finished_time = now

    def _fork(self, parent: Sequence) -> None:
        """Start the request's other samples from the computed prompt, sharing its blocks."""
        for child in parent.request.fork():
            self.block_manager.fork(parent, child)
            child.num_computed_tokens = len(child.prompt_token_ids) - 1
            self.scheduler.add_running(child)

    def _check_stop(self, seq: Sequence) -> None:
        """Take the newest token into the text and end `seq` on EOS, a stop token, a stop string
        (its text then cut) or max_tokens."""
        params, tokens = seq.sampling_params, seq.output_token_ids
        token, detokenizer = tokens[-1], self._detokenizer(seq, len(tokens) - 1)
        if seq.grammar is not None and seq.grammar.error:
            detokenizer.finish()
            seq.finish("abort")
        elif token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            detokenizer.finish(stop_token=token)
            eos = not params.ignore_eos and token == self.primary_eos  # EOS first, as vLLM checks: no stop_reason
            seq.finish("stop", None if eos else token)
        elif (stop := detokenizer.add(token)) is not None:
            seq.finish("stop", stop)
        elif len(tokens) >= params.max_tokens:
            stop = detokenizer.finish()
            if stop is None:
                seq.finish("length")
            else:
                seq.finish("stop", stop)

    def _detokenizer(self, seq: Sequence, num_tokens: int) -> IncrementalDetokenizer | NoDetokenizer:
        """`seq`'s detokenizer, having taken in its first `num_tokens` output tokens: made (and fed
        them) when `seq` has none yet (a fork) or its tokens were rewritten (beam search)."""
        detokenizer, tokens = seq.detokenizer, seq.output_token_ids
        if not seq.sampling_params.detokenize:
            return NO_TEXT
        if detokenizer is None or not detokenizer.follows(tokens, num_tokens):
            context = [] if seq.request.embeds_prompt else seq.prompt_token_ids
            detokenizer = seq.detokenizer = IncrementalDetokenizer(self.tokenizer, context, seq.sampling_params)
            for token in tokens[:num_tokens]:
                if detokenizer.add(token) is not None:
                    break
        return detokenizer

    def _finish_text(self, seq: Sequence) -> None:
        """Release the held-back text of `seq`, which ended outside a step (abort)."""
        self._detokenizer(seq, len(seq.output_token_ids)).finish()

    def text(self, seq: Sequence) -> str:
        """`seq`'s output text as it may be shown now: every earlier one is a prefix of it."""
        return self._detokenizer(seq, len(seq.output_token_ids)).text

    def request_output(self, request: Request) -> (RequestOutput | EmbeddingRequestOutput | ClassificationRequestOutput
                                                   | PoolingRequestOutput):
        if self.pooling_task in ("token_embed", "token_classify"):
            width = len(self.classifier.labels) if self.pooling_task == "token_classify" else self.model_config.hidden_size
            data = np.zeros((0, width), np.float32) if request.embedding is None else request.embedding
            return PoolingRequestOutput(request.request_id, PoolingOutput(data), request.prompt_token_ids,
                                        request.is_finished, request.metrics)
        if self.classifier is not None:
            probs = [] if request.embedding is None else request.embedding.tolist()
            return ClassificationRequestOutput(request.request_id, ClassificationOutput(probs, self.classifier.label_of(probs)),
                                               request.prompt_token_ids, request.is_finished, request.metrics)
        if self.pooler is not None:
            embedding = [] if request.embedding is None else request.embedding.tolist()
            return EmbeddingRequestOutput(request.request_id, EmbeddingOutput(embedding),
                                          request.prompt_token_ids, request.is_finished, request.metrics)
        seqs = request.seqs
        if request.is_finished and len(seqs) > request.params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: request.params.n]
        wants_logprobs = request.params.logprobs is not None
        completions = [
            CompletionOutput(i, self.text(seq), list(seq.output_token_ids), seq.finish_reason, seq.stop_reason,
                             seq.cumulative_logprob if request.params.computes_logprobs else None,
                             list(seq.output_logprobs) if wants_logprobs else None)
            for i, seq in enumerate(seqs)
        ]
        prompt_token_ids = None if request.embeds_prompt else request.prompt_token_ids  # vLLM's, for embeds
        return RequestOutput(request.request_id, request.prompt, prompt_token_ids, completions,
                             request.is_finished, request.metrics, request.prompt_logprobs)
