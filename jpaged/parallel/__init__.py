"""The model's parallel layers over the device mesh (`sharding/mesh.py`): where each parameter and
the KV cache live, the tensor-parallel attention wrapper, the pipeline runner of the decoder's
layers and the expert-parallel mixture-of-experts layer, and the checks that a layout fits a model.

The model runner (`jpaged/model_runner.py`) picks these by the engine's `ParallelConfig` and hands
them to the model (`jpaged/models/llama.py`) as its attention, MoE and layer runner.
"""
