"""Structured outputs (`SamplingParams.structured_outputs`) on stories260K.

Oracles: llguidance's own numpy bitmask application (for the sampler's on-device mask), HF
transformers' greedy `generate` with a logits processor that applies llguidance's mask at each
step (for the engine's tokens), `jsonschema` and Python's `re` (for what sampled outputs hold).
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch
from guidance_mask import GuidanceMask
from transformers import LogitsProcessorList

from jpaged import LLM, SamplingParams
from jpaged.sampler import apply_token_bitmask
from jpaged.sampling_params import StructuredOutputsParams
from jpaged.step_batch import SamplingArrays

EOS = 2
PROMPT = "Once upon a time, there was a little girl"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CONSTRAINTS = [
    StructuredOutputsParams(json=PERSON, disable_any_whitespace=True),
    StructuredOutputsParams(regex=r"(she|he) (ran|sat) [0-9]{1,3} times\."),
    StructuredOutputsParams(choice=["dog", "cat", "a big red ball"]),
    StructuredOutputsParams(grammar='start: "The " NOUN " was " ADJ "."\nNOUN: "dog" | "cat"\nADJ: /[a-z]{3,6}/'),
    StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
]


def obeys(constraint: StructuredOutputsParams, text: str) -> bool:
    """Whether a finished output's text is what the constraint allows (independent checkers)."""
    kind, spec = constraint.constraint
    if kind in ("json", "json_object"):
        value = json.loads(text)
        jsonschema.validate(value, spec if kind == "json" else {"type": "object"})
        return True
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    if kind == "choice":
        return text in spec
    return re.fullmatch(r"The (dog|cat) was [a-z]{3,6}\.", text) is not None


def test_token_bitmask_matches_llguidance_numpy():
    rng = np.random.default_rng(0)
    for vocab in (61, 512, 1000):
        logits = rng.standard_normal((5, vocab)).astype(np.float32)
        bitmask = rng.integers(-2**31, 2**31, (5, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
        bitmask[2] = -1  # an unconstrained row
        expected = logits.copy()
        llguidance.numpy.apply_token_bitmask_inplace(expected, bitmask)
        arrays = SamplingArrays.build([SamplingParams()] * 5, [0] * 5, [0] * 5, 5)
        ours = jax.jit(apply_token_bitmask)(jnp.asarray(logits), dataclasses.replace(arrays, token_bitmask=bitmask))
        np.testing.assert_array_equal(np.asarray(ours), expected)
        np.testing.assert_array_equal(np.asarray(ours)[2], logits[2])


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return LLM(stories_path, num_blocks=64, max_model_len=256), hf, AutoTokenizer.from_pretrained(stories_path)


def test_greedy_constrained_requests_in_one_batch_match_hf_generate(stories):
    llm, hf, tokenizer = stories
    prompt_ids = tokenizer(PROMPT).input_ids
    n = 40
    params = [SamplingParams(temperature=0, max_tokens=n, structured_outputs=c) for c in CONSTRAINTS]
    params.append(SamplingParams(temperature=0, max_tokens=n))  # an unconstrained row beside them
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    vocab = llm.engine.model_config.vocab_size
    for constraint, out in zip(CONSTRAINTS, outs):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                                 logits_processor=LogitsProcessorList(
                                     [GuidanceMask(tokenizer, constraint, len(prompt_ids), vocab, EOS)]))
        assert out.outputs[0].token_ids == theirs[0, len(prompt_ids):].tolist(), constraint.constraint
        if out.outputs[0].finish_reason == "stop":
            assert out.outputs[0].token_ids[-1] == EOS and obeys(constraint, out.outputs[0].text), out.outputs[0]
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs[:-1]) >= 3
    with torch.no_grad():
        plain = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS)
    assert outs[-1].outputs[0].token_ids == plain[0, len(prompt_ids):].tolist()
    assert llm.engine.stats().kv_cache_usage == 0


def test_sampled_outputs_obey_their_constraints(stories):
    llm, _, _ = stories
    params = [SamplingParams(temperature=1.0, max_tokens=60, n=3, seed=i, structured_outputs=c)
              for i, c in enumerate(CONSTRAINTS)]
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    finished = 0
    for constraint, out in zip(CONSTRAINTS, outs):
        for choice in out.outputs:
            if choice.finish_reason == "stop":
                finished += 1
                assert obeys(constraint, choice.text), (constraint.constraint, choice.text)
            else:
                assert choice.finish_reason == "length"
    assert finished >= 9
    assert len({c.text for c in outs[1].outputs}) > 1  # the samples drew apart within the regex
    assert llm.engine.stats().kv_cache_usage == 0


