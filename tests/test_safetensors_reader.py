"""`read_safetensors`, the reader under every HF folder load: the tensors as saved, and the
caller's jax default device left alone while the reader is suspended between tensors (on a GPU
a leaked CPU default put the model's weights on the host and the KV cache on the device)."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jpaged.loader.hf import read_safetensors


def test_tensors_come_back_as_saved_and_the_default_device_is_untouched(tmp_path):
    rng = np.random.default_rng(7)
    saved = {"a.weight": rng.standard_normal((5, 3)).astype(np.float32),
             "b.weight": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
             "c.bias": rng.integers(-9, 9, (2, 2)).astype(np.int32)}
    path = tmp_path / "model.safetensors"
    save_file(saved, str(path))
    before = jax.config.jax_default_device
    reader = read_safetensors(path)
    seen = {}
    for name, array in reader:
        assert jax.config.jax_default_device is before, f"default device changed while {name} was out"
        seen[name] = array
    assert seen.keys() == saved.keys()
    for name, array in saved.items():
        assert seen[name].dtype == array.dtype and np.array_equal(seen[name], array), name
