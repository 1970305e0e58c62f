"""Command line: `jpaged generate [PROMPT ...]` prints the model's answers; `jpaged serve` runs
the OpenAI-compatible HTTP server (`jpaged/server/`) on the same engine settings, and `jpaged
run-batch` answers a file of OpenAI batch requests through that server's routes, offline.

With no prompt it asks the default question; with no model it uses the built-in default model.
Prompts go through the chat template when the tokenizer has one (turn off with `--no-chat`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys

from jpaged.images import CONTENT_FORMATS
from jpaged.pooling import RUNNERS
from jpaged.reasoning import REASONING_PARSERS
from jpaged.sampling_params import LOGPROBS_MODES
from jpaged.server.tool_parsers import TOOL_PARSERS

DEFAULT_PROMPT = "What is the capital of France?"
COMMANDS = ("generate", "serve", "run-batch")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine settings `generate` and `serve` share (see `engine_kwargs`)."""
    parser.add_argument("--model", default=None, help="HF model folder, HF hub id (org/name) or .gguf file; unset: the built-in model")
    parser.add_argument("--tokenizer", default=None, help="HF folder or hub id of the tokenizer; unset: the model's own")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub model; unset: main")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float", "half"],
                        help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    parser.add_argument("--quantization", default=None, choices=["int8", "fp8", "gguf"],
                        help="keep the weights as int8 or float8 (e4m3) with a scale per 32 inputs, or a GGUF file's blocks packed")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3", "fp8"],
                        help="keep the KV cache as int8 or float8 (e4m3) with a scale per token and KV head")
    parser.add_argument("--offload-weights", default=None, choices=["host", "disk"],
                        help="keep decoder layers past --device-weight-budget-gib in host memory or memory-mapped "
                             "files and stream them onto the device in every step")
    parser.add_argument("--device-weight-budget-gib", type=float, default=None,
                        help="device memory for weights with --offload-weights; unset: stream every layer")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV cache blocks; unset: as many as --cpu-kv-cache-gib (CPU) or the device's free memory hold")
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=1.0, help="KV cache memory on a CPU, GiB")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of an accelerator's memory the engine may fill (weights, step, KV cache)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV blocks of prompt prefixes seen before")
    parser.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"],
                        help="what a sequence preempted for KV blocks does: recompute its tokens later, or swap its "
                             "blocks to host memory")
    parser.add_argument("--swap-space-gib", type=float, default=1.0, help="host memory for swapped-out blocks, GiB")
    parser.add_argument("--generation-config", default="auto",
                        help="sampling defaults for what requests leave unset: 'auto' (the model's "
                             "generation_config.json), 'none', or a folder holding a generation_config.json")
    parser.add_argument("--runner", default="auto", choices=RUNNERS,
                        help="'pooling' embeds prompts (pooled final hidden states; serve: /v1/embeddings), or "
                             "with a *ForSequenceClassification model classifies them (serve: /classify), "
                             "instead of generating; every pooling model also serves /pooling. 'auto': pooling "
                             "for base models (*Model) and classifiers, else generate")
    parser.add_argument("--pooler-config", type=_json_object, default=None,
                        help='with --runner pooling, the task the model runs and how it pools, as JSON: "task" '
                             '(embed, classify, token_embed, token_classify) and "pooling_type" (LAST, MEAN, CLS, '
                             'ALL), e.g. \'{"task": "token_embed"}\'')
    parser.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                        help="the reasoning model family's <think> markers: structured outputs apply once the "
                             "reasoning ends, and the server answers with reasoning apart from content")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                        help="order of service: arrival, or each request's priority (lower first), then arrival")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per step; unset: 512, or max_model_len for a model that computes each prompt "
                             "in one step (EmbeddingGemma, PaliGemma)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output, in tokens; unset: the model's (lowered to what the KV cache holds)")
    parser.add_argument("--max-logprobs", type=int, default=20,
                        help="most top logprobs a request may ask for per token; -1: the whole vocabulary")
    parser.add_argument("--logprobs-mode", default="raw_logprobs", choices=LOGPROBS_MODES,
                        help="what sampled tokens' logprobs hold: the model's own log-softmax or logits (raw_), or "
                             "those of the distribution drawn from, after penalties, temperature and top-k / top-p "
                             "(processed_)")
    parser.add_argument("--enable-prompt-embeds", action="store_true",
                        help="take prompts as embeddings (serve: /v1/completions' prompt_embeds, base64 torch.save'd "
                             "[length, hidden_size] tensors; read with weights_only, yet only for trusted clients)")
    parser.add_argument("--limit-mm-per-prompt", type=_json_object, default=None,
                        help='most images a prompt may hold, as JSON, e.g. \'{"image": 2}\'; {"image": 0} serves an '
                             "image model's text alone, without loading its vision tower")
    parser.add_argument("--interleave-mm-strings", action="store_true",
                        help="a chat template that takes text gets each image's token where its part is; unset: "
                             "the images a message's text does not name go first, one per line (vLLM's default)")
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="allow sleep / wake_up (serve: POST /sleep, POST /wake_up, GET /is_sleeping), which "
                             "free the device memory of the weights (level 1: kept in host memory; level 2: "
                             "discarded, read again at wake-up) and KV cache between uses")
    parser.add_argument("--profiler-dir", default=None,
                        help="allow jax profiler traces of the engine (serve: POST /start_profile and "
                             "/stop_profile), written under this folder")
    parser.add_argument("--compile-warmup", action="store_true",
                        help="compile every step program before the first request")
    parser.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="keep compiled programs in jpaged's cache directory and load them in later runs")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="devices that split each layer")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="pipeline stages the layers split into")
    parser.add_argument("--expert-parallel-size", type=int, default=1, help="devices that split the experts")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="whole-engine replicas")
    parser.add_argument("--prefill-micro-batches", type=int, default=None,
                        help="micro-batches a pipelined step that prefills is cut into; unset: twice the stages")
    parser.add_argument("--decode-micro-batches", type=int, default=1,
                        help="micro-batches a pipelined decode-only step is cut into")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "pallas", "cpu", "reference"],
                        help="paged attention: auto (Pallas kernels on a GPU, the CPU path on a CPU), or one of them; "
                             "reference is the pure-jnp one")
    parser.add_argument("--enable-lora", action="store_true", help="serve requests through LoRA adapters")
    parser.add_argument("--max-loras", type=int, default=1, help="LoRA adapters usable in one step")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="highest LoRA adapter rank")
    parser.add_argument("--hf-overrides", type=_json_object, default=None,
                        help='keys set over the model\'s config.json, as JSON, e.g. a causal LM read as a reranker: '
                             '\'{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": '
                             '["no", "yes"], "is_original_qwen3_reranker": true}\'')
    parser.add_argument("--speculative-config", type=_json_object, default=None,
                        help='n-gram speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"a LoRA module is NAME=PATH, got {text!r}")
    return name, path


def engine_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for `LLM(model, **kwargs)` / `build_engine`: every flag `_add_engine_args`
    adds, by its config field's name, but the model and -v."""
    flags = argparse.ArgumentParser(add_help=False)
    _add_engine_args(flags)
    return {action.dest: getattr(args, action.dest) for action in flags._actions
            if action.dest not in ("model", "verbose")}


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the HTTP server alone (`serve`)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; the default listens to this machine only")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /v1 routes; when not given, $JPAGED_API_KEY "
                             "if set")
    parser.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                        help="web origin whose pages may call the server from a browser (CORS), repeatable; "
                             "'*' for any")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with --enable-lora)")


