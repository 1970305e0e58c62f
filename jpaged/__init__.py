"""jpaged: PagedAttention LLM serving on JAX and Pallas.

The public names (`LLM`, `SamplingParams`, ...) load on first use (PEP 562), so importing a
host-side submodule such as `jpaged.block_manager` does not start jax or load the engine.
"""

import importlib

_EXPORTS = {
    "LLM": "jpaged.llm",
    "LLMEngine": "jpaged.engine",
    "SamplingParams": "jpaged.sampling_params",
    "BeamSearchParams": "jpaged.sampling_params",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
    "Logprob": "jpaged.outputs",
    "LoRARequest": "jpaged.lora",
    "PoolingParams": "jpaged.pooling",
    "PoolingRequestOutput": "jpaged.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jpaged' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
