"""Embeddings: a prompt's final hidden states pooled into one vector (vLLM's pooling runner).

With `EngineConfig.runner = "pooling"` the engine computes each prompt as any prefill (in chunks,
through the paged KV cache) and, where a generating engine would sample after the prompt's last
token, pools the final hidden states (after the final norm) instead: by default the last token's
state, the pooling of decoder embedding models (Qwen3-Embedding, gte-Qwen2, e5-mistral), which
vLLM applies to them by default; the mean over the prompt's tokens (LLM2Vec, GritLM) or the first
token's state (CLS) where the model's files say so. The request then ends; nothing is generated.

Each step gives, per scheduled sequence, the state at its last new token, the sum of the states
of its new tokens and the state at its first new token (`ModelRunner`); the engine keeps a
sequence's running sum (`Sequence.pooled`) from chunk to chunk, restarting it when a chunk starts
at position 0 (a sequence preempted and recomputed). Mean and CLS pooling need every prompt token
computed, so they turn prefix caching off.

A model folder's sentence-transformers files say how it pools: `modules.json` lists the
`Transformer`, a `Pooling` module (its `config.json` names the mode: last token, mean or CLS;
max and weighted pooling are refused by name), `Dense` layers applied to the pooled vector in
order (`jpaged/projection.py`; EmbeddingGemma's) and, where present, a `Normalize` module
(without one the vector is returned as it is). Any other module would change the vector after
pooling, and is refused by name.

A sequence classification model (HF's `*ForSequenceClassification`: a reward model, a
classifier) runs on the same runner: its checkpoint's `score` head ([num_labels, hidden], no bias)
takes the last token's state, unnormalised, to one logit per label, and `Classifier` applies the
activation vLLM applies (after HF's loss for the config's `problem_type`: softmax for single-label
classification, sigmoid for multi-label, none for regression; otherwise the one a
sentence-transformers cross-encoder's config.json names, else softmax, or sigmoid for one label).

A causal LM trained to answer a token (Qwen3-Reranker answers "yes" or "no") is read as such a
classifier the way vLLM reads it, where config.json (or `hf_overrides`) names it a
`*ForSequenceClassification` and gives `classifier_from_token` (the answer tokens) and `method`
(`is_original_qwen3_reranker` means "from_2_way_softmax"): the head is made of the LM head's rows
of those tokens (the embedding's, where they are tied), as they are ("no_post_processing": one
label per token) or, for "from_2_way_softmax", the second token's row minus the first's: one
label, whose sigmoid is the softmax of the two tokens' logits taken at the second. Such a model
reads a text pair joined, without separators (`use_sep_token` false, jpaged/scoring.py).

Token-level tasks (vLLM's `token_embed` and `token_classify`, `LLM.encode` and POST /pooling)
pool nothing: every prompt token's final state is kept (`pooling_type` "all", which like mean
pooling turns prefix caching off), and the output is one row per prompt token, each row
normalised (`token_embed`, as the model's files ask for sequence embeddings) or through the
classifier (`token_classify`). HF's `*ForTokenClassification` checkpoints hold such a head
(`score.weight` [num_labels, hidden] and `score.bias` [num_labels]); a sequence classifier's
head may be read token by token too, where `pooler_config` asks for that task. Which task an
engine runs is fixed at load, as in vLLM: the architecture's (a token classifier's
`token_classify`, a sequence classifier's `classify`, else `embed`), or `pooler_config["task"]`
among the tasks the model has (`supported_tasks`).

Plain Python: no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jpaged.projection import ACTIVATION_MODULES, Dense, activate, read_dense, read_json

RUNNERS = ("auto", "generate", "pooling")  # vLLM's; "auto" is the model's own (`default_runner`)
_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
          "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


POOLING_TYPES = {"pooling_mode_lasttoken": "last", "lasttoken": "last", "pooling_mode_mean_tokens": "mean",
                 "mean": "mean", "pooling_mode_cls_token": "cls", "cls": "cls"}
POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify")  # vLLM's names
CLASSIFIER_SUFFIX = "ForSequenceClassification"
TOKEN_CLASSIFIER_SUFFIX = "ForTokenClassification"
_POOLER_TYPES = {"LAST": "last", "MEAN": "mean", "CLS": "cls", "ALL": "all"}  # vLLM's pooler_config pooling_type


@dataclass(frozen=True)
class PoolerConfig:
    """How a prompt's final hidden states become its embedding."""

    # "last" (token), "mean" (over the prompt's tokens), "cls" (first token) or "all" (no pooling:
    # every prompt token's state, for the token-level tasks)
    pooling_type: str = "last"
    normalize: bool = True  # L2-normalise (vLLM's default for embedding models)
    # Matryoshka embeddings (config.json's `is_matryoshka`, or its `matryoshka_dimensions`, the
    # sizes the model was trained to be cut to): requests may ask for their first `dimensions`
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    # the model files' Dense layers, applied in order to a pooled vector (or each token embedding)
    dense: tuple[Dense, ...] = ()

    @property
    def name(self) -> str:
        """The pooling's name in messages ("last", "mean", "cls", "token-level")."""
        return "token-level" if self.pooling_type == "all" else self.pooling_type

    @property
    def reads_every_token(self) -> bool:
        """Whether the output needs every prompt token's state (mean, CLS and token-level): no
        prefix cache, and one pipeline stage."""
        return self.pooling_type != "last"

    def embedding_size(self, hidden_size: int) -> int:
        """The size of an embedding from a model of `hidden_size`: the last Dense layer's outputs."""
        return self.dense[-1].out_features if self.dense else hidden_size

    def project(self, state: np.ndarray) -> np.ndarray:
        """A pooled state [hidden] (or token states [tokens, hidden]) through the Dense layers
        (float32; as it is without any)."""
        for layer in self.dense:
            state = layer(state)
        return state


