"""Scores of text pairs (vLLM's `LLM.score` and its /score and /rerank routes) on a pooling engine.

Between the scoring APIs (`LLM.score`, `jpaged/server/scoring.py`) and the engine: it checks the
pairs, turns them into pooling requests and the requests' outputs into one score per pair.

- A **cross-encoder** is a sequence classification model with one label (a reranker such as
  bge-reranker or mxbai-rerank). It reads each (query, document) pair as one prompt, and the
  pair's score is the classifier's output for it: the sigmoid of the head's logit, unless
  config.json names another activation (`jpaged/pooling.py`). The prompt is the tokenizer's encoding of the pair,
  `tokenizer(text=query, text_pair=document)`, with whatever separators its template puts
  between and around the two texts (`[CLS] query [SEP] document [SEP]`, `<s> query </s></s>
  document </s>`; none for most decoder tokenizers); where config.json sets `use_sep_token`
  false (an LLM turned reranker) the two texts are joined and encoded as one. As vLLM does.
  Where a chat template is given (a reranker's prompt format, such as Qwen3-Reranker's), it
  renders the pair as a query turn and a document turn instead.
- A **bi-encoder** is an embedding model. It embeds every query and document on its own, and a
  pair's score is the cosine similarity of their embeddings.
- A **late-interaction** model (ColBERT's scoring, Khattab and Zaharia, SIGIR 2020) is an
  embedding model run for `token_embed`: it embeds every token of each query and document on its
  own, and a pair's score is MaxSim: for each query token, its largest dot product with a
  document token (cosines, the rows being normalised), summed over the query's tokens. As vLLM
  scores a `token_embed` model.

Pairs come as vLLM takes them: one query and N documents (1:N, the query is read N times), or N
queries and N documents paired in order (N:N).

Plain Python: no jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jpaged.chat_template import chat_text
from jpaged.pooling import Classifier
from jpaged.sampling_params import truncated_prompt, unicode_text

SCORE_TYPES = {"embed": "bi-encoder", "classify": "cross-encoder", "token_embed": "late-interaction"}  # by pooling task


def score_type(pooling_task: str | None, classifier: Classifier | None) -> str:
    """How an engine of `pooling_task` (None: it generates) scores pairs: "cross-encoder" (a
    classifier of one label), "bi-encoder" (an embedding model) or "late-interaction" (one run
    for `token_embed`). ValueError naming what the engine does instead: generate text, classify
    tokens, or classify into more than one label."""
    if pooling_task is None:
        raise ValueError("scoring needs a model run with runner='pooling' (this one generates text): a cross-encoder "
                         "(a sequence classification model of one label) or an embedding model")
    if pooling_task not in SCORE_TYPES:
        raise ValueError(f"scoring needs a cross-encoder or an embedding model; this engine runs {pooling_task!r}: "
                         "class probabilities per token, from LLM.encode (on the server, POST /pooling)")
    if classifier is not None and len(classifier.labels) != 1:
        raise ValueError(f"scoring needs a classifier of one label (num_labels == 1); this model has "
                         f"{len(classifier.labels)} ({', '.join(classifier.labels)}): use classify")
    return SCORE_TYPES[pooling_task]


def score_pairs(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """The queries and documents of a scoring call, as lists: 1 query (1:N) or as many as the
    documents (N:N). A single text stands for a list of one. ValueError for anything but texts,
    no texts on either side, or counts other than 1:N and N:N."""
    queries, documents = _texts(data_1, "data_1"), _texts(data_2, "data_2")
    if not queries:
        raise ValueError("data_1 is empty: at least one query text is needed")
    if not documents:
        raise ValueError("data_2 is empty: at least one document text is needed")
    if len(queries) > 1 and len(queries) != len(documents):
        raise ValueError(f"got {len(queries)} queries for {len(documents)} documents: pairs are 1:N (one query) or "
                         "N:N (one query per document)")
    return queries, documents


def _texts(data, name: str) -> list[str]:
    items = [data] if isinstance(data, str) else data
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise ValueError(f"{name} must be a text or a list of texts; got {type(data).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{i}] must be a text; got {type(item).__name__} {item!r:.50}")
        unicode_text(f"{name}[{i}]", item)
    return list(items)


def pair_token_ids(tokenizer, query: str, document: str, use_sep_token: bool = True, chat_template: str | None = None,
                   chat_template_kwargs: dict | None = None, max_length: int | None = None) -> list[int]:
    """The prompt token ids a cross-encoder reads for (`query`, `document`) (see the module's
    docstring). With `chat_template` (vLLM applies one only where it is given), the pair is the
    conversation `[{"role": "query", ...}, {"role": "document", ...}]` rendered by it (given
    `chat_template_kwargs`, such as a reranker's `instruction`) and encoded. `max_length`
    (vLLM's `truncate_prompt_tokens`) has the tokenizer cut the encoding to that many tokens,
    as it truncates: a pair's longer text first, keeping the separators; one text at its end.
    An empty document leaves the pair the query alone (the tokenizer drops an empty second
    text). ValueError for a template that fails on the pair, a `max_length` the tokenizer cannot
    meet, or a pair that encodes to no tokens."""
    limit = {} if max_length is None else {"truncation": True, "max_length": max_length}
    if chat_template is not None:
        conversation = [{"role": "query", "content": query}, {"role": "document", "content": document}]
        text = chat_text(tokenizer, conversation, add_generation_prompt=False, chat_template=chat_template,
                         chat_template_kwargs=chat_template_kwargs)
        texts = {"text": text}
    else:
        texts = {"text": query, "text_pair": document} if use_sep_token else {"text": query + document}
    try:
        token_ids = tokenizer(**texts, **limit)["input_ids"]
    except Exception as err:  # the tokenizer's refusal of a length it cannot cut to
        if max_length is None:
            raise
        raise ValueError(f"truncate_prompt_tokens {max_length} cannot be met: {err}") from err
    if max_length is not None and len(token_ids) > max_length:  # the tokenizer logs this and keeps them all
        raise ValueError(f"truncate_prompt_tokens {max_length} cannot be met: the pair keeps {len(token_ids)} tokens "
                         "(its template's and separators' tokens stay)")
    if not token_ids:
        raise ValueError("the pair encodes to no tokens: query and document are both empty")
    return list(token_ids)


def pair_max_length(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The `max_length` of `pair_token_ids` for vLLM's `truncate_prompt_tokens` (-1:
    `max_model_len`; None: no limit). ValueError for 0, below -1 or above `max_model_len`."""
    truncated_prompt([], truncate_prompt_tokens, max_model_len)  # checks it as a prompt's
    if truncate_prompt_tokens is None:
        return None
    return max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens


def truncated_text(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens at most (encoded without special tokens; 0
    keeps it whole): vLLM's `max_tokens_per_query` / `max_tokens_per_doc`. Cut in the text
    before the first token past the limit (before its character, where tokens split one), so
    the kept part reads as the original does; cut again if it then encodes longer."""
    while max_tokens > 0 and text:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= max_tokens:
            break
        end = min(offsets[max_tokens - 1][1], offsets[max_tokens][0])
        text = text[:min(end, len(text) - 1)]
    return text


def cosine_similarity(a: Sequence[float], b: Sequence[float]) -> float:
    """The cosine of the angle between two embeddings (in float64; 0 where one is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return float(np.clip(a @ b / norms, -1.0, 1.0)) if norms > 0 else 0.0


def max_sim(query: np.ndarray, document: np.ndarray) -> float:
    """ColBERT's MaxSim of a query's token embeddings `query` [query_tokens, dim] and a
    document's `document` [document_tokens, dim] (in float64): each query token's largest dot
    product with a document token, summed over the query's tokens."""
    return float((np.asarray(query, np.float64) @ np.asarray(document, np.float64).T).max(axis=1).sum())


def pair_scores(kind: str, outputs: list, num_queries: int) -> list[float]:
    """One score per pair from a scoring call's engine outputs: a cross-encoder's (one output per
    pair) its classifier's single value; a bi-encoder's (the queries' embeddings, then the
    documents') the cosine of the two embeddings `paired` pairs; a late-interaction model's (the
    queries' token embeddings, then the documents') their `max_sim`."""
    if kind == "cross-encoder":
        return [output.outputs.probs[0] for output in outputs]
    if kind == "late-interaction":
        rows = [output.outputs.data for output in outputs]
        return [max_sim(query, document) for query, document in paired(rows[:num_queries], rows[num_queries:])]
    embeddings = [output.outputs.embedding for output in outputs]
    return [cosine_similarity(query, document)
            for query, document in paired(embeddings[:num_queries], embeddings[num_queries:])]


def paired(queries: list, documents: list) -> list[tuple]:
    """(query's, document's) per pair, in the documents' order: a lone query goes with each."""
    return list(zip(queries * len(documents) if len(queries) == 1 else queries, documents))
