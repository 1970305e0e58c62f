"""The device mesh: named axes for data, pipeline, expert and tensor parallelism over jax devices.

Depends on jax alone and never imports jpaged; the model-specific parallel layers (partition
rules, pipeline and expert-parallel layers) that use this mesh live in `jpaged/parallel/`.
"""