def read_pooler_config(folder: Path | None, hidden_size: int | None = None) -> PoolerConfig:
    """The pooling a model folder's sentence-transformers files describe (None, or no
    `modules.json`: last token, normalised), with its Dense layers (`read_dense`). ValueError
    naming the file and mode for a pooling other than the last token's, the mean or the first
    token's, for modules in another order than Transformer, Pooling, Dense layers, Normalize, and
    for Dense layers whose sizes do not chain from `hidden_size` (where given)."""
    modules_file = folder / "modules.json" if folder is not None else None
    if modules_file is None or not modules_file.is_file():
        return PoolerConfig()
    modules = read_json(modules_file)
    names = [module.get("type", "").rsplit(".", 1)[-1] for module in modules]
    kinds = dict(zip(names, modules))
    if others := sorted(set(kinds) - {"Transformer", "Pooling", "Dense", "Normalize"}):
        raise ValueError(f"{modules_file} lists the modules {', '.join(others)} after the transformer; jpaged's "
                         "pooling runner applies Pooling, Dense and Normalize only")
    order = {"Transformer": 0, "Pooling": 1, "Dense": 2, "Normalize": 3}
    if [order[name] for name in names] != sorted(order[name] for name in names) or names.count("Pooling") > 1:
        raise ValueError(f"{modules_file} lists {', '.join(names)}; jpaged applies them in the order Transformer, "
                         "Pooling, Dense layers, Normalize")
    dense_modules = [module for name, module in zip(names, modules) if name == "Dense"]
    dense = tuple(read_dense(folder / module.get("path", "")) for module in dense_modules)
    size = hidden_size
    for layer, module in zip(dense, dense_modules):
        if size is not None and layer.in_features != size:
            raise ValueError(f"{folder / module.get('path', '')}: a Dense layer of {layer.in_features} inputs after "
                             f"a vector of {size}")
        size = layer.out_features
    return dataclasses.replace(_pooling_of(folder, modules_file, kinds), dense=dense)


