"""Beam search on top of the engine: beams are sequences that fork and die by ref counting.

Each round, every live beam of a prompt decodes one step with its top `2 * beam_width` logprobs.
The best `beam_width` continuations over all beams survive: the first continuation of a beam
takes the beam over (its placeholder token is replaced before its KV is computed), further ones
fork it (sharing all its blocks; the shared last block is copied only when written), and beams
with no surviving continuation are freed. A beam that is done sampling waits, on hold, for its
siblings' step. Continuations ending in EOS become finished hypotheses, scored like HF
transformers: cumulative logprob / generated length ** length_penalty.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from jpaged.detokenizer import IncrementalDetokenizer
from jpaged.engine_client import EngineClient
from jpaged.lora import LoRARequest
from jpaged.sampling_params import BeamSearchParams, SamplingParams
from jpaged.sequence import Sequence

_search_ids = itertools.count()
MAX_IDLE_STEPS = 8  # engine steps in a row that schedule nothing before a search gives up


@dataclass
class BeamSearchSequence:
    """One hypothesis, with vLLM's fields: `tokens` (prompt and generated tokens), `logprobs`
    (per generated token, its beam's top `2 * beam_width` as `{token id: Logprob}`, the chosen
    token first, as `generate` reports them),
    `cum_logprob`, `text` (of the generated tokens, EOS left out) and `finish_reason` ("stop":
    it ended on EOS; "length": at `max_tokens`); and `score`, what beams are ranked by:
    `cum_logprob / len(token_ids) ** length_penalty`."""

    tokens: list[int]
    logprobs: list[dict] = field(repr=False)
    cum_logprob: float
    score: float
    text: str = ""
    finish_reason: str = "length"
    num_prompt_tokens: int = field(default=0, repr=False)

    @property
    def token_ids(self) -> list[int]:
        """The generated tokens (an EOS that ended the hypothesis included)."""
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]  # best first


@dataclass
class _Search:
    """The state of one prompt's search."""

    request_id: str
    params: BeamSearchParams
    max_tokens: int  # params.max_tokens, or what max_model_len leaves after the prompt
    beams: list[Sequence]
    scores: dict[Sequence, float]
    finished: list[BeamSearchSequence] = field(default_factory=list)
    round: int = 0
    done: bool = False

    def hypothesis(self, beam: Sequence, token: int, logprob: float, finish_reason: str) -> BeamSearchSequence:
        """`beam`'s tokens with its newest one made `token`, scored by `logprob`, their sum."""
        tokens = beam.output_token_ids[:-1] + [token]
        logprobs = [{chosen: entry[chosen], **entry} for chosen, entry in zip(tokens, beam.output_logprobs)]
        return BeamSearchSequence(beam.prompt_token_ids + tokens, logprobs, logprob,
                                  logprob / len(tokens) ** self.params.length_penalty,
                                  finish_reason=finish_reason, num_prompt_tokens=len(beam.prompt_token_ids))


def beam_search(engine: EngineClient, prompts: list, params: BeamSearchParams,
                loras: list[LoRARequest | None] | None = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """The `params.beam_width` best continuations of each prompt, each through its LoRA adapter
    in `loras` (None: the base model); `use_tqdm` shows the rounds (tokens) done. ValueError for
    a beam width whose `2 * beam_width` ranked continuations exceed the engine's `max_logprobs`,
    an engine whose logprobs are logits (`logprobs_mode`), or a prompt or adapter the engine refuses; RuntimeError when the beams cannot fit in the KV
    cache together."""
    if engine.logprobs_mode.endswith("_logits"):
        raise ValueError(f"beam search ranks beams by their logprobs, and under logprobs_mode "
                         f"{engine.logprobs_mode!r} the engine returns logits: use a *_logprobs mode")
    if 2 * params.beam_width > engine.max_logprobs:
        smaller = f"use beam_width <= {engine.max_logprobs // 2} or " if engine.max_logprobs >= 2 else ""
        raise ValueError(f"beam_width {params.beam_width} needs the top {2 * params.beam_width} logprobs of every beam "
                         f"each step, more than max_logprobs {engine.max_logprobs}: {smaller}start the engine with a "
                         "larger max_logprobs")
    searches: list[_Search] = []
    bar = tqdm(total=params.max_tokens, desc="Beam search", unit="tok", disable=not use_tqdm)
    try:
        for prompt, lora in zip(prompts, loras or [None] * len(prompts)):
            searches.append(_start(engine, prompt, params, lora))
        idle_steps, progress = 0, _Progress(engine)
        while not all(search.done for search in searches):
            idle_steps = 0 if engine.step() else idle_steps + 1
            live_beams = sum(len(search.beams) for search in searches if not search.done)
            if idle_steps > MAX_IDLE_STEPS or progress.cycling(live_beams):
                raise RuntimeError(f"beam search cannot go on: {params.beam_width} beams per prompt do not fit in the "
                                   "KV cache together (beams waiting for a sibling's step hold the blocks it needs); "
                                   "use more KV blocks or a smaller beam_width")
            for search in searches:
                if not search.done:
                    _advance(engine, search)
            bar.update(max(search.round for search in searches) - bar.n)
    except BaseException:  # an interrupt, a refused prompt or a failed step: no beam stays in the engine
        for search in searches:
            for beam in search.beams:
                engine.free_sequence(beam)
            engine.abort_request(search.request_id)
        raise
    finally:
        bar.close()
    return [_output(engine, search) for search in searches]


class _Progress:
    """Whether the engine is preempting beams in a cycle: every live beam preempted twice over
    since a token was last generated (beams on hold keep the blocks that the preempted ones then
    recompute into, and are preempted in turn), which no number of further steps undoes."""

    def __init__(self, engine: EngineClient):
        self.engine = engine
        self._mark(engine.stats())

    def _mark(self, stats) -> None:
        self.generated, self.preemptions = stats.num_generated_tokens, stats.num_preemptions

    def cycling(self, live_beams: int) -> bool:
        stats = self.engine.stats()
        if stats.num_generated_tokens > self.generated:
            self._mark(stats)
            return False
        return stats.num_preemptions - self.preemptions > 2 * max(live_beams, 1)


def _start(engine: EngineClient, prompt, params: BeamSearchParams, lora: LoRARequest | None) -> _Search:
    request_id = f"beam-search-{next(_search_ids)}"
    step_params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True,
                                 logprobs=2 * params.beam_width)
    engine.add_request(request_id, prompt, step_params, lora_request=lora)
    first = engine.get_sequence(request_id)
    first.request.may_draft = False  # a round takes one token a beam
    max_tokens = min(params.max_tokens, engine.max_model_len - len(first.prompt_token_ids))  # generate's limit too
    return _Search(request_id, params, max_tokens, [first], {first: 0.0})


