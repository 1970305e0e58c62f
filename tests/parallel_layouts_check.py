"""Run in a subprocess with 8 emulated CPU devices: greedy tokens and per-device bytes of random
dense and mixture-of-experts models under pipeline / expert / tensor parallel layouts, and the
pipeline schedule as it ran for several micro-batch counts, printed as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import hf_greedy, save_random_model  # noqa: E402

from jpaged import LLM, BeamSearchParams, LoRARequest, SamplingParams  # noqa: E402
from jpaged.config import ParallelConfig  # noqa: E402
from jpaged.parallel.pipeline import run_pipeline  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": transformers.LlamaConfig(intermediate_size=128, num_hidden_layers=4, **SMALL),
    "mixtral": transformers.MixtralConfig(intermediate_size=32, num_hidden_layers=4, num_local_experts=8,
                                          num_experts_per_tok=2, sliding_window=None, **SMALL),
    "qwen3_moe": transformers.Qwen3MoeConfig(moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,
                                             num_experts_per_tok=3, norm_topk_prob=True, head_dim=16, **SMALL),
    # attention sinks split with their heads, biased experts split by expert and column, a window of 4
    "gpt_oss": transformers.GptOssConfig(intermediate_size=32, num_hidden_layers=4, num_local_experts=8,
                                         num_experts_per_tok=2, head_dim=16, sliding_window=4, **SMALL),
}
# (tensor, pipeline, expert, data) parallel sizes. A pipeline alone runs in `one_prompt_split` (4
# stages), so each layout here adds a combination.
LAYOUTS = {
    "llama": [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 1, 4)],
    "mixtral": [(1, 1, 1, 1), (1, 1, 8, 1), (2, 2, 2, 1), (1, 1, 2, 2)],
    "qwen3_moe": [(1, 1, 1, 1), (1, 1, 4, 1)],  # tp x pp x ep together: mixtral
    "gpt_oss": [(1, 1, 1, 1), (2, 2, 2, 1)],
}
# Layouts whose engine then loads another random model's weights (`LLM.load_weights`).
LOADED_LAYOUTS = {"llama": [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 1, 4)], "mixtral": [(1, 1, 1, 1), (2, 2, 2, 1)],
                  "gpt_oss-int8": [(1, 1, 1, 1), (2, 2, 2, 1)]}
QUANTIZED_LAYOUTS = {  # int8 weights and KV cache: one device, then tp x pp x ep splitting values and scales
    "mixtral": [(1, 1, 1, 1), (2, 2, 2, 1)],
    "gpt_oss": [(1, 1, 1, 1), (2, 2, 2, 1)],
}


def device_bytes(tree) -> list[int]:
    per_device = [0] * len(jax.devices())
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return per_device


def generate(folder_root: str) -> dict:
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 96, n).tolist()} for n in (21, 16, 5, 9, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    report = {}
    for name, config in CONFIGS.items():
        folder = os.path.join(folder_root, name)
        save_random_model(folder, config, seed=4)
        new_model = save_random_model(folder + "-new", config, seed=9)
        new = new_model.state_dict()
        if name == "llama":
            report["llama/hf-loaded"] = [hf_greedy(new_model, p["prompt_token_ids"], params.max_tokens)
                                         for p in prompts]
        for tp, pp, ep, dp in LAYOUTS[name]:
            llm = LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep,
                      data_parallel_size=dp, dtype="float32", num_blocks=32, max_num_batched_tokens=64)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            engines = getattr(llm.engine, "replicas", [llm.engine])
            state = engines[0].runner.state
            report[f"{name}/{tp}x{pp}x{ep}x{dp}"] = {
                "tokens": [o.outputs[0].token_ids for o in outputs],
                "param_bytes": np.sum([device_bytes(e.runner.state) for e in engines], axis=0).tolist(),
                "kv_bytes": np.sum([device_bytes(e.runner.kv_cache) for e in engines], axis=0).tolist(),
                "generated_per_replica": [e.num_generated_tokens for e in engines],
                "blocks_leaked": sum(e.block_manager.num_blocks - e.block_manager.num_free_blocks for e in engines),
                "model_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
                "layer_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(state["layers"])),
                "expert_bytes": sum(x.nbytes for layer in state["layers"].values() for name, leaf in layer.items()
                                    if name.startswith("expert_") for x in jax.tree.leaves(leaf)),
            }
            if dp > 1:  # each replica's embedding table: its devices and a digest of its values
                report[f"{name}/{tp}x{pp}x{ep}x{dp}"]["replica_embeddings"] = llm.apply_model(lambda model: (
                    sorted(d.id for d in model.embed_tokens[...].devices()),
                    float(np.asarray(model.embed_tokens[...], np.float64).sum())))
            if (tp, pp, ep, dp) in LOADED_LAYOUTS.get(name, []):
                report[f"{name}/{tp}x{pp}x{ep}x{dp}"]["loaded_tokens"] = loaded_tokens(llm, new, prompts, params)
        for tp, pp, ep, dp in QUANTIZED_LAYOUTS.get(name, []):
            llm = LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, expert_parallel_size=ep,
                      dtype="float32", num_blocks=32, max_num_batched_tokens=64, quantization="int8",
                      kv_cache_dtype="int8")
            report[f"{name}/int8-{tp}x{pp}x{ep}x{dp}"] = {
                "tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)],
                "param_bytes": device_bytes(llm.engine.runner.state),
                "kv_cache_bytes": device_bytes(llm.engine.runner.kv_cache),
            }
            if (tp, pp, ep, dp) in LOADED_LAYOUTS.get(f"{name}-int8", []):
                report[f"{name}/int8-{tp}x{pp}x{ep}x{dp}"]["loaded_tokens"] = loaded_tokens(llm, new, prompts, params)
        if name == "llama":
            report["llama/preempted"] = preempted_run(folder, prompts, params)
            report["llama/one-prompt-split"] = one_prompt_split(folder, rng, params)
            report["llama/replica-abort"] = replica_abort(folder, prompts, params)
            report["llama/lora-replicas"] = lora_replicas(folder, prompts, params)
            report["llama/beam-replicas"] = beam_replicas(folder, prompts)
        if name == "qwen3_moe":
            report["qwen3_moe/lora-experts"] = lora_replicas(folder, prompts, params, EXPERT_LORA_LAYOUTS)
    return report


def loaded_tokens(llm, weights: dict, prompts, params) -> list[list[int]]:
    """The tokens of `llm` after it loads `weights` (HF names, torch tensors): all but layer 0's
    in one call (q / k / v and gate / up joined as the model fuses them), then layer 0's one
    tensor a call (each part written into its rows of the split fused projection)."""
    first_layer = [name for name in weights if name.startswith("model.layers.0.")]
    llm.load_weights({name: tensor for name, tensor in weights.items() if name not in first_layer})
    for name in first_layer:
        llm.load_weights({name: weights[name]})
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def preempted_run(folder: str, prompts, params) -> dict:
    """A pipeline short of KV blocks (decodes cut in two): sequences are preempted and recomputed."""
    llm = LLM(folder, pipeline_parallel_size=2, tensor_parallel_size=2, decode_micro_batches=2, dtype="float32",
              num_blocks=6, block_size=8, max_num_batched_tokens=24)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    manager = llm.engine.block_manager
    return {"tokens": [o.outputs[0].token_ids for o in outputs], "num_preemptions": llm.engine.scheduler.num_preemptions,
            "blocks_leaked": manager.num_blocks - manager.num_free_blocks}


def one_prompt_split(folder: str, rng, params) -> dict:
    """One 61-token prompt on one device, and cut into 4 micro-batches over 4 stages."""
    prompt = [{"prompt_token_ids": rng.integers(3, 96, 61).tolist()}]
    tokens = {}
    for layout, kwargs in (("single", {}), ("pp4", dict(pipeline_parallel_size=4, prefill_micro_batches=4))):
        llm = LLM(folder, dtype="float32", num_blocks=32, max_num_batched_tokens=64, **kwargs)
        tokens[layout] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    return tokens


def replica_abort(folder: str, prompts, params) -> dict:
    """Two data-parallel replicas: abort one request mid-way, reuse its id, run the rest out."""
    engine = LLM(folder, data_parallel_size=2, dtype="float32", num_blocks=32, max_num_batched_tokens=64).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    try:
        engine.add_request("r0", prompts[0], params)
        duplicate_error = None
    except ValueError as error:
        duplicate_error = str(error)
    engine.step()
    engine.abort_request("r1")
    seen_after_abort, finished = set(), {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen_after_abort.add(out.request_id)
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    return {"finished": finished, "seen_after_abort": sorted(seen_after_abort), "duplicate_error": duplicate_error,
            "blocks_leaked": [e.block_manager.num_blocks - e.block_manager.num_free_blocks for e in engine.replicas],
            "requests_per_replica": [e.num_generated_tokens > 0 for e in engine.replicas]}


def beam_replicas(folder: str, prompts) -> dict:
    """Beam search over several prompts on one device and on two data-parallel replicas (a
    search's beams fork and free sequences of a request its replica may have reported finished)."""
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    report = {}
    for layout, sizes in (("single", {}), ("dp2", {"data_parallel_size": 2})):
        llm = LLM(folder, dtype="float32", num_blocks=32, max_num_batched_tokens=64, **sizes)
        outputs = llm.beam_search(prompts[:3], params)
        engines = getattr(llm.engine, "replicas", [llm.engine])
        report[layout] = {"beams": [[(s.tokens, round(s.cum_logprob, 4)) for s in out.sequences] for out in outputs],
                          "blocks_leaked": sum(e.block_manager.num_blocks - e.block_manager.num_free_blocks
                                               for e in engines)}
    return report


LORA_LAYOUTS = (("single", {}), ("dp2", {"data_parallel_size": 2}), ("tp2", {"tensor_parallel_size": 2}),
                ("tp2xdp2", {"tensor_parallel_size": 2, "data_parallel_size": 2}))
EXPERT_LORA_LAYOUTS = (("single", {}), ("ep4", {"expert_parallel_size": 4}),
                       ("tp2xep2", {"tensor_parallel_size": 2, "expert_parallel_size": 2}))


def lora_replicas(folder: str, prompts, params, layouts=LORA_LAYOUTS) -> dict:
    """A PEFT LoRA adapter on the attention (and a dense model's MLP) on every other prompt, under
    each of `layouts`."""
    import peft
    import torch

    adapter = folder + "-lora"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = ["q_proj", "v_proj"] + ([] if "moe" in folder else ["down_proj"])
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                         target_modules=targets))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    adapted.save_pretrained(adapter)
    loras = [LoRARequest("a", 1, adapter) if i % 2 == 0 else None for i in range(len(prompts))]
    report = {}
    for layout, sizes in layouts:
        llm = LLM(folder, enable_lora=True, dtype="float32", num_blocks=32, **sizes)
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        engines = getattr(llm.engine, "replicas", [llm.engine])
        report[layout] = {"tokens": [o.outputs[0].token_ids for o in outputs],
                          "blocks_leaked": sum(e.block_manager.num_blocks - e.block_manager.num_free_blocks
                                               for e in engines),
                          "replicas_used": sum(e.num_generated_tokens > 0 for e in engines)}
        if layout == "dp2":
            report["dp2_changes"] = replica_lora_changes(llm.engine, loras[0], prompts, params, folder)
    try:  # 4 shards of 2 KV heads would replicate them
        LLM(folder, enable_lora=True, dtype="float32", num_blocks=32, tensor_parallel_size=4)
    except ValueError as error:
        report["tp4_error"] = str(error)
    return report