def _pooling_of(folder: Path, modules_file: Path, kinds: dict[str, dict]) -> PoolerConfig:
    """The Pooling module's mode and the Normalize module's presence (`read_pooler_config`)."""
    if "Pooling" in kinds:
        pooling_file = folder / kinds["Pooling"].get("path", "") / "config.json"
        if not pooling_file.is_file():
            raise ValueError(f"{modules_file} lists a Pooling module, but {pooling_file} is missing")
        settings = read_json(pooling_file)
        modes = ([settings["pooling_mode"]] if isinstance(settings.get("pooling_mode"), str)
                 else [mode for mode in _MODES if settings.get(mode)])
        if len(modes) != 1 or modes[0] not in POOLING_TYPES:
            raise ValueError(f"{pooling_file} pools by {', '.join(modes) or 'no mode'}; jpaged's pooling runner "
                             "pools by one of the last token, the mean or the first token (pooling_mode_lasttoken, "
                             "pooling_mode_mean_tokens, pooling_mode_cls_token)")
        return PoolerConfig(pooling_type=POOLING_TYPES[modes[0]], normalize="Normalize" in kinds)
    return PoolerConfig(normalize="Normalize" in kinds)


def default_runner(architectures: list[str], pooler_config: dict | None = None) -> str:
    """The runner "auto" stands for, as vLLM picks it: "pooling" for a model whose architectures
    (config.json's) are all base models (`*Model`: no LM head; EmbeddingGemma's
    `Gemma3TextModel`, `Qwen3Model`) or classifiers (`*ForSequenceClassification`,
    `*ForTokenClassification`), or where a `pooler_config` is given; "generate" otherwise."""
    heads = ("LMHeadModel", "ChatModel")  # generating models whose names end in "Model"
    pooling = [name for name in architectures
               if name.endswith(("Model", CLASSIFIER_SUFFIX, TOKEN_CLASSIFIER_SUFFIX)) and not name.endswith(heads)]
    return "pooling" if pooler_config or (architectures and len(pooling) == len(architectures)) else "generate"


def supported_tasks(architectures: list[str]) -> tuple[str, ...]:
    """The pooling tasks a model of `architectures` (config.json's) can run, its default first."""
    if any(name.endswith(TOKEN_CLASSIFIER_SUFFIX) for name in architectures):
        return ("token_classify",)
    if any(name.endswith(CLASSIFIER_SUFFIX) for name in architectures):
        return ("classify", "token_classify")
    return ("embed", "token_embed")


def pooling_task(architectures: list[str], pooler_config: dict | None) -> str:
    """The task a pooling engine runs (`supported_tasks`' default, or `pooler_config["task"]`).
    ValueError naming a task the model does not have."""
    tasks = supported_tasks(architectures)
    task = (pooler_config or {}).get("task") or tasks[0]
    if task not in tasks:
        kind = architectures[0] if architectures else "an embedding model"
        raise ValueError(f"pooler_config task {task!r} is not one this model runs ({kind}): it runs "
                         f"{' or '.join(tasks)}")
    return task


def check_pooler_config(pooler_config: dict | None) -> None:
    """ValueError naming a key or value of `pooler_config` (vLLM's) that jpaged does not read:
    it reads `task` (one of `POOLING_TASKS`) and `pooling_type` (LAST, MEAN, CLS, or ALL)."""
    if pooler_config is None:
        return
    if not isinstance(pooler_config, dict):
        raise ValueError(f"pooler_config must be a dict (task, pooling_type), got {pooler_config!r:.100}")
    if others := sorted(set(pooler_config) - {"task", "pooling_type"}):
        raise ValueError(f"pooler_config key(s) {', '.join(map(repr, others))} are not read by jpaged: it takes "
                         "task and pooling_type")
    if pooler_config.get("task") not in (None, *POOLING_TASKS):
        raise ValueError(f"pooler_config task must be one of {', '.join(POOLING_TASKS)}, got "
                         f"{pooler_config['task']!r:.50}")
    if pooler_config.get("pooling_type") not in (None, *_POOLER_TYPES):
        raise ValueError(f"pooler_config pooling_type must be one of {', '.join(_POOLER_TYPES)}, got "
                         f"{pooler_config['pooling_type']!r:.50}")