def _add_app_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the OpenAI routes, which `serve` and `run-batch` share."""
    parser.add_argument("--served-model-name", default=None, help="model name the API shows; unset: the model's")
    parser.add_argument("--max-queued-requests", type=int, default=256,
                        help="sequences the server holds at once (running or waiting; each prompt and each sample "
                             "counts); more get HTTP 503 (run-batch: wait), a request that alone draws more a 400")
    parser.add_argument("--allowed-local-media-path", default=None, metavar="FOLDER",
                        help="a folder whose images chat requests may name by path or file:// URL; unset: none")
    parser.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                        help="the hosts whose http(s) image URLs chat requests may name (redirects included); "
                             "unset: any")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="name logprobs' tokens 'token_id:N' unless a request's return_tokens_as_token_ids says not")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH", type=_lora_module,
                        help="LoRA adapters (PEFT folders) served under their own model names (with --enable-lora)")
    parser.add_argument("--chat-template", default=None,
                        help="chat template: a Jinja file, or the template itself; unset: the tokenizer's")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="let requests bring their own chat_template (Jinja the server renders)")
    parser.add_argument("--chat-template-content-format", default="auto", choices=CONTENT_FORMATS,
                        help="how the chat template takes message contents: string (text parts joined by "
                             "newlines), openai (lists of parts), auto (lists where the template loops over a "
                             "message's content, else text)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='serve tool_choice "auto": find tool calls in the reply with --tool-call-parser')
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="the model family's tool-call syntax (hermes: <tool_call> JSON </tool_call>; "
                             "llama3_json: a JSON object with name and parameters)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (None: its help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpaged", description="PagedAttention LLM serving on JAX")
    sub = parser.add_subparsers(dest="command")
    shown = dict(formatter_class=_HelpFormatter)
    gen = sub.add_parser("generate", help="generate answers to prompts (the default command)", **shown)
    gen.add_argument("prompts", nargs="*", default=[DEFAULT_PROMPT], help="prompts")
    gen.add_argument("--max-tokens", type=int, default=None,
                     help="most tokens per answer; unset: the model's generation config's max_new_tokens, else 128")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 is greedy; unset: the model's generation config's, else 0")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling, 1 disables it; unset: the model's generation config's, else 1")
    gen.add_argument("--top-k", type=int, default=None,
                     help="keep the k most likely tokens, 0 disables it; unset: the model's generation config's, else 0")
    gen.add_argument("--min-p", type=float, default=None,
                     help="drop tokens below min_p x the top probability; unset: the model's generation config's, else 0")
    gen.add_argument("--seed", type=int, default=None, help="random seed of the sampling")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--no-chat", action="store_true", help="send prompts as raw text")
    gen.add_argument("--image", action="append", default=None, metavar="PATH_OR_URL",
                     help="an image for every prompt, on a model that reads images (LLaVA, Pixtral, Mistral 3, "
                          "Qwen-VL; repeatable): through the chat template it comes before the prompt's text; with "
                          "--no-chat the prompt places it with the model's image token (LLaVA's <image>, Pixtral's "
                          "[IMG], Qwen-VL's <|vision_start|><|image_pad|><|vision_end|>)")
    gen.add_argument("--lora", default=None, metavar="PATH",
                     help="answer through this LoRA adapter (a PEFT folder); turns --enable-lora on")
    _add_engine_args(gen)
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API", **shown)
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="the model, as --model (`jpaged serve org/name`, as `vllm serve`)")
    _add_server_args(serve)
    _add_app_args(serve)
    _add_engine_args(serve)
    batch = sub.add_parser("run-batch", help="answer a file of OpenAI batch requests (JSON lines) as the server would",
                           **shown)
    batch.add_argument("-i", "--input-file", required=True,
                       help='JSON lines {"custom_id", "method": "POST", "url", "body"} (OpenAI\'s batch input); '
                            "'-': standard input")
    batch.add_argument("-o", "--output-file", required=True,
                       help="where the answers go, one JSON line per input line; '-': standard output")
    _add_app_args(batch)
    _add_engine_args(batch)
    for command in (gen, serve, batch):
        command.set_defaults(command_parser=command)
    return parser


def generate(args: argparse.Namespace) -> int:
    from jpaged import LLM, LoRARequest, SamplingParams

    given = {name: value for name, value in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                                  min_p=args.min_p, max_tokens=args.max_tokens).items()
             if value is not None}
    SamplingParams(**given, seed=args.seed, stop=args.stop)  # bad values are refused before the model loads
    lora = LoRARequest("lora", 1, args.lora) if args.lora is not None else None
    llm = LLM(args.model, **{**engine_kwargs(args), **({"enable_lora": True} if lora else {})})
    if lora:
        llm.engine.add_lora(lora)  # a folder the model cannot take is refused before any answer
    # flags first, then the model's generation config (--generation-config), then greedy answers of 128 tokens
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 128, **llm.engine.default_sampling_params, **given},
                            seed=args.seed, stop=args.stop)
    prompts = args.prompts or [DEFAULT_PROMPT]
    use_chat = not args.no_chat and getattr(llm.get_tokenizer(), "chat_template", None)
    images = args.image or []
    if use_chat:
        parts = [{"type": "image_url", "image_url": {"url": image}} for image in images]
        outputs = llm.chat([[{"role": "user", "content": [*parts, {"type": "text", "text": p}] if parts else p}]
                            for p in prompts], params, use_tqdm=False, lora_request=lora)
    else:
        outputs = llm.generate([{"prompt": p, "multi_modal_data": {"image": images}} if images else p for p in prompts],
                               params, use_tqdm=False, lora_request=lora)
    for prompt, output in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(output.outputs[0].text.strip() if use_chat else prompt + output.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and (near := difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.7)) and argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; did you mean {near[0]!r}? (to use it as a prompt: "
              f"jpaged generate {argv[0]!r})", file=sys.stderr)
        return 2
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["generate", *argv]
    args, unknown = _parser().parse_known_args(argv)
    if args.command == "generate" and unknown and not any(item.startswith("-") for item in unknown):
        args.prompts, unknown = [*args.prompts, *unknown], []  # prompts on both sides of the options
    if unknown:  # named by the command's own usage, not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "model_tag", None) is not None:
        if args.model is not None and args.model != args.model_tag:
            args.command_parser.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("jpaged").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        if args.command == "serve":
            from jpaged.server.launch import serve

            return serve(args)
        if args.command == "run-batch":
            from jpaged.server.launch import run_batch_file

            return run_batch_file(args)
        return generate(args)
    except (ValueError, OSError, TypeError) as err:  # bad input, missing or unwritable files
        print(f"error: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """The `jpaged` command: `main`, then a prompt exit. Once the answers are printed and flushed
    nothing is left to save, so the process skips the runtime's teardown (about a second of
    freeing device buffers and thread pools on a CPU)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
