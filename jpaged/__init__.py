"""jpaged: PagedAttention LLM serving on JAX and Pallas."""

from jpaged.beam_search import BeamSearchParams
from jpaged.engine import LLMEngine
from jpaged.llm import LLM
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput"]
