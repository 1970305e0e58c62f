"""One process of a multi-process tensor-parallel run: 2 emulated CPU devices per process, joined
through jax.distributed (gloo collectives, coordinator on localhost); prints the greedy tokens.

    python multiprocess_check.py PROCESS_ID NUM_PROCESSES PORT MODEL_FOLDER
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402

process_id, num_processes, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                           process_id=process_id)

from jpaged import LLM, SamplingParams  # noqa: E402

prompts = json.loads(os.environ["JPAGED_TEST_PROMPTS"])
llm = LLM(folder, tensor_parallel_size=len(jax.devices()), dtype="float32", num_blocks=32, max_num_batched_tokens=16)
outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
print(json.dumps({"devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
                  "tokens": [o.outputs[0].token_ids for o in outputs]}))