def replica_lora_changes(engine, lora, prompts, params, folder) -> dict:
    """Adapter ids per replica after a refused add (its id taken by another folder on one replica)
    and a refused removal (in use on one replica): each changes every replica or none."""
    ids = {"before": [sorted(r.list_loras()) for r in engine.replicas]}
    try:
        engine.add_lora(LoRARequest("other", lora.lora_int_id, folder))
    except ValueError as error:
        ids["add_error"] = str(error)
    ids["after_add"] = [sorted(r.list_loras()) for r in engine.replicas]
    engine.add_request("busy", prompts[0], params, lora_request=lora)
    try:
        engine.remove_lora(lora.lora_int_id)
    except ValueError as error:
        ids["remove_error"] = str(error)
    ids["after_remove"] = [sorted(r.list_loras()) for r in engine.replicas]
    while engine.has_unfinished_requests():
        engine.step()
    ids["removed"] = engine.remove_lora(lora.lora_int_id)
    ids["at_end"] = [sorted(r.list_loras()) for r in engine.replicas]
    return ids


def schedule(num_stages: int = 4) -> dict:
    """Outputs and busy trace of `run_pipeline` on a toy 8-layer stack for M micro-batches."""
    mesh = make_mesh(ParallelConfig(pipeline_parallel_size=num_stages))
    rng = np.random.default_rng(1)
    layers = jnp.asarray(rng.normal(size=(8, 16, 16)) / 4, jnp.float32)
    # Entry j: layer j of every stage, stacked over stages (stage s runs layers 2s and 2s + 1).
    layer_weights = list(layers.reshape(num_stages, -1, 16, 16).swapaxes(0, 1))

    def stage(x, positions, kv_cache, md, weights, model_first_layer=0):
        for w in weights:
            x = jnp.tanh(x @ w) + positions[:, None]
        return x, kv_cache + 1  # the cache counts the layers that ran on each stage

    report = {}
    for m in (1, 2, 4, 8, 16):
        hidden = jnp.asarray(rng.normal(size=(m, 3, 16)), jnp.float32)
        positions = jnp.asarray(rng.integers(0, 5, (m, 3)), jnp.float32) / 10
        expected = jax.vmap(lambda x, p: stage(x, p, 0, None, layers)[0])(hidden, positions)
        out, kv, busy = jax.jit(lambda *a: run_pipeline(stage, mesh, *a))(
            hidden, positions, jnp.zeros(num_stages), None, layer_weights)
        report[m] = {"max_error": float(jnp.max(jnp.abs(out - expected))), "busy": np.asarray(busy).tolist(),
                     "kv": np.asarray(kv).tolist()}
    return report


if __name__ == "__main__":
    print(json.dumps({"generate": generate(sys.argv[1]), "schedule": schedule()}))
