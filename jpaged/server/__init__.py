"""The OpenAI-compatible HTTP server (`jpaged serve`): FastAPI routes in front of one engine.

Data flow: an HTTP request is validated into a `protocol` model, turned into prompts
(`prompts`) and `SamplingParams` (`params`), and handed to the `AsyncEngine` (`async_engine`),
whose one background thread steps the engine and feeds each request's outputs back to the event
loop; `completions`, `chat` and `responses` shape those outputs into OpenAI responses or
server-sent event streams (logprobs from `logprobs`; tool calls from `tools` and, under "auto",
`tool_parsers`; a reasoning model's thinking apart from its answer by `jpaged.reasoning`), and
`embeddings` serves a pooling engine's vectors.
`app` wires the routes, the API
key check and the error handlers (`errors`); `metrics` serves Prometheus text; `launch` builds
the engine and runs uvicorn.
"""