def pooler_for_task(pooler: PoolerConfig, task: str, pooler_config: dict | None) -> PoolerConfig:
    """The pooling `task` takes: "all" for the token-level tasks, the last token's unnormalised
    state for a classifier's sequence task, else `pooler` (the model's files') with
    `pooler_config`'s `pooling_type` over it. ValueError for a pooling_type the task cannot take."""
    asked = _POOLER_TYPES.get((pooler_config or {}).get("pooling_type"))
    token_level = task.startswith("token_")
    if asked is not None and (asked == "all") != token_level:
        raise ValueError(f"pooler_config pooling_type {pooler_config['pooling_type']!r} does not suit the task "
                         f"{task!r}: {'ALL' if token_level else 'LAST, MEAN or CLS'}")
    if token_level:  # token embeddings go through the Dense layers too, as vLLM's
        embeds = task == "token_embed"
        return PoolerConfig("all", normalize=pooler.normalize and embeds, dense=pooler.dense if embeds else ())
    if task == "classify":
        return PoolerConfig(asked or "last", normalize=False)  # the head reads the state as it is
    return dataclasses.replace(pooler, pooling_type=asked or pooler.pooling_type)


def pool(pooled: np.ndarray, config: PoolerConfig) -> np.ndarray:
    """The embedding (float32 [size], or [tokens, hidden] for pooling "all": each row) of a
    prompt's pooled state `pooled` (its last token's, its mean, its first token's, or every
    token's, after the Dense layers), normalised where `config` says."""
    pooled = np.asarray(pooled, np.float32)
    if not config.normalize:
        return pooled
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class PoolingParams:
    """A pooling request's options, as vLLM's `PoolingParams`. `use_activation` (None: True)
    applies the model's output activation: a classifier's softmax or sigmoid (False: its raw
    logits, one per label), an embedding model's normalisation where its files ask for one
    (False: the pooled state as it is). `dimensions` (embeddings of a Matryoshka model only;
    None: all) keeps an embedding's (or each token embedding's) first `dimensions` values,
    normalised after the cut (`check_dimensions`). `truncate_prompt_tokens` keeps the
    prompt's last N tokens (-1: `max_model_len`; None: all; checked as a generating request's).
    TypeError for a value of the wrong type, ValueError for `dimensions` below 1."""

    use_activation: bool | None = None
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.use_activation is not None and not isinstance(self.use_activation, bool):
            raise TypeError(f"use_activation must be a bool or None, got {type(self.use_activation).__name__} "
                            f"{self.use_activation!r:.50}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)):
            raise TypeError(f"dimensions must be an int or None, got {type(self.dimensions).__name__} "
                            f"{self.dimensions!r:.50}")
        if self.truncate_prompt_tokens is not None and (isinstance(self.truncate_prompt_tokens, bool)
                                                        or not isinstance(self.truncate_prompt_tokens, int)):
            raise TypeError(f"truncate_prompt_tokens must be an int or None, got "
                            f"{type(self.truncate_prompt_tokens).__name__} {self.truncate_prompt_tokens!r:.50}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")

    @property
    def activates(self) -> bool:
        return self.use_activation is not False


def check_dimensions(params: PoolingParams | None, task: str, pooler: PoolerConfig, hidden_size: int) -> None:
    """ValueError (starting "dimensions") where `params` asks for `dimensions` that an engine of
    `task` and `pooler` cannot give: a task other than embed / token_embed, a model not trained
    for Matryoshka embeddings, more than `hidden_size`, or a size outside the model's
    `matryoshka_dimensions`. As vLLM checks them."""
    dimensions = None if params is None else params.dimensions
    if dimensions is None:
        return
    if task not in ("embed", "token_embed"):
        raise ValueError(f"dimensions {dimensions} applies to embeddings; this model runs {task!r}")
    if not pooler.matryoshka:
        raise ValueError(f"dimensions {dimensions} is not supported: the model is not a Matryoshka embedding model "
                         "(config.json, or hf_overrides, sets is_matryoshka or matryoshka_dimensions for one)")
    if dimensions > hidden_size:
        raise ValueError(f"dimensions {dimensions} is more than the model's embedding size {hidden_size}")
    if pooler.matryoshka_dimensions and dimensions not in pooler.matryoshka_dimensions:
        raise ValueError(f"dimensions {dimensions} is not one of the model's matryoshka_dimensions "
                         f"{list(pooler.matryoshka_dimensions)}")


def with_matryoshka(pooler: PoolerConfig, hf_config: dict) -> PoolerConfig:
    """`pooler` with the Matryoshka sizes config.json (`hf_config`) declares."""
    sizes = hf_config.get("matryoshka_dimensions")
    sizes = tuple(sizes) if isinstance(sizes, list) and sizes else None
    return dataclasses.replace(pooler, matryoshka=bool(sizes) or bool(hf_config.get("is_matryoshka")),
                               matryoshka_dimensions=sizes)


def _cross_encoder_activation(hf_config: dict) -> str | None:
    """The activation a sentence-transformers cross-encoder's config.json names (its
    `sentence_transformers.activation_fn`, or the older `sbert_ce_default_activation_function`),
    as vLLM reads it; None where it names none. ValueError for a module outside torch.nn's
    Identity, Sigmoid, Softmax and Tanh."""
    name = (hf_config.get("sentence_transformers") or {}).get("activation_fn") or hf_config.get(
        "sbert_ce_default_activation_function")
    if name is None:
        return None
    if name not in ACTIVATION_MODULES:
        raise ValueError(f"config.json names the cross-encoder activation {name!r}; jpaged applies "
                         f"{', '.join(ACTIVATION_MODULES)}")
    return ACTIVATION_MODULES[name]


def pooled_output(state: np.ndarray, params: PoolingParams | None, classifier: Classifier | None,
                  pooler: PoolerConfig) -> np.ndarray:
    """A request's output (float32) from its pooled last-token, mean or first-token state
    [hidden] (or, pooling "all", every prompt token's [tokens, hidden]): the classifier's
    probabilities or logits, or the embedding (cut to `params.dimensions`), normalised or as it
    is (`params`), one row per token for the token-level tasks."""
    activates = params is None or params.activates
    if classifier is not None:
        return classifier(state) if activates else classifier.logits(state).astype(np.float32)
    state = pooler.project(state)
    if params is not None and params.dimensions is not None:
        state = np.asarray(state)[..., :params.dimensions]
    return pool(state, pooler) if activates else np.asarray(state, np.float32)


SCORE_TENSORS = ("score.weight", "model.score.weight")  # a classifier's head, as saved (the latter once prefixed)
SCORE_BIAS_TENSORS = ("score.bias", "model.score.bias")  # a token classifier's (HF's sequence classifiers have none)


@dataclass(frozen=True)
class Classifier:
    """A classification model's head: `weight` float32 [num_labels, hidden] (and a token
    classifier's `bias` [num_labels]), the `activation` that turns its logits into `probs`, and
    each label's name (`id2label`)."""

    weight: np.ndarray
    activation: str  # "softmax", "sigmoid", "tanh" or "identity"
    labels: tuple[str, ...]  # config.json's id2label, else transformers' default names (LABEL_0, ...)
    use_sep_token: bool = True  # as a cross-encoder, read a text pair with the tokenizer's separators (jpaged/scoring.py)
    bias: np.ndarray | None = None

    @classmethod
    def from_token_rows(cls, hf_config: dict, rows: np.ndarray, tokens: list[str], method: str) -> Classifier:
        """The head of a causal LM read as a classifier (see the module's docstring) from the LM
        head's `rows` [len(tokens), hidden] of its answer `tokens`, as `method` (`token_head`)
        combines them."""
        rows = np.asarray(rows, np.float32)
        weight = rows[1:2] - rows[0:1] if method == "from_2_way_softmax" else rows
        names = {} if method == "from_2_way_softmax" else {str(i): token for i, token in enumerate(tokens)}
        return cls.from_hf({**hf_config, "id2label": names, "use_sep_token": hf_config.get("use_sep_token", False)},
                           weight)

    @classmethod
    def from_hf(cls, hf_config: dict, weight: np.ndarray, bias: np.ndarray | None = None) -> Classifier:
        """The head of `weight` (the checkpoint's `score.weight`) and `bias` (`score.bias`, if
        any) as `hf_config` (config.json) describes it. ValueError when its label names or bias
        disagree with the head's rows."""
        weight = np.asarray(weight, np.float32)
        names = hf_config.get("id2label") or {}
        num_labels = weight.shape[0]
        if names and len(names) != num_labels:
            raise ValueError(f"config.json names {len(names)} labels (id2label), but score.weight has {num_labels} rows")
        if bias is not None and np.shape(bias) != (num_labels,):
            raise ValueError(f"score.bias has shape {tuple(np.shape(bias))}, but score.weight has {num_labels} rows")
        problem = hf_config.get("problem_type")
        activation = {"regression": "identity", "multi_label_classification": "sigmoid",
                      "single_label_classification": "softmax"}.get(problem) or _cross_encoder_activation(hf_config)
        if activation is None:
            activation = "sigmoid" if num_labels < 2 else "softmax"
        labels = tuple(names.get(str(i), f"LABEL_{i}") for i in range(num_labels))
        return cls(weight, activation, labels, bool(hf_config.get("use_sep_token", True)),
                   None if bias is None else np.asarray(bias, np.float32))

    def __call__(self, state: np.ndarray) -> np.ndarray:
        """float32 [num_labels] (or [tokens, num_labels]): the probabilities (or, under
        regression, the values) of the pooled state `state` [hidden] (or each token's, [tokens,
        hidden])."""
        return activate(self.activation, self.logits(state))

    def logits(self, state: np.ndarray) -> np.ndarray:
        """float64 [num_labels] (or [tokens, num_labels]): the head's logits of the pooled state
        `state` [hidden] (or each token's, [tokens, hidden])."""
        logits = np.asarray(state, np.float64) @ self.weight.astype(np.float64).T
        return logits if self.bias is None else logits + self.bias

    def label_of(self, probs: list[float]) -> str | None:
        """The name of the most probable label (None for no probs)."""
        return self.labels[int(np.argmax(probs))] if len(probs) else None


TOKEN_HEAD_METHODS = ("from_2_way_softmax", "no_post_processing")
LM_HEAD_TENSORS = ("lm_head.weight", "model.embed_tokens.weight")  # where a causal LM's answer tokens' rows lie


def token_head(hf_config: dict) -> tuple[list[str], str] | None:
    """The answer tokens and method of a causal LM read as a classifier (config.json's
    `classifier_from_token` and `method`), or None for a model with a `score` head of its own.
    ValueError for a method vLLM does not define, or tokens that do not fit it."""
    tokens, method = hf_config.get("classifier_from_token"), hf_config.get("method")
    if method is None and hf_config.get("is_original_qwen3_reranker"):
        method = "from_2_way_softmax"
    if tokens is None and method is None:
        return None
    if method not in TOKEN_HEAD_METHODS:
        raise ValueError(f"config.json's method {method!r} does not say how to read the model as a classifier "
                         f"(one of: {', '.join(TOKEN_HEAD_METHODS)}, with classifier_from_token)")
    if not (isinstance(tokens, list) and tokens and all(isinstance(token, str) for token in tokens)) or (
            method == "from_2_way_softmax" and len(tokens) != 2):
        need = "two tokens (false, then true)" if method == "from_2_way_softmax" else "a list of tokens"
        raise ValueError(f"classifier_from_token must be {need} for method {method!r}, got {tokens!r:.100}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"classifier_from_token names a token twice: {tokens!r:.100}")
    return list(tokens), method


def answer_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """The vocabulary ids of `tokens` (tokens as the vocabulary spells them, `classifier_from_token`).
    ValueError naming a token the vocabulary does not hold."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    for token, token_id in zip(tokens, ids):
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"classifier_from_token names {token!r}, which is not a token of the model's vocabulary")
    return ids


def split_score_head(weights: Iterable[tuple[str, np.ndarray]], found: dict,
                     token_rows: Callable[[], list[int]] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """`weights` without a classifier's `score.weight` and `score.bias`, which go to
    `found["score"]` and `found["score.bias"]`. With
    `token_rows` (the answer tokens' ids of a causal LM read as a classifier), the rows of those
    tokens of the LM head and of the embedding go to `found[name]` (and the LM head, which the
    pooling runner does not keep, no further)."""
    for name, tensor in weights:
        if name in SCORE_TENSORS or name in SCORE_BIAS_TENSORS:
            found["score" if name in SCORE_TENSORS else "score.bias"] = tensor
            continue
        if token_rows is not None and name in LM_HEAD_TENSORS:
            found[name] = np.asarray(tensor[token_rows()], np.float32)
            if name == LM_HEAD_TENSORS[0]:
                continue
        yield name, tensor