def _advance(engine: EngineClient, search: _Search) -> None:
    target = search.round + 1
    if any(len(beam.output_token_ids) < target for beam in search.beams):
        for beam in search.beams:
            beam.on_hold = len(beam.output_token_ids) == target
        return
    for beam in search.beams:
        beam.on_hold = False
    search.round = target
    last_round = target == search.max_tokens
    survivors = _select(engine, search, _candidates(search), last_round)
    for beam in search.beams:
        if beam not in survivors and not beam.is_finished:
            engine.free_sequence(beam)
    search.beams = survivors
    search.done = last_round or not survivors or _cannot_improve(search)
    if search.done:
        for beam in search.beams:
            if not beam.is_finished:
                engine.free_sequence(beam)


def _candidates(search: _Search) -> list[tuple[float, Sequence, int]]:
    width = 2 * search.params.beam_width
    candidates = []
    for beam in search.beams:
        top = sorted(beam.output_logprobs[-1].items(), key=lambda item: -item[1].logprob)[:width]
        candidates += [(search.scores[beam] + logprob.logprob, beam, token) for token, logprob in top]
    candidates.sort(key=lambda c: -c[0])
    return candidates[:width]


def _select(engine: EngineClient, search: _Search, candidates, last_round: bool) -> list[Sequence]:
    """Keep the best `beam_width` continuations; EOS ones become finished hypotheses. In the last
    round the kept continuations become finished hypotheses too (HF's finalize: every live beam
    is added, and the best `beam_width` of all hypotheses are returned)."""
    width = search.params.beam_width
    survivors: list[Sequence] = []
    taken: set[Sequence] = set()
    kept = 0
    for rank, (score, beam, token) in enumerate(candidates):
        if token in engine.eos_token_ids and not search.params.ignore_eos:
            if rank < width:
                search.finished.append(search.hypothesis(beam, token, score, "stop"))
            continue
        if last_round:
            search.finished.append(search.hypothesis(beam, token, score, "length"))
        else:
            survivor = beam if beam not in taken else engine.fork_sequence(beam)
            taken.add(beam)
            survivor.output_token_ids[-1] = token
            search.scores[survivor] = score
            survivors.append(survivor)
        kept += 1
        if kept == width:
            break
    return survivors


def _cannot_improve(search: _Search) -> bool:
    """HF's rule without early stopping: the best live beam, at its current length, scores no
    better than the worst of `beam_width` finished hypotheses."""
    if len(search.finished) < search.params.beam_width:
        return False
    worst = sorted(h.score for h in search.finished)[-search.params.beam_width]
    best_live = max(search.scores[b] for b in search.beams) / search.round ** search.params.length_penalty
    return best_live <= worst


def _output(engine: EngineClient, search: _Search) -> BeamSearchOutput:
    best = sorted(search.finished, key=lambda h: -h.score)[: search.params.beam_width]
    request = next(iter(search.scores)).request
    for hypothesis in best:
        hypothesis.text = _text(engine, request.prompt_token_ids, hypothesis.token_ids)
    return BeamSearchOutput(request.prompt, request.prompt_token_ids, best)


def _text(engine: EngineClient, prompt_token_ids: list[int], token_ids: list[int]) -> str:
    """The text of `token_ids` as it reads after the prompt, as `generate` would give it (a first
    token's word-boundary space kept; special tokens left out)."""
    detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt_token_ids, SamplingParams())
    for token_id in token_ids:
        detokenizer.add(token_id)
    detokenizer.finish()
    return detokenizer.text