def test_preempted_constrained_requests_resume_where_their_grammar_was(stories_path):
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=CONSTRAINTS[i % len(CONSTRAINTS)])
              for i in range(10)]
    prompts = [f"{PROMPT} number {i}" for i in range(10)]
    roomy = LLM(stories_path, num_blocks=128, max_model_len=256, compilation_cache=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    del roomy
    tight = LLM(stories_path, num_blocks=12, block_size=16, max_model_len=96, compilation_cache=False)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.engine.stats().kv_cache_usage == 0 and not tight.engine.has_unfinished_requests()


def test_structured_outputs_are_checked_naming_the_field(stories):
    llm, _, _ = stories
    for kwargs, message in [({}, "exactly one of"), ({"regex": "a", "choice": ["b"]}, "exactly one of"),
                            ({"choice": []}, "choice must hold at least one"), ({"choice": [3]}, "choice"),
                            ({"json": 5}, "json must be a schema"), ({"regex": ""}, "regex must be a non-empty"),
                            ({"json_object": "yes"}, "json_object")]:
        with pytest.raises((ValueError, TypeError), match=message):
            StructuredOutputsParams(**kwargs)
    with pytest.raises(TypeError, match="structured_outputs"):
        SamplingParams(structured_outputs="json")
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(regex="a+")
    assert StructuredOutputsParams(json=True) == StructuredOutputsParams(json="true")  # JSON Schema's `true`
    for constraint in [{"regex": "(unclosed"}, {"json": "{not json"}, {"grammar": "start: undefined_rule"},
                       {"json": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}}]:
        with pytest.raises(ValueError, match="structured_outputs .* is not valid"):
            llm.generate(PROMPT, SamplingParams(max_tokens=4, structured_outputs=constraint), use_tqdm=False)
    with pytest.raises(ValueError, match="must be a JSON object or true"):
        llm.generate(PROMPT, SamplingParams(max_tokens=4, structured_outputs={"json": "[1, 2]"}), use_tqdm=False)
    with pytest.raises(TypeError, match="choice must be a list"):
        StructuredOutputsParams(choice="yes")
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().kv_cache_usage == 0
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, structured_outputs={"choice": ["yes"]}),
                       use_tqdm=False)
    assert out[0].outputs[0].text == "yes"


def test_choices_are_literal_and_many(stories):
    llm, _, _ = stories
    odd = ["a.b", "(x)", "1+1=2", "[y]*", "c|d", "#&-~ ^$", "back\\slash", "{z}?"]
    many = [f"opt{i}" for i in range(3000)]  # more alternatives than llguidance's grammar rows take
    outs = llm.generate([PROMPT] * 2, [SamplingParams(temperature=1.0, n=8, seed=4, max_tokens=12,
                                                      structured_outputs={"choice": c}) for c in (odd, many)],
                        use_tqdm=False)
    for choices, out in zip((odd, many), outs):
        assert all(c.finish_reason == "stop" and c.text in choices for c in out.outputs), out.outputs
    assert len({c.text for c in outs[0].outputs}) > 1


def test_schema_options_and_boolean_schemas(stories):
    llm, _, _ = stories
    kind = {"type": "object", "properties": {"kind": {"const": {"type": "object"}}}, "required": ["kind"]}
    open_object = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["a"]}
    params = [SamplingParams(temperature=0, max_tokens=30, structured_outputs=dict(
                  json=schema, disable_any_whitespace=True, disable_additional_properties=True))
              for schema in (kind, open_object)]
    params.append(SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json": "true"}))
    constant, closed, anything = llm.generate([PROMPT] * 3, params, use_tqdm=False)
    assert json.loads(constant.outputs[0].text) == {"kind": {"type": "object"}}  # data left as it was
    assert closed.outputs[0].finish_reason == "stop" and set(json.loads(closed.outputs[0].text)) == {"a"}
    if anything.outputs[0].finish_reason == "stop":
        json.loads(anything.outputs[0].text)  # any JSON value



# a structural tag: free text, but " the" starts a segment " the <0-99> dogs"
COUNTED_DOGS = {"triggers": [" the"], "structures": [
    {"begin": " the ", "schema": {"type": "integer", "minimum": 0, "maximum": 99}, "end": " dogs"}]}


def tagged_segments_obey(text: str, finish_reason: str) -> int:
    """How many ` the <0-99> dogs` segments `text` holds, asserting that every " the" starts one
    (the last may be cut short when the output ran out of tokens)."""
    pieces = text.split(" the")[1:]
    for i, piece in enumerate(pieces):
        if not re.match(r" (0|[1-9][0-9]?) dogs", piece):
            assert i == len(pieces) - 1 and finish_reason == "length" and len(piece) < len(" 99 dogs"), text
    return len(pieces)


def test_structural_tag_constrains_only_its_segments(stories):
    """Text before the first trigger is the unconstrained output's; every trigger is followed by
    the structure's begin, a value its schema accepts, and its end (vLLM's `structural_tag`)."""
    llm, _, _ = stories
    tag = StructuredOutputsParams(structural_tag=json.dumps({"type": "structural_tag", **COUNTED_DOGS}))
    assert StructuredOutputsParams(structural_tag=COUNTED_DOGS).constraint[0] == "structural_tag"
    plain, greedy, sampled = llm.generate([PROMPT] * 3, [
        SamplingParams(temperature=0, max_tokens=60), SamplingParams(temperature=0, max_tokens=60, structured_outputs=tag),
        SamplingParams(temperature=1.0, max_tokens=60, n=4, seed=2, structured_outputs=tag)], use_tqdm=False)
    plain, constrained = plain.outputs[0].text, greedy.outputs[0].text
    assert " the" in plain
    cut = plain.index(" the") + len(" the")
    assert constrained[:cut] == plain[:cut] and constrained != plain
    assert tagged_segments_obey(constrained, greedy.outputs[0].finish_reason) >= 1
    assert sum(tagged_segments_obey(c.text, c.finish_reason) for c in sampled.outputs) >= 2
    for spec, message in [("{not json", "is not JSON"), ({"structures": COUNTED_DOGS["structures"]}, "'triggers' must"),
                          ({"triggers": [" a"], "structures": COUNTED_DOGS["structures"]}, "starts with none of"),
                          ({"triggers": [" the"], "structures": [{"begin": " the"}]}, "must hold 'begin' and 'end'"),
                          ({"type": "structural_tag", "format": {}}, r"keys \['format'\] are not among"),
                          ("[1]", "must be a JSON object")]:
        with pytest.raises(ValueError, match=f"structured_outputs structural_tag is not valid: .*{message}"):
            llm.generate(PROMPT, SamplingParams(max_tokens=4, structured_outputs={"structural_tag": spec}),
                         use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().kv_cache_usage == 0
